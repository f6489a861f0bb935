"""Per-app metrics registries, route-template labels and the pre-scrape hook."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Gauge

from axl_mesh.errors import install_error_handlers
from axl_mesh.metrics import instrument_requests, mount_metrics


def build_app() -> tuple[FastAPI, list[int]]:
    app = FastAPI()
    install_error_handlers(app)
    registry = CollectorRegistry()
    instrument_requests(app, registry)
    scrapes: list[int] = []
    gauge = Gauge("axl_test_scrapes", "times /metrics was read", registry=registry)

    async def before_scrape() -> None:
        scrapes.append(1)
        gauge.set(len(scrapes))

    mount_metrics(app, registry, before_scrape=before_scrape)

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict:
        return {"id": item_id}

    return app, scrapes


def test_two_apps_in_one_process_keep_separate_counts() -> None:
    (first, _), (second, _) = build_app(), build_app()  # would raise "Duplicated timeseries" on a shared registry
    with TestClient(first) as a, TestClient(second) as b:
        for item_id in (1, 2, 3):
            assert a.get(f"/items/{item_id}").status_code == 200
        b.get("/items/7")
        a_lines = a.get("/metrics").text.splitlines()
        b_lines = b.get("/metrics").text.splitlines()
    # Labelled by the route template, not the raw path.
    assert 'axl_http_requests_total{method="GET",route="/items/{item_id}",status="200"} 3.0' in a_lines
    assert 'axl_http_requests_total{method="GET",route="/items/{item_id}",status="200"} 1.0' in b_lines


def test_errors_and_unmatched_paths_are_counted_without_raw_paths() -> None:
    app, _ = build_app()
    with TestClient(app) as client:
        client.get("/items/not-a-number")
        client.get("/random/path/123")
        text = client.get("/metrics").text
    assert 'axl_http_requests_total{method="GET",route="/items/{item_id}",status="400"} 1.0' in text
    assert 'axl_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert "/random/path" not in text


def test_the_hook_runs_before_each_scrape() -> None:
    app, scrapes = build_app()
    with TestClient(app) as client:
        client.get("/metrics")
        response = client.get("/metrics")
    assert len(scrapes) == 2
    assert "axl_test_scrapes 2.0" in response.text.splitlines()
    assert response.headers["content-type"].startswith("text/plain")
