"""Restart the gateway while it streams: SIGKILL (a crash) and SIGTERM (an operator's restart) mid-stream.

Either way the client's stream ends within a bound, with an error or a clean end, never a hang: a crash ends it at
once, a SIGTERM after the gateway's drain time (before this, a stream kept a stopping gateway alive until it ended
by itself, however long); the worker frees the row the stream held, since its caller is gone; and the gateway
started again on the same port serves the next stream.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import httpx
import pytest

from tests.e2e.conftest import API_KEY, MESH_AUTH
from tests.faults.conftest import FaultMesh, sigkill, wait_until

pytestmark = pytest.mark.timeout(150)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CODER = "axl-coder"
ENDLESS = 100_000  # tokens: minutes of streaming for the tiny model
# Well past what a live stream needs between two lines (the gateway sends keep-alives every second here).
READ_TIMEOUT_SECONDS = 10.0
END_WITHIN_SECONDS = 5.0  # after the kill, the stream must end (or fail) this fast
# After SIGTERM the gateway lets open streams run for AXL_DRAIN_SECONDS (8 s by default), then cuts them: a stream
# must end before the supervisor's SIGKILL (the launcher waits 15 s), not run on for as long as it likes.
TERM_ENDS_WITHIN_SECONDS = 15.0


def _busy_rows(worker) -> int:  # noqa: ANN001 - a tests.support.ServiceProcess
    info = httpx.get(worker.url + "/internal/v1/info", headers=MESH_AUTH, timeout=5).json()
    return info["running"] + info["waiting"]


def _stream_and_stop_gateway(mesh: FaultMesh, stop: Callable[[], object],
                             limit: float) -> tuple[list[str], str | None, float]:
    """Stream an endless completion; after a few lines call ``stop()``; read on until the stream ends, failing if
    it still runs ``limit`` seconds later. Returns the lines, the transport error that ended it (None: a clean end)
    and the seconds from ``stop()`` to the end."""
    assert mesh.gateway is not None
    body = {"model": CODER, "prompt": "x", "max_tokens": ENDLESS, "ignore_eos": True, "stream": True}
    lines: list[str] = []
    stopped_at: float | None = None
    error: str | None = None
    try:
        with httpx.stream("POST", mesh.gateway.url + "/v1/completions", json=body, headers=AUTH,
                          timeout=httpx.Timeout(READ_TIMEOUT_SECONDS)) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line:
                    continue
                lines.append(line)
                if len(lines) == 5:
                    stop()
                    stopped_at = time.monotonic()
                if stopped_at is not None and time.monotonic() - stopped_at > limit:
                    pytest.fail(f"the stream still runs {limit:.0f}s after the gateway was stopped")
    except httpx.TransportError as exc:
        error = type(exc).__name__
    assert stopped_at is not None, f"the stream ended before the gateway was stopped: {lines}"
    return lines, error, time.monotonic() - stopped_at


def _check_restarted(mesh: FaultMesh, worker) -> None:  # noqa: ANN001
    # The gateway's upstream call died with it (or was closed by it): the worker gives the row back.
    wait_until(lambda: _busy_rows(worker) == 0, 10, "the worker to drop the orphaned stream")
    assert mesh.gateway is not None
    mesh.gateway.start()  # same port, same settings
    stream = mesh.client().completions.create(model=CODER, prompt="x", max_tokens=4, stream=True)
    chunks = list(stream)
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_gateway_killed_or_stopped_mid_stream_ends_the_stream_then_serves_again(fault_mesh: FaultMesh,
                                                                                checkpoints: dict) -> None:
    fault_mesh.start_registry()
    gateway = fault_mesh.start_gateway(AXL_MAX_TOKENS_CEILING=str(ENDLESS))  # streams that outlast the test
    worker = fault_mesh.start_worker(checkpoints["plain"], "coder")

    # A crash: the client's connection is reset under it.
    lines, error, took = _stream_and_stop_gateway(fault_mesh, lambda: sigkill(gateway), END_WITHIN_SECONDS)
    assert took < END_WITHIN_SECONDS, f"the stream took {took:.1f}s to end after the gateway died ({error})"
    assert error is not None or lines[-1] == "data: [DONE]", lines[-3:]
    _check_restarted(fault_mesh, worker)

    # An operator's restart: SIGTERM, then start again once the old process has exited.
    assert gateway.proc is not None
    lines, error, took = _stream_and_stop_gateway(fault_mesh, lambda: gateway.proc.send_signal(signal.SIGTERM),
                                                   TERM_ENDS_WITHIN_SECONDS)
    assert took < TERM_ENDS_WITHIN_SECONDS, f"the stream took {took:.1f}s to end after SIGTERM ({error})"
    assert error is not None or lines[-1] == "data: [DONE]", lines[-3:]
    gateway.proc.wait(timeout=TERM_ENDS_WITHIN_SECONDS)
    _check_restarted(fault_mesh, worker)
