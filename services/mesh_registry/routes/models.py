"""The models the mesh serves now."""

from __future__ import annotations

from fastapi import APIRouter

from axl_mesh.registry_schemas import ModelList
from services.mesh_registry.deps import ReaderAuth, StoreDep

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList, dependencies=[ReaderAuth])
async def list_models(store: StoreDep) -> ModelList:
    """Distinct models with at least one healthy instance, with specialist, context and capabilities."""
    return ModelList(data=await store.models())
