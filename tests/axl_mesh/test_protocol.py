"""The OpenAI wire schemas: what they accept, what they refuse, and the worker payloads they make."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from axl_mesh.protocol import MAX_STOP_SEQUENCES, ChatCompletionRequest, CompletionRequest, UsageInfo
from axl_mesh.worker_protocol import GenerateRequest


def test_prompt_forms_become_text() -> None:
    assert CompletionRequest(model="m", prompt="abc").prompts() == ["abc"]
    assert CompletionRequest(model="m", prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(model="m", prompt=[256, 104, 105]).prompts() == ["hi"]  # BOS dropped
    assert CompletionRequest(model="m", prompt=[[104], [105]]).prompts() == ["h", "i"]
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt=[300])
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt=[])


def test_stop_string_or_list_without_empties_and_bounded() -> None:
    assert CompletionRequest(model="m", prompt="x", stop="\n").stop == ["\n"]
    assert CompletionRequest(model="m", prompt="x", stop=["a", "", "b"]).stop == ["a", "b"]
    assert len(CompletionRequest(model="m", prompt="x", stop=[str(i) for i in range(16)]).stop) == 16
    with pytest.raises(ValidationError) as info:
        CompletionRequest(model="m", prompt="x", stop=[str(i) for i in range(MAX_STOP_SEQUENCES + 1)])
    assert info.value.errors()[0]["loc"] == ("stop",)


def test_completion_payload_per_sample() -> None:
    request = CompletionRequest(model="m", prompt="p", max_tokens=4096, temperature=0.01, top_k=-1, seed=10, n=2,
                                suffix="s", logprobs=2, echo=True, stop=["\n"], repetition_penalty=1.1)
    prompt, suffix = request.infill("p", fim=True)
    request_ = request.to_generate_request(prompt, suffix=suffix, request_id="r-1", max_tokens=4096, truncate=True,
                                           seed_offset=1, stream=True)
    assert isinstance(request_, GenerateRequest)  # the worker validates the same class
    assert request_.model_dump(mode="json") == {
        "request_id": "r-1", "model": None, "prompt": "p", "messages": None, "suffix": "s", "max_tokens": 4096, "top_k": 0,
        "seed": 11, "stop": ["\n"], "temperature": 0.01, "top_p": None, "repetition_penalty": 1.1, "logprobs": 2,
        "echo": True, "stream": True, "ignore_eos": False, "truncate": True}
    # Sampling left unset stays None, so the worker applies the specialist's defaults.
    bare = CompletionRequest(model="m", prompt="p").to_generate_request("p", request_id="r", max_tokens=16,
                                                                        truncate=False)
    assert bare.temperature is None and bare.top_p is None and bare.seed is None
    assert GenerateRequest.model_validate(bare.model_dump(mode="json")) == bare  # what crosses the hop


def test_truncate_is_the_requests_choice_else_the_servers() -> None:
    assert CompletionRequest(model="m", prompt="p").truncates(True) is True
    assert CompletionRequest(model="m", prompt="p").truncates(False) is False
    assert CompletionRequest(model="m", prompt="p", truncate=False).truncates(True) is False
    assert ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], truncate=True).truncates(False)


def test_chat_accepts_what_editors_send_and_flattens_content() -> None:
    request = ChatCompletionRequest.model_validate({
        "model": "m", "stream": True, "stream_options": {"include_usage": True},
        "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto",
        "parallel_tool_calls": False, "response_format": {"type": "text"}, "store": False,
        "service_tier": "auto", "metadata": {"a": "b"}, "some_future_field": 1, "max_completion_tokens": 7,
        "logprobs": True, "top_logprobs": 3,
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]},
            {"role": "tool", "content": "result", "tool_call_id": "c"},
        ],
    })
    assert request.include_usage and request.requested_max_tokens() == 7
    payload = request.to_generate_request(request_id="r", max_tokens=7, truncate=True).model_dump(mode="json")
    assert payload["messages"] == [{"role": "developer", "content": "be brief"},
                                   {"role": "user", "content": "one\ntwo"},
                                   {"role": "assistant", "content": ""}, {"role": "tool", "content": "result"}]
    assert payload["logprobs"] == 3 and payload["prompt"] is None


@pytest.mark.parametrize("body, where", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, None),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}}, None),
])
def test_chat_refuses_what_it_cannot_do(body: dict, where: str | None) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"model": "m", **body})
    if where is not None:
        assert info.value.errors()[0]["loc"][0] == where


def test_usage_counts_each_prompt_once() -> None:
    total = UsageInfo()
    total.add(UsageInfo(prompt_tokens=5, completion_tokens=3))
    total.add(UsageInfo(prompt_tokens=5, completion_tokens=4), count_prompt=False)
    assert (total.prompt_tokens, total.completion_tokens, total.total_tokens) == (5, 7, 12)
