"""Dependencies of the gateway's routes: settings, the upstream (workers), metrics and the API-key check.

All ``async def``: FastAPI runs plain ``def`` dependencies in a thread pool, a thread hop per dependency per
request, which was most of the gateway's added latency.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from axl_mesh.errors import AuthenticationError
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


async def require_api_key(request: Request) -> None:
    """With ``AXL_API_KEYS`` set, every /v1 call needs ``Authorization: Bearer <one of them>``."""
    keys: list[bytes] = request.app.state.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("Missing API key: send 'Authorization: Bearer <key>'.")
    given = token.strip().encode()
    # Compare against every key (no early exit) so timing says nothing about which key is close.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    if not matched:
        raise AuthenticationError("Incorrect API key provided.")


ApiKeyAuth = Depends(require_api_key)
