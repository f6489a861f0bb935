"""Run one API request's samples on the workers: non-streamed (gathered) or streamed (merged into SSE events).

A request becomes one :class:`Sample` per choice (``n`` per prompt, seeds ``seed + i``). Each sample is one
generate call on a worker, with failover before its first byte. The endpoint modules (``routes/completions.py``,
``routes/chat.py``) turn worker results into OpenAI objects through a :class:`ChunkFormatter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse

from axl_mesh.errors import APIError, InvalidRequestError
from axl_mesh.protocol import PROMPT_TRUNCATED_HEADER, FinishReason, UsageInfo, max_tokens_ceiling
from axl_mesh.worker_protocol import GenerateRequest, StreamEnd, StreamPiece, TokenLogprobOut, Usage, WorkerError
from services.api_gateway.metrics import GatewayMetrics
from services.api_gateway.sse import DONE, KEEPALIVE, EventStreamResponse, sse_data
from services.api_gateway.upstream import ResolvedModel, Upstream, UpstreamStream
from services.api_gateway.worker_client import WorkerClientError, WorkerReadTimeout

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Sample:
    """One choice of the response: the worker request, its choice index and which prompt it belongs to."""

    index: int
    request: GenerateRequest
    prompt_group: int = 0


@dataclass
class SampleResult:
    index: int
    text: str
    finish_reason: FinishReason | None
    usage: UsageInfo
    logprobs: list[TokenLogprobOut] | None = None
    prompt_truncated: int = 0  # bytes of the prompt the worker left out to fit the window


def check_sample_count(prompts: int, n: int, limit: int) -> None:
    """A 400 naming ``n`` (or ``prompt`` when n is 1) when ``prompts x n`` samples are more than ``limit``."""
    if prompts * n > limit:
        raise InvalidRequestError(
            f"This request asks for {prompts * n} samples ({prompts} prompt(s) x n={n}); the limit is {limit} "
            "per request. Send fewer prompts or a smaller n.",
            param="n" if n > 1 else "prompt",
            code="too_many_samples",
        )


def clamped_max_tokens(requested: int, model: ResolvedModel, configured_ceiling: int | None) -> int:
    """``requested``, at most the model's ceiling: a longer ask ends with finish_reason "length", never runs on."""
    return min(requested, max_tokens_ceiling(model.context_length, configured_ceiling))


def total_usage(results: Sequence[SampleResult], samples: Sequence[Sample]) -> UsageInfo:
    """OpenAI's usage for n samples: each prompt counted once, every sample's completion tokens."""
    usage = UsageInfo()
    seen_groups: set[int] = set()
    groups = {s.index: s.prompt_group for s in samples}
    for result in results:
        group = groups.get(result.index, 0)
        usage.add(result.usage, count_prompt=group not in seen_groups)
        seen_groups.add(group)
    return usage


def truncation_headers(samples: Sequence[Sample], truncated: Mapping[int, int]) -> dict[str, str]:
    """``x-axl-prompt-truncated``: bytes left out of the prompts (each prompt once, however many samples it has),
    from the workers' reports by sample index; no header when nothing was left out."""
    groups = {s.index: s.prompt_group for s in samples}
    per_prompt: dict[int, int] = {}
    for index, dropped in truncated.items():
        group = groups.get(index, 0)
        per_prompt[group] = max(per_prompt.get(group, 0), dropped)
    total = sum(per_prompt.values())
    return {PROMPT_TRUNCATED_HEADER: str(total)} if total > 0 else {}


def usage_info(usage: Usage) -> UsageInfo:
    """A worker's usage as OpenAI's (its total recomputed: the gateway sums these per request)."""
    return UsageInfo(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
    )


class RequestMetrics:
    """Metrics of one API request: counts, latencies and the running/waiting gauges of its samples."""

    def __init__(self, metrics: GatewayMetrics, endpoint: str, model_id: str) -> None:
        self.metrics = metrics
        self.endpoint = endpoint
        self.model_id = model_id
        self.started = time.perf_counter()
        self._recorded = False

    def finished(self, status: int | str) -> None:
        """Count the request once, with the status the client saw."""
        if self._recorded:
            return
        self._recorded = True
        self.metrics.requests.labels(endpoint=self.endpoint, model=self.model_id, status=str(status)).inc()
        self.metrics.e2e_latency.labels(model=self.model_id).observe(time.perf_counter() - self.started)

    def tokens(self, usage: UsageInfo) -> None:
        self.metrics.prompt_tokens.labels(model=self.model_id).inc(usage.prompt_tokens)
        self.metrics.generation_tokens.labels(model=self.model_id).inc(usage.completion_tokens)


