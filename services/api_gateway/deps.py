"""Dependencies of the gateway's routes: settings, the upstream (workers) and metrics (API keys: ``auth.py``).

All ``async def``: FastAPI runs plain ``def`` dependencies in a thread pool, a thread hop per dependency per
request, which was most of the gateway's added latency.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.api_gateway.metrics import GatewayMetrics
from services.api_gateway.settings import Settings
from services.api_gateway.upstream import Upstream


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_upstream(request: Request) -> Upstream:
    return request.app.state.upstream


async def get_metrics(request: Request) -> GatewayMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
UpstreamDep = Annotated[Upstream, Depends(get_upstream)]
MetricsDep = Annotated[GatewayMetrics, Depends(get_metrics)]
