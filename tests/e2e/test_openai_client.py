"""The mesh through the official `openai` client: models, completions, chat, streaming, errors, Continue's requests.

Real processes (see conftest): registry, two replicas of `axl-coder` (tiny random checkpoint, 128-byte window),
one FIM-capable `axl-docs`, the gateway with API keys.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from axl_model.prompt_fit import cut_block
from tests.e2e.conftest import API_KEY, MAX_BODY_BYTES, Mesh

pytestmark = pytest.mark.timeout(120)

CODER = "axl-coder"
PROMPT = "def fibonacci(n):\n    "
CONTINUE_STOPS = ["\n\n", "\r\n\r\n", "/src/", "#- coding: utf-8", "```", "\ndef", "\nclass", "\n\"\"\"#", "\n@"]
# Continue adds its FIM template's own stops (AutocompleteTemplate.ts, the StarCoder one it picks for our names).
CONTINUE_FIM_STOPS = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>", "<|endoftext|>", "</fim_middle>",
                      "</code>"]
WINDOW = 128  # the tiny checkpoints' context length


def continue_agent_system_prompt() -> str:
    """About the size and shape of Continue's agent system message (1.4 KB): rules, then how to write code blocks."""
    rules = (
        "<important_rules>\n  You are in agent mode.\n\n  Always include the language and file name in the info "
        "string when you write code blocks. If you are editing \"src/main.py\" for example, your code block should "
        "start with '```python src/main.py'.\n\n  When addressing code modification requests, present a concise "
        "code snippet that emphasizes only the necessary changes and uses abbreviated placeholders for unmodified "
        "sections, for example:\n\n  ```language /path/to/file\n  // ... existing code ...\n\n  {{ modified "
        "code here }}\n\n  // ... existing code ...\n\n  {{ another modification }}\n\n  // ... rest of code "
        "...\n  ```\n\n  In existing files, you should always restate the function or class that the snippet "
        "belongs to.\n\n  Since you are in agent mode, use the tools you have to read files before you change "
        "them, to list and search the workspace, and to run commands in the terminal when the user asks for it. "
        "Do not guess at the content of a file you have not read. Prefer small, reviewable edits; explain each "
        "change in one sentence after the code block. When a tool fails, say so and try another way rather than "
        "repeating the same call. Never run destructive commands without asking first.\n</important_rules>"
    )
    workspace = ("\n\n<workspace>\n  The workspace root is file:///home/dev/project. The user's operating system is "
                 "Linux and their shell is bash. Paths in tool calls are relative to the workspace root unless they "
                 "start with a slash; the currently open file is src/app/main.py.\n</workspace>")
    return rules + workspace


def continue_agent_tools() -> list[dict]:
    """Nine tool definitions, in the shape Continue's agent sends with every chat request."""
    def tool(name: str, description: str, **properties: str) -> dict:
        return {"type": "function", "function": {
            "name": name, "description": description,
            "parameters": {"type": "object", "required": list(properties),
                           "properties": {k: {"type": "string", "description": v} for k, v in properties.items()}}}}
    return [
        tool("read_file", "Use this tool to read the contents of an existing file.",
             filepath="The path of the file to read, relative to the root of the workspace"),
        tool("create_new_file", "Create a new file.", filepath="Where to create it", contents="Its contents"),
        tool("run_terminal_command", "Run a terminal command in the current directory.", command="The command"),
        tool("file_glob_search", "Search for files recursively by glob pattern.", pattern="A glob pattern"),
        tool("view_diff", "View the current diff of working changes."),
        tool("read_currently_open_file", "Read the currently open file in the IDE."),
        tool("ls", "List files and folders in a given directory.", dirPath="The directory to list"),
        tool("grep_search", "Perform a search over the repository using ripgrep.", query="The search query"),
        tool("edit_existing_file", "Edit an existing file.", filepath="The file to edit", changes="The changes"),
    ]


def twenty_kb_python_file() -> str:
    """A 20 KB Python module, as an editor holds it."""
    blocks = [f"def helper_{i}(values: list[int]) -> int:\n    \"\"\"Sum of the values times {i}.\"\"\"\n"
              f"    total = 0\n    for value in values:\n        total += value * {i}\n    return total\n\n\n"
              for i in range(160)]
    text = "import os\nimport sys\n\n\n" + "".join(blocks)
    assert len(text.encode()) >= 20_000
    return text


