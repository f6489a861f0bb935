"""Worker lifecycle: readiness while the checkpoint loads, registration with a real registry, SIGTERM drain."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.checkpoints import make_tiny_checkpoint
from tests.services.model_worker.conftest import (
    GENERATE,
    MESH_AUTH,
    MESH_SECRET,
    WORKER,
    info,
    ndjson,
    wait_until,
    worker_env,
)
from tests.support import REPO_ROOT, ServiceProcess, free_port

StartService = Callable[..., ServiceProcess]
SECRET = MESH_SECRET  # the registry's and the workers' secret are one


def test_readyz_is_503_until_the_checkpoint_is_loaded(start_service: StartService, tmp_path: Path) -> None:
    checkpoint = tmp_path / "not-trained-yet"
    service = start_service(WORKER, worker_env(checkpoint, AXL_CHECKPOINT_WAIT_SECONDS="60"))
    assert httpx.get(service.url + "/healthz").status_code == 200
    for response in (httpx.get(service.url + "/readyz"),
                     httpx.post(service.url + GENERATE, headers=MESH_AUTH, json={"prompt": "a", "max_tokens": 1})):
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "model_loading"
    make_tiny_checkpoint(checkpoint)  # appears atomically, as a training run writes it
    assert wait_until(lambda: httpx.get(service.url + "/readyz").status_code == 200, timeout_seconds=10)
    served = httpx.post(service.url + GENERATE, headers=MESH_AUTH, json={"prompt": "a", "max_tokens": 1})
    assert served.status_code == 200


def test_a_checkpoint_that_cannot_load_keeps_readyz_503_with_the_reason(
    start_service: StartService, tmp_path: Path
) -> None:
    service = start_service(WORKER, worker_env(tmp_path / "missing"))
    assert wait_until(lambda: httpx.get(service.url + "/readyz").json()["error"]["code"] == "model_load_failed")
    error = httpx.get(service.url + "/readyz").json()["error"]
    assert str(tmp_path / "missing") in error["message"]
    assert httpx.get(service.url + "/healthz").status_code == 200


def test_a_worker_refuses_to_start_for_an_unknown_specialist(tiny_checkpoint: Path) -> None:
    env = {**worker_env(tiny_checkpoint, AXL_SPECIALIST="astrologer"), "AXL_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "-m", WORKER], cwd=REPO_ROOT, env=env, capture_output=True, timeout=60)
    assert done.returncode != 0
    assert b"unknown specialist 'astrologer'" in done.stderr


def _registry(start_service: StartService, redis_url: str) -> ServiceProcess:
    # A long TTL: only an explicit deregistration can make an instance disappear within these tests.
    return start_service("services.mesh_registry", {
        "AXL_REDIS_URL": redis_url, "AXL_REGISTRY_SECRET": SECRET, "AXL_INSTANCE_TTL_SECONDS": "60",
        "AXL_LOG_LEVEL": "warning",
    })


def _instances(registry: ServiceProcess) -> list[dict]:
    return httpx.get(registry.url + "/v1/instances", params={"model": "axl-coder"}, headers=MESH_AUTH).json()["data"]


def test_registers_heartbeats_and_deregisters_on_sigterm(
    start_service: StartService, redis_url: str, tiny_checkpoint: Path
) -> None:
    registry = _registry(start_service, redis_url)
    worker = start_service(WORKER, worker_env(
        tiny_checkpoint, AXL_REGISTRY_URL=registry.url, AXL_REGISTRY_SECRET=SECRET, AXL_HEARTBEAT_SECONDS="0.2",
        AXL_MAX_BATCH="3",
    ))
    assert wait_until(lambda: len(_instances(registry)) == 1, timeout_seconds=15)
    [instance] = _instances(registry)
    described = info(worker.url)
    assert instance["url"] == worker.url
    assert instance["specialist"] == "coder"
    assert instance["context_length"] == 128
    assert instance["capabilities"] == ["completion", "chat"]
    assert instance["checkpoint_version"] == described["checkpoint_version"]
    assert instance["max_concurrency"] == 3
    # Heartbeats carry the live load.
    with httpx.stream("POST", worker.url + GENERATE, headers=MESH_AUTH, timeout=30,
                      json={"prompt": "a", "max_tokens": 100_000, "ignore_eos": True, "stream": True}) as response:
        lines = response.iter_lines()  # keep the iterator: dropping it closes the connection (a disconnect)
        assert next(lines)
        assert wait_until(lambda: _instances(registry)[0]["load"]["running"] == 1)
    assert wait_until(lambda: _instances(registry)[0]["load"]["running"] == 0)

    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: _instances(registry) == [], timeout_seconds=5)
    worker.proc.wait(timeout=15)


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(
    start_service: StartService, redis_url: str, tiny_checkpoint: Path
) -> None:
    registry = _registry(start_service, redis_url)
    worker = start_service(WORKER, worker_env(
        tiny_checkpoint, AXL_REGISTRY_URL=registry.url, AXL_REGISTRY_SECRET=SECRET, AXL_DRAIN_SECONDS="30",
    ))
    assert wait_until(lambda: len(_instances(registry)) == 1, timeout_seconds=15)
    max_tokens = 1500
    lines: list[dict] = []
    started = threading.Event()

    def consume() -> None:
        body = {"prompt": "a", "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "seed": 0}
        with httpx.stream("POST", worker.url + GENERATE, headers=MESH_AUTH, json=body, timeout=60) as response:
            started.set()
            lines.extend(ndjson(response))

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert started.wait(15)
    assert wait_until(lambda: info(worker.url)["running"] == 1)
    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: _instances(registry) == [], timeout_seconds=5)
    refused = httpx.post(worker.url + GENERATE, headers=MESH_AUTH, json={"prompt": "a", "max_tokens": 1})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "shutting_down"
    assert httpx.get(worker.url + "/readyz").status_code == 503
    consumer.join(60)
    assert lines[-1]["finish_reason"] == "length"
    assert lines[-1]["usage"]["completion_tokens"] == max_tokens
    worker.proc.wait(timeout=15)
