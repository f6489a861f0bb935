"""Builds the API gateway app: the OpenAI-compatible front door of the mesh (the only service users talk to)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CollectorRegistry

from axl_mesh.errors import BodySizeLimitMiddleware, install_error_handlers
from axl_mesh.jobs import JobsSettings
from axl_mesh.mesh_auth import MeshSecretMiddleware
from axl_mesh.metrics import instrument_requests, mount_metrics
from axl_mesh.model_store import ModelStore
from axl_mesh.protocol import PROMPT_TRUNCATED_HEADER
from axl_mesh.redis_util import install_redis_error_handler
from axl_mesh.registry_client import CachedLookup, RegistryClient, RegistryError
from axl_mesh.registry_schemas import InstanceRecord
from services.api_gateway.auth import ApiKeyMiddleware
from services.api_gateway.console import install_console
from services.api_gateway.exposure import HostCheckMiddleware, host_check_needed
from services.api_gateway.metrics import AgentMetrics, GatewayMetrics
from services.api_gateway.on_demand import OnDemandLoader
from services.api_gateway.openapi import install_openapi
from services.api_gateway.routes import ROUTERS, health
from services.api_gateway.routes import model_store as model_store_routes
from services.api_gateway.routes.agent import log_sandbox_status
from services.api_gateway.settings import Settings
from services.api_gateway.upstream import Upstream
from services.api_gateway.worker_client import WorkerClient


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway app for ``settings`` (read from the environment when not given)."""
    settings = settings or Settings()
    metrics_registry = CollectorRegistry()
    metrics = GatewayMetrics.create(metrics_registry)

    def count_failover(model_id: str, instance: InstanceRecord, reason: str) -> None:
        metrics.failovers.labels(model=model_id, reason=reason).inc()

    def count_on_demand_load(model_id: str, outcome: str) -> None:
        metrics.on_demand_loads.labels(outcome=outcome).inc()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = RegistryClient(
            settings.registry_url,
            settings.registry_secret_value(),
            timeout_seconds=settings.connect_timeout_seconds + 3,
        )
        await asyncio.to_thread(log_sandbox_status)
        http = WorkerClient(
            mesh_secret=settings.registry_secret_value(),
            connect_timeout=settings.connect_timeout_seconds,
            read_timeout=settings.read_timeout_seconds,
            max_connections=settings.max_upstream_connections,
        )
        lookup = CachedLookup(registry, ttl_seconds=settings.lookup_ttl_seconds)
        on_demand = OnDemandLoader(
            lookup, http, timeout_seconds=settings.on_demand_load_timeout_seconds, on_load=count_on_demand_load
        )
        app.state.upstream = Upstream(
            lookup,
            http,
            cooldown_seconds=settings.failed_instance_cooldown_seconds,
            on_failover=count_failover,
            stored_models=model_store.entries,
            on_demand=on_demand,
        )
        try:
            yield
        finally:
            await http.aclose()
            await registry.aclose()

    app = FastAPI(
        title="AXL Mesh API",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible API of the AXL Mesh code models.",
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.agent_metrics = AgentMetrics.create(metrics_registry)
    app.state.api_keys = [key.encode() for key in settings.api_key_list()]

    install_error_handlers(app)
    install_redis_error_handler(app)  # Redis down (the job routes): 503 + Retry-After, not a 500
    # Uploads have their own, larger limit (plus room for the multipart framing); the files route checks the file.
    jobs_settings = JobsSettings()
    model_store = ModelStore(jobs_settings.resolved_model_store_dir)
    app.state.model_store = model_store  # also served to pool workers elsewhere (routes/model_store.py)
    upload_limit = jobs_settings.max_file_bytes + (1 << 20)
    app.add_middleware(
        BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes, path_limits={"/v1/files": upload_limit}
    )
    if host_check_needed(settings):
        # Open (no API keys) on loopback: refuse other Host names before any body is read (DNS rebinding).
        app.add_middleware(HostCheckMiddleware, extra_hosts=settings.allowed_host_list())
    # Outside the body limit and the routes: a request without a valid key gets its 401 before its body is read.
    app.add_middleware(ApiKeyMiddleware, keys=app.state.api_keys)
    # /internal/*: the model store's files for pool workers on other hosts; the mesh secret only, checked before
    # any route runs (as on the workers).
    app.add_middleware(
        MeshSecretMiddleware, secret=settings.registry_secret.get_secret_value(), path_prefix="/internal"
    )
    install_console(app, settings)  # /ui: the same keys through a login session (services/api_gateway/console)
    instrument_requests(app, metrics_registry)
    if settings.cors_origin_list():
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list(),
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["x-axl-routed-to", "x-axl-routing-reason", PROMPT_TRUNCATED_HEADER, "Retry-After"],
        )

    async def refresh_worker_gauges() -> None:
        try:
            models = await app.state.upstream.lookup.models()
        except RegistryError:
            return  # keep the last values rather than failing the scrape
        metrics.healthy_workers.clear()
        for model in models:
            metrics.healthy_workers.labels(specialist=model.specialist, model=model.id).set(model.instances)

    mount_metrics(app, metrics_registry, before_scrape=refresh_worker_gauges)
    app.include_router(health.router)
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(model_store_routes.router, include_in_schema=False)  # internal: not the public API
    install_openapi(app)
    return app
