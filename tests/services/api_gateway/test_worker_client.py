"""The gateway's pooled HTTP/1.1 worker client over real loopback sockets: keep-alive reuse against uvicorn,
chunked streaming, a worker that dies mid-stream, a refused connection, timeouts, an idle connection the worker
closed, and an unfinished stream closed early (the worker must see the disconnect)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from axl_mesh.mesh_auth import MeshSecretMiddleware
from services.api_gateway.worker_client import (
    WorkerClient,
    WorkerConnectError,
    WorkerProtocolError,
    WorkerReadTimeout,
)
from tests.support import free_port

pytestmark = pytest.mark.timeout(30)


# --- a real uvicorn server (what workers run) --------------------------------------------------------------------


def _worker_app(client_ports: list[int]) -> Starlette:
    async def generate(request: Request) -> JSONResponse | StreamingResponse:
        client_ports.append(request.client.port if request.client else -1)
        body = await request.json()
        if body.get("status"):
            return JSONResponse({"error": {"message": "full", "code": "busy"}}, status_code=body["status"],
                                headers={"Retry-After": "3"})
        if not body.get("stream"):
            return JSONResponse({"text": body["prompt"][::-1], "n": len(client_ports)})

        async def lines() -> AsyncIterator[bytes]:
            for i in range(body["pieces"]):
                yield (json.dumps({"text": str(i)}) + "\n").encode()
                await asyncio.sleep(0)
            yield b'{"finish_reason": "stop"}\n'

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return Starlette(routes=[Route("/internal/v1/generate", generate, methods=["POST"])])


@asynccontextmanager
async def uvicorn_worker(
    client_ports: list[int], keep_alive_seconds: float = 5, mesh_secret: str | None = None
) -> AsyncIterator[str]:
    port = free_port()
    app = _worker_app(client_ports)
    if mesh_secret is not None:  # what a real worker puts in front of /internal
        app = MeshSecretMiddleware(app, secret=mesh_secret, path_prefix="/internal")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", timeout_keep_alive=keep_alive_seconds))
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/internal/v1/generate"
    finally:
        server.should_exit = True
        await task


def test_keep_alive_reuses_one_connection_for_json_and_chunked_streams() -> None:
    async def main() -> None:
        ports: list[int] = []
        async with uvicorn_worker(ports) as url:
            client = WorkerClient(connect_timeout=2, read_timeout=5)
            try:
                for i in range(5):
                    status, headers, body = await client.post_json(url, {"prompt": f"abc{i}"})
                    assert status == 200 and json.loads(body)["text"] == f"{i}cba"
                    assert headers["content-type"] == "application/json"
                async with await client.stream(url, {"stream": True, "pieces": 50}) as response:
                    assert response.status_code == 200 and "chunked" in response.headers["transfer-encoding"]
                    lines = [json.loads(line) async for line in response.lines()]
                assert [line.get("text") for line in lines[:-1]] == [str(i) for i in range(50)]
                assert lines[-1] == {"finish_reason": "stop"}
                # An error answer is an answer: status, Retry-After and body come back, the connection stays.
                status, headers, body = await client.post_json(url, {"status": 503})
                assert status == 503 and headers["retry-after"] == "3" and json.loads(body)["error"]["code"] == "busy"
                await client.post_json(url, {"prompt": "x"})
            finally:
                await client.aclose()
        assert len(ports) == 8 and len(set(ports)) == 1, ports  # every call on the same connection

    asyncio.run(main())


def test_every_call_carries_the_mesh_secret() -> None:
    async def main() -> None:
        ports: list[int] = []
        async with uvicorn_worker(ports, mesh_secret="the-mesh-secret") as url:
            client = WorkerClient(connect_timeout=2, read_timeout=5, mesh_secret="the-mesh-secret")
            outsider = WorkerClient(connect_timeout=2, read_timeout=5)
            try:
                for _ in range(2):  # a fresh and a reused connection
                    status, _, body = await client.post_json(url, {"prompt": "abc"})
                    assert status == 200 and json.loads(body)["text"] == "cba"
                async with await client.stream(url, {"stream": True, "pieces": 3}) as response:
                    assert response.status_code == 200
                    assert len([line async for line in response.lines()]) == 4
                status, headers, body = await outsider.post_json(url, {"prompt": "abc"})
                assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
            finally:
                await client.aclose()
                await outsider.aclose()
        assert len(ports) == 3  # the outsider never reached the route

    asyncio.run(main())


def test_a_mesh_secret_cannot_inject_header_lines() -> None:
    with pytest.raises(ValueError):
        WorkerClient(mesh_secret="secret\r\nX-Evil: 1")


def test_a_connection_the_worker_closed_while_idle_is_not_reused() -> None:
    async def main() -> None:
        ports: list[int] = []
        async with uvicorn_worker(ports, keep_alive_seconds=0.1) as url:
            client = WorkerClient(connect_timeout=2, read_timeout=5)
            try:
                await client.post_json(url, {"prompt": "a"})
                await asyncio.sleep(0.4)  # uvicorn closes the idle connection meanwhile
                status, _, _ = await client.post_json(url, {"prompt": "b"})
                assert status == 200
            finally:
                await client.aclose()
        assert len(set(ports)) == 2

    asyncio.run(main())


# --- raw servers for the failure cases ---------------------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/internal/v1/generate"
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return await reader.readexactly(length)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"


def test_a_worker_that_dies_mid_stream_is_a_protocol_error_after_the_lines_it_sent() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(STREAM_HEAD + chunk(b'{"text": "a"}\n{"te') + chunk(b'xt": "b"}\n'))
        await writer.drain()
        writer.transport.abort()  # killed: no terminating chunk

    async def main() -> None:
        async with raw_server(handler) as url:
            client = WorkerClient(connect_timeout=2, read_timeout=5)
            got = []
            response = await client.stream(url, {"stream": True})
            with pytest.raises(WorkerProtocolError):
                async for line in response.lines():
                    got.append(json.loads(line))
            await response.aclose()
            assert got == [{"text": "a"}, {"text": "b"}]
            await client.aclose()

    asyncio.run(main())


def test_refused_connection_is_a_connect_error() -> None:
    async def main() -> None:
        client = WorkerClient(connect_timeout=2, read_timeout=5)
        with pytest.raises(WorkerConnectError):
            await client.post_json(f"http://127.0.0.1:{free_port()}/internal/v1/generate", {})
        await client.aclose()

    asyncio.run(main())


def test_read_timeout_and_waiting_for_a_free_connection_are_bounded() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(10)  # never answers

    async def main() -> None:
        async with raw_server(silent) as url:
            client = WorkerClient(connect_timeout=0.2, read_timeout=0.3, max_connections=1)
            started = time.monotonic()
            with pytest.raises(WorkerReadTimeout):
                await client.post_json(url, {})
            assert 0.25 < time.monotonic() - started < 2
            # The timed-out connection was closed and its slot freed; hold the only slot, then ask for another.
            holder = asyncio.ensure_future(client.post_json(url, {}))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            with pytest.raises(WorkerConnectError):
                await client.post_json(url, {})
            assert 0.15 < time.monotonic() - started < 2
            with pytest.raises(WorkerReadTimeout):
                await holder
            await client.aclose()

    asyncio.run(main())


def test_a_reused_connection_that_closes_before_answering_is_retried_on_a_fresh_one() -> None:
    served: list[int] = []

    async def once_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answers one request, then closes the connection as soon as the next one arrives (an idle-close race).
        await read_request(reader)
        served.append(1)
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n{"ok": true}')
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()

    async def main() -> None:
        async with raw_server(once_per_connection) as url:
            client = WorkerClient(connect_timeout=2, read_timeout=5)
            for _ in range(3):
                status, _, body = await client.post_json(url, {})
                assert status == 200 and json.loads(body) == {"ok": True}
            await client.aclose()
        assert len(served) == 3

    asyncio.run(main())


def test_closing_an_unfinished_stream_closes_the_connection() -> None:
    async def main() -> None:
        disconnected = asyncio.Event()

        async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(STREAM_HEAD)
            try:
                while True:
                    writer.write(chunk(b'{"text": "x"}\n'))
                    await writer.drain()
                    await asyncio.sleep(0.01)
            except ConnectionError:
                disconnected.set()

        async with raw_server(endless) as url:
            client = WorkerClient(connect_timeout=2, read_timeout=5)
            response = await client.stream(url, {"stream": True})
            async for line in response.lines():
                assert json.loads(line) == {"text": "x"}
                break
            await response.aclose()
            await asyncio.wait_for(disconnected.wait(), 5)
            await client.aclose()

    asyncio.run(main())
