"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter

from axl_mesh.errors import ServiceUnavailableError
from axl_mesh.redis_util import redis_is_up
from services.mesh_registry.deps import StoreDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (does not touch Redis)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(store: StoreDep) -> dict[str, str]:
    """Ready to serve: Redis answers; 503 otherwise."""
    if not await redis_is_up(store.redis):
        raise ServiceUnavailableError("Redis is unreachable.", retry_after_seconds=1)
    return {"status": "ready"}
