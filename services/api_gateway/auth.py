"""Bearer-key auth for ``/v1/*``, checked before anything reads the request body.

An ASGI middleware rather than a route dependency: FastAPI reads and parses the body (up to an upload's 65 MiB)
before a dependency runs, so an unauthenticated caller could make the gateway do that work for a 401. Here the
401 goes out from the headers alone and the body is never received. Paths outside ``/v1`` (``/healthz``,
``/readyz``, ``/metrics``) stay open, and CORS preflights are answered by the CORS middleware outside this one.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from axl_mesh.errors import AuthenticationError

PROTECTED_PREFIX = "/v1"


def is_protected(path: str) -> bool:
    return path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")


def key_problem(authorization: str, keys: Sequence[bytes]) -> AuthenticationError | None:
    """None when ``authorization`` (the header's value) carries one of ``keys``; else the 401 to answer."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return AuthenticationError("Missing API key: send 'Authorization: Bearer <key>'.")
    given = token.strip().encode()
    # Compare against every key (no early exit) so timing says nothing about which key is close.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    return None if matched else AuthenticationError("Incorrect API key provided.")


class ApiKeyMiddleware:
    """With keys configured, every ``/v1`` request needs ``Authorization: Bearer <one of them>``; no keys: open."""

    def __init__(self, app: ASGIApp, keys: Sequence[bytes]) -> None:
        self.app = app
        self.keys = list(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys and is_protected(scope["path"]):
            authorization = ""
            for name, value in scope.get("headers", []):
                if name == b"authorization":
                    authorization = value.decode("latin-1")
                    break
            problem = key_problem(authorization, self.keys)
            if problem is not None:
                # Answered without calling receive(): the body stays unread (the server discards or closes).
                await problem.to_response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
