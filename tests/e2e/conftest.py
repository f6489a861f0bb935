"""A whole mesh as real processes on free loopback ports: a private redis-server (the session's), the registry
(instance TTL 2 s), model workers serving tiny random checkpoints, and the gateway; driven with the `openai` client.

``Mesh.start_worker(...)`` adds a worker and waits until the registry lists it; ``mesh.client()`` is an
``openai.OpenAI`` pointed at the gateway with the right key. ``Mesh(host=...)`` binds the registry, gateway and
workers to another loopback address (127.0.0.2: "host A"); ``start_worker(host=..., workdir=...)`` puts a worker
on another "host" with a data folder of its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from tests.checkpoints import make_tiny_checkpoint
from tests.support import ServiceProcess

REGISTRY_SECRET = "e2e-registry-secret"
MESH_AUTH = {"Authorization": f"Bearer {REGISTRY_SECRET}"}  # every internal hop carries the mesh secret
API_KEY = "sk-e2e-test-key"
TTL_SECONDS = 2.0
MAX_BODY_BYTES = 64 * 1024


@dataclass
class Mesh:
    redis_url: str
    workdir: Path
    registry: ServiceProcess | None = None
    gateway: ServiceProcess | None = None
    workers: list[ServiceProcess] = field(default_factory=list)
    registry_redis_url: str | None = None  # the registry's own Redis login (ACL), when not ``redis_url``
    host: str = "127.0.0.1"  # the address every service started here binds and advertises

    @property
    def registry_key_prefix(self) -> str:
        return f"e2e:{self.workdir.name}"

    def start_registry(self) -> ServiceProcess:
        self.registry = ServiceProcess("services.mesh_registry", {
            "AXL_REDIS_URL": self.registry_redis_url or self.redis_url, "AXL_REGISTRY_SECRET": REGISTRY_SECRET,
            "AXL_INSTANCE_TTL_SECONDS": str(TTL_SECONDS), "AXL_LOG_LEVEL": "warning",
            "AXL_REGISTRY_KEY_PREFIX": self.registry_key_prefix,
        }, log_path=self.workdir / "registry.log", host=self.host).start()
        return self.registry

    def start_gateway(self, **env: str) -> ServiceProcess:
        assert self.registry is not None
        self.gateway = ServiceProcess("services.api_gateway", {
            "AXL_REGISTRY_URL": self.registry.url, "AXL_REGISTRY_SECRET": REGISTRY_SECRET,
            "AXL_API_KEYS": f"other-key,{API_KEY}",
            "AXL_MAX_BODY_BYTES": str(MAX_BODY_BYTES), "AXL_LOOKUP_TTL_SECONDS": "0.5",
            "AXL_KEEPALIVE_SECONDS": "1", "AXL_LOG_LEVEL": "warning", **env,
        }, log_path=self.workdir / "gateway.log", host=self.host).start()
        return self.gateway

    def start_worker(self, checkpoint: Path, specialist: str = "coder", model_id: str | None = None, *,
                     host: str | None = None, workdir: Path | None = None, **extra_env: str) -> ServiceProcess:
        """A worker bound to ``host`` (default: the mesh's), logging and keeping its data under ``workdir``
        (default: the mesh's), with ``extra_env`` on top; returns once the registry lists it."""
        assert self.registry is not None
        env = {
            "AXL_CHECKPOINT": str(checkpoint), "AXL_SPECIALIST": specialist, "AXL_REGISTRY_URL": self.registry.url,
            "AXL_REGISTRY_SECRET": REGISTRY_SECRET, "AXL_NUM_THREADS": "1", "AXL_MAX_BATCH": "4",
            "AXL_LOG_LEVEL": "warning",
        }
        if model_id:
            env["AXL_MODEL_ID"] = model_id
        env.update(extra_env)
        (workdir or self.workdir).mkdir(parents=True, exist_ok=True)
        worker = ServiceProcess("services.model_worker", env, host=host or self.host,
                                log_path=(workdir or self.workdir) / f"worker-{len(self.workers)}.log").start(60)
        self.workers.append(worker)
        self.wait_for_instances(model_id or f"axl-{specialist}", count=None)
        return worker

    def instances(self, model: str) -> list[dict]:
        assert self.registry is not None
        return httpx.get(f"{self.registry.url}/v1/instances", params={"model": model}, headers=MESH_AUTH,
                         timeout=5).json()["data"]

    def wait_for_instances(self, model: str, count: int | None, timeout: float = 60.0) -> list[dict]:
        """Wait until the registry lists ``count`` instances of ``model`` (None: one more than before is enough
        for a worker just started, i.e. its own port appears)."""
        deadline = time.monotonic() + timeout
        want_url = self.workers[-1].url if count is None and self.workers else None
        while True:
            found = self.instances(model)
            if (count is not None and len(found) == count) or (want_url and any(i["url"] == want_url for i in found)):
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"registry lists {found} for {model}, wanted count={count} url={want_url}")
            time.sleep(0.1)

    def client(self, **kwargs: object) -> openai.OpenAI:
        assert self.gateway is not None
        return openai.OpenAI(base_url=self.gateway.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60,
                             **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        for service in [self.gateway, *reversed(self.workers), self.registry]:
            if service is not None:
                service.stop()


def _mesh(redis_server: str, workdir: Path) -> Mesh:
    mesh = Mesh(redis_url=redis_server, workdir=workdir)
    mesh.start_registry()
    return mesh


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {"plain": make_tiny_checkpoint(root / "plain", seed=0), "fim": make_tiny_checkpoint(root / "fim", seed=1,
                                                                                               fim=True)}


@pytest.fixture(scope="module")
def mesh(redis_server: str, tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> Iterator[Mesh]:
    """Registry, two replicas of `axl-coder` (one checkpoint), one FIM-capable `axl-docs`, and the gateway."""
    mesh = _mesh(redis_server, tmp_path_factory.mktemp("mesh"))
    try:
        mesh.start_worker(checkpoints["plain"], "coder")
        mesh.start_worker(checkpoints["plain"], "coder")
        mesh.start_worker(checkpoints["fim"], "docs")
        mesh.wait_for_instances("axl-coder", count=2)
        mesh.start_gateway()
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture
def fresh_mesh(redis_server: str, tmp_path: Path, checkpoints: dict[str, Path]) -> Iterator[Mesh]:
    """A mesh of its own (registry + gateway, no workers yet) for tests that kill things."""
    mesh = _mesh(redis_server, tmp_path)
    try:
        # Its tests hold streams open with max_tokens 100000: the default ceiling (4x the tiny model's 128-byte window)
        # would end them within about a second, a keep-alive interval, on a fast machine.
        mesh.start_gateway(AXL_MAX_TOKENS_CEILING="1000000")
        yield mesh
    finally:
        mesh.stop()
