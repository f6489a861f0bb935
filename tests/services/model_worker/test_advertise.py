"""What a worker registers as its URL: worked out once at start, never a wildcard (axl_mesh.advertise)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from axl_mesh.advertise import AdvertiseError
from services.model_worker.metrics import WorkerMetrics
from services.model_worker.settings import Settings
from services.model_worker.worker import ModelWorker, _warn_if_unreachable

from .conftest import MESH_SECRET


def _worker(tmp_path: Path, **settings: object) -> ModelWorker:
    base = {"checkpoint": tmp_path / "none", "registry_secret": MESH_SECRET, "port": 8901, **settings}
    return ModelWorker(Settings(**base), WorkerMetrics.create(CollectorRegistry()))  # type: ignore[arg-type]


def test_registers_its_advertised_url_not_its_bind(tmp_path: Path) -> None:
    worker = _worker(tmp_path, host="0.0.0.0", advertise_host="10.0.0.7", registry_url="http://127.0.0.1:8900")
    assert worker.advertised_url == "http://10.0.0.7:8901"
    derived = _worker(tmp_path, host="0.0.0.0", registry_url="http://127.0.0.1:8900")
    assert derived.advertised_url == "http://127.0.0.1:8901"  # the address that reaches the registry


def test_a_wildcard_it_cannot_resolve_refuses_the_start_but_standalone_needs_no_url(tmp_path: Path) -> None:
    with pytest.raises(AdvertiseError, match="AXL_ADVERTISE_HOST"):
        _worker(tmp_path, host="0.0.0.0", registry_url="http://registry.invalid:8900")
    assert _worker(tmp_path, host="0.0.0.0", registry_url="").advertised_url is None


def test_loopback_to_a_remote_registry_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        _warn_if_unreachable("http://127.0.0.1:8901", "http://127.0.0.2:8900")  # same machine: fine
        assert not caplog.records
        _warn_if_unreachable("http://127.0.0.1:8901", "http://192.168.1.10:8900")
    assert "AXL_ADVERTISE_HOST" in caplog.text
