"""Continuous batching: one thread owns the model and a ``BatchDecoder``; requests join and leave between steps.

The event loop never touches the model. A request enters a bounded waiting list (``submit``; full -> ``QueueFull``);
the scheduler thread, between two decode steps, drops requests whose client went away (``cancel``), prefills
waiting requests into free cache rows, then runs one ``step()`` for every active sequence and hands each step's
outputs to the requests' output buffers with one ``call_soon_threadsafe`` per step (not one per token).

A prompt longer than ``prefill_chunk`` tokens is read in chunks, one per decode step (``BatchDecoder.advance_prefill``),
so the running rows keep streaming while it loads; 0 reads every prompt in one go, as before.

With ``prefix_cache_mb`` > 0 each prompt's model state is kept after its prefill (``axl_model.prefix_cache``), and a
prompt that shares a kept prompt's beginning restores it and prefills only the rest (the same tokens).

A reader that stops reading (the gateway's stream is stuck on a client that reads nothing) would let a buffer
grow without end while its row keeps decoding: a request whose oldest output waited ``stalled_reader_seconds``, or
that has ``MAX_UNREAD_OUTPUTS`` waiting, is cancelled instead, which frees its row before the next step.

The same thread loads the checkpoint first (so ``torch.set_num_threads`` applies to the thread that computes),
which is why ``/readyz`` can answer while a large model is still loading.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from axl_model.compiled import CompiledDecodeStep
from axl_model.generate import BatchDecoder, GenerationSequence, SamplingParams, StepOutput
from axl_model.model import MultiScaleTransformer
from axl_model.prefix_cache import PrefixCache
from axl_model.tokenizer import EOS_ID
from services.model_worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)


# Outputs one request may have waiting for its reader before it counts as stalled, whatever the time.
MAX_UNREAD_OUTPUTS = 4096


class QueueFull(Exception):
    """Every row is busy and the waiting list holds ``max_queue`` requests already."""


class SchedulerClosed(Exception):
    """The scheduler is stopping (or never loaded its model) and takes no more requests."""


class GenerationFailed(Exception):
    """The model raised while serving this request; the message is safe to show."""


class OutputBuffer:
    """A request's outputs waiting for its reader, each with the time it arrived (to tell a stalled reader).

    Touched only on the request's event loop (the model thread hands outputs over with call_soon_threadsafe)."""

    def __init__(self) -> None:
        self._items: deque[tuple[float, StepOutput | GenerationFailed]] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: StepOutput | GenerationFailed) -> None:
        self._items.append((time.monotonic(), item))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> StepOutput | GenerationFailed:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()[1]

    def qsize(self) -> int:
        return len(self._items)

    def oldest_wait(self, now: float) -> float:
        """Seconds the oldest unread output has waited (0 when the reader is up to date)."""
        return now - self._items[0][0] if self._items else 0.0


@dataclass(eq=False)
class GenerationRequest:
    """One request on its way through the scheduler; its ``events`` queue lives on the submitting event loop.

    Events are ``StepOutput`` (the last one has a ``finish_reason``) or one ``GenerationFailed``.
    """

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    events: OutputBuffer = field(default_factory=OutputBuffer)
    cancelled: bool = False
    finished: bool = False
    completion_tokens: int = 0
    enqueued_at: float = field(default_factory=time.perf_counter)
    last_output_at: float | None = None
    sequence: GenerationSequence | None = None


