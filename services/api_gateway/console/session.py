"""The console's login session and CSRF tokens: the same API keys as ``/v1``, carried by a cookie, not a header.

- Session cookie (``axl_session``): ``<expiry>.<HMAC(console secret, expiry + API key)>``. Opaque (the key cannot
  be read back from it), HttpOnly, SameSite=Strict, path ``/ui``; it stops working when it expires or when its key
  leaves ``AXL_API_KEYS``. The key itself travels once, in the login form's body, never in a URL.
- CSRF: a random nonce cookie (``axl_csrf``) and, in every form and in the console's ``fetch`` calls, the token
  ``HMAC(console secret, nonce)``; a POST must carry the token of its own cookie (a signed double submit, so login
  is covered too) and, when the browser sends ``Origin``, come from this gateway's own origin.
- The console secret is derived from the mesh secret (``AXL_REGISTRY_SECRET``) with its own label, so no new
  setting is needed and the mesh secret itself never signs anything a browser holds.

With no API keys the gateway is open and so is the console (the Host check of ``exposure.py`` applies to it as it
does to the API); CSRF tokens are still required on every POST.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence
from urllib.parse import quote, urlsplit

from starlette.datastructures import Headers
from starlette.responses import RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from axl_mesh.errors import APIError, AuthenticationError, ErrorType

CONSOLE_PREFIX = "/ui"
SESSION_COOKIE = "axl_session"
CSRF_COOKIE = "axl_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
# Reachable without a session: the login form and the vendored scripts/styles it needs.
PUBLIC_PATHS = (CONSOLE_PREFIX + "/login", CONSOLE_PREFIX + "/static/")


def console_secret(mesh_secret: str) -> bytes:
    return hmac.new(mesh_secret.encode(), b"axl-console-v1", hashlib.sha256).digest()


class ConsoleAuth:
    """Makes and checks session cookies and CSRF tokens for ``keys`` (empty: the console is open)."""

    def __init__(self, secret: bytes, keys: Sequence[bytes], session_seconds: int) -> None:
        self.secret = secret
        self.keys = list(keys)
        self.session_seconds = session_seconds

    @property
    def open(self) -> bool:
        return not self.keys

    def _mac(self, *parts: bytes) -> str:
        return hmac.new(self.secret, b"\0".join(parts), hashlib.sha256).hexdigest()

    # --- login
    def matching_key(self, given: str) -> bytes | None:
        """The configured key equal to ``given`` (compared against every key: timing tells nothing)."""
        found = None
        for key in self.keys:
            if hmac.compare_digest(given.encode(), key):
                found = key
        return found

    def session_value(self, key: bytes, now: float | None = None) -> str:
        expires = int((now if now is not None else time.time()) + self.session_seconds)
        return f"{expires}.{self._mac(b'session', str(expires).encode(), key)}"

    def session_valid(self, value: str | None, now: float | None = None) -> bool:
        if self.open:
            return True
        expires, _, mac = (value or "").partition(".")
        if not expires.isdigit() or int(expires) <= (now if now is not None else time.time()):
            return False
        valid = False
        for key in self.keys:
            valid |= hmac.compare_digest(mac, self._mac(b"session", expires.encode(), key))
        return valid

    # --- CSRF
    @staticmethod
    def new_nonce() -> str:
        return secrets.token_hex(16)

    def csrf_token(self, nonce: str) -> str:
        return self._mac(b"csrf", nonce.encode())

    def csrf_valid(self, nonce: str | None, token: str | None) -> bool:
        return bool(nonce and token) and hmac.compare_digest(self.csrf_token(nonce or ""), token or "")


def same_origin(headers: Headers) -> bool:
    """False only when the browser says the request comes from another origin than the Host it was sent to."""
    origin = headers.get("origin")
    if origin is None:
        return True  # not sent (old browsers, same-origin GET); SameSite=Strict and the token still apply
    return urlsplit(origin).netloc.lower() == headers.get("host", "").lower()


def set_cookie(response: Response, name: str, value: str, *, max_age: int | None, secure: bool) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path=CONSOLE_PREFIX, httponly=True, samesite="strict", secure=secure
    )


class ConsoleAuthMiddleware:
    """Every ``/ui`` path but the login form and static files needs a valid session cookie when keys are set.

    Checked from the headers alone, before any body is read (as ``auth.ApiKeyMiddleware`` does for ``/v1``): a page
    redirects to the login form, the console's JSON endpoints answer an OpenAI-shaped 401."""

    def __init__(self, app: ASGIApp, auth: ConsoleAuth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        guarded = path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/")
        if guarded and not path.startswith(PUBLIC_PATHS) and not self.auth.open:
            cookie = _cookie(Headers(scope=scope), SESSION_COOKIE)
            if not self.auth.session_valid(cookie):
                response: Response
                if path.startswith(CONSOLE_PREFIX + "/api/") or scope.get("method") != "GET":
                    response = AuthenticationError(
                        "Log in to the console first (or send an API key to /v1)."
                    ).to_response()
                else:
                    response = RedirectResponse(f"{CONSOLE_PREFIX}/login?next={quote(path)}", status_code=303)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _cookie(headers: Headers, name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def csrf_error() -> APIError:
    return APIError(
        403,
        "Missing or invalid CSRF token (reload the page and try again).",
        type=ErrorType.PERMISSION,
        code="csrf_failed",
    )
