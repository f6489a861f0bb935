"""Models served on demand, as docker-compose.yml deploys them: the compose file's registry, gateway, trainer and
model pool, each started as a local process with the environment compose gives it (service names and ports turned
into loopback URLs, the named volumes into one local data folder, Redis with the compose ACL). A model fine-tuned
through the API is then served by the pool on its first request, with nothing started by hand.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest
import yaml

from axl_mesh.redis_acl import JOBS_USER, REGISTRY_USER
from tests.deploy.conftest import COMPOSE_FILE, REQUIRED_ENV, env_of
from tests.services.trainer_worker.mesh import PAIRS, wait_for_status
from tests.support import RedisServer, ServiceProcess

# The compose services a fine-tune and its serving need (the specialist workers serve ./checkpoints, not the store).
SERVICES = ("mesh-registry", "api-gateway", "trainer-worker", "model-pool")
API_KEY = REQUIRED_ENV["AXL_API_KEYS"].split(",")[0]
SECRET = REQUIRED_ENV["AXL_REGISTRY_SECRET"]


def _interpolate(value: str) -> str:
    """Compose's ``${VAR:?message}`` (the test's value of a required variable) and ``${VAR:-default}``."""
    def one(match: re.Match[str]) -> str:
        name, op, rest = match.group(1), match.group(2), match.group(3)
        return REQUIRED_ENV[name] if op == ":?" else rest

    return re.sub(r"\$\{(\w+)(:\?|:-)([^}]*)\}", one, value)


def local_env(service: dict[str, Any], urls: dict[str, str], redis_port: int, data: Path) -> dict[str, str]:
    """A compose service's environment for a local process: ``http://<service>:<port>`` -> that service's local
    URL, ``@redis:6379`` -> the local Redis, ``/data`` (every named volume is mounted under it, at the same path in
    each container) -> ``data``; host and port are the process's own."""
    env = {}
    for name, raw in env_of(service).items():
        value = _interpolate(raw)
        for compose_url, url in urls.items():
            value = value.replace(compose_url, url)
        value = value.replace("@redis:6379", f"@127.0.0.1:{redis_port}")
        if value == "/data" or value.startswith("/data/"):
            value = str(data) + value[len("/data"):]
        env[name] = value
    for name in ("AXL_HOST", "AXL_PORT"):
        env.pop(name)
    env.update(OMP_NUM_THREADS="1", AXL_NUM_THREADS="1")  # a shared test machine: one thread per process
    return env


@pytest.fixture
def compose_mesh(tmp_path: Path) -> Iterator[dict[str, ServiceProcess]]:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    redis = RedisServer(tmp_path / "redis.log", acl_users={
        REGISTRY_USER: REQUIRED_ENV["AXL_REDIS_REGISTRY_PASSWORD"], JOBS_USER: REQUIRED_ENV["AXL_REDIS_JOBS_PASSWORD"],
    }).start()
    processes, urls = {}, {}
    for name in SERVICES:
        spec = compose["services"][name]
        assert spec["command"][:2] == ["python", "-m"], name
        processes[name] = ServiceProcess(spec["command"][2], log_path=tmp_path / f"{name}.log")
        urls[f"http://{name}:{_interpolate(env_of(spec)['AXL_PORT'])}"] = processes[name].url
    started: list[ServiceProcess] = []
    try:
        for name in SERVICES:  # in compose's dependency order
            process = processes[name]
            process.env.update(local_env(compose["services"][name], urls, redis.port, tmp_path / "data"))
            started.append(process.start(60))
        yield processes
    finally:
        for process in reversed(started):
            process.stop()
        redis.stop()


