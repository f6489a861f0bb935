"""Models served on demand: a request for a model of the store that no worker holds asks a pool worker to load it.

Pools announce themselves to the registry under the specialist ``on-demand`` (``axl_mesh.registry_schemas``);
``OnDemandLoader.load(name)`` tries them least busy first with ``POST /internal/v1/models/load`` (the mesh secret
as bearer, as every internal hop), bounded by ``AXL_ON_DEMAND_LOAD_TIMEOUT_SECONDS``. The first pool that loads it
answers with the model's registration (also in the registry by then); a pool that is full (503) or unreachable is
skipped. When none can, the last pool's 503 (with its Retry-After) is the client's answer. Concurrent requests for
one model share one load.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from pydantic import ValidationError

from axl_mesh.errors import APIError, ServiceUnavailableError
from axl_mesh.registry_client import CachedLookup, RegistryError
from axl_mesh.registry_schemas import InstanceRecord, InstanceRegistration
from services.api_gateway.upstream import worker_error
from services.api_gateway.worker_client import WorkerClient, WorkerClientError

logger = logging.getLogger(__name__)

LOAD_PATH = "/internal/v1/models/load"


class OnDemandLoader:
    """Asks pool workers to load models of the store (see the module docstring)."""

    def __init__(
        self,
        lookup: CachedLookup,
        http: WorkerClient,
        *,
        timeout_seconds: float,
        on_load: Callable[[str, str], None] | None = None,
    ) -> None:
        self.lookup = lookup
        self.http = http
        self.timeout_seconds = timeout_seconds
        self._on_load = on_load  # (model, outcome) for metrics
        self._loading: dict[str, asyncio.Future[InstanceRegistration | None]] = {}

    async def pools(self) -> list[InstanceRecord]:
        try:
            return await self.lookup.pools()
        except RegistryError as exc:
            raise ServiceUnavailableError(
                f"The model registry is unavailable: {exc}", code="registry_unavailable"
            ) from None

    async def load(self, name: str) -> InstanceRegistration | None:
        """Have a pool load ``name``; its registration, or None when no pool is registered (503 when none could)."""
        pending = self._loading.get(name)
        if pending is None:
            pending = asyncio.ensure_future(self._load(name))
            self._loading[name] = pending
            pending.add_done_callback(lambda _: self._loading.pop(name, None))
        # Shielded: a client that gives up does not cancel the load others wait for.
        return await asyncio.shield(pending)

    async def _load(self, name: str) -> InstanceRegistration | None:
        pools = await self.pools()
        if not pools:
            return None
        last_error: APIError | None = None
        for pool in pools:
            try:
                registration = await self._ask(pool, name)
            except APIError as exc:
                if exc.status == 404:  # this pool's copy of the store lacks it (the gateway's has it): not a 404
                    exc = ServiceUnavailableError(
                        f"The pool worker {pool.instance_id} cannot find the model '{name}' in its model store.",
                        retry_after_seconds=5,
                        code="model_store_unavailable",
                    )
                logger.warning("pool %s could not load %s: %s", pool.instance_id, name, exc.message)
                last_error = exc
                continue
            self._count(name, "loaded")
            # The registry lists the model now: forget cached "no instance" answers.
            self.lookup.invalidate()
            return registration
        self._count(name, "failed")
        assert last_error is not None
        raise last_error

    async def _ask(self, pool: InstanceRecord, name: str) -> InstanceRegistration:
        try:
            async with asyncio.timeout(self.timeout_seconds):
                status, headers, body = await self.http.post_json(pool.url + LOAD_PATH, {"model": name})
        except TimeoutError:
            raise ServiceUnavailableError(
                f"Loading the model '{name}' took longer than {self.timeout_seconds:g}s; retry shortly.",
                retry_after_seconds=5,
                code="model_load_timeout",
            ) from None
        except WorkerClientError as exc:
            raise ServiceUnavailableError(
                f"The pool worker {pool.instance_id} could not be reached: {exc}",
                retry_after_seconds=1,
                code="no_healthy_replica",
            ) from None
        if status == 200:
            try:
                return InstanceRegistration.model_validate_json(body)
            except ValidationError:
                raise APIError(
                    502, "The pool worker's answer did not follow the worker protocol.", code="upstream_error"
                ) from None
        error = worker_error(status, headers, body)
        if status == 503:
            error.headers.setdefault("Retry-After", "1")
        raise error

    def _count(self, name: str, outcome: str) -> None:
        if self._on_load is not None:
            self._on_load(name, outcome)