def sse_response(mesh: Mesh, path: str, body: dict) -> tuple[httpx.Headers, list[str]]:
    assert mesh.gateway is not None
    with httpx.stream("POST", mesh.gateway.url + path, json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return response.headers, [line for line in response.iter_lines() if line]


# --- models ------------------------------------------------------------------------------------------------------


def test_list_and_retrieve_models(mesh: Mesh) -> None:
    client = mesh.client()
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"axl-coder", "axl-docs"}
    coder = models[CODER]
    assert coder.owned_by == "axl-mesh" and coder.object == "model"
    extra = coder.model_extra or {}
    assert extra["specialist"] == "coder" and extra["context_length"] == 128 and extra["instances"] == 2
    assert "fim" in (models["axl-docs"].model_extra or {})["capabilities"]
    assert client.models.retrieve(CODER).id == CODER
    assert client.models.retrieve("coder").id == CODER  # the specialist's name is an alias
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.code == "model_not_found"


# --- completions ---------------------------------------------------------------------------------------------


def test_completion_usage_and_seed(mesh: Mesh) -> None:
    client = mesh.client()
    first = client.completions.create(model=CODER, prompt=PROMPT, max_tokens=12, temperature=0.8, seed=7)
    again = client.completions.create(model=CODER, prompt=PROMPT, max_tokens=12, temperature=0.8, seed=7)
    assert first.object == "text_completion" and first.model == CODER
    choice = first.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.index == 0
    assert choice.text == again.choices[0].text  # same seed, either replica: same text
    assert first.usage is not None
    assert first.usage.prompt_tokens == len(PROMPT.encode()) + 1  # bytes + BOS
    assert 0 < first.usage.completion_tokens <= 12
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


def test_streamed_text_equals_non_streamed_text(mesh: Mesh) -> None:
    client = mesh.client()
    whole = client.completions.create(model=CODER, prompt=PROMPT, max_tokens=20, temperature=1.0, seed=3)
    chunks = list(client.completions.create(model=CODER, prompt=PROMPT, max_tokens=20, temperature=1.0, seed=3,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stop_sequences_cut_the_text(mesh: Mesh) -> None:
    client = mesh.client()
    free = client.completions.create(model=CODER, prompt=PROMPT, max_tokens=40, temperature=0.0).choices[0]
    assert len(free.text) >= 4
    stop = free.text[2:4]  # appears in the unconstrained output, so the stopped one must end before it
    stopped = client.completions.create(model=CODER, prompt=PROMPT, max_tokens=40, temperature=0.0,
                                        stop=["\x00never", stop] + [f"never{i}" for i in range(14)]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text and free.text.startswith(stopped.text)
    assert len(stopped.text) <= free.text.index(stop)


def test_n_and_prompt_lists_give_one_choice_each(mesh: Mesh) -> None:
    client = mesh.client()
    two = client.completions.create(model=CODER, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=11, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    seed_12 = client.completions.create(model=CODER, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=12)
    assert two.choices[1].text == seed_12.choices[0].text  # sample i uses seed + i
    both = client.completions.create(model=CODER, prompt=["a = ", "b = "], max_tokens=4, temperature=0.0)
    assert len(both.choices) == 2
    assert both.usage.prompt_tokens == (4 + 1) * 2
    ids = client.completions.create(model=CODER, prompt=list(b"a = "), max_tokens=4, temperature=0.0)
    assert ids.choices[0].text == both.choices[0].text  # byte token ids are the same prompt


def test_echo_and_logprobs(mesh: Mesh) -> None:
    client = mesh.client()
    out = client.completions.create(model=CODER, prompt="x = ", max_tokens=5, temperature=0.0, echo=True, logprobs=2)
    choice = out.choices[0]
    assert choice.text.startswith("x = ")
    assert choice.logprobs is not None and len(choice.logprobs.token_logprobs) == out.usage.completion_tokens
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)


def test_continue_autocomplete_request(mesh: Mesh) -> None:
    """What Continue.dev sends for tab completion: its FIM template around the prefix and suffix of a 20 KB file,
    as a plain prompt, max_tokens far over the window, ~16 stops, near-greedy, stream. To a FIM model the gateway
    hands prefix and suffix (fitted, prefix-weighted) to the model's own FIM tokens; to the others, the prompt's
    end. Both answer 200 with text, and say how much of the prompt they left out."""
    source = twenty_kb_python_file()
    cursor = source.index("        total += value * 90\n") + len("        total += ")  # inside a line
    prefix, suffix = source[:cursor], source[cursor:]
    for model in ("axl-docs", CODER):
        body = {"model": model, "prompt": f"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>",
                "max_tokens": 4096, "temperature": 0.01, "stop": CONTINUE_STOPS + CONTINUE_FIM_STOPS, "stream": True,
                "stream_options": {"include_usage": True}}
        headers, lines = sse_response(mesh, "/v1/completions", body)
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[len("data: "):]) for line in lines[:-1] if line.startswith("data: ")]
        assert chunks and all(c["object"] == "text_completion" for c in chunks)
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]), f"{model} answered no text"
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] in ("stop", "length")
        used, budget = chunks[-1]["usage"]["prompt_tokens"], WINDOW - WINDOW // 4  # max_tokens 4096: a quarter left
        if model == CODER:  # a plain prompt's head goes in whole blocks: up to one of the room unused
            assert budget - cut_block(budget - 1) < used <= budget
        else:  # the long suffix takes what the prefix's whole-block cut leaves
            assert used == budget
        whole = len(body["prompt"].encode()) + 1 if model == CODER else len(source.encode()) + 4  # + BOS (+ FIM)
        assert int(headers["x-axl-prompt-truncated"]) == whole - used


