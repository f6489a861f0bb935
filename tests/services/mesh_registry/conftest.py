"""A registry process shared by this folder's HTTP tests (TTL 1.5 s), and registration payloads."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import ServiceProcess

SECRET = "test-registry-secret"
TTL_SECONDS = 1.5
AUTH = {"Authorization": f"Bearer {SECRET}"}


def registry_env(redis_url: str, **extra: str) -> dict[str, str]:
    return {
        "AXL_REDIS_URL": redis_url,
        "AXL_REGISTRY_SECRET": SECRET,
        "AXL_INSTANCE_TTL_SECONDS": str(TTL_SECONDS),
        "AXL_LOG_LEVEL": "warning",
        **extra,
    }


def registration(instance_id: str = "worker-1", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "instance_id": instance_id,
        "specialist": "python",
        "model_id": "axl-micro-python",
        "url": "http://127.0.0.1:8901",
        "context_length": 1024,
        "capabilities": ["completion", "fim"],
        "checkpoint_version": "step-100",
        "max_concurrency": 4,
    }
    body.update(overrides)
    return body


@pytest.fixture(scope="module")
def registry(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One registry process for the module; tests flush Redis through ``redis_url`` to start empty."""
    log_path = tmp_path_factory.mktemp("registry") / "registry.log"
    with ServiceProcess("services.mesh_registry", registry_env(redis_server), log_path=log_path) as service:
        yield service
