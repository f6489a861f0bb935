"""The mesh secret: every internal hop (worker -> registry, gateway -> registry, gateway -> worker) carries it.

The secret is ``AXL_REGISTRY_SECRET`` (it was the registry's first and is already handed to every service by the
launcher and compose), sent as ``Authorization: Bearer <secret>``. Services that take internal calls check it with
:func:`check_mesh_bearer` (a route dependency) or :class:`MeshSecretMiddleware` (paths under a prefix, checked
before the body is read); a missing or wrong secret is a 401 in the OpenAI shape.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from axl_mesh.errors import AuthenticationError


def bearer_header(secret: str | None) -> dict[str, str]:
    """``{"Authorization": "Bearer <secret>"}``, or nothing when no secret is configured."""
    return {"Authorization": f"Bearer {secret}"} if secret else {}


def mesh_auth_error(authorization: str | None, secret: str) -> AuthenticationError | None:
    """None when ``authorization`` (the header's value) carries ``secret``; else the 401 to answer with."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return AuthenticationError("Missing mesh secret: send 'Authorization: Bearer <AXL_REGISTRY_SECRET>'.")
    if not hmac.compare_digest(token.strip().encode(), secret.encode()):
        return AuthenticationError("Wrong mesh secret (AXL_REGISTRY_SECRET).")
    return None


def check_mesh_bearer(authorization: str | None, secret: str) -> None:
    """Raise the 401 of :func:`mesh_auth_error` unless ``authorization`` carries ``secret``."""
    error = mesh_auth_error(authorization, secret)
    if error is not None:
        raise error


class MeshSecretMiddleware:
    """Answer 401 (OpenAI shape) to any request under ``path_prefix`` that does not carry the mesh secret.

    A middleware rather than a dependency so an unauthenticated caller gets its 401 before its body is read.
    """

    def __init__(self, app: ASGIApp, secret: str, path_prefix: str) -> None:
        self.app = app
        self.secret = secret
        self.path_prefix = path_prefix.rstrip("/") + "/"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["path"] + "/").startswith(self.path_prefix):
            authorization = next(
                (value.decode("latin-1") for name, value in scope.get("headers", []) if name == b"authorization"), None
            )
            error = mesh_auth_error(authorization, self.secret)
            if error is not None:
                await error.to_response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
