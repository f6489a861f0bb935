"""Server-sent events as OpenAI streams them: ``data: {json}\\n\\n`` lines, ``: keep-alive`` comments, ``[DONE]``.

:class:`EventStreamResponse` watches for the client going away while it streams (whatever ASGI version the server
speaks) and always closes the event generator, so the upstream request to the worker is closed too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

KEEPALIVE = ": keep-alive\n\n"
DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_data(payload: BaseModel | dict[str, Any]) -> str:
    """One ``data:`` event; pydantic models leave out nothing (OpenAI sends explicit nulls)."""
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json()
    else:
        body = json.dumps(payload, separators=(",", ":"))
    return f"data: {body}\n\n"


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` that stops (and closes its generator) as soon as the client disconnects, or when one
    write waits longer than ``send_timeout_seconds`` for a client that stopped reading."""

    media_type = "text/event-stream"

    def __init__(
        self,
        content: AsyncIterator[str],
        headers: dict[str, str] | None = None,
        *,
        send_timeout_seconds: float | None = None,
    ) -> None:
        super().__init__(content, headers={**SSE_HEADERS, **(headers or {})}, media_type=self.media_type)
        self._events = content
        self._send_timeout = send_timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()

        async def send_while_connected(message: Message) -> None:
            # uvicorn's send() returns silently once the client is gone; a cancellation of the streaming task
            # can also be lost (asyncio.wait_for on Python 3.11). Failing the next send stops the stream anyway.
            if gone.is_set():
                raise OSError("the client disconnected")
            # A client that keeps its socket open but reads nothing blocks send() (the server's write buffer is
            # full): past the timeout the stream ends as if it had gone, and its rows on the workers are freed.
            try:
                async with asyncio.timeout(self._send_timeout):
                    await send(message)
            except TimeoutError:
                raise OSError("the client stopped reading") from None

        async def watch() -> None:
            await _wait_for_disconnect(receive)
            gone.set()

        streaming = asyncio.ensure_future(self._stream(send_while_connected))
        watching = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, watching):
                task.cancel()
            for task in (streaming, watching):
                with contextlib.suppress(asyncio.CancelledError, OSError, Exception):
                    await task
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def _stream(self, send: Send) -> None:
        try:
            await self.stream_response(send)
        except OSError:
            pass  # the client went away mid-write


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
