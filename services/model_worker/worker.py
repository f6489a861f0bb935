"""The model worker's state: the checkpoint being served, its scheduler, its registration, its shutdown.

``ModelWorker.start()`` begins loading in the scheduler's thread; once loaded it announces itself to the
registry (unless standalone) and heartbeats its live load. ``prepare()`` turns a validated request into token
ids and sampling parameters (or a 400), ``submit()`` queues it (or a 503) and ``outputs()`` yields its pieces.
``drain()`` is the SIGTERM path: deregister, refuse new work, let in-flight requests finish for a bounded time.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from axl_mesh.advertise import is_loopback
from axl_mesh.errors import InvalidRequestError, ServiceUnavailableError
from axl_mesh.registry_client import RegistryClient
from axl_mesh.registry_schemas import Capability, InstanceLoad, InstanceRegistration
from axl_mesh.worker_protocol import GenerateRequest, WorkerInfo
from axl_model.checkpoint import MODEL_FILE, is_checkpoint, load_config
from axl_model.config import ModelConfig
from axl_model.generate import SamplingParams, StepOutput
from axl_model.model import MultiScaleTransformer
from axl_model.prompt_fit import fit_chat, fit_fim, fit_text, generation_reserve
from axl_model.quantize import load_serving_model
from axl_model.specialists import Specialist, get_specialist
from axl_model.tokenizer import ByteTokenizer
from services.model_worker.metrics import WorkerMetrics
from services.model_worker.sampling import to_sampling_params
from services.model_worker.scheduler import (
    GenerationFailed,
    GenerationRequest,
    QueueFull,
    Scheduler,
    SchedulerClosed,
)
from services.model_worker.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class PreparedPrompt:
    ids: list[int]
    text: str  # what `echo` returns: the prompt as given, or the rendered chat prompt
    params: SamplingParams
    truncated: int = 0  # tokens of the prompt left out to fit the window (axl_model.prompt_fit)


def checkpoint_version(path: Path) -> str:
    """A short content hash of the checkpoint's config and weights: replicas of one checkpoint agree on it.

    A checkpoint is a folder (config.json + weights) or one axl-multiscale .gguf file holding both.
    """
    digest = hashlib.sha256()
    files = [path] if path.is_file() else [path / "config.json", path / MODEL_FILE]
    for file in files:
        with file.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return "sha256:" + digest.hexdigest()[:16]


def _warn_if_unreachable(url: str, registry_url: str) -> None:
    """A loopback URL handed to a registry on another machine reaches nobody there (the gateway would call its own
    loopback): say so. Not refused, since a gateway on this machine could still use it."""
    registry_host = urlsplit(registry_url).hostname or ""
    if is_loopback(urlsplit(url).hostname or "") and registry_host and not is_loopback(registry_host):
        logger.warning(
            "advertising %s, a loopback address, to the registry at %s on another host: gateways "
            "elsewhere cannot reach it; bind a routable AXL_HOST or set AXL_ADVERTISE_HOST",
            url,
            registry_url,
        )


class ModelWorker:
    def __init__(self, settings: Settings, metrics: WorkerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.specialist: Specialist = get_specialist(settings.specialist)
        self.model_id = settings.served_model_id
        self.instance_id = f"{self.model_id}-{uuid.uuid4().hex[:12]}"
        # Worked out once, before anything loads: a URL nobody could call refuses the start (AdvertiseError).
        self.advertised_url = None if settings.standalone else settings.advertised_url()
        if self.advertised_url is not None:
            _warn_if_unreachable(self.advertised_url, settings.registry_url)
        self.config: ModelConfig | None = None
        self.tokenizer: ByteTokenizer | None = None
        self.checkpoint_version = ""
        self.draining = False
        self.scheduler = Scheduler(
            self._load,
            max_batch=settings.max_batch,
            max_queue=settings.max_queue,
            num_threads=settings.threads,
            stalled_reader_seconds=settings.stalled_reader_seconds,
            prefill_chunk=settings.prefill_chunk_tokens,
            compile=settings.compile,
            prefix_cache_mb=settings.prefix_cache_mb,
            metrics=metrics,
            on_loaded=self._loaded,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._registry: RegistryClient | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._deregistered = False

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin loading the checkpoint in the model thread; returns at once."""
        self._loop = asyncio.get_running_loop()
        self.scheduler.start()

    def _load(self) -> MultiScaleTransformer:  # model thread
        path = self.settings.checkpoint
        assert path is not None, "a pinned worker has a checkpoint (Settings checks it)"
        self._wait_for_checkpoint(path)
        self.config = load_config(path)  # fails fast, naming the file, before reading the weights
        model = load_serving_model(path, self.settings.dtype)  # int8: axl_model.quantize
        self.checkpoint_version = checkpoint_version(path)
        self.tokenizer = ByteTokenizer(fim=model.config.fim)
        return model

    def _wait_for_checkpoint(self, path: Path) -> None:
        """A checkpoint folder appears atomically (``save_checkpoint`` swaps it in), so polling for it is safe."""
        deadline = time.monotonic() + self.settings.checkpoint_wait_seconds
        if not is_checkpoint(path) and self.settings.checkpoint_wait_seconds:
            logger.info("waiting up to %.0fs for checkpoint %s", self.settings.checkpoint_wait_seconds, path)
        while not is_checkpoint(path) and time.monotonic() < deadline and not self.scheduler.stopping:
            time.sleep(0.2)

    def _loaded(self, model: MultiScaleTransformer) -> None:  # model thread
        self.metrics.model_loaded.set(1)
        logger.info(
            "serving %s (%s, %s) from %s: %d parameters, context %d, version %s",
            self.model_id,
            self.specialist.name,
            model.config.name,
            self.settings.checkpoint,
            model.num_parameters(),
            model.config.max_seq_len,
            self.checkpoint_version,
        )
        if self._loop is not None and not self.settings.standalone:
            self._loop.call_soon_threadsafe(self._start_heartbeat)

    def _start_heartbeat(self) -> None:
        if self.draining:
            return
        self._registry = RegistryClient(self.settings.registry_url, self.settings.registry_secret_value())
        self._heartbeat = self._registry.heartbeat_forever(
            self.registration(), load_fn=self.load, interval_seconds=self.settings.heartbeat_seconds
        )

    async def drain(self) -> None:
        """SIGTERM: leave the registry, refuse new requests (503), give running ones up to drain_seconds."""
        if self.draining:
            return
        self.draining = True
        await self._deregister()
        busy = self.scheduler.running + self.scheduler.waiting
        if busy:
            logger.info("draining %d requests (up to %.0fs)", busy, self.settings.drain_seconds)
        if not await self.scheduler.wait_idle(self.settings.drain_seconds):
            logger.warning("drain timed out with %d requests still running", self.scheduler.running)

    async def close(self) -> None:
        """Lifespan shutdown: deregister if the drain did not, stop the model thread."""
        self.draining = True
        await self._deregister()
        await asyncio.to_thread(self.scheduler.stop)
        if self._registry is not None:
            await self._registry.aclose()

    async def _deregister(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            try:
                await self._heartbeat
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the heartbeat logs its own failures
                pass
            self._heartbeat = None
        if self._registry is not None and not self._deregistered:
            self._deregistered = True
            try:
                await self._registry.deregister(self.instance_id)
                logger.info("deregistered %s", self.instance_id)
            except Exception as exc:  # noqa: BLE001 - the TTL forgets us anyway
                logger.warning("deregistering %s failed (%s); the registry's TTL will forget it", self.instance_id, exc)

    # --- what the worker serves ----------------------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return self.config.max_seq_len if self.config is not None else 0

    @property
    def capabilities(self) -> list[str]:
        caps = [Capability.COMPLETION.value, Capability.CHAT.value]
        if self.config is not None and self.config.fim:
            caps.append(Capability.FIM.value)
        return caps

    def load(self) -> InstanceLoad:
        return InstanceLoad(running=self.scheduler.running, waiting=self.scheduler.waiting)

    def registration(self) -> InstanceRegistration:
        return InstanceRegistration(
            instance_id=self.instance_id,
            specialist=self.specialist.name,
            model_id=self.model_id,
            url=self.advertised_url or self.settings.advertised_url(),
            context_length=self.context_length,
            capabilities=self.capabilities,
            checkpoint_version=self.checkpoint_version,
            max_concurrency=self.settings.max_batch,
            load=self.load(),
        )

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            model_id=self.model_id,
            specialist=self.specialist.name,
            context_length=self.context_length,
            capabilities=self.capabilities,
            running=self.scheduler.running,
            waiting=self.scheduler.waiting,
            max_batch=self.settings.max_batch,
            max_queue=self.settings.max_queue,
            checkpoint_version=self.checkpoint_version,
            dtype=self.settings.dtype,
            ready=self.ready,
            draining=self.draining,
        )

    @property
    def ready(self) -> bool:
        return self.scheduler.ready and not self.draining

    def not_ready_error(self) -> ServiceUnavailableError:
        retry = self.settings.retry_after_seconds
        if self.draining:
            return ServiceUnavailableError(
                "This worker is shutting down.", retry_after_seconds=retry, code="shutting_down"
            )
        if self.scheduler.load_error is not None:
            return ServiceUnavailableError(
                f"The model failed to load: {self.scheduler.load_error}",
                retry_after_seconds=retry,
                code="model_load_failed",
            )
        return ServiceUnavailableError(
            f"The model is still loading (checkpoint {self.settings.checkpoint}).",
            retry_after_seconds=retry,
            code="model_loading",
        )

    # --- serving one request -------------------------------------------------------------------------------------

    def prepare(self, body: GenerateRequest) -> PreparedPrompt:
        """Tokens and sampling parameters for a request; InvalidRequestError (400) for what cannot be served.

        With ``truncate`` a prompt longer than the window less the room for the answer is fitted into it
        (axl_model.prompt_fit); without, one longer than the window is a 400 context_length_exceeded."""
        assert self.config is not None and self.tokenizer is not None, "prepare() before the model loaded"
        s = self.specialist
        try:
            params = to_sampling_params(body, s)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        budget = (
            self.context_length - generation_reserve(params.max_tokens, self.context_length) if body.truncate else None
        )
        if body.messages is not None:
            param = "messages"
            try:
                fitted = fit_chat(s, self.tokenizer, [m.model_dump() for m in body.messages], budget)
            except (ValueError, KeyError) as exc:
                raise InvalidRequestError(f"Invalid messages: {exc}", param="messages") from None
            text = fitted.text
        elif body.suffix is not None:
            param = "prompt"
            if not self.config.fim:
                raise InvalidRequestError(
                    f"The model '{self.model_id}' does not support fill-in-the-middle (it was trained without FIM "
                    "tokens); leave out `suffix`.",
                    param="suffix",
                    code="fim_not_supported",
                )
            assert body.prompt is not None
            fitted = fit_fim(self.tokenizer, body.prompt, body.suffix, budget)
            text = body.prompt
        else:
            param = "prompt"
            assert body.prompt is not None
            fitted = fit_text(self.tokenizer, body.prompt, budget)
            text = body.prompt
        ids = fitted.ids
        if len(ids) > self.context_length:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.context_length} tokens (bytes). However, your "
                f"prompt has {len(ids)} tokens. Please shorten the prompt.",
                param=param,
                code="context_length_exceeded",
            )
        return PreparedPrompt(ids=ids, text=text, params=params, truncated=fitted.dropped)

    def submit(self, body: GenerateRequest) -> tuple[GenerationRequest, PreparedPrompt]:
        """Validate and queue a request; raises the 400 or 503 the client should see."""
        if not self.ready:
            self.metrics.requests.labels(status="rejected").inc()
            raise self.not_ready_error()
        try:
            prepared = self.prepare(body)
        except InvalidRequestError:
            self.metrics.requests.labels(status="invalid").inc()
            raise
        request = GenerationRequest(
            prepared.ids,
            prepared.params,
            loop=asyncio.get_running_loop(),
            request_id=body.request_id or uuid.uuid4().hex,
        )
        try:
            self.scheduler.submit(request)
        except QueueFull as exc:
            self.metrics.requests.labels(status="rejected").inc()
            raise ServiceUnavailableError(
                f"This worker is at capacity: {exc}. Retry shortly or use another replica.",
                retry_after_seconds=self.settings.retry_after_seconds,
                code="queue_full",
            ) from None
        except SchedulerClosed:
            self.metrics.requests.labels(status="rejected").inc()
            raise self.not_ready_error() from None
        return request, prepared

    async def outputs(self, request: GenerationRequest) -> AsyncIterator[StepOutput]:
        """The request's outputs as they are decoded, the last with a finish_reason.

        Leaving early (the client went away, the task was cancelled) cancels the request in the scheduler.
        Raises GenerationFailed if the model failed mid-way.
        """
        try:
            while True:
                event = await request.events.get()
                if isinstance(event, GenerationFailed):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if not request.finished:
                self.scheduler.cancel(request)
