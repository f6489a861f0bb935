"""A small pooled HTTP/1.1 client for the gateway's one hot call: ``POST`` JSON to a model worker.

httpx/httpcore spent about a millisecond of CPU per worker call on this machine (request building, the anyio
layers, h11 events, headers and body sent as two packets); this client writes one packet and parses the
answer with a few bytes methods. It keeps what the gateway relies on:

- keep-alive: connections are reused per host (LIFO, so idle ones age out); an idle connection the worker closed
  is noticed before reuse, and one that dies before any byte of the answer was read is retried once on a fresh
  connection (a worker closing an idle keep-alive connection just as we send on it);
- timeouts: ``connect_timeout`` for opening a connection (or waiting for a free one), ``read_timeout`` for each
  read of the answer (a worker stuck mid-stream ends the call, it never hangs);
- typed errors: :class:`WorkerConnectError` (refused, unreachable, connect timeout: nothing was sent, try
  another replica), :class:`WorkerReadTimeout`, :class:`WorkerProtocolError` (closed or reset mid-answer);
- streaming: :meth:`WorkerClient.stream` returns once the status line and headers are in; its body is read
  (chunked or sized) line by line; closing it early closes the connection, so the worker sees the disconnect
  and drops the request;
- the mesh secret: every request carries ``Authorization: Bearer <mesh_secret>`` (workers answer 401 without it).

    client = WorkerClient(mesh_secret=settings.registry_secret_value(), connect_timeout=2, read_timeout=300)
    answer = await client.post_json("http://127.0.0.1:8901/internal/v1/generate", {"prompt": "x"})
    async with await client.stream(url, payload) as response:
        async for line in response.lines(): ...
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

MAX_HEADER_BYTES = 64 * 1024
# uvicorn closes keep-alive connections idle for 5 s; drop ours a little earlier rather than race it.
DEFAULT_IDLE_SECONDS = 4.0


class WorkerClientError(Exception):
    """Any failure of a call to a worker (transport level; HTTP error statuses are answers, not errors)."""


class WorkerConnectError(WorkerClientError):
    """No connection could be made (refused, unreachable, connect timeout, no free connection): nothing was sent."""


class WorkerReadTimeout(WorkerClientError):
    """The worker did not send the next part of its answer within ``read_timeout``."""


class WorkerProtocolError(WorkerClientError):
    """The connection closed or broke mid-answer, or the answer was not HTTP/1.1 as expected."""


@dataclass(frozen=True)
class _Origin:
    host: str
    port: int
    tls: bool
    host_header: bytes

    @classmethod
    def parse(cls, url: str) -> tuple[_Origin, str]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"worker URL must be http(s)://host[:port]/path, got {url!r}")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return cls(parts.hostname, port, tls, parts.netloc.encode("ascii")), path


class _Connection:
    """One keep-alive connection: a stream reader/writer pair and when it was last released."""

    __slots__ = ("origin", "reader", "writer", "idle_since", "reused")

    def __init__(self, origin: _Origin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.origin = origin
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0
        self.reused = False

    def usable(self, now: float, idle_seconds: float) -> bool:
        """Still open, nothing unread (an idle connection that got data or EOF was closed by the worker)."""
        # asyncio.StreamReader has no public accessor for bytes received and not yet read: its _buffer holds them.
        unread = self.reader._buffer  # type: ignore[attr-defined]  # noqa: SLF001
        return (
            not self.writer.is_closing()
            and not self.reader.at_eof()
            and not unread
            and now - self.idle_since < idle_seconds
        )

    def close(self) -> None:
        self.writer.close()  # no wait: the transport closes in the background


class WorkerResponse:
    """An answer whose status line and headers were read; the body is read with :meth:`read` or :meth:`lines`.

    Close it (``aclose`` or ``async with``): a fully read body gives the connection back for reuse, an unread
    one closes it (which is how the worker learns that the client went away)."""

    def __init__(self, client: WorkerClient, conn: _Connection, status: int, headers: dict[str, str]) -> None:
        self.status_code = status
        self.headers = headers  # names lower-cased
        self._client = client
        self._conn: _Connection | None = conn
        self._keep_alive = headers.get("connection", "").lower() != "close"
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        if self._chunked:
            self._remaining = -1
        elif length is not None:
            try:
                self._remaining = int(length)
            except ValueError:
                raise WorkerProtocolError(f"bad Content-Length {length!r}") from None
            if self._remaining < 0:
                raise WorkerProtocolError(f"bad Content-Length {length!r}")
        else:  # the body runs until the worker closes the connection
            self._remaining = -1
            self._keep_alive = False
        self._finished = self._remaining == 0 and not self._chunked

    # --- reading ---

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([piece async for piece in self.iter_bytes()])

    async def json(self) -> Any:
        return json.loads(await self.read())

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunk framing removed)."""
        conn = self._conn
        if conn is None or self._finished:
            return
        reader = conn.reader
        timeout = self._client.read_timeout
        try:
            if self._chunked:
                while True:
                    async with asyncio.timeout(timeout):
                        size_line = await reader.readuntil(b"\r\n")
                    try:
                        size = int(size_line.split(b";", 1)[0].strip(), 16)
                    except ValueError:
                        raise WorkerProtocolError(f"bad chunk size line {size_line[:40]!r}") from None
                    if size == 0:
                        async with asyncio.timeout(timeout):
                            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the blank line
                                pass
                        break
                    async with asyncio.timeout(timeout):
                        data = await reader.readexactly(size + 2)
                    yield data[:-2]
            elif self._remaining >= 0:
                while self._remaining > 0:
                    async with asyncio.timeout(timeout):
                        data = await reader.read(min(self._remaining, 1 << 16))
                    if not data:
                        raise WorkerProtocolError("the worker closed the connection before the body ended")
                    self._remaining -= len(data)
                    yield data
            else:
                while True:
                    async with asyncio.timeout(timeout):
                        data = await reader.read(1 << 16)
                    if not data:
                        break
                    yield data
        except TimeoutError:
            raise WorkerReadTimeout(f"no data from the worker within {timeout} s") from None
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError) as exc:
            raise WorkerProtocolError(f"the connection to the worker broke mid-answer: {exc!r}") from exc
        self._finished = True

    async def lines(self) -> AsyncIterator[bytes]:
        """The body split on newlines (NDJSON), without the line endings; a last unterminated line included."""
        pending = b""
        async for piece in self.iter_bytes():
            pending += piece
            if b"\n" in pending:
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    yield line
        if pending:
            yield pending

    # --- closing ---

    async def aclose(self) -> None:
        """Give the connection back (body fully read, keep-alive) or close it."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._finished and self._keep_alive:
            self._client._release(conn)  # noqa: SLF001
        else:
            self._client._discard(conn)  # noqa: SLF001

    async def __aenter__(self) -> WorkerResponse:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class WorkerClient:
    """Pooled keep-alive HTTP/1.1 client for JSON POSTs to workers (see the module docstring)."""

    def __init__(
        self,
        *,
        connect_timeout: float = 2.0,
        read_timeout: float = 300.0,
        max_connections: int = 256,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
        ssl_context: ssl.SSLContext | None = None,
        mesh_secret: str | None = None,
    ) -> None:
        if mesh_secret is not None and any(c in mesh_secret for c in "\r\n"):
            raise ValueError("the mesh secret must not contain line breaks")  # it goes into a header line as is
        # One pre-built header line, so the hot path only joins bytes.
        self._auth_line = f"Authorization: Bearer {mesh_secret}\r\n".encode() if mesh_secret else b""
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle_seconds = idle_seconds
        self._ssl_context = ssl_context
        self._slots = asyncio.Semaphore(max_connections)  # open connections, idle ones included
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._origins: dict[str, tuple[_Origin, str]] = {}
        self._closed = False

    # --- calls ---

    async def post_json(self, url: str, payload: Any) -> tuple[int, dict[str, str], bytes]:
        """POST ``payload`` as JSON; returns (status, headers, body) once the whole answer is in."""
        response = await self.stream(url, payload)
        try:
            body = await response.read()
        finally:
            await response.aclose()
        return response.status_code, response.headers, body

    async def stream(self, url: str, payload: Any) -> WorkerResponse:
        """POST ``payload`` as JSON; returns once the status line and headers are in (read the body, then close)."""
        if self._closed:
            raise WorkerClientError("the worker client is closed")
        origin, path = self._origin(url)
        body = json.dumps(payload, separators=(",", ":")).encode()
        request = b"".join(
            (
                b"POST ",
                path.encode("ascii"),
                b" HTTP/1.1\r\nHost: ",
                origin.host_header,
                b"\r\nContent-Type: application/json\r\nAccept: */*\r\n",
                self._auth_line,
                b"Content-Length: ",
                str(len(body)).encode(),
                b"\r\n\r\n",
                body,
            )
        )
        conn = await self._acquire(origin)
        try:
            return await self._exchange(conn, request)
        except WorkerProtocolError:
            if not conn.reused:
                raise
            # A reused connection that broke before any byte of the answer: the worker most likely closed it
            # as idle while we sent. Nothing was processed; try once more on a fresh connection.
        conn = await self._acquire(origin, fresh=True)
        return await self._exchange(conn, request)

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    # --- internals ---

    def _origin(self, url: str) -> tuple[_Origin, str]:
        cached = self._origins.get(url)
        if cached is None:
            if len(self._origins) > 1024:
                self._origins.clear()
            cached = self._origins[url] = _Origin.parse(url)
        return cached

    async def _exchange(self, conn: _Connection, request: bytes) -> WorkerResponse:
        """Send the request and read the status line and headers; on any failure the connection is closed."""
        try:
            conn.writer.write(request)
            reader = conn.reader
            async with asyncio.timeout(self.read_timeout):
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    status, headers = _parse_head(head)
                    if status >= 200:
                        break  # skip 1xx interim answers
            return WorkerResponse(self, conn, status, headers)
        except BaseException as exc:
            self._discard(conn)
            if isinstance(exc, TimeoutError):
                raise WorkerReadTimeout(f"no answer from the worker within {self.read_timeout} s") from None
            if isinstance(exc, asyncio.LimitOverrunError):
                raise WorkerProtocolError("the worker's answer headers are too long") from exc
            if isinstance(exc, (asyncio.IncompleteReadError, ConnectionError, OSError)):
                raise WorkerProtocolError(f"the connection to the worker broke: {exc!r}") from exc
            raise

    async def _acquire(self, origin: _Origin, fresh: bool = False) -> _Connection:
        if not fresh:
            idle = self._idle.get(origin)
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if conn.usable(now, self.idle_seconds):
                    conn.reused = True
                    return conn
                self._discard(conn)
        if self._slots.locked():
            self._evict_oldest_idle()  # at the connection limit: an idle connection elsewhere makes room
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._slots.acquire()
                try:
                    reader, writer = await asyncio.open_connection(
                        origin.host,
                        origin.port,
                        limit=MAX_HEADER_BYTES,
                        ssl=(self._ssl_context or ssl.create_default_context()) if origin.tls else None,
                    )
                except BaseException:
                    self._slots.release()
                    raise
        except TimeoutError:
            raise WorkerConnectError(
                f"connect to {origin.host}:{origin.port} timed out after {self.connect_timeout} s"
            ) from None
        except OSError as exc:  # refused, unreachable, name not found
            raise WorkerConnectError(f"cannot connect to {origin.host}:{origin.port}: {exc!r}") from exc
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Connection(origin, reader, writer)

    def _release(self, conn: _Connection) -> None:
        if self._closed or conn.writer.is_closing():
            self._discard(conn)
            return
        now = conn.idle_since = time.monotonic()
        idle = self._idle.setdefault(conn.origin, [])
        while idle and not idle[0].usable(now, self.idle_seconds):
            self._discard(idle.pop(0))  # the oldest ones, closed by the worker or idle too long: never reused
        idle.append(conn)

    def _evict_oldest_idle(self) -> None:
        oldest: list[_Connection] | None = None
        for conns in self._idle.values():
            if conns and (oldest is None or conns[0].idle_since < oldest[0].idle_since):
                oldest = conns
        if oldest:
            self._discard(oldest.pop(0))

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._slots.release()


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """``HTTP/1.1 200 OK\\r\\nName: value\\r\\n...\\r\\n\\r\\n`` -> (200, {"name": "value"})."""
    lines = head[:-4].decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/1."):
        raise WorkerProtocolError(f"not an HTTP/1.x answer: {lines[0][:60]!r}")
    try:
        status = int(rest[:3])
    except ValueError:
        raise WorkerProtocolError(f"bad status line {lines[0][:60]!r}") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if version == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
        headers["connection"] = "close"
    return status, headers
