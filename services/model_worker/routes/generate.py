"""``POST /internal/v1/generate``: one sample, streamed as NDJSON or answered as one JSON object."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from axl_mesh.errors import APIError
from axl_mesh.protocol import PROMPT_TRUNCATED_HEADER
from axl_mesh.worker_protocol import (
    GenerateRequest,
    GenerateResponse,
    StreamEnd,
    StreamPiece,
    TokenLogprobOut,
    Usage,
    WorkerError,
    WorkerErrorDetail,
    stream_line,
)
from axl_model.generate import StepOutput, TokenLogprob
from services.model_worker.deps import serving_worker
from services.model_worker.scheduler import GenerationFailed, GenerationRequest
from services.model_worker.worker import ModelWorker, PreparedPrompt

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/internal/v1", tags=["internal"])

NDJSON = "application/x-ndjson"


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, request: Request) -> Response:
    """Generate one sample; errors before the first byte are OpenAI-shaped (400 context_length_exceeded, 503)."""
    worker = await serving_worker(request, body.model)  # a pool loads body.model first if it must
    generation, prepared = worker.submit(body)  # no await in between: an unload cannot slip in
    if body.stream:
        # The gateway reads this before the first line, so its own response can carry it in its headers.
        headers = {PROMPT_TRUNCATED_HEADER: str(prepared.truncated)} if prepared.truncated else None
        return StreamingResponse(_ndjson(worker, generation, prepared, body.echo), media_type=NDJSON, headers=headers)
    collecting = asyncio.ensure_future(_collect(worker, generation, prepared, body.echo))
    disconnected = asyncio.ensure_future(_client_disconnected(request))
    try:
        done, _ = await asyncio.wait({collecting, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled: never leave a generation running for nobody
        disconnected.cancel()
        if not collecting.done():
            collecting.cancel()  # worker.outputs() then cancels the request in the scheduler
    if collecting not in done:
        await asyncio.gather(collecting, return_exceptions=True)
        return Response(status_code=499)  # the client is gone; nobody reads this
    try:
        return Response(collecting.result().model_dump_json(), media_type="application/json")
    except GenerationFailed as exc:
        raise APIError(500, str(exc), code="generation_failed") from None


async def _client_disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so only a disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage(prepared: PreparedPrompt, generation: GenerationRequest) -> Usage:
    prompt_tokens = len(prepared.ids)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=generation.completion_tokens,
        total_tokens=prompt_tokens + generation.completion_tokens,
    )


def _logprob(lp: TokenLogprob | None) -> TokenLogprobOut | None:
    return None if lp is None else TokenLogprobOut(token=lp.token, logprob=lp.logprob, top_logprobs=lp.top)


async def _collect(
    worker: ModelWorker, generation: GenerationRequest, prepared: PreparedPrompt, echo: bool
) -> GenerateResponse:
    pieces = [prepared.text] if echo else []
    logprobs: list[TokenLogprobOut] = []
    last: StepOutput | None = None
    async for output in worker.outputs(generation):
        pieces.append(output.text)
        if output.logprob is not None:
            logprobs.append(_logprob(output.logprob))  # type: ignore[arg-type]
        last = output
    assert last is not None and last.finish_reason is not None
    return GenerateResponse(
        text="".join(pieces),
        finish_reason=last.finish_reason,
        usage=_usage(prepared, generation),
        logprobs=logprobs if prepared.params.logprobs is not None else None,
        model=worker.model_id,
        prompt_truncated=prepared.truncated,
    )


async def _ndjson(
    worker: ModelWorker, generation: GenerationRequest, prepared: PreparedPrompt, echo: bool
) -> AsyncIterator[bytes]:
    """One JSON object per line: pieces of text (with their logprob), then {finish_reason, usage, model}.

    If the client disconnects, Starlette cancels this generator and ``worker.outputs`` cancels the request.
    """
    if echo and prepared.text:
        yield stream_line(StreamPiece(text=prepared.text))
    try:
        async for output in worker.outputs(generation):
            if output.text or output.logprob is not None:
                yield stream_line(StreamPiece(text=output.text, logprob=_logprob(output.logprob)))
            if output.finish_reason is not None:
                yield stream_line(
                    StreamEnd(
                        finish_reason=output.finish_reason, usage=_usage(prepared, generation), model=worker.model_id
                    )
                )
    except GenerationFailed as exc:
        # Headers are gone already: the error travels as the last line, in the usual shape.
        logger.warning("request %s failed mid-stream: %s", generation.request_id, exc)
        yield stream_line(
            WorkerError(error=WorkerErrorDetail(message=str(exc), type="server_error", code="generation_failed"))
        )
