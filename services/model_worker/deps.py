"""Dependencies of the worker's routes: the settings and the worker state (model, scheduler, registration)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.model_worker.settings import Settings
from services.model_worker.worker import ModelWorker


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_worker(request: Request) -> ModelWorker:
    return request.app.state.worker


async def serving_worker(request: Request, model: str | None) -> ModelWorker:
    """The worker that serves ``model``: the pinned one, or in a pool the model's own (loaded first if needed)."""
    pool = getattr(request.app.state, "pool", None)
    if pool is None:
        return request.app.state.worker
    return await pool.acquire(model)


SettingsDep = Annotated[Settings, Depends(get_settings)]
WorkerDep = Annotated[ModelWorker, Depends(get_worker)]