def test_autocomplete_with_suffix_keeps_both_sides_of_the_cursor(mesh: Mesh) -> None:
    """OpenAI's own `suffix` on a FIM model: the end of the prefix and the start of the suffix, prefix-weighted."""
    raw = mesh.client().completions.with_raw_response.create(
        model="axl-docs", prompt="p" * 5000 + "before", suffix="after" + "s" * 5000, max_tokens=16, echo=True)
    out = raw.parse()
    assert out.usage.prompt_tokens == WINDOW - 16
    assert int(raw.headers["x-axl-prompt-truncated"]) == 10_011 + 4 - (WINDOW - 16)
    assert out.choices[0].text.startswith("p" * 5000 + "before")  # echo: the prompt as sent


@pytest.mark.parametrize("template", [
    "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>",  # StarCoder / StableCode: Continue's default
    "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>",  # Qwen-Coder, CodeGemma
    "<PRE> {prefix} <SUF>{suffix} <MID>",  # CodeLlama
    "<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>",  # DeepSeek-Coder
    "[SUFFIX]{suffix}[PREFIX]{prefix}",  # Codestral
])
def test_editor_fim_templates_reach_a_fim_model_as_its_fim_tokens(mesh: Mesh, template: str) -> None:
    prefix, suffix = "def area(r):\n    return 3.14 * ", "\n\nprint(area(2))\n"
    out = mesh.client().completions.create(model="axl-docs", prompt=template.format(prefix=prefix, suffix=suffix),
                                           max_tokens=8, temperature=0.01, stop=CONTINUE_STOPS)
    # BOS + <fim_prefix> prefix <fim_suffix> suffix <fim_middle>: the template's markers are not in the prompt.
    assert out.usage.prompt_tokens == len(prefix.encode()) + len(suffix.encode()) + 4
    assert out.choices[0].finish_reason in ("stop", "length")


# --- chat ----------------------------------------------------------------------------------------------------


