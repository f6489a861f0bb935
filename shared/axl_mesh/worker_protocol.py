"""The model worker's internal API, one typed contract for both sides of the hop: the gateway builds a
:class:`GenerateRequest` (``axl_mesh.protocol``'s ``to_generate_request``), sends ``model_dump(mode="json")`` to
``POST /internal/v1/generate`` and parses the answer as :class:`GenerateResponse` (or, streamed, NDJSON lines
:class:`StreamPiece` ... :class:`StreamEnd` or :class:`WorkerError`, read by :func:`parse_stream_line`); the worker
validates the body with the same class and answers with the same models (``GET /internal/v1/info``:
:class:`WorkerInfo`). Imports no torch.

Sampling fields left out (or null) take the specialist's defaults (``axl_model.specialists``); the worker turns a
request into the model library's ``SamplingParams`` in one place (``services.model_worker.sampling``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, field_validator, model_validator

# Bounds shared with the OpenAI schemas (axl_mesh.protocol imports them from here).
MAX_STOP_SEQUENCES = 32
MAX_LOGPROBS = 20  # alternatives per token the worker returns (OpenAI's chat top_logprobs bound)
# Sampling bounds, the same at the gateway (OpenAI's request) and at the worker.
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=10.0)]
# New tokens a sample may ask for, wherever a request carries max_tokens (OpenAI's completions and chat, the agent,
# the worker): at least one. The upper bound depends on the model (``axl_mesh.protocol.max_tokens_ceiling``).
MaxTokens = Annotated[int, Field(ge=1)]


class WorkerMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | None = ""


class GenerateRequest(BaseModel):
    """One sample: a prompt (optionally with a fill-in-the-middle suffix) or chat messages."""

    model_config = ConfigDict(extra="ignore")

    request_id: str | None = Field(default=None, max_length=200)
    # The model asked for. A pool worker (AXL_WORKER_MODE=pool) serves whichever model of the store this names,
    # loading it first if it must; a worker pinned to one model ignores it. The gateway always sets it.
    model: str | None = Field(default=None, max_length=200)
    prompt: str | None = None
    messages: list[WorkerMessage] | None = None
    suffix: str | None = None
    # Always set by the gateway (the OpenAI request's, or its default, clamped to the model's ceiling); None: the
    # specialist's default, for a direct call.
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: RepetitionPenalty | None = None
    # Wider than OpenAI's int64: the gateway adds the sample's index to the request's seed.
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: list[str] = Field(default_factory=list)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    stream: bool = False
    # --- AXL extension: keep sampling past the end-of-text token (benches, tests; vLLM's `ignore_eos`)
    ignore_eos: bool = False
    # Fit a prompt that does not fit the window into it (axl_model.prompt_fit) instead of a 400
    # context_length_exceeded. The gateway always says which (its AXL_TRUNCATE_PROMPTS or the request's `truncate`).
    truncate: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            if len(value) > MAX_STOP_SEQUENCES:
                raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are supported, got {len(value)}")
            if any(isinstance(s, str) and not s for s in value):
                raise ValueError("stop sequences must be non-empty strings")
        return value

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if self.suffix is not None and self.messages is not None:
            raise ValueError("suffix (fill-in-the-middle) goes with prompt, not messages")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TokenLogprobOut(BaseModel):
    """The chosen token (one byte, shown as text), its logprob, and the likeliest alternatives."""

    token: str
    logprob: float
    top_logprobs: dict[str, float]


class GenerateResponse(BaseModel):
    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage
    logprobs: list[TokenLogprobOut] | None = None
    model: str
    # Tokens of the prompt left out to fit the window (a stream says it in the PROMPT_TRUNCATED_HEADER header).
    prompt_truncated: int = 0


class StreamPiece(BaseModel):
    """One NDJSON line of a stream: a piece of text (possibly empty when only a logprob is new)."""

    text: str
    logprob: TokenLogprobOut | None = None


class StreamEnd(BaseModel):
    """The last NDJSON line of a stream."""

    finish_reason: Literal["stop", "length"]
    usage: Usage
    model: str


class WorkerErrorDetail(BaseModel):
    message: str
    type: str | None = None
    param: str | None = None
    code: str | None = None


class WorkerError(BaseModel):
    """An error answer, in the usual shape: the body of a non-200 answer, or the last NDJSON line of a stream that
    failed after its headers went out."""

    error: WorkerErrorDetail


def _stream_line_kind(value: Any) -> str:
    """Which line: an error has ``error``, an end ``finish_reason``; anything else must be a piece."""
    if isinstance(value, dict):
        return "error" if "error" in value else "end" if "finish_reason" in value else "piece"
    return "error" if isinstance(value, WorkerError) else "end" if isinstance(value, StreamEnd) else "piece"


StreamLine = Annotated[
    Annotated[StreamPiece, Tag("piece")] | Annotated[StreamEnd, Tag("end")] | Annotated[WorkerError, Tag("error")],
    Discriminator(_stream_line_kind),
]
_STREAM_LINE: TypeAdapter[StreamPiece | StreamEnd | WorkerError] = TypeAdapter(StreamLine)


def parse_stream_line(line: bytes | str) -> StreamPiece | StreamEnd | WorkerError:
    """One NDJSON line of a worker's stream as its model; raises ``pydantic.ValidationError`` (a ValueError) for a
    line outside the protocol."""
    return _STREAM_LINE.validate_json(line)


def stream_line(line: StreamPiece | StreamEnd | WorkerError) -> bytes:
    """The NDJSON line (with its newline) the worker sends for ``line``."""
    return line.model_dump_json().encode() + b"\n"


class WorkerInfo(BaseModel):
    model_id: str
    specialist: str
    context_length: int
    capabilities: list[str]
    running: int
    waiting: int
    max_batch: int
    max_queue: int
    checkpoint_version: str
    dtype: str
    ready: bool
    draining: bool
