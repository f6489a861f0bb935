"""SIGKILL the model worker that is serving a stream, with the registry's shipped instance TTL.

tests/e2e/test_failover.py covers failover to a replica and the error event (with a 2 s TTL); what this adds is the
whole outage as a client sees it when the only worker of a model dies mid-stream: the stream ends with an error
event, every request for the model in the meantime (completions, chat, streamed or not) is a 503 with
``Retry-After`` and an OpenAI error body, never another status and never a wait, the registry forgets the dead
instance within 15 s, and a worker that starts again serves the next request.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from tests.e2e.conftest import API_KEY
from tests.faults.conftest import FaultMesh, sigkill, wait_until

pytestmark = pytest.mark.timeout(150)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CODER = "axl-coder"
FORGET_WITHIN_SECONDS = 15.0  # the README's promise, with the registry's default instance TTL
REQUEST_TIMEOUT = httpx.Timeout(10.0)  # a request in the outage that takes this long is a hang


@dataclass
class Answer:
    at: float
    status: int | str  # an HTTP status, or the name of the transport error
    retry_after: str | None = None
    code: str | None = None


class Prober(threading.Thread):
    """Asks the gateway for the model over and over (each kind of request in turn) and notes every answer."""

    def __init__(self, gateway_url: str) -> None:
        super().__init__(daemon=True)
        self.url = gateway_url
        self.answers: list[Answer] = []
        self.done = threading.Event()

    def run(self) -> None:
        requests = [
            ("/v1/completions", {"model": CODER, "prompt": "a", "max_tokens": 2}),
            ("/v1/completions", {"model": CODER, "prompt": "a", "max_tokens": 2, "stream": True}),
            ("/v1/chat/completions", {"model": CODER, "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 2}),
            ("/v1/chat/completions", {"model": CODER, "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 2, "stream": True}),
        ]
        with httpx.Client(headers=AUTH, timeout=REQUEST_TIMEOUT) as client:
            i = 0
            while not self.done.is_set():
                path, body = requests[i % len(requests)]
                i += 1
                self.answers.append(self.ask(client, path, body))
                time.sleep(0.05)  # leave the two cores to the worker that is starting

    def ask(self, client: httpx.Client, path: str, body: dict) -> Answer:
        at = time.monotonic()
        try:
            with client.stream("POST", self.url + path, json=body) as response:
                response.read()  # a stream is read to its end: an answer that never ends is a hang
                if response.status_code != 200:
                    error = response.json().get("error") or {}
                    return Answer(at, response.status_code, response.headers.get("retry-after"), error.get("code"))
                if body.get("stream") and '"error"' in response.text:
                    return Answer(at, "error event in a 200 stream")
                return Answer(at, 200)
        except (httpx.HTTPError, ValueError) as exc:
            return Answer(at, type(exc).__name__)


def test_only_worker_killed_mid_stream_gives_503s_until_another_serves(fault_mesh: FaultMesh,
                                                                         checkpoints: dict) -> None:
    fault_mesh.start_registry(default_registry=True)
    gateway = fault_mesh.start_gateway()
    worker = fault_mesh.start_worker(checkpoints["plain"], "coder")
    assert fault_mesh.client().completions.create(model=CODER, prompt="a", max_tokens=2).choices

    body = {"model": CODER, "prompt": "x", "max_tokens": 100000, "ignore_eos": True, "stream": True}
    lines: list[str] = []
    prober = Prober(gateway.url)
    with httpx.stream("POST", gateway.url + "/v1/completions", json=body, headers=AUTH,
                      timeout=REQUEST_TIMEOUT) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line:
                continue
            lines.append(line)
            if len(lines) == 5:
                sigkill(worker)
                killed_at = time.monotonic()
                prober.start()
    ended_after = time.monotonic() - killed_at
    assert lines[-1] == "data: [DONE]" and lines[-2].startswith('data: {"error":'), lines[-3:]
    assert ended_after < 5, f"the broken stream took {ended_after:.1f}s to end"

    try:
        last_listed = killed_at  # when the last listing that still named the dead worker was asked for
        while True:
            asked = time.monotonic()
            if not fault_mesh.instances(CODER):
                forgotten = time.monotonic()
                break
            last_listed = asked
            assert asked - killed_at < FORGET_WITHIN_SECONDS + 5, "the registry never forgot the dead worker"
            time.sleep(0.2)
        # The registry answered from a moment after it was asked: a listing asked for 15 s after the kill is late.
        assert last_listed - killed_at < FORGET_WITHIN_SECONDS, f"still listed {last_listed - killed_at:.1f}s on"
        fault_mesh.start_worker(checkpoints["plain"], "coder")  # returns once the registry lists it
        wait_until(lambda: any(a.status == 200 for a in prober.answers), 15, "a request served by the new worker")
        time.sleep(0.5)  # a few more answers after the first success
    finally:
        prober.done.set()
        prober.join(timeout=15)
    assert not prober.is_alive(), "a request through the gateway hung"

    answers = prober.answers
    first_ok = next(i for i, a in enumerate(answers) if a.status == 200)
    outage, after = answers[:first_ok], answers[first_ok:]
    assert len(outage) >= 10 and outage[-1].at - outage[0].at > 5, "too few requests during the outage to judge"
    wrong = [a for a in outage if a.status != 503 or not a.retry_after or not a.code]
    assert not wrong, f"during the outage, answers other than 503 + Retry-After + error code: {wrong[:5]}"
    # Before the registry forgot it, the dead instance was skipped; after, the model had no replica.
    assert {a.code for a in outage if a.at > forgotten} == {"no_healthy_replica"}
    assert all(a.status == 200 for a in after), f"a worker serves again, yet: {[a for a in after if a.status != 200]}"
