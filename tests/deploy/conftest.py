"""Shared by the deploy tests: the parsed compose file and how to run the compose CLI."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
# Values for the required variables (${VAR:?}) so that the file interpolates.
REQUIRED_ENV = {"AXL_REGISTRY_SECRET": "compose-test-secret", "AXL_API_KEYS": "sk-test-1,sk-test-2",
                "AXL_REDIS_REGISTRY_PASSWORD": "compose-test-registry-password",
                "AXL_REDIS_JOBS_PASSWORD": "compose-test-jobs-password",
                "AXL_GRAFANA_ADMIN_PASSWORD": "compose-test-grafana-password"}


def compose_command() -> list[str] | None:
    """``docker compose`` (v2 plugin) if it works, else the standalone ``docker-compose``; None if neither."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def run_compose(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = compose_command()
    if command is None:
        pytest.skip("no Docker Compose client: neither `docker compose` (plugin) nor `docker-compose` is installed")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AXL_")}
    return subprocess.run([*command, "-f", str(COMPOSE_FILE), *args], capture_output=True, text=True,
                          env={**clean, **env}, cwd=REPO_ROOT, timeout=60)


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    """docker-compose.yml as YAML sees it (anchors and merge keys resolved, variables not interpolated)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def app_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run our image (``python -m services.X``)."""
    return {name: s for name, s in compose["services"].items()
            if (s.get("command") or [None, None, ""])[:2] == ["python", "-m"]}


@contextlib.contextmanager
def acl_redis(command: list[str], data_dir: Path, passwords: dict[str, str]) -> Iterator[int]:
    """Run redis-server as a deployment file's `command` (on a free loopback port, data in `data_dir`), check the mesh's
    ACL holds there (`passwords`: the registry and jobs users' own), and yield the port for the file's own probe.

    The ACL: each user logs in with its password, the jobs user can neither read nor write the registry's keys, and
    a client that does not log in gets nothing."""
    import redis as redis_client
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from axl_mesh.redis_acl import url_for_user
    from tests.support import free_port

    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server / redis-cli not installed")
    port = free_port()
    proc = subprocess.Popen([command[0], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
                             *command[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"redis://127.0.0.1:{port}/0"
        registry = redis_client.Redis.from_url(url_for_user(base, "registry", passwords["registry"]))
        jobs = redis_client.Redis.from_url(url_for_user(base, "jobs", passwords["jobs"]))
        for _ in range(100):
            try:
                registry.ping()
                break
            except redis_client.ConnectionError:
                time.sleep(0.05)
        registry.set("axl:registry:probe", "1")
        jobs.set("rq:probe", "1")
        with pytest.raises(redis_client.exceptions.NoPermissionError):
            jobs.get("axl:registry:probe")
        with pytest.raises(redis_client.exceptions.NoPermissionError):
            jobs.set("axl:registry:probe", "2")
        with pytest.raises(redis_client.AuthenticationError):
            redis_client.Redis(port=port, retry=Retry(NoBackoff(), 0)).ping()
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def command_user_lines(command: list[str]) -> list[str]:
    """The ``--user`` directives of a redis-server command line, one ``user ...`` line each."""
    lines: list[list[str]] = []
    for arg in command:
        if arg.startswith("--"):
            lines.append([arg[2:]])
        elif lines:
            lines[-1].append(arg)
    return [" ".join(line) for line in lines if line[0] == "user"]
