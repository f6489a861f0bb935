"""Builds the model-worker app: one checkpoint, one specialist, continuous batching behind an internal API; or, with
``AXL_WORKER_MODE=pool``, any model of the model store on demand (services/model_worker/pool.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from axl_mesh.errors import BodySizeLimitMiddleware, install_error_handlers
from axl_mesh.mesh_auth import MeshSecretMiddleware
from axl_mesh.metrics import instrument_requests, mount_metrics
from services.model_worker.metrics import WorkerMetrics
from services.model_worker.pool import ModelPool
from services.model_worker.routes import generate, health, info
from services.model_worker.routes import pool as pool_routes
from services.model_worker.settings import Settings
from services.model_worker.worker import ModelWorker

INTERNAL_PREFIX = "/internal"


def create_app(settings: Settings | None = None) -> FastAPI:
    """The worker app for ``settings`` (read from the environment when not given).

    Starting the app starts loading the checkpoint in the model thread; ``/readyz`` turns 200 when it is loaded.
    """
    settings = settings or Settings()
    metrics_registry = CollectorRegistry()
    metrics = WorkerMetrics.create(metrics_registry)
    # Pool mode: the pool stands where the worker would (lifecycle, readiness, drain); each model it loads is a
    # ModelWorker of its own (services/model_worker/pool.py).
    pool = ModelPool(settings, metrics, metrics_registry) if settings.pool else None
    worker = pool if pool is not None else ModelWorker(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await worker.close()

    app = FastAPI(title="AXL model worker", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.worker = worker
    app.state.pool = pool

    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    # Only the gateway may call /internal/v1/*: it carries the mesh secret. /healthz, /readyz and /metrics stay
    # open for container health checks and Prometheus (deploy/prometheus.yml scrapes without credentials); they
    # tell load and readiness, never a completion. Added after the body limit, so it runs before it: a caller
    # without the secret gets its 401 before any body is read (request metrics still count it).
    app.add_middleware(
        MeshSecretMiddleware, secret=settings.registry_secret.get_secret_value(), path_prefix=INTERNAL_PREFIX
    )
    instrument_requests(app, metrics_registry)

    async def refresh_load_gauges() -> None:
        load = worker.load()
        metrics.running.set(load.running)
        metrics.waiting.set(load.waiting)

    mount_metrics(app, metrics_registry, before_scrape=refresh_load_gauges)
    app.include_router(health.router)
    app.include_router(pool_routes.router if pool is not None else info.router)
    app.include_router(generate.router)
    return app
