"""Tiny checkpoints (random weights) and a standalone worker process shared by this folder's HTTP tests."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.checkpoints import make_tiny_checkpoint
from tests.support import ServiceProcess

WORKER = "services.model_worker"
GENERATE = "/internal/v1/generate"
# The mesh secret every worker requires; /internal/v1/* calls carry it (the gateway does, see worker_client.py).
MESH_SECRET = "test-registry-secret"
MESH_AUTH = {"Authorization": f"Bearer {MESH_SECRET}"}


def worker_env(checkpoint: Path | str, **extra: str) -> dict[str, str]:
    """Environment of a standalone worker (no registry) on one thread, for tests."""
    return {
        "AXL_CHECKPOINT": str(checkpoint),
        "AXL_SPECIALIST": "coder",
        "AXL_REGISTRY_URL": "",
        "AXL_REGISTRY_SECRET": MESH_SECRET,
        "AXL_NUM_THREADS": "1",
        "AXL_LOG_LEVEL": "warning",
        **extra,
    }


def wait_ready(url: str, timeout_seconds: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if httpx.get(url + "/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"{url} was not ready within {timeout_seconds}s")


def wait_until(predicate, timeout_seconds: float = 5.0, interval: float = 0.02) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def info(url: str) -> dict[str, Any]:
    response = httpx.get(url + "/internal/v1/info", headers=MESH_AUTH)
    response.raise_for_status()
    return response.json()


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.iter_lines() if line]


def stream_lines(url: str, body: dict[str, Any], timeout: float = 60.0) -> list[dict[str, Any]]:
    with httpx.stream("POST", url + GENERATE, json={**body, "stream": True}, headers=MESH_AUTH,
                      timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("application/x-ndjson")
        return ndjson(response)


def metric_value(url: str, name: str, labels: str = "") -> float:
    """The value of one sample in /metrics, e.g. metric_value(url, "axl_worker_requests_total", 'status="x"')."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset (128-byte window), random weights, no fill-in-the-middle."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def fim_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-fim", seed=1, fim=True)


@pytest.fixture(scope="module")
def worker(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One standalone worker (4 batch rows) for the module, ready to generate."""
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    env = worker_env(tiny_checkpoint, AXL_MAX_BATCH="4", AXL_MAX_QUEUE="8")
    with ServiceProcess(WORKER, env, log_path=log_path) as service:
        wait_ready(service.url)
        yield service
