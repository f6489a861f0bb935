"""The one error shape of the mesh: ``{"error": {"message", "type", "param", "code"}}``.

Routes raise :class:`APIError` (or one of its subclasses); :func:`install_error_handlers` turns it, FastAPI's
validation errors, Starlette's HTTP errors (unknown route, wrong method) and any unhandled exception into that
shape with the right status, so no service ever answers with another shape.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from enum import StrEnum
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)


class ErrorType(StrEnum):
    """The ``type`` values OpenAI uses, which clients (the ``openai`` package) map to exception classes."""

    INVALID_REQUEST = "invalid_request_error"
    AUTHENTICATION = "authentication_error"
    PERMISSION = "permission_error"
    NOT_FOUND = "not_found_error"
    CONFLICT = "conflict_error"
    RATE_LIMIT = "rate_limit_error"
    SERVER = "server_error"
    SERVICE_UNAVAILABLE = "service_unavailable_error"


def default_error_type(status: int) -> ErrorType:
    """The error type a status gets when the raiser does not name one."""
    if status == 401:
        return ErrorType.AUTHENTICATION
    if status == 403:
        return ErrorType.PERMISSION
    if status == 409:
        return ErrorType.CONFLICT
    if status == 429:
        return ErrorType.RATE_LIMIT
    if status == 503:
        return ErrorType.SERVICE_UNAVAILABLE
    if status >= 500:
        return ErrorType.SERVER
    return ErrorType.INVALID_REQUEST


class APIError(Exception):
    """An error a client is meant to see, with its HTTP status and the OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,  # noqa: A002 - the wire name
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = str(type or default_error_type(status))
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def to_response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers or None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, message={self.message!r}, code={self.code!r})"


class InvalidRequestError(APIError):
    """400: the request is malformed or names something that cannot be used."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(400, message, type=ErrorType.INVALID_REQUEST, param=param, code=code)


class AuthenticationError(APIError):
    """401: missing or wrong bearer token."""

    def __init__(self, message: str = "Invalid or missing bearer token.", *, code: str = "invalid_api_key") -> None:
        super().__init__(401, message, type=ErrorType.AUTHENTICATION, code=code, headers={"WWW-Authenticate": "Bearer"})


class NotFoundError(APIError):
    """404: the named object does not exist."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = "not_found") -> None:
        super().__init__(404, message, type=ErrorType.INVALID_REQUEST, param=param, code=code)


class ModelNotFoundError(NotFoundError):
    """404 with OpenAI's ``model_not_found`` code."""

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{model}' does not exist or has no healthy instance.", param="model", code="model_not_found"
        )


class PayloadTooLargeError(APIError):
    """413: the request body is over the service's limit."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(
            413,
            f"Request body is larger than the limit of {limit_bytes} bytes.",
            type=ErrorType.INVALID_REQUEST,
            code="request_too_large",
        )


class ServiceUnavailableError(APIError):
    """503 with ``Retry-After``: a dependency (Redis, a worker, the registry) cannot serve now."""

    def __init__(self, message: str, *, retry_after_seconds: int = 1, code: str = "service_unavailable") -> None:
        super().__init__(
            503,
            message,
            type=ErrorType.SERVICE_UNAVAILABLE,
            code=code,
            headers={"Retry-After": str(max(0, int(retry_after_seconds)))},
        )


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:  # noqa: A002
    """The JSON body every error response carries."""
    return {"error": {"message": message, "type": str(type), "param": param, "code": code}}


# --- mapping exceptions to responses -------------------------------------------------------------------------


def _param_from_loc(loc: Sequence[str | int]) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; the request part ('body', 'query', ...) is dropped."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _validation_error_to_api_error(exc: RequestValidationError) -> APIError:
    errors = list(exc.errors())
    if not errors:
        return InvalidRequestError("Invalid request.")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return InvalidRequestError(f"Request body is not valid JSON: {first.get('msg', '')}.", code="invalid_json")
    param = _param_from_loc(first.get("loc", ()))
    messages = []
    for err in errors[:5]:
        where = _param_from_loc(err.get("loc", ())) or "body"
        messages.append(f"'{where}': {err.get('msg', 'invalid value')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return InvalidRequestError("Invalid request: " + "; ".join(messages) + more + ".", param=param)


def _http_exception_to_api_error(request: Request, exc: StarletteHTTPException) -> APIError:
    status = exc.status_code
    default_phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if status == 404 and detail == default_phrase:
        message = f"Invalid URL ({request.method} {request.url.path})."
    elif status == 405 and detail == default_phrase:
        message = f"Method {request.method} is not allowed for {request.url.path}."
    else:
        message = detail
    code = {404: None, 405: "method_not_allowed", 413: "request_too_large"}.get(status)
    return APIError(status, message, code=code, headers=dict(exc.headers or {}))


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.to_response()


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _validation_error_to_api_error(exc).to_response()


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return _http_exception_to_api_error(request, exc).to_response()


async def _on_unhandled(request: Request, exc: Exception) -> JSONResponse:
    # The one boundary that records what nobody handled; the client gets no internals.
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return APIError(500, "The server had an error while processing your request.", code="internal_error").to_response()


def install_error_handlers(app: FastAPI) -> None:
    """Make every error this app returns OpenAI-shaped (validation errors become 400, not 422)."""
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(Exception, _on_unhandled)


# --- request body limit --------------------------------------------------------------------------------------


class _BodyTooLarge(StarletteHTTPException):
    # An HTTPException so FastAPI's body parsing re-raises it instead of turning it into a 400.
    def __init__(self, limit_bytes: int) -> None:
        super().__init__(status_code=413, detail=PayloadTooLargeError(limit_bytes).message)


class BodySizeLimitMiddleware:
    """Answer 413 (OpenAI shape) when a request body is over ``max_bytes``, declared or streamed.

    Usage: ``app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)``;
    ``path_limits={"/v1/files": 64 << 20}`` gives paths under a prefix a limit of their own (uploads).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, path_limits: dict[str, int] | None = None) -> None:
        if max_bytes < 0 or any(v < 0 for v in (path_limits or {}).values()):
            raise ValueError(f"max_bytes and path_limits must be >= 0, got {max_bytes} and {path_limits}")
        self.app = app
        self.default_max_bytes = max_bytes
        self.path_limits = sorted((path_limits or {}).items(), key=lambda kv: -len(kv[0]))  # longest prefix first

    def limit_for(self, path: str) -> int:
        for prefix, limit in self.path_limits:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return limit
        return self.default_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.limit_for(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > max_bytes:
            await PayloadTooLargeError(max_bytes).to_response()(scope, receive, send)
            return

        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise _BodyTooLarge(max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            # Normally the app's HTTPException handler already answered; this covers bodies read elsewhere.
            if response_started:
                raise
            await PayloadTooLargeError(max_bytes).to_response()(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
