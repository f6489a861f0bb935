"""The worker's internal API answers only callers that carry the mesh secret; health and metrics stay open."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.services.model_worker.conftest import GENERATE, MESH_AUTH, WORKER, worker_env
from tests.support import REPO_ROOT, ServiceProcess, free_port

WRONG = [{}, {"Authorization": "Bearer not-the-mesh-secret"}, {"Authorization": "Basic dGVzdDp0ZXN0"}]


@pytest.mark.parametrize("headers", WRONG, ids=["missing", "wrong", "basic-scheme"])
def test_internal_calls_without_the_mesh_secret_are_401(worker: ServiceProcess, headers: dict[str, str]) -> None:
    body = {"prompt": "a", "max_tokens": 1}
    for response in (
        httpx.post(worker.url + GENERATE, json=body, headers=headers, timeout=30),
        httpx.post(worker.url + GENERATE, json={**body, "stream": True}, headers=headers, timeout=30),
        httpx.get(worker.url + "/internal/v1/info", headers=headers),
    ):
        assert response.status_code == 401, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.post(worker.url + GENERATE, json=body, headers=MESH_AUTH, timeout=30).status_code == 200


def test_a_caller_without_the_secret_is_refused_before_its_body_is_looked_at(worker: ServiceProcess) -> None:
    # Not JSON: a caller with the secret gets a 400, one without gets the 401 (the check runs before the body).
    broken = {"content": b"{", "headers": {"Content-Type": "application/json"}}
    assert httpx.post(worker.url + GENERATE, **broken).status_code == 401
    with_secret = httpx.post(worker.url + GENERATE, content=b"{",
                             headers={**MESH_AUTH, "Content-Type": "application/json"})
    assert with_secret.status_code == 400


def test_health_and_metrics_stay_open_for_probes_and_prometheus(worker: ServiceProcess) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(worker.url + path).status_code == 200, path


def test_a_worker_refuses_to_start_without_the_mesh_secret(tiny_checkpoint: Path) -> None:
    env = {k: v for k, v in worker_env(tiny_checkpoint).items() if k != "AXL_REGISTRY_SECRET"}
    env["AXL_PORT"] = str(free_port())
    done = subprocess.run([sys.executable, "-m", WORKER], cwd=REPO_ROOT, env=env, capture_output=True, timeout=60)
    assert done.returncode != 0
    assert b"registry_secret" in done.stderr
