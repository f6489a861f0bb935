"""The worker's stream lines are one typed contract: what the worker writes (``stream_line``) the gateway reads back
(``parse_stream_line``) as the same models, over a real socket; a line outside the protocol is a 502, not a guess."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from axl_mesh.errors import APIError, error_body
from axl_mesh.registry_schemas import InstanceRecord
from axl_mesh.worker_protocol import (
    GenerateRequest,
    StreamEnd,
    StreamPiece,
    TokenLogprobOut,
    Usage,
    WorkerError,
    WorkerErrorDetail,
    parse_stream_line,
    stream_line,
)
from services.api_gateway.upstream import UpstreamStream
from services.api_gateway.worker_client import WorkerClient
from tests.support import free_port

pytestmark = pytest.mark.timeout(60)

LINES: list[StreamPiece | StreamEnd | WorkerError] = [
    StreamPiece(text="def f():\n"),
    StreamPiece(text="", logprob=TokenLogprobOut(token="\xe2", logprob=-0.25, top_logprobs={"\xe2": -0.25})),
    StreamPiece(text='é"\\\u2028', logprob=TokenLogprobOut(token="\n", logprob=-1.5,
                                                             top_logprobs={"\n": -1.5, " ": -2.0, '"': -3.0})),
    StreamEnd(finish_reason="length", usage=Usage(prompt_tokens=9, completion_tokens=3, total_tokens=12),
              model="axl-coder"),
]
FAILED = WorkerError(error=WorkerErrorDetail(message="out of memory", type="server_error", code="generation_failed"))


def test_every_line_round_trips_and_the_wire_is_unchanged() -> None:
    for line in [*LINES, FAILED]:
        raw = stream_line(line)
        assert raw.endswith(b"\n") and raw.count(b"\n") == 1  # one NDJSON line, whatever the text holds
        assert parse_stream_line(raw) == line and type(parse_stream_line(raw)) is type(line)
    # The shapes the gateway read before the models existed: an error line is the usual error body.
    assert json.loads(stream_line(FAILED)) == error_body("out of memory", "server_error", None, "generation_failed")
    assert json.loads(stream_line(LINES[0])) == {"text": "def f():\n", "logprob": None}


@pytest.mark.parametrize("raw", [
    b'{"finish_reason": "maybe", "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}, '
    b'"model": "m"}',
    b'{"finish_reason": "stop"}',  # an end without usage: the gateway used to count it as zero tokens
    b'{"text": 3}',
    b'{"error": "boom"}',
    b"[1]",
    b"not json",
])
def test_a_line_outside_the_protocol_is_refused(raw: bytes) -> None:
    with pytest.raises(ValidationError):
        parse_stream_line(raw)


def _worker(body: list[bytes]) -> Starlette:
    async def generate(request: Request) -> StreamingResponse:
        async def lines() -> AsyncIterator[bytes]:
            for line in body:
                yield line
                await asyncio.sleep(0)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return Starlette(routes=[Route("/internal/v1/generate", generate, methods=["POST"])])


async def _read(body: list[bytes]) -> list[StreamPiece | StreamEnd | WorkerError | APIError]:
    """What the gateway's UpstreamStream makes of ``body`` streamed by a real uvicorn server."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_worker(body), host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    client = WorkerClient(connect_timeout=2, read_timeout=10)
    got: list[StreamPiece | StreamEnd | WorkerError | APIError] = []
    try:
        response = await client.stream(f"http://127.0.0.1:{port}/internal/v1/generate", {"stream": True})
        instance = InstanceRecord.model_construct(instance_id="worker-under-test")
        stream = UpstreamStream(instance, response, lambda: None)
        try:
            async for line in stream.events():
                got.append(line)
        except APIError as exc:
            got.append(exc)
        finally:
            await stream.aclose()
    finally:
        await client.aclose()
        server.should_exit = True
        await task
    return got


def test_the_gateway_reads_the_workers_lines_over_a_socket_as_the_same_models() -> None:
    assert asyncio.run(_read([stream_line(line) for line in LINES])) == LINES
    assert asyncio.run(_read([stream_line(LINES[0]), stream_line(FAILED)])) == [LINES[0], FAILED]


def test_a_stream_line_outside_the_protocol_ends_the_stream_with_a_502() -> None:
    got = asyncio.run(_read([stream_line(LINES[0]), b'{"finish_reason": "stop"}\n', stream_line(LINES[-1])]))
    assert got[0] == LINES[0] and len(got) == 2
    error = got[1]
    assert isinstance(error, APIError) and error.status == 502 and error.code == "upstream_error"


def test_max_tokens_has_one_bound_and_one_default_per_endpoint() -> None:
    from axl_mesh.agent_protocol import AgentSampling
    from axl_mesh.protocol import DEFAULT_COMPLETION_MAX_TOKENS, ChatCompletionRequest, CompletionRequest

    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    makers = [
        lambda n: CompletionRequest(model="m", prompt="p", max_tokens=n),
        lambda n: ChatCompletionRequest(**chat, max_tokens=n),
        lambda n: ChatCompletionRequest(**chat, max_completion_tokens=n),
        lambda n: GenerateRequest(prompt="p", max_tokens=n),
        lambda n: AgentSampling(max_tokens=n),
    ]
    for make in makers:  # every request that carries max_tokens refuses 0 and takes 1, by the same MaxTokens
        make(1)
        with pytest.raises(ValidationError, match="greater than or equal to 1"):
            make(0)
    # A completion left without one, or sent null, gets the one default; a chat's is the gateway's setting.
    assert CompletionRequest(model="m", prompt="p").requested_max_tokens() == DEFAULT_COMPLETION_MAX_TOKENS
    assert CompletionRequest(model="m", prompt="p", max_tokens=None).requested_max_tokens() == \
        DEFAULT_COMPLETION_MAX_TOKENS
    assert ChatCompletionRequest(**chat).requested_max_tokens() is None
