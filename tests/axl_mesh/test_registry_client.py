"""RegistryClient and CachedLookup against a real registry process (the heartbeat loop is tested with the
registry's lifecycle in tests/services/mesh_registry/test_lifecycle.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from axl_mesh.registry_client import CachedLookup, RegistryClient, RegistryError
from axl_mesh.registry_schemas import InstanceLoad, InstanceRegistration
from tests.support import ServiceProcess

SECRET = "client-test-secret"


def registration(instance_id: str, model_id: str = "axl-micro-python", **extra) -> InstanceRegistration:
    return InstanceRegistration(
        instance_id=instance_id, specialist="python", model_id=model_id, url="http://127.0.0.1:8901",
        context_length=512, capabilities=["fim"], max_concurrency=2, **extra,
    )


@pytest.fixture
def registry(start_service: Callable[..., ServiceProcess], redis_url: str) -> ServiceProcess:
    env = {"AXL_REDIS_URL": redis_url, "AXL_REGISTRY_SECRET": SECRET, "AXL_INSTANCE_TTL_SECONDS": "30"}
    return start_service("services.mesh_registry", env)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_client_round_trip(registry: ServiceProcess) -> None:
    async def scenario() -> None:
        async with RegistryClient(registry.url, SECRET) as client:
            ack = await client.register(registration("w1"))
            assert (ack.created, ack.ttl_seconds) == (True, 30.0)
            await client.heartbeat(registration("w2"), InstanceLoad(running=2, waiting=2))
            await client.heartbeat(registration("w1"), InstanceLoad(running=1))
            instances = await client.lookup("axl-micro-python")
            assert [(i.instance_id, i.busyness) for i in instances] == [("w1", 0.5), ("w2", 2.0)]
            [model] = await client.list_models()
            assert (model.id, model.instances, model.capabilities) == ("axl-micro-python", 2, ["fim"])
            assert await client.deregister("w2") is True

        for secret in ("wrong-secret", None):
            async with RegistryClient(registry.url, secret) as intruder:
                with pytest.raises(RegistryError) as info:
                    await intruder.register(registration("w3"))
                assert info.value.status == 401
                assert info.value.error["type"] == "authentication_error"
                # Reads need the secret too: without it no one learns where the workers are.
                for read in (intruder.lookup("axl-micro-python"), intruder.list_models()):
                    with pytest.raises(RegistryError) as info:
                        await read
                    assert info.value.status == 401

    asyncio.run(scenario())


def test_cached_lookup_serves_from_cache_then_refreshes(registry: ServiceProcess) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        async with RegistryClient(registry.url, SECRET) as client:
            await client.register(registration("w1"))
            cache = CachedLookup(client, ttl_seconds=2.0, stale_seconds=10.0, clock=clock)
            assert [i.instance_id for i in await cache.instances("axl-micro-python")] == ["w1"]
            assert len(await cache.models()) == 1

            await client.register(registration("w2"))
            await client.register(registration("s1", model_id="axl-micro-sql"))
            clock.now += 1.0
            assert len(await cache.instances("axl-micro-python")) == 1  # still cached
            assert len(await cache.models()) == 1
            clock.now += 1.5
            assert len(await cache.instances("axl-micro-python")) == 2  # refreshed
            assert len(await cache.models()) == 2

            await client.deregister("w2")
            cache.invalidate("axl-micro-python")
            assert len(await cache.instances("axl-micro-python")) == 1

    asyncio.run(scenario())


def test_cached_lookup_serves_stale_data_while_the_registry_is_down(registry: ServiceProcess) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        async with RegistryClient(registry.url, SECRET, timeout_seconds=1.0) as client:
            await client.register(registration("w1"))
            cache = CachedLookup(client, ttl_seconds=2.0, stale_seconds=10.0, clock=clock)
            await cache.instances("axl-micro-python")
            await asyncio.to_thread(registry.stop)

            clock.now += 5.0  # expired, but within the stale window
            assert [i.instance_id for i in await cache.instances("axl-micro-python")] == ["w1"]
            clock.now += 10.0  # past it
            with pytest.raises(RegistryError) as info:
                await cache.instances("axl-micro-python")
            assert info.value.status is None
            with pytest.raises(RegistryError):
                await cache.instances("never-cached")

    asyncio.run(scenario())


def test_concurrent_misses_share_one_request(registry: ServiceProcess) -> None:
    calls = 0

    async def scenario() -> None:
        nonlocal calls
        async with RegistryClient(registry.url, SECRET) as client:
            await client.register(registration("w1"))
            real_lookup = client.lookup

            async def counting_lookup(model: str | None = None, specialist: str | None = None):
                nonlocal calls
                calls += 1
                return await real_lookup(model, specialist)

            client.lookup = counting_lookup  # type: ignore[method-assign]  # count calls; still the real request
            cache = CachedLookup(client, ttl_seconds=5.0)
            results = await asyncio.gather(*(cache.instances("axl-micro-python") for _ in range(10)))
            assert all(len(r) == 1 for r in results)

    asyncio.run(scenario())
    assert calls == 1


def test_an_answer_fetched_across_an_invalidation_is_not_cached(registry: ServiceProcess) -> None:
    """A pool registers a model while a lookup is on its way back, and the gateway invalidates: that answer may
    predate the registration, so the next lookup asks the registry again instead of serving it for a TTL."""

    async def scenario() -> None:
        async with RegistryClient(registry.url, SECRET) as client:
            await client.register(registration("w1"))
            real_lookup = client.lookup
            cache = CachedLookup(client, ttl_seconds=60.0)

            async def lookup_then_change(model: str | None = None, specialist: str | None = None):
                answer = await real_lookup(model, specialist)
                if not any(i.instance_id == "w2" for i in answer):
                    await client.register(registration("w2"))  # the registry changes after answering ...
                    cache.invalidate(model)  # ... and the change is announced before the answer is stored
                return answer

            client.lookup = lookup_then_change  # type: ignore[method-assign]  # still the real request
            assert [i.instance_id for i in await cache.instances("axl-micro-python")] == ["w1"]
            assert sorted(i.instance_id for i in await cache.instances("axl-micro-python")) == ["w1", "w2"]

    asyncio.run(scenario())
