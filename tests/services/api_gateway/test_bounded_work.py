"""Bounded work per request: samples (prompts x n) capped, max_tokens clamped, and a stream whose client stops
reading ended after a timeout with its upstream streams closed (so the workers free their rows)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from axl_mesh.protocol import MAX_SAMPLES_PER_REQUEST, MAX_TOKENS_PER_WINDOW, max_tokens_ceiling
from axl_mesh.worker_protocol import GenerateRequest, GenerateResponse, StreamPiece, Usage
from services.api_gateway.generation import STREAM_BUFFER_EVENTS, RequestMetrics, Sample, StreamRun
from services.api_gateway.main import create_app
from services.api_gateway.metrics import GatewayMetrics
from services.api_gateway.routes.completions import CompletionChunks
from services.api_gateway.settings import Settings
from services.api_gateway.sse import EventStreamResponse
from services.api_gateway.upstream import ResolvedModel

KEY = "sk-bounded-work"
AUTH = {"Authorization": f"Bearer {KEY}"}
WINDOW = 128
MODEL = ResolvedModel("axl-coder", "coder", WINDOW, ("completion", "chat"))


class EndlessStream:
    """An upstream stream that never finishes (a model whose window slides forever)."""

    prompt_truncated = 0

    def __init__(self) -> None:
        self.sent = 0
        self.closed = False

    async def events(self) -> Any:
        while True:
            self.sent += 1
            yield StreamPiece(text="x")
            await asyncio.sleep(0)

    async def aclose(self) -> None:
        self.closed = True


class FakeUpstream:
    """What the routes need of Upstream: resolve, generate (answers at once), open_stream (endless)."""

    def __init__(self) -> None:
        self.requests: list[GenerateRequest] = []
        self.streams: list[EndlessStream] = []

    async def resolve(self, name: str, routing_text: Any) -> ResolvedModel:
        return MODEL

    async def generate(self, model: ResolvedModel, request: GenerateRequest) -> GenerateResponse:
        self.requests.append(request)
        tokens = request.max_tokens or 0
        return GenerateResponse(text="x" * tokens, finish_reason="length", model=model.model_id,
                                usage=Usage(prompt_tokens=1, completion_tokens=tokens, total_tokens=1 + tokens))

    async def open_stream(self, model: ResolvedModel, request: GenerateRequest) -> EndlessStream:
        self.requests.append(request)
        stream = EndlessStream()
        self.streams.append(stream)
        return stream


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[TestClient, FakeUpstream]]:
    monkeypatch.setenv("AXL_DATA_DIR", str(tmp_path / "data"))
    settings = Settings(api_keys=KEY, registry_secret="bounded-work-test-secret", registry_url="http://127.0.0.1:9")
    app = create_app(settings)
    with TestClient(app) as client:
        upstream = FakeUpstream()
        app.state.upstream = upstream
        yield client, upstream


def test_prompts_times_n_over_the_cap_is_a_400_naming_the_param(gateway) -> None:
    client, upstream = gateway
    too_many_prompts = client.post("/v1/completions", headers=AUTH, json={
        "model": "axl-coder", "prompt": ["a"] * (MAX_SAMPLES_PER_REQUEST + 1)})
    assert too_many_prompts.status_code == 400
    error = too_many_prompts.json()["error"]
    assert error["param"] == "prompt" and error["code"] == "too_many_samples", error
    times_n = client.post("/v1/completions", headers=AUTH, json={"model": "axl-coder", "prompt": ["a"] * 4, "n": 8})
    assert times_n.status_code == 400 and times_n.json()["error"]["param"] == "n"
    assert upstream.requests == []  # refused before any work
    at_the_cap = client.post("/v1/completions", headers=AUTH, json={
        "model": "axl-coder", "prompt": ["a"] * (MAX_SAMPLES_PER_REQUEST // 2), "n": 2, "max_tokens": 1})
    assert at_the_cap.status_code == 200 and len(at_the_cap.json()["choices"]) == MAX_SAMPLES_PER_REQUEST


def test_max_tokens_over_the_ceiling_is_clamped_and_ends_with_length(gateway) -> None:
    client, upstream = gateway
    ceiling = max_tokens_ceiling(WINDOW)
    assert ceiling == MAX_TOKENS_PER_WINDOW * WINDOW
    # Continue sends max_tokens 4096 with every chat: it must keep working, clamped.
    chat = client.post("/v1/chat/completions", headers=AUTH, json={
        "model": "axl-coder", "max_tokens": 4096, "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["finish_reason"] == "length"
    completion = client.post("/v1/completions", headers=AUTH, json={
        "model": "axl-coder", "prompt": "a", "max_tokens": 10**9})
    assert completion.status_code == 200 and completion.json()["choices"][0]["finish_reason"] == "length"
    small = client.post("/v1/completions", headers=AUTH, json={"model": "axl-coder", "prompt": "a", "max_tokens": 5})
    assert small.status_code == 200
    assert [r.max_tokens for r in upstream.requests] == [ceiling, ceiling, 5]


def _run(upstream: FakeUpstream, samples: int, stall_seconds: float) -> StreamRun:
    tracker = RequestMetrics(GatewayMetrics.create(CollectorRegistry()), "completions", MODEL.model_id)
    samples_ = [Sample(i, GenerateRequest(prompt="a")) for i in range(samples)]
    return StreamRun(upstream, MODEL, samples_, tracker,  # type: ignore[arg-type]
                     stall_seconds=stall_seconds)


def test_a_client_that_stops_reading_is_cut_off_and_the_workers_freed() -> None:
    async def scenario() -> None:
        upstream = FakeUpstream()
        run = _run(upstream, samples=2, stall_seconds=0.3)
        await run.wait_opened(1.0)
        ends: list[int | str] = []
        events = run.events(CompletionChunks(MODEL.model_id, False), include_usage=False, keepalive_seconds=5,
                            on_end=ends.append)
        response = EventStreamResponse(events, send_timeout_seconds=0.3)
        sent: list[dict[str, Any]] = []
        stuck = asyncio.Event()

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if len(sent) > 3:  # the client's socket is open, but it reads nothing more: writes block
                await stuck.wait()

        async def receive() -> dict[str, Any]:
            await stuck.wait()  # never a disconnect
            return {"type": "http.disconnect"}

        await asyncio.wait_for(response({"type": "http"}, receive, send), timeout=3)
        assert ends == [499]
        assert all(stream.closed for stream in upstream.streams) and len(upstream.streams) == 2
        assert all(task.done() for task in run.tasks)
        # Never more than the buffer was read from the workers meanwhile.
        assert sum(s.sent for s in upstream.streams) <= run.queue.maxsize + 8
        assert run.queue.maxsize == 2 * STREAM_BUFFER_EVENTS

    asyncio.run(scenario())


def test_a_stream_nobody_reads_stops_its_pumps_and_a_late_reader_is_told() -> None:
    async def scenario() -> None:
        upstream = FakeUpstream()
        run = _run(upstream, samples=1, stall_seconds=0.2)
        await run.wait_opened(1.0)
        await asyncio.sleep(0.6)  # the response never started (the client went away before)
        assert run.stalled and all(task.done() for task in run.tasks)
        assert all(stream.closed for stream in upstream.streams)
        ends: list[int | str] = []
        chunks = [c async for c in run.events(CompletionChunks(MODEL.model_id, False), include_usage=False,
                                              keepalive_seconds=5, on_end=ends.append)]
        assert '"client_stalled"' in chunks[-2] and chunks[-1] == "data: [DONE]\n\n"
        assert ends == [408]

    asyncio.run(scenario())