def test_chat_completion_and_stream(mesh: Mesh) -> None:
    client = mesh.client()
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "text", "text": "Write hello world."}]}]
    whole = client.chat.completions.create(model=CODER, messages=messages, max_tokens=16, seed=5, temperature=0.9)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens <= 16 and whole.usage.prompt_tokens > 10
    chunks = list(client.chat.completions.create(model=CODER, messages=messages, max_tokens=16, seed=5,
                                                 temperature=0.9, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_continue_agent_chat_with_tools(mesh: Mesh) -> None:
    """Continue's agent mode: a 1.4 KB system prompt and nine tools with every (streamed) request, tool calls and
    results in the history; it reads delta.content. The conversation is ten times the window: it is fitted."""
    client = mesh.client()
    system = continue_agent_system_prompt()
    assert 1300 <= len(system.encode()) <= 1600
    raw = client.chat.completions.with_raw_response.create(
        model=CODER, stream=True, max_tokens=4096, temperature=0.5, seed=3,  # the seed: the same text every run
        tools=continue_agent_tools(), tool_choice="auto",
        parallel_tool_calls=False, user="dev", metadata={"session": "x"}, presence_penalty=0.0, frequency_penalty=0.0,
        stop=CONTINUE_STOPS,
        messages=[{"role": "system", "content": system},
                  {"role": "user", "content": "List the files in this folder."},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "call_1", "type": "function", "function": {"name": "ls", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "a.py\nb.py"},
                  {"role": "user", "content": "ok"}],
        stream_options={"include_usage": True},
    )
    assert int(raw.headers["x-axl-prompt-truncated"]) > len(system.encode()) - WINDOW
    chunks = list(raw.parse())
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert 0 < chunks[-1].usage.prompt_tokens <= WINDOW - WINDOW // 4
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), "no text"


def test_chat_n_two_streams(mesh: Mesh) -> None:
    client = mesh.client()
    chunks = list(client.chat.completions.create(model=CODER, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, n=2, seed=1, temperature=1.0, stream=True))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_specialists_are_listed_with_the_models_serving_them(mesh: Mesh) -> None:
    assert mesh.gateway is not None
    auth = {"Authorization": f"Bearer {API_KEY}"}
    listed = httpx.get(mesh.gateway.url + "/v1/specialists", headers=auth, timeout=10).json()["data"]
    by_name = {s["id"]: s for s in listed}
    assert {"coder", "debugger", "docs", "testgen", "secure", "translate"} <= set(by_name)
    assert by_name["coder"]["models"] == ["axl-coder"] and by_name["debugger"]["models"] == []
    assert "{input}" in by_name["docs"]["prompt_format"] and by_name["docs"]["default_sampling"]["stop"]
    missing = httpx.get(mesh.gateway.url + "/v1/specialists/nope", headers=auth, timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "specialist_not_found"


def test_auto_model_reports_its_choice(mesh: Mesh) -> None:
    client = mesh.client()
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Write the docstring for this function."}], max_tokens=4)
    assert raw.headers["x-axl-routed-to"] == "axl-docs"
    assert raw.parse().model == "axl-docs"


# --- errors ---------------------------------------------------------------------------------------------------


def test_wrong_or_missing_key_is_401(mesh: Mesh) -> None:
    assert mesh.gateway is not None
    bad = openai.OpenAI(base_url=mesh.gateway.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.code == "invalid_api_key"
    assert httpx.get(mesh.gateway.url + "/v1/models").status_code == 401
    assert httpx.get(mesh.gateway.url + "/healthz").status_code == 200  # health stays open
    assert httpx.get(mesh.gateway.url + "/metrics").status_code == 200


def test_unknown_model_is_404(mesh: Mesh) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        mesh.client().completions.create(model="gpt-9", prompt="x")
    assert info.value.code == "model_not_found" and info.value.param == "model"


def test_bad_fields_are_400_with_param(mesh: Mesh) -> None:
    client = mesh.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=CODER, prompt="x", temperature=5)
    assert info.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CODER, messages=[])
    assert info.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=CODER, prompt="x", stop=[f"s{i}" for i in range(40)])
    assert info.value.param == "stop"
    with pytest.raises(openai.BadRequestError) as info:  # FIM on a model without the capability
        client.completions.create(model=CODER, prompt="def f(", suffix="):\n    pass\n")
    assert info.value.param == "suffix"
    fim = client.completions.create(model="axl-docs", prompt="def f(", suffix="):\n    pass\n", max_tokens=4)
    assert fim.choices[0].finish_reason in ("stop", "length")


def test_oversized_body_is_413(mesh: Mesh) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        mesh.client().completions.create(model=CODER, prompt="x" * (MAX_BODY_BYTES + 10))
    assert info.value.status_code == 413
    assert info.value.code == "request_too_large"


def test_prompt_over_the_window_is_fitted_or_with_truncate_false_context_length_exceeded(mesh: Mesh) -> None:
    client = mesh.client()
    fitted = client.completions.with_raw_response.create(model=CODER, prompt="y" * 1000, max_tokens=4)
    # WINDOW - 4 tokens: BOS and 123 bytes, of 1,000; 877 must go, in whole blocks of 123 // 8 = 15: 59 of them.
    assert fitted.parse().usage.prompt_tokens == 1 + 1000 - 59 * 15
    assert fitted.headers["x-axl-prompt-truncated"] == str(59 * 15)
    strict = {"truncate": False}  # OpenAI's behaviour, per request (AXL_TRUNCATE_PROMPTS=false: for all)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=CODER, prompt="y" * 1000, max_tokens=4, extra_body=strict)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:  # the same before the first byte of a stream
        list(client.completions.create(model=CODER, prompt="y" * 1000, max_tokens=4, stream=True, extra_body=strict))
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CODER, messages=[{"role": "user", "content": "y" * 1000}],
                                       extra_body=strict)
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"


def test_metrics_count_requests_tokens_and_workers(mesh: Mesh) -> None:
    assert mesh.gateway is not None
    mesh.client().completions.create(model=CODER, prompt="q", max_tokens=3, stream=True).close()
    text = httpx.get(mesh.gateway.url + "/metrics").text
    assert 'axl_gateway_requests_total{endpoint="completions",model="axl-coder",status="200"}' in text
    assert 'axl_gateway_healthy_workers{model="axl-coder",specialist="coder"} 2.0' in text
    assert "axl_gateway_time_to_first_token_seconds_bucket" in text
    assert 'axl_gateway_generation_tokens_total{model="axl-coder"}' in text