class Scheduler:
    """Owns the model thread. ``start()`` loads the model there; ``loaded`` is set when that ended, either way."""

    def __init__(
        self,
        load_model: Callable[[], MultiScaleTransformer],
        *,
        max_batch: int,
        max_queue: int,
        num_threads: int,
        stalled_reader_seconds: float,
        prefill_chunk: int = 0,
        compile: bool = False,
        prefix_cache_mb: float = 0.0,
        metrics: WorkerMetrics | None = None,
        on_loaded: Callable[[MultiScaleTransformer], None] | None = None,
    ) -> None:
        self._load_model = load_model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.num_threads = num_threads
        self.stalled_reader_seconds = stalled_reader_seconds
        self.prefill_chunk = prefill_chunk
        self.compile = compile
        self.metrics = metrics
        self.prefix_cache: PrefixCache | None = None
        if prefix_cache_mb > 0:
            self.prefix_cache = PrefixCache(int(prefix_cache_mb * (1 << 20)), observer=self._prefix_lookup)
        self._on_loaded = on_loaded
        self.model: MultiScaleTransformer | None = None
        self.load_error: BaseException | None = None
        self.loaded = threading.Event()
        self._cond = threading.Condition()
        self._waiting: deque[GenerationRequest] = deque()
        self._running: dict[int, GenerationRequest] = {}  # id(sequence) -> request; touched by the model thread
        self._running_count = 0  # what other threads read (len() of a dict being mutated is fine, but be explicit)
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name="axl-model-scheduler", daemon=True)

    # --- called from the event loop ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self.loaded.is_set() and self.load_error is None and not self._stopping

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def running(self) -> int:
        return self._running_count

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request for the next admission; raises QueueFull or SchedulerClosed instead of waiting."""
        with self._cond:
            if self._stopping or not self.ready:
                raise SchedulerClosed("the model is not loaded" if not self._stopping else "the worker is stopping")
            if self._running_count + len(self._waiting) >= self.max_batch + self.max_queue:
                raise QueueFull(
                    f"all {self.max_batch} batch rows are busy and {len(self._waiting)} requests are waiting "
                    f"(limit {self.max_queue})"
                )
            request.enqueued_at = time.perf_counter()
            self._waiting.append(request)
            self._cond.notify()

    def cancel(self, request: GenerationRequest) -> None:
        """The client went away: forget a waiting request now, drop a running one before the next step."""
        if request.finished or request.cancelled:
            return
        request.cancelled = True
        with self._cond:
            try:
                self._waiting.remove(request)
            except ValueError:
                pass  # running (the model thread drops it) or just finished
            else:
                self._record_outcome(request, "cancelled")
            self._cond.notify()

    def stop(self, timeout_seconds: float = 10.0) -> None:
        """Stop the thread; requests still queued or running get a GenerationFailed."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_seconds)

    async def wait_idle(self, timeout_seconds: float) -> bool:
        """Wait until nothing runs or waits (the drain on shutdown); False if that took longer than the timeout."""
        deadline = time.monotonic() + timeout_seconds
        while self._running_count or self._waiting:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    # --- the model thread -------------------------------------------------------------------------------------

    def _main(self) -> None:
        torch.set_num_threads(self.num_threads)
        try:
            started = time.perf_counter()
            model = self._load_model()
            self.model = model
            decoder = BatchDecoder(
                model,
                max_batch=self.max_batch,
                prefill_chunk=self.prefill_chunk,
                decode_step=self._compiled_step(model) if self.compile else None,
                prefix_cache=self.prefix_cache,
            )
            if self._on_loaded is not None:
                self._on_loaded(model)
            logger.info("model loaded in %.1fs (%d threads)", time.perf_counter() - started, self.num_threads)
        except BaseException as exc:  # noqa: BLE001 - reported through /readyz and the log, the process stays up
            logger.exception("loading the model failed")
            self.load_error = exc
            self.loaded.set()
            return
        self.loaded.set()
        try:
            self._serve(decoder)
        finally:
            self._fail_everything("the worker is shutting down")

    def _compiled_step(self, model: MultiScaleTransformer) -> CompiledDecodeStep:
        """The compiled decode step, every kind compiled now (before /readyz) so no request waits for a compiler."""
        step = CompiledDecodeStep(model)
        step.warm_up((1, 2) if self.max_batch > 1 else (1,))
        if step.fallback_reason is None:
            logger.info("compiled decode step: %d graphs in %.1fs", step.compilations, step.compile_seconds)
        return step

    def _serve(self, decoder: BatchDecoder) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._running and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                admitted: list[GenerationRequest] = []
                while self._waiting and len(self._running) + len(admitted) < self.max_batch:
                    admitted.append(self._waiting.popleft())
                # Counted as running from here on, so `running + waiting` never dips while a request moves.
                self._running_count = len(self._running) + len(admitted)
            events: list[tuple[GenerationRequest, StepOutput | GenerationFailed]] = []
            self._drop_cancelled(decoder)
            for request in admitted:
                self._admit(decoder, request, events)
            if decoder.prefilling:
                self._advance_prefill(decoder, events)
            if admitted or decoder.prefilling:
                self._prefix_cache_held()
            if decoder.active:
                self._step(decoder, events)
            self._running_count = len(self._running)
            self._deliver(events)

    def _prefix_lookup(self, prompt_tokens: int, reused_tokens: int) -> None:
        """The prefix cache's report of one lookup (model thread)."""
        if self.metrics is not None:
            self.metrics.prefix_cache_lookups.labels(result="hit" if reused_tokens else "miss").inc()
            self.metrics.prefix_cache_reused_tokens.inc(reused_tokens)

    def _prefix_cache_held(self) -> None:
        if self.metrics is not None and self.prefix_cache is not None:
            self.metrics.prefix_cache_bytes.set(self.prefix_cache.bytes_held)

    def _drop_cancelled(self, decoder: BatchDecoder) -> None:
        for key, request in list(self._running.items()):
            if request.cancelled:
                assert request.sequence is not None
                decoder.remove(request.sequence)
                del self._running[key]
                self._record_outcome(request, "cancelled")

    def _admit(self, decoder: BatchDecoder, request: GenerationRequest, events: list) -> None:
        if request.cancelled:
            self._record_outcome(request, "cancelled")
            return
        try:
            sequence, output = decoder.add(request.prompt_ids, request.params, request.request_id)
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the others
            logger.exception("prefill of request %s failed", request.request_id)
            events.append((request, GenerationFailed(f"prefill failed: {exc}")))
            self._record_outcome(request, "error")
            return
        request.sequence = sequence
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(request.prompt_ids))
        if not sequence.finished:
            self._running[id(sequence)] = request
        if output is not None:  # None: a long prompt queued for a chunked prefill; its first token comes later
            self._record_output(request, output, events)

    def _advance_prefill(self, decoder: BatchDecoder, events: list) -> None:
        """One chunk of the prompt being read; a failure fails that request only."""
        sequence = decoder.prefilling[0]
        try:
            results = decoder.advance_prefill()
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the others
            request = self._running.pop(id(sequence), None)
            logger.exception("chunked prefill of request %s failed", request.request_id if request else "?")
            if request is not None:
                events.append((request, GenerationFailed(f"prefill failed: {exc}")))
                self._record_outcome(request, "error")
            return
        self._record_results(results, events)

    def _step(self, decoder: BatchDecoder, events: list) -> None:
        try:
            results = decoder.step()
        except Exception as exc:  # noqa: BLE001 - fail the batch, keep the worker serving
            logger.exception("decode step failed; failing the %d running requests", len(self._running))
            for request in self._running.values():
                assert request.sequence is not None
                decoder.remove(request.sequence)
                events.append((request, GenerationFailed(f"decoding failed: {exc}")))
                self._record_outcome(request, "error")
            self._running.clear()
            return
        self._record_results(results, events)

    def _record_results(self, results: list[tuple[GenerationSequence, StepOutput]], events: list) -> None:
        for sequence, output in results:
            request = self._running[id(sequence)]
            if output.finish_reason is not None:
                del self._running[id(sequence)]
            self._record_output(request, output, events)

    def _record_output(self, request: GenerationRequest, output: StepOutput, events: list) -> None:
        now = time.perf_counter()
        metrics = self.metrics
        if metrics is not None and output.token_id is not None:
            if request.last_output_at is None:
                metrics.time_to_first_token.observe(now - request.enqueued_at)
            else:
                metrics.inter_token_latency.observe(now - request.last_output_at)
            if output.token_id != EOS_ID:
                metrics.generation_tokens.inc()
        request.last_output_at = now
        if output.finish_reason is not None:
            assert request.sequence is not None
            request.completion_tokens = sum(1 for t in request.sequence.generated if t != EOS_ID)
            request.finished = True
            if metrics is not None:
                metrics.e2e_latency.observe(now - request.enqueued_at)
                metrics.finished.labels(finish_reason=output.finish_reason).inc()
            self._record_outcome(request, "finished")
        events.append((request, output))

    def _record_outcome(self, request: GenerationRequest, status: str) -> None:
        request.finished = True
        if self.metrics is not None:
            self.metrics.requests.labels(status=status).inc()

    def _deliver(self, events: list[tuple[GenerationRequest, StepOutput | GenerationFailed]]) -> None:
        """Hand a step's outputs to their event loops: one wake-up per loop and step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request, event in events:
            if not request.cancelled:
                by_loop.setdefault(request.loop, []).append((request, event))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._put_all, batch)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _fail_everything(self, reason: str) -> None:
        with self._cond:
            leftover = list(self._running.values()) + list(self._waiting)
            self._running.clear()
            self._waiting.clear()
            self._running_count = 0
        for request in leftover:
            self._record_outcome(request, "error")
        self._deliver([(request, GenerationFailed(reason)) for request in leftover])

    def _put_all(self, batch: list[tuple[GenerationRequest, StepOutput | GenerationFailed]]) -> None:
        """On the requests' event loop: buffer each output, or cancel a request whose reader stopped reading."""
        now = time.monotonic()
        for request, event in batch:
            if request.cancelled:
                continue
            buffer = request.events
            if not request.finished and (
                buffer.qsize() >= MAX_UNREAD_OUTPUTS or buffer.oldest_wait(now) > self.stalled_reader_seconds
            ):
                logger.warning(
                    "request %s: its reader took nothing for %.0fs (%d outputs waiting); cancelled",
                    request.request_id,
                    buffer.oldest_wait(now),
                    buffer.qsize(),
                )
                self.cancel(request)  # its row is freed before the next step
                buffer.put_nowait(GenerationFailed("the client stopped reading the stream"))
                continue
            buffer.put_nowait(event)
