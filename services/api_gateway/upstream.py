"""Finding and calling model workers: model name -> registry (cached) -> least-busy replica, with failover.

A replica that cannot be reached (connection refused or reset, a connect timeout) or answers 503 before anything
was sent to the client is skipped and the next one is tried; one that refused a connection is ranked last for a
short cooldown. Errors a worker returns on purpose (400 context_length_exceeded, 400 for FIM) pass through.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from axl_mesh.errors import APIError, ModelNotFoundError, ServiceUnavailableError
from axl_mesh.protocol import PROMPT_TRUNCATED_HEADER
from axl_mesh.registry_client import CachedLookup, RegistryError
from axl_mesh.registry_schemas import InstanceRecord, ModelSummary
from axl_mesh.routing import choose_specialist
from axl_mesh.worker_protocol import (
    GenerateRequest,
    GenerateResponse,
    StreamEnd,
    StreamPiece,
    WorkerError,
    WorkerErrorDetail,
    parse_stream_line,
)
from services.api_gateway.worker_client import (
    WorkerClient,
    WorkerClientError,
    WorkerConnectError,
    WorkerReadTimeout,
    WorkerResponse,
)

if TYPE_CHECKING:
    from services.api_gateway.on_demand import OnDemandLoader

logger = logging.getLogger(__name__)

GENERATE_PATH = "/internal/v1/generate"
AUTO_MODEL = "auto"
T = TypeVar("T")


@dataclass(frozen=True)
class ResolvedModel:
    """The model a request goes to (for ``model: "auto"``, the one chosen and why)."""

    model_id: str
    specialist: str
    context_length: int
    capabilities: tuple[str, ...]
    routed_reason: str | None = None


class _Unreachable(Exception):
    """The replica could not take the request, and nothing was sent to the client: try another."""

    def __init__(self, reason: str, error: APIError | None = None) -> None:
        super().__init__(reason)
        self.error = error  # the worker's own 503 (with its Retry-After), when it answered one


@dataclass
class UpstreamStream:
    """An open streaming generate call on one replica; iterate :meth:`events`, then :meth:`aclose`."""

    instance: InstanceRecord
    response: WorkerResponse
    _release: Callable[[], None]
    _closed: bool = field(default=False)

    @property
    def prompt_truncated(self) -> int:
        """Bytes of the prompt the worker left out to fit its window (its ``x-axl-prompt-truncated`` header)."""
        value = self.response.headers.get(PROMPT_TRUNCATED_HEADER, "0")
        return int(value) if value.isdigit() else 0

    async def events(self) -> AsyncIterator[StreamPiece | StreamEnd | WorkerError]:
        """The worker's NDJSON lines as the protocol's models: pieces, then an end (or an error); a 502
        ``upstream_error`` for a line outside the protocol."""
        async for line in self.response.lines():
            if line.strip():
                try:
                    yield parse_stream_line(line)
                except ValidationError as exc:
                    logger.warning("worker %s streamed outside the protocol: %s", self.instance.instance_id, exc)
                    raise APIError(
                        502, "The model worker's stream did not follow the worker protocol.", code="upstream_error"
                    ) from None

    async def aclose(self) -> None:
        """Close the connection (a worker drops a request whose client went away) and release the slot."""
        if not self._closed:
            self._closed = True
            self._release()
            await self.response.aclose()


def worker_error(status: int, headers: Mapping[str, str], body: bytes) -> APIError:
    """A worker's error answer as the same OpenAI-shaped error (status, fields and Retry-After kept);
    ``headers`` has lower-cased names."""
    try:
        error = WorkerError.model_validate_json(body).error
    except ValidationError:  # not a worker's error (a proxy's page, a process dying): the status says enough
        error = WorkerErrorDetail(message="")
    retry_after = {"Retry-After": headers["retry-after"]} if "retry-after" in headers else None
    return APIError(
        status,
        error.message or f"The model worker answered {status}.",
        type=error.type,
        param=error.param,
        code=error.code,
        headers=retry_after,
    )


def rank_instances(
    instances: Iterable[InstanceRecord], in_flight: Counter[str], cooling: Iterable[str] = (), rotation: int = 0
) -> list[InstanceRecord]:
    """Least busy first: (reported running + waiting + our own in-flight requests) per slot; replicas that recently
    refused a connection go last; equal replicas take turns (``rotation``) so idle ones share the load."""
    cooling = set(cooling)
    listed = list(instances)
    n = max(1, len(listed))

    def key(item: tuple[int, InstanceRecord]) -> tuple[bool, float, int]:
        index, inst = item
        busy = (inst.load.running + inst.load.waiting + in_flight[inst.instance_id]) / inst.max_concurrency
        return (inst.instance_id in cooling, busy, (index - rotation) % n)

    return [inst for _, inst in sorted(enumerate(listed), key=key)]


def resolve_name(
    name: str,
    models: list[ModelSummary],
    choose: Callable[[list[ModelSummary]], tuple[str, str]] | None = None,
    known: Collection[str] = (),
) -> ResolvedModel:
    """A request's ``model`` -> a served model: its id, or its specialist's name as an alias, or ``auto``
    (``choose`` picks a specialist among those served and says why). A name in ``known`` (served before, no
    replica now) is a 503 to retry, not a 404."""
    reason = None
    if name == AUTO_MODEL and choose is not None and models:
        specialist, reason = choose(models)
        candidates = [m for m in models if m.specialist == specialist]
    else:
        candidates = [m for m in models if m.id == name] or [m for m in models if m.specialist == name]
    if not candidates and name in known:
        raise ServiceUnavailableError(
            f"The model '{name}' has no healthy replica right now; retry shortly.",
            retry_after_seconds=2,
            code="no_healthy_replica",
        )
    if not candidates:
        raise ModelNotFoundError(name)
    chosen = max(candidates, key=lambda m: (m.instances, m.id))  # an alias naming several models: the best-served
    return ResolvedModel(chosen.id, chosen.specialist, chosen.context_length, tuple(chosen.capabilities), reason)


class Upstream:
    """The gateway's view of the workers: registry lookups (cached), replica choice, calls with failover."""

    def __init__(
        self,
        lookup: CachedLookup,
        http: WorkerClient,
        *,
        cooldown_seconds: float = 5.0,
        on_failover: Callable[[str, InstanceRecord, str], None] | None = None,
        stored_models: Callable[[], Collection[str]] | None = None,
        on_demand: OnDemandLoader | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lookup = lookup
        self.http = http
        self.cooldown_seconds = cooldown_seconds
        self.in_flight: Counter[str] = Counter()
        self._cooling_until: dict[str, float] = {}
        self._rotation = itertools.count()
        self._on_failover = on_failover
        self.known_models: set[str] = set()  # ids and specialist names served at some point: 503, not 404
        self._stored_models = stored_models  # names in the model store (a worker for them may be starting)
        self.on_demand = on_demand  # asks pool workers to load a stored model no worker holds
        self._clock = clock

    # --- lookups ---

    async def models(self) -> list[ModelSummary]:
        """Models with at least one healthy replica (503 if the registry is down and nothing is cached)."""
        try:
            models = await self.lookup.models()
        except RegistryError as exc:
            raise ServiceUnavailableError(
                f"The model registry is unavailable: {exc}", code="registry_unavailable"
            ) from exc
        for model in models:
            self.known_models.update((model.id, model.specialist))
        return models

    async def instances(self, model_id: str) -> list[InstanceRecord]:
        try:
            return await self.lookup.instances(model_id)
        except RegistryError as exc:
            raise ServiceUnavailableError(
                f"The model registry is unavailable: {exc}", code="registry_unavailable"
            ) from exc

    async def resolve(self, name: str, routing_text: Callable[[], str | list[dict[str, Any]]]) -> ResolvedModel:
        """A request's model name -> the model to call (``auto``: the specialist the routing rules pick)."""
        models = await self.models()

        def choose(served: list[ModelSummary]) -> tuple[str, str]:
            return choose_specialist(routing_text(), {m.specialist for m in served})

        try:
            return resolve_name(name, models, choose, self.known_models)
        except ModelNotFoundError:
            if self._is_stored(name):
                registration = await self.on_demand.load(name) if self.on_demand is not None else None
                if registration is not None:  # a pool holds it now (and the registry lists it)
                    return ResolvedModel(
                        registration.model_id,
                        registration.specialist,
                        registration.context_length,
                        tuple(registration.capabilities),
                    )
                raise ServiceUnavailableError(
                    f"The model '{name}' is in the model store but no worker serves it yet and no pool worker "
                    "(AXL_WORKER_MODE=pool) is registered to load it (`make up` starts a worker within seconds); "
                    "retry shortly.",
                    retry_after_seconds=5,
                    code="model_not_served_yet",
                ) from None
            raise

    def _is_stored(self, name: str) -> bool:
        return self._stored_models is not None and name in self._stored_models()

    # --- calls ---

    async def generate(self, model: ResolvedModel, request: GenerateRequest) -> GenerateResponse:
        """A non-streaming generate call on the least-busy replica; failover while nothing came back."""
        payload = _worker_payload(model, request)

        async def call(instance: InstanceRecord) -> GenerateResponse:
            self.in_flight[instance.instance_id] += 1
            try:
                status, headers, body = await self.http.post_json(instance.url + GENERATE_PATH, payload)
            except WorkerConnectError as exc:  # refused, unreachable, connect timeout: nothing was sent
                raise _Unreachable(str(exc)) from exc
            except WorkerReadTimeout as exc:
                raise _timeout_error(instance) from exc
            except WorkerClientError as exc:  # reset, died mid-answer: nothing reached the client
                raise _Unreachable(repr(exc)) from exc
            finally:
                self._release(instance.instance_id)
            if status == 200:
                try:
                    return GenerateResponse.model_validate_json(body)
                except ValidationError as exc:
                    logger.warning("worker %s answered outside the protocol: %s", instance.instance_id, exc)
                    raise APIError(
                        502, "The model worker's answer did not follow the worker protocol.", code="upstream_error"
                    ) from None
            error = worker_error(status, headers, body)
            if status == 503:
                raise _Unreachable("busy", error)
            raise error

        return await self._with_failover(model, call)

    async def open_stream(self, model: ResolvedModel, request: GenerateRequest) -> UpstreamStream:
        """Start a streaming generate call; returns once a replica answered 200 (failover until then)."""
        payload = _worker_payload(model, request)

        async def call(instance: InstanceRecord) -> UpstreamStream:
            self.in_flight[instance.instance_id] += 1
            released = False

            def release() -> None:
                nonlocal released
                if not released:
                    released = True
                    self._release(instance.instance_id)

            try:
                response = await self.http.stream(instance.url + GENERATE_PATH, payload)
            except WorkerConnectError as exc:
                release()
                raise _Unreachable(str(exc)) from exc
            except WorkerReadTimeout as exc:
                release()
                raise _timeout_error(instance) from exc
            except WorkerClientError as exc:
                release()
                raise _Unreachable(repr(exc)) from exc
            except BaseException:
                release()
                raise
            if response.status_code == 200:
                return UpstreamStream(instance, response, release)
            try:
                body = await response.read()
            except WorkerClientError:
                body = b""
            finally:
                await response.aclose()
                release()
            error = worker_error(response.status_code, response.headers, body)
            if response.status_code == 503:
                raise _Unreachable("busy", error)
            raise error

        return await self._with_failover(model, call)

    def _release(self, instance_id: str) -> None:
        self.in_flight[instance_id] -= 1
        if self.in_flight[instance_id] <= 0:
            del self.in_flight[instance_id]

    async def _with_failover(self, model: ResolvedModel, call: Callable[[InstanceRecord], Awaitable[T]]) -> T:
        tried: set[str] = set()
        busy: APIError | None = None
        refreshed = False
        reloaded = False
        while True:
            now = self._clock()
            self._cooling_until = {i: until for i, until in self._cooling_until.items() if until > now}
            cooling = list(self._cooling_until)
            candidates = [i for i in await self.instances(model.model_id) if i.instance_id not in tried]
            if not candidates and tried and not refreshed:
                # The cached list may be stale (replicas restarted on new ids): ask the registry once more.
                refreshed = True
                self.lookup.invalidate(model.model_id)
                continue
            if (
                not candidates
                and not tried
                and not reloaded
                and self.on_demand is not None
                and self._is_stored(model.model_id)
            ):
                # A pool unloaded it (idle, or to make room) since the request was resolved: have one load it again.
                reloaded = True
                if await self.on_demand.load(model.model_id) is not None:
                    continue
            if not candidates:
                break
            instance = rank_instances(candidates, self.in_flight, cooling, next(self._rotation))[0]
            tried.add(instance.instance_id)
            try:
                return await call(instance)
            except _Unreachable as exc:
                if exc.error is not None:
                    busy = exc.error
                else:
                    self._cooling_until[instance.instance_id] = self._clock() + self.cooldown_seconds
                    self.lookup.invalidate(model.model_id)
                logger.warning(
                    "replica %s of %s could not take a request (%s); trying another",
                    instance.instance_id,
                    model.model_id,
                    exc,
                )
                if self._on_failover is not None:
                    self._on_failover(model.model_id, instance, "busy" if exc.error else "unreachable")
        if busy is not None:
            raise busy  # every replica is full: the worker's own 503 and Retry-After
        raise ServiceUnavailableError(
            f"No replica of model '{model.model_id}' can take the request now; retry shortly.",
            retry_after_seconds=1,
            code="no_healthy_replica",
        )


def _worker_payload(model: ResolvedModel, request: GenerateRequest) -> dict[str, Any]:
    """The request's JSON, naming the resolved model (a pool worker serves the model the request names)."""
    return request.model_copy(update={"model": model.model_id}).model_dump(mode="json")


def _timeout_error(instance: InstanceRecord) -> APIError:
    return APIError(504, f"The model worker {instance.instance_id} did not answer in time.", code="upstream_timeout")
