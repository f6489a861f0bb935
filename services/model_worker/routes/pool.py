"""A pool worker's own routes (``AXL_WORKER_MODE=pool``): load a model of the store, and say what it holds."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from axl_mesh.registry_schemas import InstanceRegistration
from services.model_worker.pool import ModelPool, PoolInfo

router = APIRouter(prefix="/internal/v1", tags=["internal"])


class LoadRequest(BaseModel):
    model: str = Field(min_length=1, max_length=200, description="a model of the model store")


def _pool(request: Request) -> ModelPool:
    return request.app.state.pool


@router.post("/models/load", response_model=InstanceRegistration)
async def load_model(body: LoadRequest, request: Request) -> InstanceRegistration:
    """Load ``model`` unless it is held (bounded by AXL_POOL_LOAD_TIMEOUT_SECONDS); answers with its registration
    once the registry lists it. 404 model_not_found; 503 + Retry-After: pool_full, model_too_large_for_pool,
    model_load_failed, model_load_timeout, shutting_down."""
    worker = await _pool(request).acquire(body.model)
    return worker.registration()


@router.get("/pool", response_model=PoolInfo)
async def pool_info(request: Request) -> PoolInfo:
    """The models held, each with its estimated memory, idle time and load; the budget and what is used of it."""
    return _pool(request).info()
