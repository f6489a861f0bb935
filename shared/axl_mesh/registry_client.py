"""Async client of the mesh registry, used by model workers (announce themselves) and the gateway (find them).

Worker:
    client = RegistryClient(settings.registry_url, settings.registry_secret_value())
    task = client.heartbeat_forever(registration, load_fn=lambda: InstanceLoad(running=..., waiting=...))
    ...  # on shutdown:
    task.cancel(); await client.deregister(registration.instance_id); await client.aclose()

Gateway:
    lookup = CachedLookup(client, ttl_seconds=2.0)
    instances = await lookup.instances("axl-micro")     # least busy first

Every call carries the mesh secret (``AXL_REGISTRY_SECRET``) as a bearer: the registry refuses writes without it,
and reads too unless it runs with ``AXL_REGISTRY_PROTECT_READS=false``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from axl_mesh.mesh_auth import bearer_header
from axl_mesh.registry_schemas import (
    ON_DEMAND_SPECIALIST,
    InstanceAck,
    InstanceList,
    InstanceLoad,
    InstanceRecord,
    InstanceRegistration,
    ModelList,
    ModelSummary,
)

logger = logging.getLogger(__name__)

LoadFn = Callable[[], InstanceLoad | Awaitable[InstanceLoad]]
T = TypeVar("T")


class RegistryError(Exception):
    """The registry answered with an error (``status`` and its OpenAI-shaped ``error`` body) or could not be reached
    (``status`` None)."""

    def __init__(self, message: str, *, status: int | None = None, error: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error or {}


class RegistryClient:
    """Thin typed wrapper over the registry's HTTP API; every call is bounded by ``timeout_seconds`` and carries
    ``secret`` (the mesh secret; None only for a registry whose reads are open, and then writes are refused)."""

    def __init__(
        self,
        base_url: str,
        secret: str | None = None,
        *,
        timeout_seconds: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=bearer_header(secret), timeout=timeout_seconds, transport=transport
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- writes (need the secret) ---

    async def register(self, registration: InstanceRegistration) -> InstanceAck:
        """Announce an instance (or re-assert it)."""
        return await self._call("POST", "/v1/instances", InstanceAck, json=registration.model_dump(mode="json"))

    async def heartbeat(self, registration: InstanceRegistration, load: InstanceLoad | None = None) -> InstanceAck:
        """Re-assert the whole registration with its current load (re-creates it if the registry lost it)."""
        if load is not None:
            registration = registration.model_copy(update={"load": load})
        path = f"/v1/instances/{registration.instance_id}/heartbeat"
        return await self._call("PUT", path, InstanceAck, json=registration.model_dump(mode="json"))

    async def deregister(self, instance_id: str) -> bool:
        """Forget an instance now; False when the registry did not know it."""
        try:
            await self._request("DELETE", f"/v1/instances/{instance_id}")
        except RegistryError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def heartbeat_forever(
        self, registration: InstanceRegistration, load_fn: LoadFn | None = None, interval_seconds: float | None = None
    ) -> asyncio.Task[None]:
        """Start a task that heartbeats until cancelled, surviving registry restarts and outages.

        ``interval_seconds`` defaults to a third of the TTL the registry reports (2 s until it first answers).
        """
        return asyncio.create_task(
            self._heartbeat_loop(registration, load_fn, interval_seconds),
            name=f"registry-heartbeat-{registration.instance_id}",
        )

    async def _heartbeat_loop(
        self, registration: InstanceRegistration, load_fn: LoadFn | None, interval_seconds: float | None
    ) -> None:
        interval = interval_seconds or 2.0
        failing = False
        while True:
            try:
                load = await _maybe_await(load_fn()) if load_fn else None
                ack = await self.heartbeat(registration, load)
                if interval_seconds is None:
                    interval = max(0.2, ack.ttl_seconds / 3)
                if failing or ack.created:
                    logger.info(
                        "registered %s with the registry (ttl %.1fs)", registration.instance_id, ack.ttl_seconds
                    )
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the registry being down must never kill the worker
                # One warning per outage, then quiet retries.
                log = logger.debug if failing else logger.warning
                log("heartbeat of %s failed (%s); retrying in %.1fs", registration.instance_id, exc, interval)
                failing = True
            await asyncio.sleep(interval)

    # --- reads (need the secret unless the registry opened them) ---

    async def lookup(self, model: str | None = None, specialist: str | None = None) -> list[InstanceRecord]:
        """Healthy instances of ``model`` (and/or ``specialist``), least busy first."""
        params = {k: v for k, v in (("model", model), ("specialist", specialist)) if v is not None}
        return (await self._call("GET", "/v1/instances", InstanceList, params=params)).data

    async def list_models(self) -> list[ModelSummary]:
        """Models with at least one healthy instance."""
        return (await self._call("GET", "/v1/models", ModelList)).data

    # --- plumbing ---

    async def _call(self, method: str, path: str, schema: type[T], **kwargs: Any) -> T:
        response = await self._request(method, path, **kwargs)
        assert issubclass(schema, BaseModel)
        return schema.model_validate_json(response.content)  # type: ignore[return-value]

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise RegistryError(f"registry unreachable: {method} {path}: {exc!r}") from exc
        if response.is_success:
            return response
        try:
            error = response.json().get("error", {})
        except ValueError:
            error = {}
        message = error.get("message") or response.text[:200]
        raise RegistryError(
            f"registry answered {response.status_code} to {method} {path}: {message}",
            status=response.status_code,
            error=error,
        )


async def _maybe_await(value: T | Awaitable[T]) -> T:
    return await value if inspect.isawaitable(value) else value  # type: ignore[return-value]


class CachedLookup:
    """Registry reads cached for ``ttl_seconds``; on a registry outage, serves what it had for up to
    ``stale_seconds`` more before letting the error through. Concurrent misses for one key share one request."""

    def __init__(
        self,
        client: RegistryClient,
        *,
        ttl_seconds: float = 2.0,
        stale_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.ttl_seconds = ttl_seconds
        self.stale_seconds = stale_seconds
        self._clock = clock
        self._entries: dict[tuple[str, ...], tuple[float, Any]] = {}
        self._locks: dict[tuple[str, ...], asyncio.Lock] = {}
        # Bumped by invalidate(): an answer fetched across an invalidation may predate the change it announced
        # (a model a pool just loaded), so it is returned to its caller but not cached.
        self._generation = 0

    async def instances(self, model: str) -> list[InstanceRecord]:
        """Healthy instances of ``model``, least busy first (as of at most ``ttl_seconds`` ago)."""
        return await self._get(("instances", model), lambda: self.client.lookup(model))

    async def models(self) -> list[ModelSummary]:
        """Served models (as of at most ``ttl_seconds`` ago)."""
        return await self._get(("models",), self.client.list_models)

    async def pools(self) -> list[InstanceRecord]:
        """Pool workers that load models of the store on demand, least busy first (as of ``ttl_seconds`` ago)."""
        return await self._get(("pools",), lambda: self.client.lookup(specialist=ON_DEMAND_SPECIALIST))

    def invalidate(self, model: str | None = None) -> None:
        """Drop the cached instances of ``model`` (e.g. after it failed a request), or everything."""
        self._generation += 1
        if model is None:
            self._entries.clear()
        else:
            self._entries.pop(("instances", model), None)

    async def _get(self, key: tuple[str, ...], fetch: Callable[[], Awaitable[T]]) -> T:
        entry = self._entries.get(key)
        if entry is not None and self._clock() - entry[0] < self.ttl_seconds:
            return entry[1]
        async with self._locks.setdefault(key, asyncio.Lock()):
            entry = self._entries.get(key)  # another caller may have refreshed it while we waited
            if entry is not None and self._clock() - entry[0] < self.ttl_seconds:
                return entry[1]
            generation = self._generation
            try:
                value = await fetch()
            except RegistryError as exc:
                registry_down = exc.status is None or exc.status >= 500
                fresh_enough = entry is not None and self._clock() - entry[0] < self.ttl_seconds + self.stale_seconds
                if registry_down and fresh_enough:
                    assert entry is not None
                    logger.warning("registry unreachable, serving cached %s: %s", key, exc)
                    return entry[1]
                raise
            if generation == self._generation:
                self._entries[key] = (self._clock(), value)
            return value
