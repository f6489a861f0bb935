"""A launcher killed outright takes its children with it: nothing keeps a port, so the next ``make up`` starts.

Before, a SIGKILLed launcher (or its terminal closed) left the registry, workers, gateway and its redis-server
running in their own sessions, and the next start refused with "port(s) already in use".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.launcher import port_is_free
from tests.checkpoints import make_tiny_checkpoint
from tests.deploy.test_launcher import _alive, _descendants, _wait
from tests.support import REPO_ROOT, free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")


def _config(root: Path, *, with_worker: bool) -> tuple[Path, list[int]]:
    """A small mesh on free ports (its own redis-server): registry, gateway and, if asked, one tiny worker."""
    ports = {"redis": free_port(), "registry": free_port(), "gateway": free_port()}
    config: dict[str, Any] = {
        "host": "127.0.0.1", "redis_url": f"redis://127.0.0.1:{ports['redis']}/0",
        "registry": {"port": ports["registry"]}, "gateway": {"port": ports["gateway"], "api_keys": ["sk-orphans"]},
        "trainer_workers": 0, "quantizer_workers": 0, "queue_worker_port_start": free_port(),
        "data_dir": str(root / "data"), "model_store": str(root / "data" / "models"),
        "files_dir": str(root / "data" / "files"), "jobs_dir": str(root / "data" / "jobs"),
        "state_dir": str(root / "state"), "auto_serve_new_models": False,
        "worker_num_threads": 1, "health_timeout_seconds": 120,
    }
    if with_worker:
        ports["worker"] = free_port()
        checkpoint = make_tiny_checkpoint(root / "checkpoints" / "boot")
        config["bootstrap"] = {"checkpoint": str(checkpoint)}
        config["workers"] = [{"specialist": "coder", "port": ports["worker"]}]
    path = root / "mesh.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, list(ports.values())


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AXL_") and k != "REDIS_URL"}
    return {**env, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}


def _all_gone_and_ports_free(children: set[int], ports: list[int]) -> bool:
    return not any(_alive(pid) for pid in children) and all(port_is_free(port) for port in ports)


def _kill_leftovers(pids: set[int]) -> None:
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_child_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """The preexec_fn alone: a parent SIGKILLed after starting ``sleep`` takes the sleep with it."""
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import subprocess, sys, time
        from deploy.launcher import die_with_launcher
        child = subprocess.Popen(["sleep", "120"], start_new_session=True, preexec_fn=die_with_launcher())
        print(child.pid, flush=True)
        time.sleep(120)
    """)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert _alive(child)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its parent"
    finally:
        _kill_leftovers({child})


def test_sigkill_of_the_launcher_frees_every_port(tmp_path: Path) -> None:
    config, ports = _config(tmp_path, with_worker=True)
    log = tmp_path / "launcher.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "deploy.launcher", "--config", str(config), "--no-bootstrap"],
                                cwd=REPO_ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    children: set[int] = set()
    try:
        _wait(lambda: "AXL mesh is up" in log.read_text(errors="replace") or proc.poll() is not None, 180,
              "the mesh to come up", log)
        assert proc.poll() is None, log.read_text(errors="replace")
        children = _descendants(proc.pid)
        assert len(children) >= 4  # redis-server, registry, coder worker, gateway
        assert not any(port_is_free(port) for port in ports)
        proc.kill()
        proc.wait(10)
        _wait(lambda: _all_gone_and_ports_free(children, ports), 10,
              "every child to die with the launcher and free its port", log)
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_leftovers(children)


def test_killing_what_started_the_launcher_stops_the_mesh(tmp_path: Path) -> None:
    """``make up`` passes --exit-with-parent: SIGKILL of make stops the launcher, which stops its children."""
    config, ports = _config(tmp_path, with_worker=False)
    log = tmp_path / "launcher.log"
    with log.open("wb") as out:  # stands in for make: a parent that waits for the launcher
        make = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])",
                                 sys.executable, "-m", "deploy.launcher", "--config", str(config), "--no-bootstrap",
                                 "--exit-with-parent"],
                                cwd=REPO_ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    everything: set[int] = set()
    try:
        _wait(lambda: "AXL mesh is up" in log.read_text(errors="replace") or make.poll() is not None, 180,
              "the mesh to come up", log)
        everything = _descendants(make.pid)  # the launcher and its children
        assert len(everything) >= 4  # launcher, redis-server, registry, gateway
        make.kill()
        make.wait(10)
        _wait(lambda: _all_gone_and_ports_free(everything, ports), 30, "the launcher to stop the mesh", log)
        text = log.read_text(errors="replace")
        assert "got SIGTERM; stopping" in text and text.rstrip().endswith("stopped")  # a clean stop, not a kill
    finally:
        _kill_leftovers(everything)
