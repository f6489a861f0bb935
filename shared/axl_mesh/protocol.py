"""OpenAI wire schemas of the gateway: models, completions, chat completions (requests, responses, stream chunks).

In the style of vLLM's ``entrypoints/openai/protocol.py``: request fields in the order of OpenAI's API reference,
our extensions (``top_k``, ``repetition_penalty``) in one marked block, unknown fields accepted and ignored
(clients such as Continue send fields we cannot honour, e.g. ``tools`` with every chat request), and
``to_generate_request`` turning a request into the typed body of a model worker's ``POST /internal/v1/generate``
(``axl_mesh.worker_protocol``).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.config import JsonDict
from pydantic.json_schema import SkipJsonSchema

from axl_mesh.fim_templates import split_fim_template
from axl_mesh.worker_protocol import (
    MAX_LOGPROBS,
    MAX_STOP_SEQUENCES,
    GenerateRequest,
    MaxTokens,
    RepetitionPenalty,
    Temperature,
    TopP,
    WorkerMessage,
)

OWNED_BY = "axl-mesh"
# The AXL tokenizer is byte-level: token ids 0-255 are the bytes, 256 BOS, 257 EOS (not accepted in prompts).
BYTE_TOKENS = 256
SPECIAL_TOKENS = (256, 257)
MAX_N = 16
# max_tokens of a completion without one (OpenAI's default; a chat's is the gateway's AXL_DEFAULT_CHAT_MAX_TOKENS).
DEFAULT_COMPLETION_MAX_TOKENS = 16
# Bounded work per request: samples (prompts x n) one request may ask for (the gateway's default), and how many
# context windows of new tokens a request may ask for before max_tokens is clamped (finish_reason "length").
MAX_SAMPLES_PER_REQUEST = 16
MAX_TOKENS_PER_WINDOW = 4
MAX_TOKENS_WITHOUT_WINDOW = 8192  # a model that reports no context length
# Set on a response whose prompt was fitted into the model's window: how many bytes (tokens) of it were left out.
PROMPT_TRUNCATED_HEADER = "x-axl-prompt-truncated"

FinishReason = Literal["stop", "length"]


def max_tokens_ceiling(context_length: int, configured: int | None = None) -> int:
    """The most new tokens one sample may ask for: ``configured``, else MAX_TOKENS_PER_WINDOW windows.

    A model's window slides, so without a ceiling a request could hold a worker's row forever."""
    if configured is not None:
        return configured
    return MAX_TOKENS_PER_WINDOW * context_length if context_length > 0 else MAX_TOKENS_WITHOUT_WINDOW


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIBaseModel(BaseModel):
    """Accept (and keep) fields we do not know: the API grows faster than any server."""

    model_config = ConfigDict(extra="allow")


# --- models ---------------------------------------------------------------------------------------------------


class ModelCard(OpenAIBaseModel):
    """An OpenAI model object plus what a client may want to know about an AXL model."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = OWNED_BY
    # --- AXL extensions ---
    specialist: str
    context_length: int
    capabilities: list[str]
    instances: int = Field(description="healthy replicas serving it now")


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- shared pieces --------------------------------------------------------------------------------------------


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def add(self, other: UsageInfo, *, count_prompt: bool = True) -> None:
        if count_prompt:
            self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.total_tokens = self.prompt_tokens + self.completion_tokens


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


def _normalize_stop(value: str | list[str] | None) -> list[str]:
    """``stop`` as a list without empty strings (OpenAI ignores those); at most MAX_STOP_SEQUENCES."""
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else list(value)
    stops = [s for s in stops if s]
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are supported, got {len(stops)}")
    return stops


# Cross-field rules of the validators below, stated in the JSON schema too (clients and fuzzers read it).
STREAM_OPTIONS_NEED_STREAM: JsonDict = {
    "if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
    "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
}
TOP_LOGPROBS_NEED_LOGPROBS: JsonDict = {
    "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer", "minimum": 1}}},
    "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
}


