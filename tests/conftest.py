"""Fixtures shared by every test folder.

- ``redis_server`` (session): URL of a private ``redis-server`` (free port, no persistence) started for this run;
  set ``AXL_TEST_REDIS_URL`` to use an existing server instead (give it a DB nobody else uses: tests flush it).
- ``redis_url``: the same URL, with the database flushed before the test.
- ``start_service``: ``start_service("services.mesh_registry", {"AXL_...": ...})`` boots ``python -m`` that module
  on a free port, waits for its ``/healthz`` and returns a :class:`tests.support.ServiceProcess` (``.url``,
  ``.restart()``, ``.stop()``, ``.logs()``); every process it started is stopped at teardown.
- Plain helpers (``free_port``, ``ServiceProcess``) are in ``tests/support.py`` for module-scoped fixtures.
- No test sees the developer's state (autouse): every ``AXL_*`` variable but ``AXL_TEST_*`` is dropped, and
  ``AXL_DATA_DIR`` (uploads, job folders, the model store) points at a temporary folder of each test's own; the
  settings' default, ``data/`` in the repository, is what `make up` and a fine-tune fill.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.support import RedisServer, ServiceProcess, free_port

__all__ = ["free_port"]


@pytest.fixture(scope="session", autouse=True)
def _no_developer_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """For the whole session (module-scoped fixtures included): no AXL_* setting of the shell that ran pytest,
    and a temporary data folder instead of the repository's ``data/``."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("AXL_") and not name.startswith("AXL_TEST_"):
                patch.delenv(name)
        patch.setenv("AXL_DATA_DIR", str(tmp_path_factory.mktemp("session-data")))
        yield


@pytest.fixture(autouse=True)
def _own_data_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's own data folder, for settings read in the test process (in-process apps, JobsSettings())."""
    monkeypatch.setenv("AXL_DATA_DIR", str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL (DB 0) of a redis-server private to this test session."""
    external = os.environ.get("AXL_TEST_REDIS_URL")
    if external:
        yield external
        return
    server = RedisServer(tmp_path_factory.mktemp("redis") / "redis.log").start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session's Redis URL, its database emptied first."""
    client = redis.Redis.from_url(redis_server)
    try:
        client.flushdb()
    finally:
        client.close()
    return redis_server


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Factory that boots ``python -m <module>`` on a free port and stops it when the test ends."""
    started: list[ServiceProcess] = []

    def start(
        module: str, env: dict[str, str] | None = None, *, port: int | None = None,
        health_path: str = "/healthz", timeout_seconds: float = 30.0,
    ) -> ServiceProcess:
        log_path = tmp_path / f"{module.rsplit('.', 1)[-1]}-{len(started)}.log"
        service = ServiceProcess(module, env, log_path=log_path, port=port, health_path=health_path)
        started.append(service)
        return service.start(timeout_seconds)

    yield start
    for service in reversed(started):
        service.stop()
