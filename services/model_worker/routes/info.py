"""What this worker serves and how busy it is."""

from __future__ import annotations

from fastapi import APIRouter

from axl_mesh.worker_protocol import WorkerInfo
from services.model_worker.deps import WorkerDep

router = APIRouter(prefix="/internal/v1", tags=["internal"])


@router.get("/info", response_model=WorkerInfo)
async def info(worker: WorkerDep) -> WorkerInfo:
    """Model id, specialist, context length, capabilities and live load (running, waiting)."""
    return worker.info()
