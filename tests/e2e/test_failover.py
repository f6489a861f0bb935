"""Killing workers and closing clients: failover, the registry forgetting the dead, clean 503s, broken streams end
with an error event, keep-alives while a request waits, a client that leaves frees the worker's slot."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import API_KEY, MESH_AUTH, TTL_SECONDS, Mesh

pytestmark = pytest.mark.timeout(180)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CODER = "axl-coder"


def _kill(worker) -> None:  # noqa: ANN001 - a tests.support.ServiceProcess
    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait(timeout=10)


def _running(worker) -> int:  # noqa: ANN001
    info = httpx.get(worker.url + "/internal/v1/info", headers=MESH_AUTH, timeout=5).json()
    return info["running"] + info["waiting"]


def test_failover_then_registry_forgets_then_clean_503(fresh_mesh: Mesh, checkpoints: dict) -> None:
    first = fresh_mesh.start_worker(checkpoints["plain"], "coder")
    second = fresh_mesh.start_worker(checkpoints["plain"], "coder")
    fresh_mesh.wait_for_instances(CODER, count=2)
    client = fresh_mesh.client()
    for _ in range(4):  # warm the gateway's cache and connections to both replicas
        client.completions.create(model=CODER, prompt="a", max_tokens=2)

    _kill(first)
    killed_at = time.monotonic()
    for _ in range(6):  # the registry still lists the dead replica: the gateway must skip it
        out = client.completions.create(model=CODER, prompt="a", max_tokens=2)
        assert out.choices[0].finish_reason in ("stop", "length")
    fresh_mesh.wait_for_instances(CODER, count=1, timeout=TTL_SECONDS * 3)
    assert time.monotonic() - killed_at < TTL_SECONDS * 3

    _kill(second)
    for stream in (False, True):  # both before and after the registry forgets the last one
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=CODER, prompt="a", max_tokens=2, stream=stream)
        assert info.value.status_code == 503
        assert info.value.response.headers.get("retry-after")
    fresh_mesh.wait_for_instances(CODER, count=0, timeout=TTL_SECONDS * 3)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=CODER, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 503 and info.value.code == "no_healthy_replica"


def test_stream_broken_mid_way_ends_with_error_event(fresh_mesh: Mesh, checkpoints: dict) -> None:
    worker = fresh_mesh.start_worker(checkpoints["plain"], "coder")
    assert fresh_mesh.gateway is not None
    body = {"model": CODER, "prompt": "x", "max_tokens": 100000, "ignore_eos": True, "stream": True}
    lines: list[str] = []
    with httpx.stream("POST", fresh_mesh.gateway.url + "/v1/completions", json=body, headers=AUTH,
                      timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line:
                lines.append(line)
            if len(lines) == 20:
                _kill(worker)
    assert lines[-1] == "data: [DONE]"
    assert lines[-2].startswith('data: {"error":')
    # The official client turns the error event into an exception instead of a silent, short answer.
    fresh_mesh.start_worker(checkpoints["plain"], "coder")
    client = fresh_mesh.client()
    stream = client.completions.create(model=CODER, prompt="x", max_tokens=100000, stream=True,
                                       extra_body={"ignore_eos": True})
    with pytest.raises(openai.APIError):
        for i, _chunk in enumerate(stream):
            if i == 20:
                _kill(fresh_mesh.workers[-1])


def test_keepalive_while_waiting_and_disconnect_frees_the_worker(fresh_mesh: Mesh, checkpoints: dict) -> None:
    worker = fresh_mesh.start_worker(checkpoints["plain"], "coder")  # AXL_MAX_BATCH=4 in the fixture
    assert fresh_mesh.gateway is not None
    url = fresh_mesh.gateway.url + "/v1/completions"
    long_body = {"model": CODER, "prompt": "x", "max_tokens": 100000, "ignore_eos": True, "stream": True}
    stop = threading.Event()

    def hog() -> None:  # fill every batch row with endless streams, so the next request waits in the queue
        with httpx.stream("POST", url, json=long_body, headers=AUTH, timeout=60) as response:
            for _ in response.iter_lines():
                if stop.is_set():
                    return

    hogs = [threading.Thread(target=hog) for _ in range(4)]
    for thread in hogs:
        thread.start()
    try:
        deadline = time.monotonic() + 20
        while _running(worker) < 4:
            assert time.monotonic() < deadline, "the hogs never filled the batch"
            time.sleep(0.05)
        lines: list[str] = []
        with httpx.stream("POST", url, json={**long_body, "max_tokens": 2}, headers=AUTH, timeout=30) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                if line.startswith(": keep-alive"):
                    break  # waited a keep-alive interval without a token: the comment came
        assert lines and lines[0] == ": keep-alive"
    finally:
        stop.set()
        for thread in hogs:
            thread.join(timeout=30)
    # Every client went away: the gateway closed its upstream requests and the worker dropped them.
    deadline = time.monotonic() + 10
    while _running(worker) > 0:
        assert time.monotonic() < deadline, f"worker still busy: {_running(worker)}"
        time.sleep(0.1)
