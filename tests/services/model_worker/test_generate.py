"""``POST /internal/v1/generate`` and ``GET /internal/v1/info`` of a real worker process over real HTTP."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from axl_model.specialists import get_specialist
from tests.services.model_worker.conftest import (
    GENERATE,
    MESH_AUTH,
    WORKER,
    info,
    stream_lines,
    wait_ready,
    worker_env,
)
from tests.support import ServiceProcess

StartService = Callable[..., ServiceProcess]
PROMPT = "def add(a, b):\n"


def generate(url: str, **body: object) -> httpx.Response:
    return httpx.post(url + GENERATE, headers=MESH_AUTH, json=body, timeout=60)


def test_info_describes_the_served_model(worker: ServiceProcess) -> None:
    described = info(worker.url)
    assert described["model_id"] == "axl-coder"
    assert described["specialist"] == "coder"
    assert described["context_length"] == 128
    assert described["capabilities"] == ["completion", "chat"]
    assert described["max_batch"] == 4
    assert described["checkpoint_version"].startswith("sha256:")
    assert (described["running"], described["waiting"]) == (0, 0)


def test_completion_counts_tokens_and_honours_max_tokens(worker: ServiceProcess) -> None:
    response = generate(worker.url, prompt=PROMPT, max_tokens=24, seed=3, temperature=0.8, ignore_eos=True)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["finish_reason"] == "length"
    assert body["model"] == "axl-coder"
    assert body["usage"] == {"prompt_tokens": 1 + len(PROMPT), "completion_tokens": 24, "total_tokens": 25 + len(PROMPT)}
    assert len(body["text"].encode("utf-8", errors="surrogatepass")) <= 24 * 3  # replacement chars widen bytes
    assert body["logprobs"] is None


def test_same_seed_same_text_and_streaming_equals_non_streaming(worker: ServiceProcess) -> None:
    request = {"prompt": PROMPT, "max_tokens": 40, "seed": 11, "temperature": 0.9, "top_k": 50}
    first = generate(worker.url, **request).json()
    second = generate(worker.url, **request).json()
    assert first["text"] == second["text"]
    lines = stream_lines(worker.url, request)
    *pieces, end = lines
    assert "".join(p["text"] for p in pieces) == first["text"]
    assert all(set(p) == {"text", "logprob"} for p in pieces)
    assert end == {"finish_reason": first["finish_reason"], "usage": first["usage"], "model": "axl-coder"}
    other_seed = generate(worker.url, **{**request, "seed": 12}).json()
    assert other_seed["text"] != first["text"]


def test_max_tokens_beyond_the_window_slides_instead_of_failing(worker: ServiceProcess) -> None:
    response = generate(worker.url, prompt="x" * 100, max_tokens=300, seed=0, ignore_eos=True)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 300


def test_prompt_longer_than_the_window_is_context_length_exceeded(worker: ServiceProcess) -> None:
    for body in ({"prompt": "x" * 128}, {"prompt": "x" * 500, "stream": True},
                 {"messages": [{"role": "user", "content": "y" * 200}]}):
        response = generate(worker.url, **body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded"
        assert error["type"] == "invalid_request_error"
        assert "128" in error["message"]
    # 127 bytes + BOS is exactly the window: allowed.
    assert generate(worker.url, prompt="x" * 127, max_tokens=2).status_code == 200


def test_truncate_fits_a_long_prompt_into_the_window_less_the_answers_room(worker: ServiceProcess) -> None:
    # Window 128, max_tokens 100: a quarter of the window (32) stays free, so the prompt gets 96 tokens, BOS and 95
    # bytes, of which it keeps the end, its head dropped in whole blocks of 95 // 8 = 11 bytes: 418 of 503 go.
    answer = generate(worker.url, prompt="x" * 500 + "END", max_tokens=100, seed=0, truncate=True, echo=True)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["usage"]["prompt_tokens"] == 1 + 503 - 418 and body["prompt_truncated"] == 418
    assert body["text"].startswith("x" * 500 + "END")  # echo gives back the prompt as sent
    # It fits the window, not the window less 4 for the answer: 3 bytes must go, one block of 123 // 8 = 15 goes, so
    # the answer starts before a slide.
    small = generate(worker.url, prompt="y" * 126, max_tokens=4, truncate=True).json()
    assert (small["usage"]["prompt_tokens"], small["prompt_truncated"]) == (127 - 15, 15)
    fits = generate(worker.url, prompt=PROMPT, max_tokens=4, truncate=True).json()
    assert fits["prompt_truncated"] == 0
    with httpx.stream("POST", worker.url + GENERATE, headers=MESH_AUTH, timeout=60,
                      json={"prompt": "z" * 300, "max_tokens": 8, "stream": True, "truncate": True}) as streamed:
        assert streamed.status_code == 200  # 181 bytes must go of 300: 13 blocks of 119 // 8 = 14
        assert streamed.headers["x-axl-prompt-truncated"] == str(13 * 14)
        end = [line for line in streamed.iter_lines() if line][-1]
    assert f'"prompt_tokens":{301 - 13 * 14}' in end


def test_truncate_fits_a_long_chat_keeping_the_latest_message(worker: ServiceProcess) -> None:
    messages = [{"role": "system", "content": "S" * 400}, {"role": "user", "content": "old " * 50},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "LATEST"}]
    answer = generate(worker.url, messages=messages, max_tokens=64, truncate=True, echo=True)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["usage"]["prompt_tokens"] <= 96 and body["prompt_truncated"] > 400
    assert "LATEST\n### Output:\n" in body["text"] and "old" not in body["text"]


def test_chat_messages_are_rendered_with_the_specialist_template(worker: ServiceProcess) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse a list."}]
    response = generate(worker.url, messages=messages, max_tokens=5, seed=1, echo=True)
    assert response.status_code == 200, response.text
    body = response.json()
    rendered = get_specialist("coder").render_chat(messages)
    assert body["text"].startswith(rendered)
    assert body["usage"]["prompt_tokens"] == 1 + len(rendered.encode())
    bad = generate(worker.url, messages=[{"role": "assistant", "content": "hi"}])
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "messages"


def test_chat_honours_the_callers_stop_sequences(worker: ServiceProcess) -> None:
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "seed": 4, "temperature": 1.0,
               "ignore_eos": True}
    full = generate(worker.url, **request).json()
    assert full["finish_reason"] == "length", "the template's stops ended the sample early; pick another seed"
    stop = full["text"][30:32]
    cut = generate(worker.url, **request, stop=[stop]).json()
    assert (cut["finish_reason"], cut["text"]) == ("stop", full["text"][: full["text"].index(stop)])


def test_stop_sequences_cut_the_text_before_the_match(worker: ServiceProcess) -> None:
    request = {"prompt": PROMPT, "max_tokens": 60, "seed": 5, "temperature": 1.0, "ignore_eos": True}
    full = generate(worker.url, **request).json()["text"]
    stop = full[20:23]
    assert len(stop) == 3
    cut = generate(worker.url, **request, stop=[stop]).json()
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full[: full.index(stop)]
    streamed = stream_lines(worker.url, {**request, "stop": [stop]})
    assert "".join(line.get("text", "") for line in streamed[:-1]) == cut["text"]
    assert streamed[-1]["finish_reason"] == "stop"


def test_echo_and_logprobs(worker: ServiceProcess) -> None:
    body = generate(worker.url, prompt=PROMPT, max_tokens=6, seed=2, echo=True, logprobs=3, ignore_eos=True).json()
    assert body["text"].startswith(PROMPT)
    assert len(body["logprobs"]) == 6
    for entry in body["logprobs"]:
        assert entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 3
        assert max(entry["top_logprobs"].values()) >= entry["logprob"] - 1e-6
    lines = stream_lines(worker.url, {"prompt": PROMPT, "max_tokens": 6, "seed": 2, "echo": True, "logprobs": 3,
                                      "ignore_eos": True})
    assert lines[0] == {"text": PROMPT, "logprob": None}
    streamed = [line["logprob"] for line in lines[1:-1]]
    assert streamed == body["logprobs"]


def test_bad_requests_are_openai_shaped_400s(worker: ServiceProcess) -> None:
    cases = [
        {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
        {},
        {"prompt": "a", "temperature": -1},
        {"prompt": "a", "stop": [""]},
        {"prompt": "a", "suffix": "b"},  # this checkpoint has no fill-in-the-middle tokens
    ]
    for body in cases:
        response = generate(worker.url, **body)
        assert response.status_code == 400, (body, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert generate(worker.url, prompt="a", suffix="b").json()["error"]["code"] == "fim_not_supported"


def test_fill_in_the_middle_when_the_checkpoint_has_it(
    start_service: StartService, fim_checkpoint: Path
) -> None:
    service = start_service(WORKER, worker_env(fim_checkpoint, AXL_SPECIALIST="fixer"))
    wait_ready(service.url)
    described = info(service.url)
    assert described["capabilities"] == ["completion", "chat", "fim"]
    assert described["model_id"] == "axl-fixer"
    body = generate(service.url, prompt="def f(x):\n    return ", suffix="\n", max_tokens=8, seed=0).json()
    # <BOS> <fim_prefix> prefix <fim_suffix> suffix <fim_middle>
    assert body["usage"]["prompt_tokens"] == 4 + len("def f(x):\n    return ") + 1


def test_serves_a_full_model_gguf_with_the_same_text(tmp_path: Path, worker: ServiceProcess, tiny_checkpoint: Path,
                                                    start_service: StartService) -> None:
    """An axl-multiscale GGUF (F32) is a checkpoint too: the worker serves it with the same output."""
    from axl_model import load_checkpoint
    from axl_model.export.gguf import export_multiscale_gguf

    gguf_file = export_multiscale_gguf(load_checkpoint(tiny_checkpoint), tmp_path / "model.gguf")
    served = start_service(WORKER, worker_env(gguf_file, AXL_MAX_BATCH="4"))
    wait_ready(served.url)
    body = dict(prompt=PROMPT, max_tokens=24, temperature=0.0, ignore_eos=True)
    assert generate(served.url, **body).json()["text"] == generate(worker.url, **body).json()["text"]
    assert info(served.url)["checkpoint_version"].startswith("sha256:")


def test_float16_serving_matches_float32_greedy_text(worker: ServiceProcess, tiny_checkpoint: Path,
                                                     start_service: StartService) -> None:
    """AXL_DTYPE=float16 halves the weight bytes per step; on a short greedy run the text is the same."""
    half = start_service(WORKER, worker_env(tiny_checkpoint, AXL_DTYPE="float16"))
    wait_ready(half.url)
    assert info(half.url)["dtype"] == "float16" and info(worker.url)["dtype"] == "float32"
    body = dict(prompt=PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True)
    assert generate(half.url, **body).json()["text"] == generate(worker.url, **body).json()["text"]


def test_int8_serving_matches_float32_greedy_text(worker: ServiceProcess, tiny_checkpoint: Path,
                                                  start_service: StartService) -> None:
    """AXL_DTYPE=int8 serves weight-only int8 linear layers (axl_model.quantize); a short greedy run keeps the text."""
    int8 = start_service(WORKER, worker_env(tiny_checkpoint, AXL_DTYPE="int8"))
    wait_ready(int8.url)
    assert info(int8.url)["dtype"] == "int8"
    body = dict(prompt=PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True)
    assert generate(int8.url, **body).json()["text"] == generate(worker.url, **body).json()["text"]


def test_serves_a_q8_0_gguf_with_int8_weights(tmp_path: Path, worker: ServiceProcess, tiny_checkpoint: Path,
                                              start_service: StartService) -> None:
    """A Q8_0 axl-multiscale GGUF is served on its int8 values (tests/axl_model/test_quantize.py checks the
    layers in memory); the default AXL_DTYPE=float32 keeps its other tensors float32."""
    from axl_model import load_checkpoint
    from axl_model.export.gguf import export_multiscale_gguf

    gguf_file = export_multiscale_gguf(load_checkpoint(tiny_checkpoint), tmp_path / "model-q8_0.gguf", qtype="q8_0")
    served = start_service(WORKER, worker_env(gguf_file))
    wait_ready(served.url)
    body = dict(prompt=PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True)
    response = generate(served.url, **body).json()
    assert response["usage"]["completion_tokens"] == 8
    assert response["text"] == generate(worker.url, **body).json()["text"]