@dataclass
class _SampleGauge:
    """Moves one sample from waiting to running to done on the gauges, whatever way it ends."""

    metrics: GatewayMetrics
    model_id: str
    request_started: float
    state: str = "new"
    last_piece: float = field(default=0.0)

    def wait(self) -> None:
        self.metrics.waiting.labels(model=self.model_id).inc()
        self.state = "waiting"

    def piece(self) -> None:
        now = time.perf_counter()
        if self.state == "waiting":
            self.metrics.waiting.labels(model=self.model_id).dec()
            self.metrics.running.labels(model=self.model_id).inc()
            self.metrics.time_to_first_token.labels(model=self.model_id).observe(now - self.request_started)
            self.state = "running"
        elif self.state == "running":
            self.metrics.inter_token_latency.labels(model=self.model_id).observe(now - self.last_piece)
        self.last_piece = now

    def done(self) -> None:
        if self.state == "waiting":
            self.metrics.waiting.labels(model=self.model_id).dec()
        elif self.state == "running":
            self.metrics.running.labels(model=self.model_id).dec()
        self.state = "done"


# --- non-streamed -----------------------------------------------------------------------------------------------


async def generate_all(
    upstream: Upstream, model: ResolvedModel, samples: Sequence[Sample], tracker: RequestMetrics
) -> list[SampleResult]:
    """Every sample's worker answer, concurrently; the first error cancels the rest and is raised."""

    async def one(sample: Sample) -> SampleResult:
        gauge = _SampleGauge(tracker.metrics, model.model_id, tracker.started)
        gauge.wait()
        try:
            answer = await upstream.generate(model, sample.request)
        finally:
            gauge.done()
        return SampleResult(
            index=sample.index,
            text=answer.text,
            finish_reason=answer.finish_reason,
            usage=usage_info(answer.usage),
            logprobs=answer.logprobs,
            prompt_truncated=answer.prompt_truncated,
        )

    if len(samples) == 1:  # the common case: no tasks to spawn and cancel
        results = [await one(samples[0])]
    else:
        results = await _first_error_cancels([one(s) for s in samples])
    tracker.tokens(total_usage(results, samples))
    return results


async def _first_error_cancels(coros: Sequence[Awaitable[T]]) -> list[T]:
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [t.result() for t in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first (the worker then drops the request)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise APIError(499, "The client closed the request.", code="client_closed_request")
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# --- streamed ---------------------------------------------------------------------------------------------------


class ChunkFormatter(Protocol):
    """Turns sample events into an endpoint's stream chunks (chat.completion.chunk or text_completion)."""

    def start(self, index: int) -> list[Any]: ...

    def piece(self, index: int, text: str, logprob: TokenLogprobOut | None) -> Any: ...

    def finish(self, index: int, finish_reason: FinishReason | None) -> Any: ...

    def usage(self, usage: UsageInfo) -> Any: ...


@dataclass
class _Event:
    index: int
    data: StreamPiece | StreamEnd | APIError  # a piece, the sample's end, or the error that ended it


def broken_stream_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, WorkerReadTimeout):
        return APIError(504, "The model worker stopped sending tokens.", code="upstream_timeout")
    return APIError(502, f"The stream from the model worker broke: {type(exc).__name__}.", code="upstream_error")


# Events buffered per sample between its worker and the client. A full buffer stops the pump reading from the
# worker (TCP back-pressure reaches the worker, whose own buffer is bounded too: services/model_worker/scheduler.py).
STREAM_BUFFER_EVENTS = 64


class _ClientStalled(Exception):
    """The client took nothing from a full buffer for ``stall_seconds``."""


