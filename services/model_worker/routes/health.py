"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter

from services.model_worker.deps import WorkerDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (the model may still be loading)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(worker: WorkerDep) -> dict[str, str]:
    """Ready to generate: the checkpoint is loaded and the worker is not shutting down; 503 otherwise."""
    if not worker.ready:
        raise worker.not_ready_error()
    return {"status": "ready", "model": worker.model_id}
