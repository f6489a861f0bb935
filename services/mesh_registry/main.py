"""Builds the mesh registry app: where model-worker instances announce themselves and the gateway finds them."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge

from axl_mesh.errors import BodySizeLimitMiddleware, install_error_handlers
from axl_mesh.metrics import instrument_requests, mount_metrics
from axl_mesh.redis_util import create_redis, install_redis_error_handler, redis_is_up
from services.mesh_registry.routes import health, instances, models
from services.mesh_registry.settings import Settings
from services.mesh_registry.store import RegistryStore


@dataclass
class RegistryCounters:
    writes: Counter
    instances: Gauge


def _registry_metrics(registry: CollectorRegistry) -> RegistryCounters:
    return RegistryCounters(
        writes=Counter(
            "axl_registry_writes_total",
            "Registry writes by kind and whether they created the instance",
            ["kind", "created"],
            registry=registry,
        ),
        instances=Gauge(
            "axl_registry_instances",
            "Healthy instances per specialist and model",
            ["specialist", "model"],
            registry=registry,
        ),
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """The registry app for ``settings`` (read from the environment when not given)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Redis is connected lazily, so the process starts (and /healthz answers) while Redis is still down.
        redis = create_redis(settings.redis_url)
        app.state.store = RegistryStore(
            redis, prefix=settings.registry_key_prefix, ttl_seconds=settings.instance_ttl_seconds
        )
        try:
            yield
        finally:
            await redis.aclose()

    app = FastAPI(title="AXL mesh registry", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    metrics_registry = CollectorRegistry()
    app.state.counters = counters = _registry_metrics(metrics_registry)

    install_error_handlers(app)
    install_redis_error_handler(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    instrument_requests(app, metrics_registry)

    async def refresh_instance_gauge() -> None:
        store: RegistryStore = app.state.store
        if not await redis_is_up(store.redis):
            return  # keep the last values rather than failing the scrape
        tally = Tally((r.specialist, r.model_id) for r in await store.instances())
        counters.instances.clear()
        for (specialist, model), count in tally.items():
            counters.instances.labels(specialist=specialist, model=model).set(count)

    mount_metrics(app, metrics_registry, before_scrape=refresh_instance_gauge)
    app.include_router(health.router)
    app.include_router(instances.router)
    app.include_router(models.router)
    return app
