"""The gateway process against a real registry, without workers: auth, CORS, limits, readiness, 503s."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.support import ServiceProcess, free_port

SECRET = "gateway-test-secret"
KEY = "sk-test"


@pytest.fixture
def registry(start_service: Callable[..., ServiceProcess], redis_url: str) -> ServiceProcess:
    return start_service("services.mesh_registry", {
        "AXL_REDIS_URL": redis_url, "AXL_REGISTRY_SECRET": SECRET, "AXL_INSTANCE_TTL_SECONDS": "30",
        "AXL_REGISTRY_KEY_PREFIX": "gateway-test", "AXL_LOG_LEVEL": "warning",
    })


@pytest.fixture
def gateway(start_service: Callable[..., ServiceProcess], registry: ServiceProcess) -> Iterator[ServiceProcess]:
    yield start_service("services.api_gateway", {
        "AXL_REGISTRY_URL": registry.url, "AXL_REGISTRY_SECRET": SECRET, "AXL_API_KEYS": KEY,
        "AXL_CORS_ORIGINS": "http://editor.local",
        "AXL_MAX_BODY_BYTES": "2000", "AXL_LOOKUP_TTL_SECONDS": "0.1", "AXL_LOG_LEVEL": "warning",
    })


def register(registry: ServiceProcess, instance_id: str, url: str) -> None:
    body = {"instance_id": instance_id, "specialist": "coder", "model_id": "axl-coder", "url": url,
            "context_length": 128, "capabilities": ["completion", "chat"], "max_concurrency": 2}
    response = httpx.post(registry.url + "/v1/instances", json=body, headers={"Authorization": f"Bearer {SECRET}"})
    assert response.status_code == 200, response.text


def test_auth_cors_and_open_health(gateway: ServiceProcess) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(gateway.url + "/healthz").status_code == 200
    denied = httpx.get(gateway.url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
    assert httpx.get(gateway.url + "/v1/models", headers=auth).json() == {"object": "list", "data": []}
    preflight = httpx.options(gateway.url + "/v1/chat/completions", headers={
        "Origin": "http://editor.local", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://editor.local"
    # No healthy model yet: not ready.
    assert httpx.get(gateway.url + "/readyz").status_code == 503


def test_errors_are_openai_shaped(gateway: ServiceProcess, registry: ServiceProcess) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    url = gateway.url + "/v1/completions"
    too_big = httpx.post(url, json={"model": "axl-coder", "prompt": "x" * 5000}, headers=auth)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    bad = httpx.post(url, json={"model": "axl-coder", "prompt": "x", "top_p": 0}, headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_p"
    not_json = httpx.post(url, content=b"{", headers={**auth, "Content-Type": "application/json"})
    assert not_json.status_code == 400
    unknown = httpx.post(url, json={"model": "axl-coder", "prompt": "x"}, headers=auth)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"

    # Registered but unreachable replicas: a clean 503 with Retry-After, streamed or not, after trying both.
    register(registry, "dead-1", f"http://127.0.0.1:{free_port()}")
    register(registry, "dead-2", f"http://127.0.0.1:{free_port()}")
    time.sleep(0.2)  # past the gateway's lookup TTL (0.1 s): the 404 above cached an empty model list
    for stream in (False, True):
        answer = httpx.post(url, json={"model": "axl-coder", "prompt": "x", "stream": stream}, headers=auth)
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] and answer.json()["error"]["code"] == "no_healthy_replica"
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'axl_gateway_upstream_failovers_total{model="axl-coder",reason="unreachable"}' in metrics
    assert 'axl_gateway_healthy_workers{model="axl-coder",specialist="coder"} 2.0' in metrics
    assert httpx.get(gateway.url + "/readyz").status_code == 200
