"""Every service in docker-compose.yml starts as a local process with the compose file's command and environment
(container addresses swapped for loopback ones, data folders for temporary ones) and passes its own health check."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.checkpoints import make_tiny_checkpoint
from tests.deploy.conftest import COMPOSE_FILE, REQUIRED_ENV, app_services, env_of
from tests.support import ServiceProcess

COMPOSE = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES = app_services(COMPOSE)


def _interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` and ``${VAR:?error}`` with no VAR set: the default, or our test value."""
    def replace(match: re.Match[str]) -> str:
        name, kind, rest = match.groups()
        if kind == ":?":
            return REQUIRED_ENV[name]
        return rest

    return re.sub(r"\$\{(\w+)(:-|:\?)([^}]*)\}", replace, value)


def _local_env(service: dict[str, Any], *, redis_url: str, registry_url: str, data: Path,
               checkpoint: Path) -> dict[str, str]:
    """The compose environment of ``service`` with what only exists inside compose replaced by local values."""
    env = env_of(service)
    assert env["AXL_REGISTRY_SECRET"].startswith("${AXL_REGISTRY_SECRET:?")
    env = {key: _interpolate(value) for key, value in env.items()}
    env.pop("AXL_HOST")  # ServiceProcess binds loopback
    env.pop("AXL_PORT")  # ... on a free port
    env.pop("AXL_PUBLIC_URL", None)  # the default (http://host:port) is the local address
    env["OMP_NUM_THREADS"] = env["AXL_NUM_THREADS"] = "1"  # two shared cores
    env["AXL_REDIS_URL"] = redis_url
    env["AXL_REGISTRY_URL"] = registry_url
    for key, value in list(env.items()):
        if value.startswith("/data"):
            env[key] = str(data / value.removeprefix("/data/"))
    if "AXL_CHECKPOINT" in env:
        env["AXL_CHECKPOINT"] = str(checkpoint)
    return env


def _health_path(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    assert test[:2] == ["CMD", "axl-healthcheck"], test
    return test[2]


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, redis_server: str) -> Iterator[dict[str, Any]]:
    """A registry started from the compose definition, and what the other services need around it."""
    root = tmp_path_factory.mktemp("compose-local")
    checkpoint = make_tiny_checkpoint(root / "checkpoints" / "axl-micro")
    redis_url = redis_server.rsplit("/", 1)[0] + "/7"  # a database of its own
    service = SERVICES["mesh-registry"]
    env = _local_env(service, redis_url=redis_url, registry_url="", data=root / "data", checkpoint=checkpoint)
    registry = ServiceProcess("services.mesh_registry", env, log_path=root / "registry.log",
                              health_path=_health_path(service)).start(60)
    try:
        yield {"root": root, "checkpoint": checkpoint, "redis_url": redis_url, "registry": registry}
    finally:
        registry.stop()


def test_registry_starts_from_its_compose_definition(local: dict[str, Any]) -> None:
    assert httpx.get(local["registry"].url + "/readyz", timeout=5).status_code == 200


@pytest.mark.parametrize("name", sorted(set(SERVICES) - {"mesh-registry"}))
def test_service_starts_from_its_compose_definition(name: str, local: dict[str, Any]) -> None:
    service = SERVICES[name]
    module = service["command"][2]
    env = _local_env(service, redis_url=local["redis_url"], registry_url=local["registry"].url,
                     data=local["root"] / "data", checkpoint=local["checkpoint"])
    process = ServiceProcess(module, env, log_path=local["root"] / f"{name}.log", health_path=_health_path(service))
    process.start(90)
    try:
        assert httpx.get(process.url + _health_path(service), timeout=5).status_code == 200
        metrics = httpx.get(process.url + "/metrics", timeout=5)
        assert metrics.status_code == 200 and "# TYPE" in metrics.text  # what Prometheus scrapes
        mesh_auth = {"Authorization": f"Bearer {env.get('AXL_REGISTRY_SECRET', '')}"}  # internal reads need it
        if module == "services.model_worker" and env.get("AXL_WORKER_MODE") == "pool":
            # The pool holds nothing until asked; it answers its internal view of what it holds.
            pool = httpx.get(process.url + "/internal/v1/pool", headers=mesh_auth, timeout=5)
            assert pool.status_code == 200, pool.text
        elif module == "services.model_worker":  # a worker registers itself under its specialist's model id
            models = httpx.get(local["registry"].url + "/v1/models", headers=mesh_auth, timeout=5).json()
            assert f"axl-{env['AXL_SPECIALIST']}" in str(models)
    finally:
        process.stop()
