"""Prometheus helpers: each app owns one ``CollectorRegistry`` (so several apps in one process never collide),
counts its requests by route template, and serves ``/metrics``.

    registry = CollectorRegistry()
    instrument_requests(app, registry)
    mount_metrics(app, registry, before_scrape=refresh_gauges)   # optional async hook
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ScrapeHook = Callable[[], Awaitable[None]]


def mount_metrics(
    app: FastAPI, registry: CollectorRegistry, *, path: str = "/metrics", before_scrape: ScrapeHook | None = None
) -> None:
    """Serve ``registry`` in the Prometheus text format at ``path``; ``before_scrape`` refreshes gauges first."""

    async def metrics() -> Response:
        """Prometheus metrics of this service."""
        if before_scrape is not None:
            await before_scrape()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route(path, metrics, methods=["GET"], include_in_schema=False)


class RequestMetricsMiddleware:
    """Counts requests and their latency, labelled by method, route template (not raw path) and status."""

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees if the app raises before answering
        started = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            # The router writes the matched route into the (shared) scope; unmatched paths share one label
            # so random URLs cannot blow up the label cardinality.
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.requests.labels(method=method, route=template, status=str(status)).inc()
            self.latency.labels(method=method, route=template).observe(time.perf_counter() - started)


def instrument_requests(app: FastAPI, registry: CollectorRegistry) -> None:
    """Add ``axl_http_requests_total`` and ``axl_http_request_duration_seconds`` for this app to ``registry``."""
    requests = Counter(
        "axl_http_requests_total",
        "HTTP requests by method, route and status",
        ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram(
        "axl_http_request_duration_seconds",
        "HTTP request latency by method and route",
        ["method", "route"],
        registry=registry,
    )
    app.add_middleware(RequestMetricsMiddleware, requests=requests, latency=latency)