class SamplingFields(OpenAIBaseModel):
    """Fields completions and chat share, with the limits the model workers accept."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"allOf": [STREAM_OPTIONS_NEED_STREAM]})

    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)  # accepted, not applied
    logit_bias: dict[str, float] | None = None  # accepted, not applied
    n: int = Field(default=1, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)  # accepted, not applied
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    user: str | None = None

    # --- AXL extensions (not in OpenAI's API; vLLM and llama.cpp accept the same names) ---
    top_k: int | None = Field(default=None, ge=-1, description="sample among the k likeliest bytes; 0 or -1: off")
    repetition_penalty: RepetitionPenalty | None = None
    ignore_eos: bool = Field(default=False, description="keep sampling past end-of-text (benchmarks; as in vLLM)")
    truncate: bool | None = Field(
        default=None,
        description=(
            "fit a prompt longer than the model's window into it (true) or answer 400 context_length_exceeded "
            "(false, OpenAI's behaviour); unset: the server's AXL_TRUNCATE_PROMPTS (on by default). As in Ollama."
        ),
    )
    # --- end of AXL extensions ---

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        return _normalize_stop(value)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def truncates(self, server_default: bool) -> bool:
        """Whether this request's prompt is fitted into the window: its ``truncate``, else the server's setting."""
        return server_default if self.truncate is None else self.truncate

    def _sampling_fields(self, max_tokens: int, seed_offset: int, truncate: bool) -> dict[str, Any]:
        """The worker request's sampling fields; unset ones stay None, so the worker applies the specialist's."""
        return {
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k if self.top_k and self.top_k > 0 else 0,
            "repetition_penalty": self.repetition_penalty,
            "seed": None if self.seed is None else self.seed + seed_offset,
            "stop": list(self.stop or []),
            "ignore_eos": bool(self.ignore_eos),
            "truncate": truncate,
        }


# --- completions ----------------------------------------------------------------------------------------------

TokenIds = list[Annotated[int, Field(ge=0, le=max(SPECIAL_TOKENS))]]


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``; the fields in OpenAI's order (shared sampling fields in :class:`SamplingFields`)."""

    model: str
    prompt: str | list[str] | TokenIds | list[TokenIds]
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)  # accepted; best_of == n is the only kind we do
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    max_tokens: MaxTokens | None = DEFAULT_COMPLETION_MAX_TOKENS
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        if isinstance(value, list) and value and not isinstance(value[0], str):
            for ids in value if isinstance(value[0], list) else [value]:
                _ids_to_text(ids)  # raises on ids outside the byte vocabulary
        return value

    def requested_max_tokens(self) -> int:
        """``max_tokens``, or DEFAULT_COMPLETION_MAX_TOKENS when it is left out or null."""
        return DEFAULT_COMPLETION_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    def prompts(self) -> list[str]:
        """Every prompt as text: a string, a list of strings, or byte-token ids (one list or several)."""
        value = self.prompt
        if isinstance(value, str):
            return [value]
        if all(isinstance(item, str) for item in value):
            return list(value)  # type: ignore[arg-type]
        if all(isinstance(item, int) for item in value):
            return [_ids_to_text(value)]  # type: ignore[arg-type]
        return [_ids_to_text(ids) for ids in value]  # type: ignore[arg-type]

    def infill(self, prompt: str, fim: bool) -> tuple[str, str | None]:
        """``(prompt, suffix)`` for the worker: the request's ``suffix`` when given; for a model with FIM tokens, a
        prompt in a client's fill-in-the-middle template (axl_mesh.fim_templates) split into prefix and suffix."""
        if self.suffix is not None or not fim:
            return prompt, self.suffix
        return split_fim_template(prompt) or (prompt, None)

    def to_generate_request(
        self,
        prompt: str,
        *,
        request_id: str,
        max_tokens: int,
        truncate: bool,
        seed_offset: int = 0,
        stream: bool = False,
        suffix: str | None = None,
    ) -> GenerateRequest:
        """The worker's ``POST /internal/v1/generate`` request for one prompt and one of the ``n`` samples
        (``suffix``: the one :meth:`infill` found)."""
        return GenerateRequest(
            request_id=request_id,
            prompt=prompt,
            suffix=suffix,
            logprobs=self.logprobs,
            echo=bool(self.echo),
            stream=stream,
            **self._sampling_fields(max_tokens, seed_offset, truncate),
        )


