"""A mesh across two "hosts" on one machine: every loopback address (127.0.0.0/8) is this machine's, so services
bound to 127.0.0.2 ("host A": registry, gateway, a worker) and 127.0.0.3 ("host B": a worker of the same model)
reach each other only through the addresses they bind and advertise, as on two machines. The hosts keep separate
data folders and share only Redis and the model store (the checkpoint folder, as a network filesystem would).

Requests through host A's gateway are served by both hosts; SIGKILLing host B's processes fails over to host A
(at most a bounded blip of 503 + Retry-After) and the registry forgets B within its TTL.
"""

from __future__ import annotations

import shutil
import signal
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from tests.e2e.conftest import REGISTRY_SECRET, TTL_SECONDS, Mesh
from tests.support import ServiceProcess

pytestmark = pytest.mark.timeout(120)

HOST_A, HOST_B = "127.0.0.2", "127.0.0.3"
CODER = "axl-coder"


def _can_bind(host: str) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
    except OSError:
        return False
    return True


needs_loopback_range = pytest.mark.skipif(
    not (_can_bind(HOST_A) and _can_bind(HOST_B)),
    reason="this OS routes only 127.0.0.1 to loopback (Linux routes all of 127.0.0.0/8)",
)


def _served(worker: ServiceProcess) -> float:
    """Requests this worker finished, from its own /metrics."""
    for line in httpx.get(worker.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("axl_worker_requests_total{") and 'status="finished"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@needs_loopback_range
def test_two_hosts_serve_together_and_fail_over(redis_server: str, tmp_path: Path,
                                                 checkpoints: dict[str, Path]) -> None:
    store = tmp_path / "models"  # the model store both hosts see (NFS in a real lab)
    checkpoint = shutil.copytree(checkpoints["plain"], store / CODER)
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"
    host_a.mkdir()
    mesh = Mesh(redis_url=redis_server, workdir=host_a, host=HOST_A)
    try:
        mesh.start_registry()
        assert mesh.registry is not None and urlsplit(mesh.registry.url).hostname == HOST_A
        shared = {"AXL_MODEL_STORE_DIR": str(store)}
        worker_a = mesh.start_worker(checkpoint, "coder", **shared)
        # Host B knows host A only by the registry URL; its data folder is its own.
        worker_b = mesh.start_worker(checkpoint, "coder", host=HOST_B, workdir=host_b, **shared)
        listed = mesh.wait_for_instances(CODER, count=2)
        assert {urlsplit(i["url"]).hostname for i in listed} == {HOST_A, HOST_B}
        assert {i["url"] for i in listed} == {worker_a.url, worker_b.url}
        assert (host_a / "data") != (host_b / "data")
        mesh.start_gateway(**shared)
        client = mesh.client()

        for _ in range(8):  # idle replicas take turns: both hosts serve
            out = client.completions.create(model=CODER, prompt="def f(", max_tokens=2)
            assert out.choices[0].finish_reason in ("stop", "length")
        assert _served(worker_a) >= 2 and _served(worker_b) >= 2, (_served(worker_a), _served(worker_b))

        # Host B goes down hard: no drain, no deregistration; the registry still lists it for up to its TTL.
        assert worker_b.proc is not None
        worker_b.proc.send_signal(signal.SIGKILL)
        worker_b.proc.wait(timeout=10)
        killed_at = time.monotonic()
        served_before = _served(worker_a)
        ok, blips = 0, 0
        forgotten_at: float | None = None
        while time.monotonic() - killed_at < TTL_SECONDS * 3:
            try:
                client.completions.create(model=CODER, prompt="def f(", max_tokens=2)
                ok += 1
            except openai.APIStatusError as exc:  # a bounded blip is allowed, and only as a clean 503
                assert exc.status_code == 503 and exc.response.headers.get("retry-after"), exc
                blips += 1
            if forgotten_at is None and len(mesh.instances(CODER)) == 1:
                forgotten_at = time.monotonic()
            if forgotten_at is not None and time.monotonic() - forgotten_at > 1.0:
                break
            time.sleep(0.05)
        assert forgotten_at is not None, f"the registry still lists host B {TTL_SECONDS * 3}s after it died"
        assert [urlsplit(i["url"]).hostname for i in mesh.instances(CODER)] == [HOST_A]
        assert blips <= 2 and ok >= 5, (ok, blips)
        assert _served(worker_a) - served_before == ok  # every success after the kill came from host A
        for stream in (False, True):  # and host A keeps serving both kinds of request
            if stream:
                chunks = list(client.completions.create(model=CODER, prompt="x", max_tokens=2, stream=True))
                assert chunks
            else:
                assert client.completions.create(model=CODER, prompt="x", max_tokens=2).choices
    finally:
        mesh.stop()


def test_worker_refuses_to_advertise_a_wildcard_it_cannot_resolve(tmp_path: Path,
                                                                   checkpoints: dict[str, Path]) -> None:
    """Bound to 0.0.0.0 with a registry whose name resolves nowhere, no address of this host can be derived:
    the worker refuses at once, naming the variables to set, instead of registering a URL nobody can call."""
    worker = ServiceProcess("services.model_worker", {
        "AXL_CHECKPOINT": str(checkpoints["plain"]), "AXL_REGISTRY_URL": "http://registry.invalid:8900",
        "AXL_REGISTRY_SECRET": REGISTRY_SECRET, "AXL_NUM_THREADS": "1", "AXL_HOST": "0.0.0.0",
    }, log_path=tmp_path / "worker.log")
    with pytest.raises(RuntimeError, match="exited with 2") as info:
        worker.start(timeout_seconds=30)
    assert "AXL_ADVERTISE_HOST" in str(info.value) and "0.0.0.0" in str(info.value)
