"""The registry's HTTP API against a real registry process and a real Redis."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.services.mesh_registry.conftest import AUTH, TTL_SECONDS, registration
from tests.support import ServiceProcess


@pytest.fixture
def api(registry: ServiceProcess, redis_url: str) -> httpx.Client:
    """An HTTP client on the registry, Redis emptied first."""
    with httpx.Client(base_url=registry.url, timeout=5.0) as client:
        yield client


def assert_openai_error(response: httpx.Response, status: int, type_: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_
    assert body["error"]["message"]
    return body["error"]


def test_register_then_lookup_and_list_models(api: httpx.Client) -> None:
    ack = api.post("/v1/instances", json=registration(), headers=AUTH)
    assert ack.status_code == 200, ack.text
    assert ack.json()["created"] is True
    assert ack.json()["ttl_seconds"] == TTL_SECONDS

    again = api.post("/v1/instances", json=registration(), headers=AUTH)
    assert again.json()["created"] is False

    found = api.get("/v1/instances", headers=AUTH, params={"model": "axl-micro-python"}).json()
    assert found["object"] == "list"
    [instance] = found["data"]
    assert instance["instance_id"] == "worker-1"
    assert instance["url"] == "http://127.0.0.1:8901"
    assert instance["capabilities"] == ["completion", "fim"]
    assert instance["load"] == {"running": 0, "waiting": 0}
    assert instance["expires_at"] > instance["last_heartbeat"] >= instance["registered_at"]

    assert api.get("/v1/instances", headers=AUTH, params={"model": "other-model"}).json()["data"] == []
    models = api.get("/v1/models", headers=AUTH).json()
    assert models["object"] == "list"
    assert models["data"] == [
        {
            "id": "axl-micro-python",
            "object": "model",
            "created": models["data"][0]["created"],
            "owned_by": "axl",
            "specialist": "python",
            "context_length": 1024,
            "capabilities": ["completion", "fim"],
            "instances": 1,
        }
    ]


def test_models_summarise_their_instances(api: httpx.Client) -> None:
    api.post("/v1/instances", json=registration("a", context_length=2048, capabilities=["fim", "chat"]), headers=AUTH)
    api.post("/v1/instances", json=registration("b", context_length=1024, capabilities=["fim"]), headers=AUTH)
    api.post("/v1/instances", json=registration("c", model_id="axl-micro-sql", specialist="sql"), headers=AUTH)

    models = {m["id"]: m for m in api.get("/v1/models", headers=AUTH).json()["data"]}
    assert set(models) == {"axl-micro-python", "axl-micro-sql"}
    python = models["axl-micro-python"]
    assert (python["instances"], python["context_length"], python["capabilities"]) == (2, 1024, ["fim"])
    assert models["axl-micro-sql"]["specialist"] == "sql"


def test_lookup_filters_by_specialist_and_orders_least_busy_first(api: httpx.Client) -> None:
    busy = registration("busy", load={"running": 4, "waiting": 2})
    idle = registration("idle", load={"running": 1, "waiting": 0})
    sql = registration("sql-1", model_id="axl-micro-sql", specialist="sql")
    for body in (busy, idle, sql):
        assert api.post("/v1/instances", json=body, headers=AUTH).status_code == 200

    by_model = api.get("/v1/instances", headers=AUTH, params={"model": "axl-micro-python"}).json()["data"]
    assert [i["instance_id"] for i in by_model] == ["idle", "busy"]
    by_specialist = api.get("/v1/instances", headers=AUTH, params={"specialist": "sql"}).json()["data"]
    assert [i["instance_id"] for i in by_specialist] == ["sql-1"]
    both = api.get("/v1/instances", headers=AUTH,
                   params={"model": "axl-micro-python", "specialist": "sql"}).json()["data"]
    assert both == []
    everything = api.get("/v1/instances", headers=AUTH).json()["data"]
    assert {i["instance_id"] for i in everything} == {"busy", "idle", "sql-1"}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-secret"}, {"Authorization": "Basic dGVzdDp0ZXN0"}, {"Authorization": "Bearer"}],
    ids=["missing", "wrong", "basic-scheme", "empty-token"],
)
def test_writes_without_the_secret_are_401(api: httpx.Client, headers: dict[str, str]) -> None:
    for response in (
        api.post("/v1/instances", json=registration(), headers=headers),
        api.put("/v1/instances/worker-1/heartbeat", json=registration(), headers=headers),
        api.delete("/v1/instances/worker-1", headers=headers),
    ):
        error = assert_openai_error(response, 401, "authentication_error")
        assert error["code"] == "invalid_api_key"
    assert api.get("/v1/instances", headers=AUTH).json()["data"] == []


@pytest.mark.parametrize("path", ["/v1/instances", "/v1/models"])
def test_reads_without_the_secret_are_401(api: httpx.Client, path: str) -> None:
    api.post("/v1/instances", json=registration(), headers=AUTH)
    for headers in ({}, {"Authorization": "Bearer wrong-secret"}):
        error = assert_openai_error(api.get(path, headers=headers), 401, "authentication_error")
        assert "AXL_REGISTRY_SECRET" in error["message"] or "secret" in error["message"]
    assert api.get(path, headers=AUTH).status_code == 200


def test_a_registered_instance_cannot_be_hijacked_without_the_secret(api: httpx.Client) -> None:
    api.post("/v1/instances", json=registration(), headers=AUTH)
    stray = registration(url="http://10.0.0.66:9999")
    assert api.put("/v1/instances/worker-1/heartbeat", json=stray).status_code == 401
    assert api.post("/v1/instances", json=stray, headers={"Authorization": "Bearer nope"}).status_code == 401
    [instance] = api.get("/v1/instances", headers=AUTH).json()["data"]
    assert instance["url"] == "http://127.0.0.1:8901"


def test_heartbeats_keep_an_instance_alive_and_report_its_load(api: httpx.Client) -> None:
    api.post("/v1/instances", json=registration(), headers=AUTH)
    deadline = time.monotonic() + 2 * TTL_SECONDS
    beat = 0
    while time.monotonic() < deadline:
        beat += 1
        body = registration(load={"running": beat, "waiting": 1})
        response = api.put("/v1/instances/worker-1/heartbeat", json=body, headers=AUTH)
        assert response.status_code == 200, response.text
        assert response.json()["created"] is False
        time.sleep(TTL_SECONDS / 4)
    [instance] = api.get("/v1/instances", headers=AUTH, params={"model": "axl-micro-python"}).json()["data"]
    assert instance["load"] == {"running": beat, "waiting": 1}


def test_an_instance_that_stops_heartbeating_disappears_after_the_ttl(api: httpx.Client) -> None:
    api.post("/v1/instances", json=registration(), headers=AUTH)
    assert len(api.get("/v1/instances", headers=AUTH, params={"model": "axl-micro-python"}).json()["data"]) == 1
    time.sleep(TTL_SECONDS + 0.3)
    assert api.get("/v1/instances", headers=AUTH, params={"model": "axl-micro-python"}).json()["data"] == []
    assert api.get("/v1/instances", headers=AUTH, params={"specialist": "python"}).json()["data"] == []
    assert api.get("/v1/models", headers=AUTH).json()["data"] == []


def test_a_heartbeat_recreates_an_instance_the_registry_lost(api: httpx.Client) -> None:
    response = api.put("/v1/instances/worker-9/heartbeat", json=registration("worker-9"), headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["created"] is True
    assert [i["instance_id"] for i in api.get("/v1/instances", headers=AUTH).json()["data"]] == ["worker-9"]


def test_a_heartbeat_must_name_the_instance_of_its_url(api: httpx.Client) -> None:
    response = api.put("/v1/instances/worker-1/heartbeat", json=registration("worker-2"), headers=AUTH)
    error = assert_openai_error(response, 400, "invalid_request_error")
    assert error["param"] == "instance_id"
    assert api.get("/v1/instances", headers=AUTH).json()["data"] == []


def test_reasserting_a_new_model_moves_the_instance(api: httpx.Client) -> None:
    api.post("/v1/instances", json=registration(), headers=AUTH)
    moved = registration(model_id="axl-micro-python-ft", specialist="python-ft")
    assert api.put("/v1/instances/worker-1/heartbeat", json=moved, headers=AUTH).json()["created"] is False
    assert api.get("/v1/instances", headers=AUTH, params={"model": "axl-micro-python"}).json()["data"] == []
    assert api.get("/v1/instances", headers=AUTH, params={"specialist": "python"}).json()["data"] == []
    [instance] = api.get("/v1/instances", headers=AUTH, params={"model": "axl-micro-python-ft"}).json()["data"]
    assert instance["specialist"] == "python-ft"
    assert [m["id"] for m in api.get("/v1/models", headers=AUTH).json()["data"]] == ["axl-micro-python-ft"]


def test_deregister_removes_the_instance_now(api: httpx.Client) -> None:
    api.post("/v1/instances", json=registration(), headers=AUTH)
    assert api.delete("/v1/instances/worker-1", headers=AUTH).status_code == 204
    assert api.get("/v1/instances", headers=AUTH).json()["data"] == []
    assert api.get("/v1/models", headers=AUTH).json()["data"] == []
    error = assert_openai_error(api.delete("/v1/instances/worker-1", headers=AUTH), 404, "invalid_request_error")
    assert error["param"] == "instance_id"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (registration(context_length=0), "context_length"),
        (registration(url="ftp://host/x"), "url"),
        (registration(instance_id="has spaces"), "instance_id"),
        (registration(max_concurrency="many"), "max_concurrency"),
        (registration(load={"running": -1}), "load.running"),
        (registration(capabilities=["fim", "Bad Cap"]), "capabilities[1]"),
        ({k: v for k, v in registration().items() if k != "model_id"}, "model_id"),
    ],
    ids=["context", "url", "id", "concurrency", "load", "capability", "missing-model"],
)
def test_invalid_registrations_are_400_naming_the_field(api: httpx.Client, body: dict, param: str) -> None:
    error = assert_openai_error(api.post("/v1/instances", json=body, headers=AUTH), 400, "invalid_request_error")
    assert error["param"] == param
    assert param.split("[")[0].split(".")[0] in error["message"]


def test_malformed_json_and_bad_query_are_400(api: httpx.Client) -> None:
    response = api.post(
        "/v1/instances", content=b'{"instance_id": ', headers={**AUTH, "Content-Type": "application/json"}
    )
    assert assert_openai_error(response, 400, "invalid_request_error")["code"] == "invalid_json"
    bad = api.get("/v1/instances", headers=AUTH, params={"model": "bad model!"})
    error = assert_openai_error(bad, 400, "invalid_request_error")
    assert error["param"] == "model"


def test_unknown_routes_and_methods_get_the_openai_shape(api: httpx.Client) -> None:
    error = assert_openai_error(api.get("/v1/nothing-here"), 404, "invalid_request_error")
    assert "/v1/nothing-here" in error["message"]
    response = api.delete("/v1/models")
    assert assert_openai_error(response, 405, "invalid_request_error")["code"] == "method_not_allowed"
    assert response.headers["allow"] == "GET"


def test_an_oversized_body_is_413(api: httpx.Client) -> None:
    body = registration(checkpoint_version="x" * 100, capabilities=["c"] * 20_000)
    error = assert_openai_error(api.post("/v1/instances", json=body, headers=AUTH), 413, "invalid_request_error")
    assert error["code"] == "request_too_large"


def test_health_and_readiness(api: httpx.Client) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").json() == {"status": "ready"}


def test_metrics_count_instances_and_requests(api: httpx.Client) -> None:
    api.post("/v1/instances", json=registration("a"), headers=AUTH)
    api.post("/v1/instances", json=registration("b"), headers=AUTH)
    api.post("/v1/instances", json=registration("c", model_id="axl-micro-sql", specialist="sql"), headers=AUTH)
    api.get("/v1/nothing-here")

    response = api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    lines = response.text.splitlines()
    assert 'axl_registry_instances{model="axl-micro-python",specialist="python"} 2.0' in lines
    assert 'axl_registry_instances{model="axl-micro-sql",specialist="sql"} 1.0' in lines
    assert any(
        line.startswith('axl_http_requests_total{method="POST",route="/v1/instances",status="200"}') for line in lines
    )
    assert any(line.startswith('axl_http_requests_total{method="GET",route="unmatched",status="404"}') for line in lines)
    assert any(line.startswith('axl_registry_writes_total{created="true",kind="register"}') for line in lines)

    # After the instances expire, the gauge forgets them.
    time.sleep(TTL_SECONDS + 0.3)
    assert "axl_registry_instances{" not in api.get("/metrics").text
