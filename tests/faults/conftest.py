"""Fault injection with real processes on loopback: SIGKILL a worker, a trainer, Redis or the gateway at the worst
moment and check what the README promises (an error, a 503 with Retry-After or a resumed job; never a hang, never a
lost record).

The mesh is tests/e2e's (``Mesh``, the ``checkpoints`` fixture, ``ServiceProcess``), so whatever the e2e helpers
learn (secrets, headers, limits) these tests get too. What is added here:

- ``FaultMesh``: a ``Mesh`` whose registry can run with the product's defaults (``default_registry=True``: the
  instance TTL the README's "forgotten within 15 s" is about), and a trainer worker of its own;
- ``AppendOnlyRedis``: a password-protected ``redis-server`` of the test's own that persists every write
  (``--appendonly yes --appendfsync always``) and can be SIGKILLed and started again on its port;
- ``sigkill`` / ``descendants``: kill a process (and its children, such as RQ's work horse) with no goodbye.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.e2e.conftest import Mesh, checkpoints  # noqa: F401 - the e2e fixture, shared with this folder
from tests.support import ServiceProcess, free_port

REDIS_SERVER = shutil.which("redis-server")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every fault test boots real services against a real Redis: without ``redis-server`` (and no
    ``AXL_TEST_REDIS_URL``) there is nothing to run them on; the Redis restart test needs the binary itself."""
    here = Path(__file__).parent
    for item in items:
        if here not in Path(str(item.fspath)).parents:
            continue
        needs_binary = item.get_closest_marker("needs_redis_server") is not None
        if REDIS_SERVER is None and (needs_binary or not os.environ.get("AXL_TEST_REDIS_URL")):
            item.add_marker(pytest.mark.skip(reason="redis-server is not installed"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_redis_server: the test starts and kills a redis-server of its own")


# --- killing ------------------------------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first), read from /proc (Linux)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The field after the parenthesised command (which may hold spaces) is the state, then the ppid.
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie is dead, only not yet reaped by its parent


def sigkill(service: ServiceProcess, *, with_children: bool = False) -> list[int]:
    """SIGKILL ``service`` (and, with ``with_children``, every process under it, in the same instant); returns the
    pids of the children killed. Waits until the service is reaped."""
    assert service.proc is not None and service.proc.poll() is None, f"{service.module} is not running"
    children = descendants(service.proc.pid) if with_children else []
    for pid in [service.proc.pid, *children]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    service.proc.wait(timeout=10)
    return children


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):  # noqa: ANN001, ANN201
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --- the mesh -----------------------------------------------------------------------------------------------------


class FaultMesh(Mesh):
    """tests/e2e's ``Mesh`` plus a trainer worker, and a registry that may keep the product's default TTL."""

    trainer: ServiceProcess | None = None

    def start_registry(self, *, default_registry: bool = False) -> ServiceProcess:  # type: ignore[override]
        registry = super().start_registry()
        if default_registry:  # the e2e mesh shortens the instance TTL; these tests check the shipped one
            registry.env.pop("AXL_INSTANCE_TTL_SECONDS", None)
            registry.restart()
        return registry

    def start_trainer(self, env: dict[str, str]) -> ServiceProcess:
        self.trainer = ServiceProcess("services.trainer_worker", env,
                                      log_path=self.workdir / f"trainer-{time.monotonic_ns()}.log").start(60)
        return self.trainer

    def stop(self) -> None:
        if self.trainer is not None:
            self.trainer.stop()
        super().stop()


def jobs_env(redis_url: str, workdir: Path) -> dict[str, str]:
    """The job system's settings for the gateway and the trainer: this test's Redis and data folder, one thread,
    the product's heartbeat, reaper and retry defaults (the README's "resumes within 60 s" is about those)."""
    return {"AXL_REDIS_URL": redis_url, "AXL_DATA_DIR": str(workdir / "data"),
            "AXL_JOBS_KEY_PREFIX": f"axl:faults:{workdir.name}", "AXL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
            "AXL_LOG_LEVEL": "info"}


@pytest.fixture
def fault_mesh(redis_url: str, tmp_path: Path) -> Iterator[FaultMesh]:
    """A mesh of its own on the session's Redis: nothing started yet (each test starts what it kills)."""
    mesh = FaultMesh(redis_url=redis_url, workdir=tmp_path)
    try:
        yield mesh
    finally:
        mesh.stop()


# --- a Redis that can die -----------------------------------------------------------------------------------------


class AppendOnlyRedis:
    """A ``redis-server`` of the test's own on a free port, with a password, that appends every write to its
    append-only file before answering (``appendfsync always``), so a SIGKILL loses nothing it acknowledged."""

    def __init__(self, directory: Path) -> None:
        assert REDIS_SERVER is not None
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = secrets.token_hex(16)
        self.url = f"redis://:{self.password}@127.0.0.1:{self.port}/0"
        self.log_path = directory / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_seconds: float = 15.0) -> AppendOnlyRedis:
        """Start (or start again, on the same port, from the append-only file) and wait until it serves."""
        assert REDIS_SERVER is not None
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", self.password,
                 "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.directory)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1)
        try:
            deadline = time.monotonic() + timeout_seconds
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{self.logs()}")
                try:
                    if client.ping():  # BusyLoadingError while it replays the file
                        return self
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not serve within {timeout_seconds}s:\n{self.logs()}")
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye to clients."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=5)

    def logs(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


@pytest.fixture
def append_only_redis(tmp_path: Path) -> Iterator[AppendOnlyRedis]:
    server = AppendOnlyRedis(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
