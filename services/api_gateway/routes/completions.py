"""``POST /v1/completions``: text completion of one or several prompts (FIM with ``suffix``), streamed or not.

For a model with FIM tokens, a prompt written in an editor's fill-in-the-middle template (Continue's autocomplete
sends ``<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>``) is served as ``prompt`` + ``suffix``
(axl_mesh.fim_templates). A prompt longer than the window is fitted into it by the worker unless ``truncate`` is false.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from axl_mesh.errors import APIError, InvalidRequestError
from axl_mesh.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    FinishReason,
    UsageInfo,
    random_id,
)
from axl_mesh.registry_schemas import Capability
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

router = APIRouter(prefix="/v1", tags=["completions"])


def completion_logprobs(entries: list[TokenLogprobOut] | None, offset: int = 0) -> CompletionLogProbs | None:
    """The worker's per-token logprobs in the completions layout (``offset``: where the first token starts)."""
    if entries is None:
        return None
    out = CompletionLogProbs()
    for entry in entries:
        out.tokens.append(entry.token)
        out.token_logprobs.append(entry.logprob)
        out.top_logprobs.append(entry.top_logprobs)
        out.text_offset.append(offset)
        offset += len(entry.token)
    return out


class CompletionChunks:
    """Stream chunks of ``text_completion`` objects, one id and timestamp for the whole stream."""

    def __init__(self, model_id: str, with_logprobs: bool) -> None:
        self.id = random_id("cmpl")
        self.created = int(time.time())
        self.model_id = model_id
        self.with_logprobs = with_logprobs
        self.offsets: dict[int, int] = {}

    def _chunk(self, choice: CompletionResponseChoice) -> CompletionStreamResponse:
        return CompletionStreamResponse(id=self.id, created=self.created, model=self.model_id, choices=[choice])

    def start(self, index: int) -> list[Any]:
        return []  # completions streams open with the first text

    def piece(self, index: int, text: str, logprob: TokenLogprobOut | None) -> CompletionStreamResponse:
        logprobs = None
        if self.with_logprobs:
            offset = self.offsets.get(index, 0)
            if logprob is None:  # echoed prompt text: no logprob of its own, as OpenAI's first echoed token
                logprobs = CompletionLogProbs(
                    text_offset=[offset], token_logprobs=[None], tokens=[text], top_logprobs=[None]
                )
            else:
                logprobs = completion_logprobs([logprob], offset)
        self.offsets[index] = self.offsets.get(index, 0) + len(text)
        return self._chunk(CompletionResponseChoice(index=index, text=text, logprobs=logprobs))

    def finish(self, index: int, finish_reason: FinishReason | None) -> CompletionStreamResponse:
        return self._chunk(CompletionResponseChoice(index=index, text="", finish_reason=finish_reason))

    def usage(self, usage: UsageInfo) -> CompletionStreamResponse:
        return CompletionStreamResponse(id=self.id, created=self.created, model=self.model_id, choices=[], usage=usage)


@router.post("/completions", response_model=CompletionResponse)
async def create_completion(
    body: CompletionRequest, request: Request, upstream: UpstreamDep, settings: SettingsDep, metrics: MetricsDep
) -> Any:
    """Creates a completion for the provided prompt(s) and parameters."""
    prompts = body.prompts()
    check_sample_count(len(prompts), body.n, settings.max_samples_per_request)
    try:
        model = await upstream.resolve(body.model, lambda: prompts[0])
    except APIError as exc:  # 404 unknown model, 503 registry down or no replica
        RequestMetrics(metrics, "completions", UNKNOWN_MODEL).finished(exc.status)
        raise
    tracker = RequestMetrics(metrics, "completions", model.model_id)
    if body.suffix is not None and Capability.FIM not in model.capabilities:
        tracker.finished(400)
        raise InvalidRequestError(
            f"The model '{model.model_id}' does not support fill-in-the-middle (suffix); "
            "use a model whose capabilities include 'fim'.",
            param="suffix",
            code="fim_not_supported",
        )
    request_id = random_id("cmpl")
    max_tokens = clamped_max_tokens(body.requested_max_tokens(), model, settings.max_tokens_ceiling)
    fim = Capability.FIM in model.capabilities
    infills = [body.infill(prompt, fim) for prompt in prompts]
    samples = [
        Sample(
            index=p * body.n + i,
            request=body.to_generate_request(
                prefix,
                suffix=suffix,
                request_id=f"{request_id}-{p * body.n + i}",
                max_tokens=max_tokens,
                truncate=body.truncates(settings.truncate_prompts),
                seed_offset=i,
                stream=bool(body.stream),
            ),
            prompt_group=p,
        )
        for p, (prefix, suffix) in enumerate(infills)
        for i in range(body.n)
    ]
    if model.routed_reason:
        metrics.routed.labels(specialist=model.specialist, model=model.model_id).inc()

    def build(results: list[SampleResult], usage: UsageInfo) -> CompletionResponse:
        choices = [
            CompletionResponseChoice(
                index=r.index,
                text=r.text,
                finish_reason=r.finish_reason,
                logprobs=completion_logprobs(r.logprobs) if body.logprobs is not None else None,
            )
            for r in results
        ]
        return CompletionResponse(id=request_id, model=model.model_id, choices=choices, usage=usage)

    return await respond(
        request,
        upstream=upstream,
        keepalive_seconds=settings.keepalive_seconds,
        tracker=tracker,
        model=model,
        samples=samples,
        stream=bool(body.stream),
        formatter=CompletionChunks(model.model_id, body.logprobs is not None),
        include_usage=body.include_usage,
        build_response=build,
        stalled_client_seconds=settings.stalled_client_seconds,
    )