class StreamRun:
    """The samples of one streaming request, each pumped from its worker into one bounded queue.

    A client that stops reading while keeping its socket open fills the queue; a pump that then cannot add an event
    for ``stall_seconds`` ends the whole run (every upstream stream closed, so the workers free their rows).
    """

    def __init__(
        self,
        upstream: Upstream,
        model: ResolvedModel,
        samples: Sequence[Sample],
        tracker: RequestMetrics,
        *,
        stall_seconds: float,
    ) -> None:
        self.model = model
        self.samples = list(samples)
        self.tracker = tracker
        self.stall_seconds = stall_seconds
        self.stalled = False
        self.truncated: dict[int, int] = {}  # sample index -> prompt bytes its worker left out (its stream's header)
        self.queue: asyncio.Queue[_Event] = asyncio.Queue(maxsize=STREAM_BUFFER_EVENTS * len(self.samples))
        loop = asyncio.get_running_loop()
        # Each resolves to None (the stream is open) or the APIError that stopped it from opening.
        self.opened: list[asyncio.Future[APIError | None]] = [loop.create_future() for _ in self.samples]
        self.tasks = [
            asyncio.ensure_future(self._pump(upstream, sample, opened))
            for sample, opened in zip(self.samples, self.opened, strict=True)
        ]

    async def wait_opened(self, timeout: float) -> None:
        """Wait until every sample's stream is open (or ``timeout``); raise the first error from opening so it
        becomes a proper HTTP error (404, 400 context_length_exceeded, 503) instead of an event."""
        pending = set(self.opened)
        deadline = time.monotonic() + timeout
        while pending:
            done, pending = await asyncio.wait(
                pending, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
            for future in done:
                if future.result() is not None:
                    await self.cancel()
                    raise future.result()  # type: ignore[misc]
            if not done:
                return  # still waiting (long queue or prefill): stream keep-alives meanwhile

    async def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _put(self, event: _Event) -> None:
        try:
            async with asyncio.timeout(self.stall_seconds):
                await self.queue.put(event)
        except TimeoutError:
            raise _ClientStalled from None

    def _stop_for_stalled_client(self) -> None:
        if not self.stalled:
            self.stalled = True
            logger.warning(
                "a client of %s read nothing for %.0fs: its stream is ended", self.model.model_id, self.stall_seconds
            )
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()

    async def _pump(self, upstream: Upstream, sample: Sample, opened: asyncio.Future[APIError | None]) -> None:
        gauge = _SampleGauge(self.tracker.metrics, self.model.model_id, self.tracker.started)
        gauge.wait()
        try:
            await self._pump_events(upstream, sample, opened, gauge)
        except _ClientStalled:
            self._stop_for_stalled_client()
        finally:
            gauge.done()
            if not opened.done():
                opened.set_result(APIError(499, "cancelled", code="client_closed_request"))

    async def _pump_events(
        self, upstream: Upstream, sample: Sample, opened: asyncio.Future[APIError | None], gauge: _SampleGauge
    ) -> None:
        stream: UpstreamStream | None = None
        try:
            try:
                stream = await upstream.open_stream(self.model, sample.request)
            except Exception as exc:  # noqa: BLE001 - becomes the response (or an error event)
                error = broken_stream_error(exc)
                if not opened.done():
                    opened.set_result(error)
                await self._put(_Event(sample.index, error))
                return
            self.truncated[sample.index] = stream.prompt_truncated
            opened.set_result(None)
            try:
                async for line in stream.events():
                    if isinstance(line, WorkerError):
                        await self._put(
                            _Event(
                                sample.index,
                                APIError(
                                    502,
                                    line.error.message or "The model worker failed mid-stream.",
                                    type=line.error.type,
                                    code=line.error.code or "upstream_error",
                                ),
                            )
                        )
                        return
                    if isinstance(line, StreamEnd):
                        await self._put(_Event(sample.index, line))
                        return
                    if line.text or line.logprob is not None:
                        gauge.piece()
                        await self._put(_Event(sample.index, line))
                raise APIError(502, "The model worker closed the stream before it finished.", code="upstream_error")
            except (WorkerClientError, ValueError, APIError) as exc:
                await self._put(_Event(sample.index, broken_stream_error(exc)))
        finally:
            if stream is not None:
                await stream.aclose()

    async def events(
        self,
        formatter: ChunkFormatter,
        *,
        include_usage: bool,
        keepalive_seconds: float,
        on_end: Callable[[int | str], None],
    ) -> AsyncIterator[str]:
        """SSE text: the opening chunks, pieces as they come, each choice's finish, usage, ``[DONE]``.
        A sample that breaks ends the whole stream with an error event and ``[DONE]``; idle gaps get keep-alives."""
        results: dict[int, SampleResult] = {}
        status: int | str = 200
        try:
            for sample in self.samples:
                for chunk in formatter.start(sample.index):
                    yield sse_data(chunk)
            remaining = len(self.samples)
            while remaining:
                if self.stalled and self.queue.empty():  # a late reader learns why nothing more comes
                    status = 408
                    yield sse_data(
                        APIError(
                            408,
                            f"The stream was ended: the client read nothing for {self.stall_seconds:.0f}s.",
                            code="client_stalled",
                        ).body()
                    )
                    yield DONE
                    return
                try:
                    async with asyncio.timeout(keepalive_seconds):  # unlike wait_for, never loses a cancellation
                        event = await self.queue.get()
                except TimeoutError:
                    yield KEEPALIVE
                    continue
                data = event.data
                if isinstance(data, StreamPiece):
                    yield sse_data(formatter.piece(event.index, data.text, data.logprob))
                elif isinstance(data, StreamEnd):
                    remaining -= 1
                    results[event.index] = SampleResult(event.index, "", data.finish_reason, usage_info(data.usage))
                    yield sse_data(formatter.finish(event.index, data.finish_reason))
                else:
                    error = data
                    status = error.status
                    logger.warning("stream of %s ended by an error: %s", self.model.model_id, error.message)
                    yield sse_data(error.body())
                    yield DONE
                    return
            usage = total_usage(list(results.values()), self.samples)
            self.tracker.tokens(usage)
            if include_usage:
                yield sse_data(formatter.usage(usage))
            yield DONE
        except (asyncio.CancelledError, GeneratorExit):
            status = 499  # the client went away
            raise
        finally:
            on_end(status)
            with contextlib.suppress(Exception):
                await self.cancel()


# --- one request, start to end ----------------------------------------------------------------------------------


def routing_headers(model: ResolvedModel) -> dict[str, str]:
    """Which model served the request (and for ``auto``, why)."""
    headers = {"x-axl-routed-to": model.model_id}
    if model.routed_reason:
        headers["x-axl-routing-reason"] = model.routed_reason.encode("ascii", "replace").decode()[:200]
    return headers


async def respond(
    request: Request,
    *,
    upstream: Upstream,
    keepalive_seconds: float,
    tracker: RequestMetrics,
    model: ResolvedModel,
    samples: Sequence[Sample],
    stream: bool,
    formatter: ChunkFormatter,
    include_usage: bool,
    build_response: Callable[[list[SampleResult], UsageInfo], Any],
    stalled_client_seconds: float,
) -> Any:
    """Run ``samples`` and answer: an SSE stream (errors before the first byte stay HTTP errors) or one JSON body.

    Both carry ``x-axl-prompt-truncated`` when a worker fitted a prompt into the window (for a stream, as reported
    by the workers whose streams opened before its headers went out)."""
    headers = routing_headers(model)
    try:
        if stream:
            run = StreamRun(upstream, model, samples, tracker, stall_seconds=stalled_client_seconds)
            await run.wait_opened(keepalive_seconds)
            events = run.events(
                formatter, include_usage=include_usage, keepalive_seconds=keepalive_seconds, on_end=tracker.finished
            )
            headers.update(truncation_headers(samples, run.truncated))
            return EventStreamResponse(events, headers=headers, send_timeout_seconds=stalled_client_seconds)
        results = await until_disconnect(request, generate_all(upstream, model, samples, tracker))
        body = build_response(sorted(results, key=lambda r: r.index), total_usage(results, samples))
        tracker.finished(200)
        headers.update(truncation_headers(samples, {r.index: r.prompt_truncated for r in results}))
        return JSONResponse(body.model_dump(mode="json"), headers=headers)
    except APIError as exc:
        tracker.finished(exc.status)
        raise
