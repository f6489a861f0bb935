"""Registry process lifecycle: restarts, Redis outages, configuration, and the client's heartbeat loop."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Callable

import httpx

from axl_mesh.registry_client import RegistryClient
from axl_mesh.registry_schemas import InstanceLoad, InstanceRegistration
from tests.services.mesh_registry.conftest import AUTH, SECRET, TTL_SECONDS, registration, registry_env
from tests.support import REPO_ROOT, ServiceProcess, free_port

StartService = Callable[..., ServiceProcess]


def test_registrations_survive_a_registry_restart(start_service: StartService, redis_url: str) -> None:
    registry = start_service("services.mesh_registry", registry_env(redis_url, AXL_INSTANCE_TTL_SECONDS="30"))
    assert httpx.post(registry.url + "/v1/instances", json=registration(), headers=AUTH).status_code == 200
    registry.restart()
    [instance] = httpx.get(registry.url + "/v1/instances", headers=AUTH).json()["data"]
    assert instance["instance_id"] == "worker-1"
    heartbeat = httpx.put(registry.url + "/v1/instances/worker-1/heartbeat", json=registration(), headers=AUTH)
    assert heartbeat.json()["created"] is False


def test_readiness_fails_while_redis_is_unreachable(start_service: StartService) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    registry = start_service("services.mesh_registry", registry_env(dead_redis))
    assert httpx.get(registry.url + "/healthz").status_code == 200
    for response in (
        httpx.get(registry.url + "/readyz", timeout=10),
        httpx.post(registry.url + "/v1/instances", json=registration(), headers=AUTH, timeout=10),
        httpx.get(registry.url + "/v1/models", headers=AUTH, timeout=10),
    ):
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "service_unavailable_error"


def test_the_registry_refuses_to_start_without_a_secret(redis_url: str) -> None:
    env = {k: v for k, v in registry_env(redis_url).items() if k != "AXL_REGISTRY_SECRET"}
    env["AXL_PORT"] = str(free_port())
    done = subprocess.run(
        [sys.executable, "-m", "services.mesh_registry"], cwd=REPO_ROOT, env=env, capture_output=True, timeout=60
    )
    assert done.returncode != 0
    assert b"registry_secret" in done.stderr


def test_reads_can_be_opened_for_a_closed_network(start_service: StartService, redis_url: str) -> None:
    # Reads need the secret by default (test_routes); AXL_REGISTRY_PROTECT_READS=false opens them, writes stay shut.
    registry = start_service("services.mesh_registry", registry_env(redis_url, AXL_REGISTRY_PROTECT_READS="false"))
    assert httpx.get(registry.url + "/v1/models").status_code == 200
    assert httpx.get(registry.url + "/v1/instances").status_code == 200
    assert httpx.post(registry.url + "/v1/instances", json=registration()).status_code == 401
    assert httpx.get(registry.url + "/healthz").status_code == 200


def test_the_heartbeat_task_rides_out_a_registry_outage(start_service: StartService, redis_url: str) -> None:
    registry = start_service("services.mesh_registry", registry_env(redis_url))
    reg = InstanceRegistration.model_validate(registration())
    beats = 0

    def load() -> InstanceLoad:
        nonlocal beats
        beats += 1
        return InstanceLoad(running=beats)

    async def scenario() -> None:
        async with RegistryClient(registry.url, SECRET, timeout_seconds=1.0) as client:
            task = client.heartbeat_forever(reg, load, interval_seconds=0.25)
            await asyncio.sleep(0.6)
            [seen] = await client.lookup("axl-micro-python")
            assert seen.instance_id == "worker-1" and seen.load.running >= 1

            # Registry down for longer than the TTL: the registration expires in Redis meanwhile.
            await asyncio.to_thread(registry.stop)
            await asyncio.sleep(TTL_SECONDS + 0.5)
            assert not task.done()
            await asyncio.to_thread(registry.start)
            deadline = time.monotonic() + 5
            while not await client.lookup("axl-micro-python"):
                assert time.monotonic() < deadline, "the heartbeat task did not re-register"
                await asyncio.sleep(0.1)

            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert await client.deregister("worker-1") is True
            assert await client.lookup("axl-micro-python") == []
            assert await client.deregister("worker-1") is False

    asyncio.run(scenario())
