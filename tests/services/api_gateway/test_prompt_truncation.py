"""The gateway's side of fitting prompts into the window: which requests ask the worker to fit (the request's
``truncate``, else AXL_TRUNCATE_PROMPTS), the ``x-axl-prompt-truncated`` header from the workers' reports, and
editors' FIM templates turned into prompt + suffix for FIM models."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from axl_mesh.protocol import PROMPT_TRUNCATED_HEADER
from axl_mesh.worker_protocol import GenerateRequest, GenerateResponse, StreamEnd, StreamPiece, Usage
from services.api_gateway.main import create_app
from services.api_gateway.settings import Settings
from services.api_gateway.upstream import ResolvedModel

KEY = "sk-prompt-truncation"
AUTH = {"Authorization": f"Bearer {KEY}"}
PLAIN = ResolvedModel("axl-coder", "coder", 128, ("completion", "chat"))
FIM = ResolvedModel("axl-docs", "docs", 128, ("completion", "chat", "fim"))
DROPPED = 37  # what the fake worker says it left out of each prompt


class FakeStream:
    prompt_truncated = DROPPED

    async def events(self) -> Any:
        yield StreamPiece(text="ok")
        yield StreamEnd(finish_reason="stop", usage=Usage(prompt_tokens=91, completion_tokens=1, total_tokens=92),
                        model=PLAIN.model_id)

    async def aclose(self) -> None:
        pass


class FakeUpstream:
    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []

    async def resolve(self, name: str, routing_text: Any) -> ResolvedModel:
        return FIM if name == FIM.model_id else PLAIN

    async def generate(self, model: ResolvedModel, request: GenerateRequest) -> GenerateResponse:
        self.payloads.append(request.model_dump(mode="json"))  # what crosses the hop
        return GenerateResponse(text="ok", finish_reason="stop", model=model.model_id,
                                usage=Usage(prompt_tokens=91, completion_tokens=1, total_tokens=92),
                                prompt_truncated=DROPPED if request.truncate else 0)

    async def open_stream(self, model: ResolvedModel, request: GenerateRequest) -> FakeStream:
        self.payloads.append(request.model_dump(mode="json"))
        return FakeStream()


Gateway = Callable[..., tuple[TestClient, FakeUpstream]]


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Gateway]:
    monkeypatch.setenv("AXL_DATA_DIR", str(tmp_path / "data"))
    clients: list[TestClient] = []

    def start(**settings: Any) -> tuple[TestClient, FakeUpstream]:
        app = create_app(Settings(api_keys=KEY, registry_secret="prompt-truncation-secret",
                                  registry_url="http://127.0.0.1:9", **settings))
        client = TestClient(app).__enter__()
        clients.append(client)
        app.state.upstream = upstream = FakeUpstream()
        return client, upstream

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def test_prompts_are_fitted_by_default_and_the_header_says_how_much(gateway: Gateway) -> None:
    client, upstream = gateway()
    chat = client.post("/v1/chat/completions", headers=AUTH, json={
        "model": "axl-coder", "n": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200, chat.text
    assert chat.headers[PROMPT_TRUNCATED_HEADER] == str(DROPPED)  # one prompt, however many samples
    assert chat.json()["usage"]["prompt_tokens"] == 91
    two_prompts = client.post("/v1/completions", headers=AUTH, json={"model": "axl-coder", "prompt": ["a", "b"]})
    assert two_prompts.headers[PROMPT_TRUNCATED_HEADER] == str(2 * DROPPED)
    assert [p["truncate"] for p in upstream.payloads] == [True] * 4
    with client.stream("POST", "/v1/chat/completions", headers=AUTH, json={
            "model": "axl-coder", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as streamed:
        assert streamed.status_code == 200
        assert streamed.headers[PROMPT_TRUNCATED_HEADER] == str(DROPPED)
        assert any('"ok"' in line for line in streamed.iter_lines())


def test_strict_per_request_and_server_wide(gateway: Gateway) -> None:
    client, upstream = gateway()
    strict = client.post("/v1/completions", headers=AUTH, json={"model": "axl-coder", "prompt": "a",
                                                                  "truncate": False})
    assert strict.status_code == 200 and PROMPT_TRUNCATED_HEADER not in strict.headers
    assert upstream.payloads[-1]["truncate"] is False
    strict_server, upstream = gateway(truncate_prompts=False)
    strict_server.post("/v1/chat/completions", headers=AUTH, json={
        "model": "axl-coder", "messages": [{"role": "user", "content": "hi"}]})
    strict_server.post("/v1/completions", headers=AUTH, json={"model": "axl-coder", "prompt": "a", "truncate": True})
    assert [p["truncate"] for p in upstream.payloads] == [False, True]


@pytest.mark.parametrize("template", [
    "<fim_prefix>{p}<fim_suffix>{s}<fim_middle>", "<|fim_prefix|>{p}<|fim_suffix|>{s}<|fim_middle|>",
    "<PRE> {p} <SUF>{s} <MID>", "<｜fim▁begin｜>{p}<｜fim▁hole｜>{s}<｜fim▁end｜>", "[SUFFIX]{s}[PREFIX]{p}",
])
def test_fim_templates_become_prompt_and_suffix_for_fim_models_only(gateway: Gateway, template: str) -> None:
    client, upstream = gateway()
    prompt = template.format(p="x = fo", s="\nprint(x)\n")
    for model in ("axl-docs", "axl-coder"):
        response = client.post("/v1/completions", headers=AUTH, json={"model": model, "prompt": prompt})
        assert response.status_code == 200, response.text
    fim, plain = upstream.payloads
    assert (fim["prompt"], fim["suffix"]) == ("x = fo", "\nprint(x)\n")
    assert (plain["prompt"], plain["suffix"]) == (prompt, None)  # a model without FIM tokens reads it as text
