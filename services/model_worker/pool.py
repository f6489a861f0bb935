"""A pool worker (``AXL_WORKER_MODE=pool``): serves any model of the model store on demand, as Ollama does.

A request (or the gateway's ``POST /internal/v1/models/load``) for a model the pool does not hold loads it from the
store: one :class:`~services.model_worker.worker.ModelWorker` per held model (its own scheduler thread and KV
cache, registered with the registry under the model's name at the pool's URL, heartbeating as any worker does).
The pool keeps the most recently used models within ``AXL_POOL_MEMORY_BUDGET_MB``: a load that does not fit first
unloads the least recently used idle models (nothing running or waiting); if it still does not fit, the answer is a
503 ``pool_full`` with Retry-After. A model nobody asked for in ``AXL_POOL_IDLE_UNLOAD_SECONDS`` is unloaded.

On a host without the store's volume, ``AXL_MODEL_STORE_URL`` (the gateway) is where a model the local store
lacks is copied from, checksummed (``services.model_worker.store_fetch``), before it loads.

The pool also registers a record of its own (specialist ``on-demand``, ``axl_mesh.registry_schemas``): that is how
the gateway finds pools to ask for a model no worker holds. Loads run one at a time (each is CPU-bound; the micro
preset loads in about a second and a half), and concurrent requests for the model being loaded wait for that load.

A model's memory is estimated before it loads (:func:`estimate_serving_bytes`): its weights at the serving dtype plus
the KV cache the worker allocates (``max_batch`` rows over the full window), both computed exactly from the
checkpoint's config on torch's ``meta`` device, without reading the weights.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel

from axl_mesh.errors import InvalidRequestError, ModelNotFoundError, ServiceUnavailableError
from axl_mesh.model_store import ModelStore, ModelStoreError
from axl_mesh.registry_client import RegistryClient
from axl_mesh.registry_schemas import NAME_PATTERN, ON_DEMAND_SPECIALIST, InstanceLoad, InstanceRegistration
from axl_model.checkpoint import is_checkpoint, load_config
from axl_model.config import ModelConfig
from axl_model.model import MultiScaleTransformer
from axl_model.specialists import SPECIALISTS
from services.model_worker.metrics import WorkerMetrics
from services.model_worker.settings import Settings
from services.model_worker.store_fetch import FetchError, NotInStore, fetch_model
from services.model_worker.worker import ModelWorker

logger = logging.getLogger(__name__)

MB = 1 << 20
# Bytes per weight at each serving dtype. int8 is weight-only on the linear layers (axl_model.quantize): those
# weights take one byte plus a float32 scale per output channel; embeddings and norms stay float32.
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def estimate_serving_bytes(
    config: ModelConfig, *, dtype: str, max_batch: int, prefill_chunk: int, prefix_cache_mb: float = 0.0
) -> int:
    """Weights at ``dtype`` plus the KV cache a worker allocates for ``max_batch`` rows (one more when it reads
    prompts in chunks: ``BatchDecoder``'s staging row), over the full window, plus the most its prompt prefix cache
    may hold. Exact shapes, no weights read."""
    with torch.device("meta"):
        model = MultiScaleTransformer(config)
        cache = model.new_cache(max_batch + (1 if prefill_chunk else 0))
    if dtype == "int8":
        weights = 0
        linear = set()
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                linear.add(id(module.weight))
                weights += module.weight.numel() + module.out_features * 4
        weights += sum(p.numel() * 4 for p in model.parameters() if id(p) not in linear)
        cache_element = 4  # activations stay float (bfloat16 only inside the int8 matmul)
    else:
        element = _DTYPE_BYTES[dtype]
        weights = sum(p.numel() * element for p in model.parameters())
        cache_element = element
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    cache_bytes = sum(t.numel() for t in cache.tensors() if t.is_floating_point()) * cache_element
    cache_bytes += int(prefix_cache_mb * MB)
    return int(weights + cache_bytes)


def _release_memory() -> None:
    """Give an unloaded model's memory back now: the worker and its scheduler refer to each other (bound methods),
    so only the cycle collector frees them; then glibc keeps freed heap pages unless asked to return them."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only (musl has none): probe once
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


class HeldModel(BaseModel):
    """A model the pool holds (``GET /internal/v1/pool``)."""

    model: str
    specialist: str
    instance_id: str
    estimated_bytes: int
    idle_seconds: float
    running: int
    waiting: int


class PoolInfo(BaseModel):
    """What a pool holds and how much of its budget that takes."""

    instance_id: str
    model_id: str
    memory_budget_bytes: int
    memory_used_bytes: int
    idle_unload_seconds: float
    models: list[HeldModel]
    ready: bool
    draining: bool


@dataclass
class _Held:
    worker: ModelWorker
    estimated_bytes: int
    last_used: float


@dataclass
class _PoolMetrics:
    models: Gauge
    memory: Gauge
    loads: Counter
    unloads: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> _PoolMetrics:
        return cls(
            models=Gauge("axl_pool_models_loaded", "Models the pool holds now", registry=registry),
            memory=Gauge("axl_pool_memory_bytes", "Estimated bytes of the models the pool holds", registry=registry),
            loads=Counter("axl_pool_loads_total", "Model loads by outcome", ["outcome"], registry=registry),
            unloads=Counter(
                "axl_pool_unloads_total", "Model unloads by reason (lru, idle, shutdown)", ["reason"], registry=registry
            ),
        )


class ModelPool:
    """Loads, holds and unloads models of the store; the app's ``state.worker`` in pool mode (it answers the same
    lifecycle calls as a :class:`ModelWorker`: start, drain, close, ready, not_ready_error, load)."""

    def __init__(self, settings: Settings, metrics: WorkerMetrics, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.metrics = metrics
        self.pool_metrics = _PoolMetrics.create(registry)
        self.model_id = settings.served_model_id
        self.instance_id = f"{self.model_id}-{uuid.uuid4().hex[:12]}"
        self.advertised_url = None if settings.standalone else settings.advertised_url()
        self.budget_bytes = int(settings.pool_memory_budget_mb * MB)
        self.store = ModelStore(settings.resolved_model_store_dir)
        self.draining = False
        self._held: OrderedDict[str, _Held] = OrderedDict()  # least recently used first
        self._reserved = 0  # bytes of the model being loaded
        self._load_lock = asyncio.Lock()
        self._registry: RegistryClient | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._started = False

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Announce the pool and start the idle reaper; models load when asked for."""
        self._started = True
        if not self.settings.standalone:
            self._registry = RegistryClient(self.settings.registry_url, self.settings.registry_secret_value())
            self._heartbeat = self._registry.heartbeat_forever(
                self.registration(), load_fn=self.load, interval_seconds=self.settings.heartbeat_seconds
            )
        if self.settings.pool_idle_unload_seconds > 0:
            self._reaper = asyncio.create_task(self._unload_idle_forever(), name="pool-idle-reaper")
        logger.info(
            "pool %s: serving the model store %s on demand (budget %.0f MB, idle unload %s)",
            self.instance_id,
            self.store.root,
            self.budget_bytes / MB,
            f"{self.settings.pool_idle_unload_seconds:g}s" if self.settings.pool_idle_unload_seconds else "off",
        )

    async def drain(self) -> None:
        """SIGTERM: leave the registry, refuse new requests, let every held model finish its requests."""
        if self.draining:
            return
        self.draining = True
        await self._deregister()
        await asyncio.gather(*(held.worker.drain() for held in list(self._held.values())))

    async def close(self) -> None:
        self.draining = True
        if self._reaper is not None:
            self._reaper.cancel()
        await self._deregister()
        while self._held:
            name, held = self._held.popitem()
            await self._close_worker(name, held, "shutdown")
        if self._registry is not None:
            await self._registry.aclose()

    async def _deregister(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None
            assert self._registry is not None
            try:
                await self._registry.deregister(self.instance_id)
            except Exception as exc:  # noqa: BLE001 - the TTL forgets us anyway
                logger.warning(
                    "deregistering pool %s failed (%s); the registry's TTL will forget it", self.instance_id, exc
                )

    # --- what the pool is -----------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._started and not self.draining

    def not_ready_error(self) -> ServiceUnavailableError:
        if self.draining:
            return ServiceUnavailableError(
                "This worker is shutting down.",
                code="shutting_down",
                retry_after_seconds=self.settings.retry_after_seconds,
            )
        return ServiceUnavailableError(
            "The pool is starting.", code="model_loading", retry_after_seconds=self.settings.retry_after_seconds
        )

    def load(self) -> InstanceLoad:
        """Requests in every held model together (the pool record's load, and the worker's gauges)."""
        workers = [held.worker for held in self._held.values()]
        return InstanceLoad(
            running=sum(w.scheduler.running for w in workers), waiting=sum(w.scheduler.waiting for w in workers)
        )

    def registration(self) -> InstanceRegistration:
        return InstanceRegistration(
            instance_id=self.instance_id,
            specialist=ON_DEMAND_SPECIALIST,
            model_id=self.model_id,
            url=self.advertised_url or self.settings.advertised_url(),
            context_length=1,  # a pool has no window of its own; each held model registers its own
            capabilities=[],
            max_concurrency=self.settings.max_batch,
            load=self.load(),
        )

    @property
    def used_bytes(self) -> int:
        return sum(held.estimated_bytes for held in self._held.values()) + self._reserved

    def info(self) -> PoolInfo:
        now = time.monotonic()
        return PoolInfo(
            instance_id=self.instance_id,
            model_id=self.model_id,
            memory_budget_bytes=self.budget_bytes,
            memory_used_bytes=self.used_bytes,
            idle_unload_seconds=self.settings.pool_idle_unload_seconds,
            ready=self.ready,
            draining=self.draining,
            models=[
                HeldModel(
                    model=name,
                    specialist=held.worker.specialist.name,
                    instance_id=held.worker.instance_id,
                    estimated_bytes=held.estimated_bytes,
                    idle_seconds=round(now - held.last_used, 3),
                    running=held.worker.scheduler.running,
                    waiting=held.worker.scheduler.waiting,
                )
                for name, held in self._held.items()
            ],
        )

    # --- serving ----------------------------------------------------------------------------------------------------

    async def acquire(self, name: str | None) -> ModelWorker:
        """The worker serving ``name``, loaded first if the pool does not hold it (bounded); marks it used.

        Returns without yielding to the event loop once the model is held, so the caller's ``submit`` reaches the
        worker before any unload could run."""
        if name is None:
            raise InvalidRequestError("A pool worker serves the model a request names: give `model`.", param="model")
        held = self._held.get(name)
        if held is None or not held.worker.ready:
            if self.draining:
                raise self.not_ready_error()
            await self._load(name)
            held = self._held[name]
        held.last_used = time.monotonic()
        self._held.move_to_end(name)
        return held.worker

    async def _load(self, name: str) -> None:
        if re.match(NAME_PATTERN, name) is None:
            raise InvalidRequestError(f"The model name {name!r} is not one a pool can serve.", param="model")
        async with self._load_lock:  # one load at a time; who waited here may find the model loaded
            held = self._held.get(name)
            if held is not None and held.worker.ready:
                return
            if held is not None:  # it failed or is stopping: replace it
                del self._held[name]
                await self._close_worker(name, held, "failed")
            try:
                await self._load_locked(name)
            except Exception:
                self.pool_metrics.loads.labels(outcome="failed").inc()
                raise
            self.pool_metrics.loads.labels(outcome="loaded").inc()

    async def _load_locked(self, name: str) -> None:
        if self.settings.model_store_url and self._not_stored_here(name):
            await self._fetch(name)
        path, specialist = self._locate(name)
        try:
            config = await asyncio.to_thread(load_config, path)
            needed = await asyncio.to_thread(
                estimate_serving_bytes,
                config,
                dtype=self.settings.dtype,
                max_batch=self.settings.max_batch,
                prefill_chunk=self.settings.prefill_chunk_tokens,
                prefix_cache_mb=self.settings.prefix_cache_mb,
            )
        except (OSError, ValueError) as exc:
            raise self._unavailable(
                f"The model '{name}' cannot be read from the model store: {exc}", "model_load_failed"
            ) from None
        await self._make_room(name, needed)
        worker = ModelWorker(
            self.settings.model_copy(
                update={
                    "worker_mode": "pinned",
                    "checkpoint": path,
                    "specialist": specialist,
                    "model_id": name,
                    "checkpoint_wait_seconds": 0.0,
                }
            ),
            self.metrics,
        )
        self._reserved = needed
        started = time.perf_counter()
        try:
            worker.start()
            loaded = await asyncio.to_thread(worker.scheduler.loaded.wait, self.settings.pool_load_timeout_seconds)
            if not loaded or worker.scheduler.load_error is not None:
                await worker.close()
                reason = (
                    f"did not load within {self.settings.pool_load_timeout_seconds:g}s"
                    if not loaded
                    else f"failed to load: {worker.scheduler.load_error}"
                )
                raise self._unavailable(
                    f"The model '{name}' {reason}.", "model_load_timeout" if not loaded else "model_load_failed"
                )
        finally:
            self._reserved = 0
        self._held[name] = _Held(worker, needed, time.monotonic())
        self._update_gauges()
        logger.info(
            "pool: loaded %s (%s) in %.2fs, ~%.1f MB; holding %d models, %.1f of %.0f MB",
            name,
            specialist,
            time.perf_counter() - started,
            needed / MB,
            len(self._held),
            self.used_bytes / MB,
            self.budget_bytes / MB,
        )
        if self._registry is not None:
            # Registered before the load call answers, so the gateway's next registry lookup finds it (the
            # worker's own heartbeat keeps it there from now on).
            try:
                await self._registry.register(worker.registration())
            except Exception as exc:  # noqa: BLE001 - the worker's heartbeat retries; the model is served anyway
                logger.warning("registering %s failed (%s); its heartbeat will retry", name, exc)

    def _not_stored_here(self, name: str) -> bool:
        try:
            return self.store.get(name) is None
        except ModelStoreError:
            return False  # a broken manifest is reported by _locate

    async def _fetch(self, name: str) -> None:
        """Copy the model from the gateway's store into this pool's own (a host without the shared volume)."""
        url = self.settings.model_store_url
        assert url is not None
        try:
            # On disk the weights are float32; a checkpoint larger than the whole budget could never be served.
            await asyncio.to_thread(
                fetch_model,
                url,
                self.settings.registry_secret_value(),
                name,
                self.store,
                timeout_seconds=self.settings.pool_load_timeout_seconds,
                max_bytes=4 * self.budget_bytes,
            )
        except NotInStore:
            raise ModelNotFoundError(name) from None
        except (FetchError, OSError, ValueError) as exc:
            logger.warning("pool: fetching %s from %s failed: %s", name, url, exc)
            raise self._unavailable(
                f"The model '{name}' could not be copied from the model store at {url}: {exc}", "model_fetch_failed"
            ) from None

    def _locate(self, name: str) -> tuple[Path, str]:
        """The checkpoint folder and specialist of a stored model (404 when the store has no such model)."""
        try:
            entry = self.store.get(name)
            if entry is None:
                raise ModelNotFoundError(name)
            path = self.store.path(name)
        except ModelStoreError as exc:
            raise self._unavailable(f"The model store cannot be read: {exc}", "model_store_unavailable") from None
        if not is_checkpoint(path):
            raise self._unavailable(
                f"The model '{name}' is in the manifest but its checkpoint folder is missing.", "model_load_failed"
            )
        specialist = entry.get("specialist")
        # Every worker needs a prompt layout; an unknown (or unset) specialist is served as a coder, as under make up.
        return path, specialist if specialist in SPECIALISTS else "coder"

    async def _make_room(self, name: str, needed: int) -> None:
        """Unload least recently used idle models until ``needed`` more bytes fit the budget; 503 if they cannot."""
        if needed > self.budget_bytes:
            raise self._unavailable(
                f"The model '{name}' needs about {needed / MB:.1f} MB, more than this pool's whole budget "
                f"({self.budget_bytes / MB:.0f} MB, AXL_POOL_MEMORY_BUDGET_MB).",
                "model_too_large_for_pool",
            )
        while self.used_bytes + needed > self.budget_bytes:
            idle = [
                (n, h) for n, h in self._held.items() if not h.worker.scheduler.running + h.worker.scheduler.waiting
            ]
            if not idle:
                busy = ", ".join(self._held)
                raise self._unavailable(
                    f"This pool's memory budget is full with models serving requests ({busy}); the model '{name}' "
                    f"(about {needed / MB:.1f} MB) cannot be loaded now. Retry shortly.",
                    "pool_full",
                )
            victim, held = idle[0]  # the least recently used idle model
            del self._held[victim]
            await self._close_worker(victim, held, "lru")

    async def _close_worker(self, name: str, held: _Held, reason: str) -> None:
        held.worker.draining = True  # refuses new requests at once, before any await
        await held.worker.close()  # deregisters, stops its thread
        held.worker = None  # type: ignore[assignment]  # the last reference to the model: its memory can go
        _release_memory()
        self.pool_metrics.unloads.labels(reason=reason).inc()
        self._update_gauges()
        logger.info("pool: unloaded %s (%s)", name, reason)

    async def _unload_idle_forever(self) -> None:
        limit = self.settings.pool_idle_unload_seconds
        interval = min(max(limit / 4, 0.25), 5.0)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for name, held in list(self._held.items()):
                if held.worker.scheduler.running or held.worker.scheduler.waiting:
                    held.last_used = now  # a long generation is use; its idle time starts when it ends
                elif now - held.last_used >= limit and self._held.get(name) is held:
                    del self._held[name]
                    try:
                        await self._close_worker(name, held, "idle")
                    except Exception:  # noqa: BLE001 - one failed unload must not stop the reaper
                        logger.exception("pool: unloading %s failed", name)

    def _update_gauges(self) -> None:
        self.pool_metrics.models.set(len(self._held))
        self.pool_metrics.memory.set(sum(h.estimated_bytes for h in self._held.values()))
        self.metrics.model_loaded.set(1 if self._held else 0)

    def _unavailable(self, message: str, code: str) -> ServiceUnavailableError:
        retry = max(1, self.settings.retry_after_seconds)
        return ServiceUnavailableError(message, code=code, retry_after_seconds=retry)
