"""Liveness and readiness probes (open: no API key)."""

from __future__ import annotations

from fastapi import APIRouter

from axl_mesh.errors import ServiceUnavailableError
from services.api_gateway.deps import UpstreamDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (touches nothing else)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(upstream: UpstreamDep) -> dict[str, object]:
    """Ready to serve: the registry answers and at least one model has a healthy replica; 503 otherwise."""
    models = await upstream.models()
    if not models:
        raise ServiceUnavailableError("No model has a healthy worker yet.", retry_after_seconds=2, code="no_models")
    return {"status": "ready", "models": len(models)}