def _ids_to_text(ids: list[int]) -> str:
    bad = [i for i in ids if i >= BYTE_TOKENS and i not in SPECIAL_TOKENS]
    if bad:
        raise ValueError(f"token ids must be bytes 0-255 (AXL's byte tokenizer), got {bad[0]}")
    return bytes(i for i in ids if i < BYTE_TOKENS).decode("utf-8", errors="replace")


class CompletionLogProbs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionResponseChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo


class CompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None


# --- chat completions -----------------------------------------------------------------------------------------


class TextContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class OtherContentPart(OpenAIBaseModel):
    """Images, audio, files: accepted by the schema so the error can say which part we cannot read."""

    type: str


# Other parts validate (so the error names the part we cannot read) but the schema offers only text parts.
ContentPart = TextContentPart | SkipJsonSchema[OtherContentPart]


class ChatMessage(OpenAIBaseModel):
    """One message of ``messages``: content as a string, a list of parts, or null (assistant tool calls)."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The content as one string; text parts are joined with newlines."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content if isinstance(part, TextContentPart))


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``; tools, response_format and the like are accepted and not applied."""

    model_config = ConfigDict(
        extra="allow", json_schema_extra={"allOf": [STREAM_OPTIONS_NEED_STREAM, TOP_LOGPROBS_NEED_LOGPROBS]}
    )

    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    audio: dict[str, Any] | None = None
    function_call: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    logprobs: bool | None = False
    max_completion_tokens: MaxTokens | None = None
    max_tokens: MaxTokens | None = None
    metadata: dict[str, Any] | None = None
    modalities: list[str] | None = None
    parallel_tool_calls: bool | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    response_format: dict[str, Any] | None = None
    service_tier: str | None = None
    store: bool | None = None
    tool_choice: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _check_content(self) -> ChatCompletionRequest:
        for i, message in enumerate(self.messages):
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    if not isinstance(part, TextContentPart):
                        raise ValueError(
                            f"messages[{i}].content[{j}] has type '{part.type}'; AXL models read only 'text' parts"
                        )
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")
        return self

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (the current name) or ``max_tokens`` (the deprecated one)."""
        return self.max_completion_tokens or self.max_tokens

    def worker_messages(self) -> list[dict[str, str]]:
        """Messages as the worker's chat template reads them: role and plain-text content."""
        out = []
        for message in self.messages:
            role = "tool" if message.role == "function" else message.role
            out.append({"role": role, "content": message.text()})
        return out

    def last_user_text(self) -> str:
        users = [m for m in self.messages if m.role == "user"]
        return (users[-1] if users else self.messages[-1]).text()

    def to_generate_request(
        self, *, request_id: str, max_tokens: int, truncate: bool, seed_offset: int = 0, stream: bool = False
    ) -> GenerateRequest:
        """The worker's ``POST /internal/v1/generate`` request for one of the ``n`` samples."""
        return GenerateRequest(
            request_id=request_id,
            messages=[WorkerMessage.model_validate(m) for m in self.worker_messages()],
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            echo=False,
            stream=stream,
            **self._sampling_fields(max_tokens, seed_offset, truncate),
        )


class ChatLogProb(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogProbsContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatLogProbs(OpenAIBaseModel):
    content: list[ChatLogProbsContent] | None = None


class ChatResponseMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatCompletionResponseChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo


class DeltaMessage(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None
