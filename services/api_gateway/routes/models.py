"""The models the mesh serves now, as OpenAI model objects (plus specialist, context length, capabilities)."""

from __future__ import annotations

from fastapi import APIRouter

from axl_mesh.errors import ModelNotFoundError
from axl_mesh.protocol import ModelCard, ModelList
from axl_mesh.registry_schemas import ModelSummary
from services.api_gateway.deps import UpstreamDep

router = APIRouter(prefix="/v1/models", tags=["models"])


def _card(summary: ModelSummary) -> ModelCard:
    return ModelCard(
        id=summary.id, created=summary.created, specialist=summary.specialist,
        context_length=summary.context_length, capabilities=summary.capabilities, instances=summary.instances,
    )


@router.get("", response_model=ModelList)
async def list_models(upstream: UpstreamDep) -> ModelList:
    """Models with at least one healthy worker."""
    return ModelList(data=[_card(m) for m in await upstream.models()])


@router.get("/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, upstream: UpstreamDep) -> ModelCard:
    """One model by id (or by its specialist's name); 404 ``model_not_found`` when nothing serves it."""
    models = await upstream.models()
    for summary in [m for m in models if m.id == model_id] or [m for m in models if m.specialist == model_id]:
        return _card(summary)
    raise ModelNotFoundError(model_id)