def test_a_model_fine_tuned_over_http_is_served_by_the_compose_pool(compose_mesh: dict[str, ServiceProcess]) -> None:
    gateway, pool, registry = compose_mesh["api-gateway"], compose_mesh["model-pool"], compose_mesh["mesh-registry"]
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    file_id = client.files.create(file=("pairs.jsonl", io.BytesIO(PAIRS.encode())), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model="tiny", training_file=file_id, suffix="pooled", seed=3,
                                         hyperparameters={"max_steps": 20, "batch_size": 4, "seq_len": 64,
                                                          "specialist": "coder"})
    done = wait_for_status(client, job.id, {"succeeded", "failed", "cancelled"}, 180)
    assert done.status == "succeeded", done.error
    name = done.fine_tuned_model
    listed = {m.id: m for m in client.models.list().data}
    assert listed[name].model_extra["instances"] == 0  # stored, not loaded yet

    # The first request waits for the pool to load it; nothing else was started.
    started = time.monotonic()
    completion = client.completions.create(model=name, prompt="def add_3(a, b):\n", max_tokens=8, temperature=0)
    first_seconds = time.monotonic() - started
    assert completion.model == name and completion.usage.completion_tokens >= 1
    assert first_seconds < 60
    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "add"}], max_tokens=4)
    assert chat.model == name

    # Served by the pool, under its compose address made local, and registered there.
    auth = {"Authorization": f"Bearer {SECRET}"}
    held = httpx.get(pool.url + "/internal/v1/pool", headers=auth, timeout=10).json()
    assert [m["model"] for m in held["models"]] == [name]
    (record,) = httpx.get(registry.url + "/v1/instances", params={"model": name}, headers=auth).json()["data"]
    assert urlsplit(record["url"]).port == pool.port
    assert {m.id: m for m in client.models.list().data}[name].model_extra["instances"] == 1
    # A model the store does not have is still a 404, not a load.
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="ft:tiny:absent:deadbeef", prompt="x", max_tokens=1)


def test_the_gateway_passes_on_a_full_pool_and_loads_one_model_once(redis_server: str, tmp_path: Path) -> None:
    """Through the gateway: while the pool's budget is held by a model that is streaming, a request for another
    stored model is an OpenAI-shaped 503 pool_full with Retry-After; once the stream ends that model loads, and
    concurrent first requests for a model load it once."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.e2e.conftest import REGISTRY_SECRET, Mesh
    from tests.services.model_worker.test_pool import A, B, make_store, one_model_budget_mb

    window = {"max_seq_len": 4096}  # a long answer takes seconds
    store = make_store(tmp_path / "store", **window)
    mesh = Mesh(redis_url=redis_server, workdir=tmp_path)
    try:
        mesh.start_registry()
        mesh.start_gateway(AXL_MODEL_STORE_DIR=str(store.root))
        pool = ServiceProcess("services.model_worker", {
            "AXL_WORKER_MODE": "pool", "AXL_MODEL_STORE_DIR": str(store.root), "AXL_REGISTRY_URL": mesh.registry.url,
            "AXL_REGISTRY_SECRET": REGISTRY_SECRET, "AXL_NUM_THREADS": "1", "AXL_MAX_BATCH": "4",
            "AXL_PREFIX_CACHE_MB": "0",  # one_model_budget_mb counts no prefix cache
            "AXL_POOL_MEMORY_BUDGET_MB": one_model_budget_mb(**window)}, log_path=tmp_path / "pool.log").start(60)
        mesh.workers.append(pool)
        mesh.wait_for_instances("axl-pool", count=1)  # the pool's own record (specialist on-demand)
        client = mesh.client()
        with ThreadPoolExecutor(4) as threads:  # four first requests at once: one load
            answers = list(threads.map(lambda _: client.completions.create(model=A, prompt="x", max_tokens=2),
                                       range(4)))
        assert {a.model for a in answers} == {A}
        assert 'axl_pool_loads_total{outcome="loaded"} 1.0' in httpx.get(pool.url + "/metrics").text
        assert 'axl_gateway_on_demand_loads_total{outcome="loaded"}' in httpx.get(mesh.gateway.url + "/metrics").text
        stream = client.completions.create(model=A, prompt="x", max_tokens=4000, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))  # A is decoding
        with pytest.raises(openai.APIStatusError) as full:
            client.completions.create(model=B, prompt="x", max_tokens=2)
        assert full.value.status_code == 503 and full.value.body["code"] == "pool_full"
        assert int(full.value.response.headers["retry-after"]) >= 1
        stream.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = client.completions.create(model=B, prompt="x", max_tokens=2)
                break
            except openai.APIStatusError as exc:
                assert exc.status_code == 503 and time.monotonic() < deadline, exc
                time.sleep(0.5)
        assert answer.model == B
        assert [m["model_id"] for m in mesh.instances(B)] == [B] and mesh.instances(A) == []
    finally:
        mesh.stop()
