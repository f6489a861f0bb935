"""``POST /v1/chat/completions``: messages rendered with the model's chat template by the worker, streamed or not.

``tools``, ``tool_choice``, ``response_format`` and the like are accepted and not applied: editors such as
Continue send tools with every request and read only the streamed ``delta.content``. Tool definitions never reach
the prompt (a byte model cannot call tools); a conversation longer than the window is fitted into it by the worker
(axl_model.prompt_fit) unless ``truncate`` (or AXL_TRUNCATE_PROMPTS) is false.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from axl_mesh.errors import APIError
from axl_mesh.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatLogProb,
    ChatLogProbs,
    ChatLogProbsContent,
    ChatResponseMessage,
    DeltaMessage,
    FinishReason,
    UsageInfo,
    random_id,
)
from axl_mesh.worker_protocol import TokenLogprobOut
from services.api_gateway.deps import MetricsDep, SettingsDep, UpstreamDep
from services.api_gateway.generation import (
    RequestMetrics,
    Sample,
    SampleResult,
    check_sample_count,
    clamped_max_tokens,
    respond,
)
from services.api_gateway.metrics import UNKNOWN_MODEL

router = APIRouter(prefix="/v1/chat", tags=["chat"])


def chat_logprobs(entries: list[TokenLogprobOut] | None) -> ChatLogProbs | None:
    """The worker's per-token logprobs in the chat layout."""
    if entries is None:
        return None
    content = [
        ChatLogProbsContent(
            token=entry.token,
            logprob=entry.logprob,
            bytes=list(entry.token.encode()),
            top_logprobs=[
                ChatLogProb(token=token, logprob=logprob, bytes=list(token.encode()))
                for token, logprob in entry.top_logprobs.items()
            ],
        )
        for entry in entries
    ]
    return ChatLogProbs(content=content)


class ChatChunks:
    """``chat.completion.chunk`` objects: the role first, then content deltas, then the finish reason."""

    def __init__(self, model_id: str, with_logprobs: bool) -> None:
        self.id = random_id("chatcmpl")
        self.created = int(time.time())
        self.model_id = model_id
        self.with_logprobs = with_logprobs

    def _chunk(self, choice: ChatCompletionStreamChoice) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(id=self.id, created=self.created, model=self.model_id, choices=[choice])

    def start(self, index: int) -> list[Any]:
        return [self._chunk(ChatCompletionStreamChoice(index=index, delta=DeltaMessage(role="assistant", content="")))]

    def piece(self, index: int, text: str, logprob: TokenLogprobOut | None) -> ChatCompletionStreamResponse:
        logprobs = chat_logprobs([logprob]) if self.with_logprobs and logprob is not None else None
        return self._chunk(ChatCompletionStreamChoice(index=index, delta=DeltaMessage(content=text), logprobs=logprobs))

    def finish(self, index: int, finish_reason: FinishReason | None) -> ChatCompletionStreamResponse:
        return self._chunk(ChatCompletionStreamChoice(index=index, delta=DeltaMessage(), finish_reason=finish_reason))

    def usage(self, usage: UsageInfo) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(
            id=self.id, created=self.created, model=self.model_id, choices=[], usage=usage
        )


@router.post("/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, upstream: UpstreamDep, settings: SettingsDep, metrics: MetricsDep
) -> Any:
    """Creates a model response for the given chat conversation."""
    check_sample_count(1, body.n, settings.max_samples_per_request)
    try:
        model = await upstream.resolve(body.model, lambda: [m.model_dump() for m in body.messages])
    except APIError as exc:  # 404 unknown model, 503 registry down or no replica
        RequestMetrics(metrics, "chat", UNKNOWN_MODEL).finished(exc.status)
        raise
    tracker = RequestMetrics(metrics, "chat", model.model_id)
    if model.routed_reason:
        metrics.routed.labels(specialist=model.specialist, model=model.model_id).inc()
    request_id = random_id("chatcmpl")
    max_tokens = clamped_max_tokens(
        body.requested_max_tokens() or settings.default_chat_max_tokens, model, settings.max_tokens_ceiling
    )
    samples = [
        Sample(
            index=i,
            request=body.to_generate_request(
                request_id=f"{request_id}-{i}",
                max_tokens=max_tokens,
                truncate=body.truncates(settings.truncate_prompts),
                seed_offset=i,
                stream=bool(body.stream),
            ),
        )
        for i in range(body.n)
    ]

    def build(results: list[SampleResult], usage: UsageInfo) -> ChatCompletionResponse:
        choices = [
            ChatCompletionResponseChoice(
                index=r.index,
                message=ChatResponseMessage(content=r.text),
                finish_reason=r.finish_reason,
                logprobs=chat_logprobs(r.logprobs) if body.logprobs else None,
            )
            for r in results
        ]
        return ChatCompletionResponse(id=request_id, model=model.model_id, choices=choices, usage=usage)

    return await respond(
        request,
        upstream=upstream,
        keepalive_seconds=settings.keepalive_seconds,
        tracker=tracker,
        model=model,
        samples=samples,
        stream=bool(body.stream),
        formatter=ChatChunks(model.model_id, bool(body.logprobs)),
        include_usage=body.include_usage,
        build_response=build,
        stalled_client_seconds=settings.stalled_client_seconds,
    )
