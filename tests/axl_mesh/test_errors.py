"""Every error an app with install_error_handlers returns has the OpenAI shape and the right status."""

from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from axl_mesh.errors import (
    APIError,
    AuthenticationError,
    BodySizeLimitMiddleware,
    InvalidRequestError,
    ModelNotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    install_error_handlers,
)


class Message(BaseModel):
    role: str
    content: str


class ChatBody(BaseModel):
    model: str
    messages: list[Message]
    temperature: float = 1.0


def build_app(max_body_bytes: int = 1000) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes)

    @app.post("/chat")
    async def chat(body: ChatBody) -> dict:
        return {"n": len(body.messages)}

    @app.post("/raw")
    async def raw(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    @app.get("/raise/{which}")
    async def raise_(which: str) -> dict:
        errors = {
            "invalid": InvalidRequestError("bad temperature", param="temperature", code="out_of_range"),
            "auth": AuthenticationError(),
            "model": ModelNotFoundError("axl-nope"),
            "too-large": PayloadTooLargeError(10),
            "busy": ServiceUnavailableError("all workers busy", retry_after_seconds=3),
            "teapot": APIError(418, "short and stout", code="teapot"),
        }
        raise errors[which]

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("secret internals")

    return app


@pytest.fixture
def client() -> TestClient:
    with TestClient(build_app(), raise_server_exceptions=False) as test_client:
        yield test_client


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    assert list(body["error"]) == ["message", "type", "param", "code"]
    return body["error"]


@pytest.mark.parametrize(
    ("which", "status", "type_", "param", "code"),
    [
        ("invalid", 400, "invalid_request_error", "temperature", "out_of_range"),
        ("auth", 401, "authentication_error", None, "invalid_api_key"),
        ("model", 404, "invalid_request_error", "model", "model_not_found"),
        ("too-large", 413, "invalid_request_error", None, "request_too_large"),
        ("busy", 503, "service_unavailable_error", None, "service_unavailable"),
        ("teapot", 418, "invalid_request_error", None, "teapot"),
    ],
)
def test_api_errors_keep_status_type_param_and_code(
    client: TestClient, which: str, status: int, type_: str, param: str | None, code: str
) -> None:
    error = error_of(client.get(f"/raise/{which}"), status)
    assert (error["type"], error["param"], error["code"]) == (type_, param, code)
    assert error["message"]


def test_extra_headers_travel_with_the_error(client: TestClient) -> None:
    assert client.get("/raise/busy").headers["retry-after"] == "3"
    assert client.get("/raise/auth").headers["www-authenticate"] == "Bearer"


def test_validation_errors_are_400_and_name_the_nested_field(client: TestClient) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "user"}]}
    error = error_of(client.post("/chat", json=body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "messages[1].content"
    assert "messages[1].content" in error["message"]

    error = error_of(client.post("/chat", json={"model": "m", "messages": [], "temperature": "hot"}), 400)
    assert error["param"] == "temperature"


def test_invalid_json_is_400(client: TestClient) -> None:
    response = client.post("/chat", content=b"{not json", headers={"content-type": "application/json"})
    assert error_of(response, 400)["code"] == "invalid_json"


def test_unknown_routes_and_wrong_methods(client: TestClient) -> None:
    error = error_of(client.get("/v1/unknown"), 404)
    assert error["message"] == "Invalid URL (GET /v1/unknown)."
    response = client.get("/chat")
    assert error_of(response, 405)["code"] == "method_not_allowed"
    assert response.headers["allow"] == "POST"


def test_unhandled_exceptions_are_500_logged_and_leak_nothing(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="axl_mesh.errors"):
        error = error_of(client.get("/boom"), 500)
    assert error["type"] == "server_error"
    assert "secret internals" not in error["message"]
    [record] = [r for r in caplog.records if r.name == "axl_mesh.errors"]
    assert record.exc_info is not None and "secret internals" in str(record.exc_info[1])


def test_body_limit_rejects_declared_and_streamed_bodies(client: TestClient) -> None:
    assert client.post("/raw", content=b"x" * 1000).json() == {"bytes": 1000}
    declared = client.post("/raw", content=b"x" * 1001)
    assert error_of(declared, 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit must trip while streaming
        for _ in range(20):
            yield b"y" * 100

    streamed = client.post("/raw", content=chunks())
    assert "content-length" not in streamed.request.headers
    assert error_of(streamed, 413)["code"] == "request_too_large"
    json_route = client.post("/chat", content=chunks(), headers={"content-type": "application/json"})
    assert error_of(json_route, 413)["code"] == "request_too_large"


def test_body_limit_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        BodySizeLimitMiddleware(FastAPI(), max_bytes=-1)


def test_paths_can_have_a_larger_body_limit() -> None:
    limits = BodySizeLimitMiddleware(FastAPI(), max_bytes=10, path_limits={"/v1/files": 1000})
    assert limits.limit_for("/v1/files") == 1000 and limits.limit_for("/v1/files/file-1/content") == 1000
    assert limits.limit_for("/v1/filesystem") == 10 and limits.limit_for("/v1/completions") == 10
