"""A pool worker (AXL_WORKER_MODE=pool) as a real process over a real model store: it loads the model a request
names, keeps the most recently used within its memory budget, answers 503 pool_full while the budget is held by
busy models, unloads idle models, and registers what it holds (and itself) with a real registry."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from axl_mesh.model_store import ModelStore
from axl_model import ModelConfig
from services.model_worker.pool import estimate_serving_bytes
from tests.checkpoints import make_tiny_checkpoint
from tests.services.mesh_registry.conftest import registry_env
from tests.services.model_worker.conftest import GENERATE, MESH_AUTH, MESH_SECRET, WORKER, wait_until
from tests.support import ServiceProcess

A, B = "ft:tiny:alpha:00000001", "ft:tiny:beta:00000002"
MB = 1 << 20


def make_store(root: Path, **overrides: int) -> ModelStore:
    """A model store holding two tiny models (different weights) under fine-tune names."""
    store = ModelStore(root / "models")
    for seed, name in enumerate((A, B)):
        store.add(name, make_tiny_checkpoint(root / f"ckpt-{seed}", seed=seed, **overrides), move=False,
                  specialist="coder", base="tiny")
    return store


def one_model_budget_mb(**overrides: int) -> str:
    """A budget with room for one of the store's models and not two (the pool's own estimate, max_batch 4)."""
    size = estimate_serving_bytes(ModelConfig.from_name("tiny", **overrides), dtype="float32", max_batch=4,
                                  prefill_chunk=256)
    return f"{1.5 * size / MB:.3f}"


def pool_env(store: ModelStore, **extra: str) -> dict[str, str]:
    return {"AXL_WORKER_MODE": "pool", "AXL_MODEL_STORE_DIR": str(store.root), "AXL_REGISTRY_URL": "",
            "AXL_REGISTRY_SECRET": MESH_SECRET, "AXL_NUM_THREADS": "1", "AXL_MAX_BATCH": "4",
            "AXL_LOG_LEVEL": "info", "AXL_PREFIX_CACHE_MB": "0", **extra}  # budgets: one_model_budget_mb


def held(url: str) -> list[str]:
    answer = httpx.get(url + "/internal/v1/pool", headers=MESH_AUTH, timeout=10)
    answer.raise_for_status()
    return [m["model"] for m in answer.json()["models"]]


def generate(url: str, model: str | None, **body: object) -> httpx.Response:
    payload = {"prompt": "def add(a, b):\n", "max_tokens": 8, "temperature": 0, **body}
    if model is not None:
        payload["model"] = model
    return httpx.post(url + GENERATE, json=payload, headers=MESH_AUTH, timeout=60)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("pool")
    store = make_store(root)
    with ServiceProcess(WORKER, pool_env(store, AXL_POOL_MEMORY_BUDGET_MB=one_model_budget_mb()),
                        log_path=root / "pool.log", health_path="/readyz") as service:
        yield service


def test_a_pool_loads_what_is_asked_and_keeps_the_most_recent_within_its_budget(pool: ServiceProcess) -> None:
    assert held(pool.url) == []  # ready with nothing loaded: models load when asked for
    first = generate(pool.url, A)
    assert first.status_code == 200, first.text
    assert first.json()["model"] == A and first.json()["usage"]["completion_tokens"] == 8
    assert held(pool.url) == [A]
    # The budget holds one: B replaces A (the least recently used, and idle).
    second = generate(pool.url, B, messages=[{"role": "user", "content": "hi"}], prompt=None)
    assert second.status_code == 200, second.text
    assert second.json()["model"] == B
    assert held(pool.url) == [B]
    # A again: loaded again, the same weights give the same greedy text.
    again = generate(pool.url, A)
    assert again.status_code == 200 and again.json()["text"] == first.json()["text"]
    assert held(pool.url) == [A]
    metrics = httpx.get(pool.url + "/metrics").text
    assert 'axl_pool_loads_total{outcome="loaded"} 3.0' in metrics
    assert 'axl_pool_unloads_total{reason="lru"} 2.0' in metrics


def test_a_pool_refuses_what_it_cannot_serve(pool: ServiceProcess) -> None:
    unknown = generate(pool.url, "ft:tiny:nope:12345678")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    unnamed = generate(pool.url, None)
    assert unnamed.status_code == 400 and unnamed.json()["error"]["param"] == "model"
    for path, body in (("/internal/v1/models/load", {"model": A}), ("/internal/v1/pool", None)):
        anonymous = httpx.request("POST" if body else "GET", pool.url + path, json=body, timeout=10)
        assert anonymous.status_code == 401, path  # internal: the mesh secret only
    loaded = httpx.post(pool.url + "/internal/v1/models/load", json={"model": B}, headers=MESH_AUTH, timeout=60)
    assert loaded.status_code == 200, loaded.text
    registration = loaded.json()
    assert registration["model_id"] == B and registration["url"] == pool.url and registration["context_length"] == 128


def test_a_full_pool_answers_503_until_a_model_is_idle(tmp_path: Path) -> None:
    """While A streams a long answer it cannot be unloaded, so B does not fit: 503 pool_full with Retry-After.
    Once A's client goes away, B loads in its place."""
    window = {"max_seq_len": 4096}  # a long answer takes seconds, long enough to ask for B meanwhile
    store = make_store(tmp_path, **window)
    env = pool_env(store, AXL_POOL_MEMORY_BUDGET_MB=one_model_budget_mb(**window))
    with ServiceProcess(WORKER, env, log_path=tmp_path / "pool.log", health_path="/readyz") as pool:
        body = {"model": A, "prompt": "x", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", pool.url + GENERATE, json=body, headers=MESH_AUTH, timeout=60) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            assert "text" in json.loads(next(lines))  # A is decoding
            full = generate(pool.url, B)
            assert full.status_code == 503, full.text
            assert full.json()["error"]["code"] == "pool_full" and int(full.headers["retry-after"]) >= 1
            assert held(pool.url) == [A]
        # The stream is closed: the worker drops the request, A turns idle and gives way to B.
        assert wait_until(lambda: generate(pool.url, B).status_code == 200, timeout_seconds=20, interval=0.2)
        assert held(pool.url) == [B]


def test_a_pool_registers_what_it_holds_and_unloads_idle_models(redis_url: str, tmp_path: Path) -> None:
    store = make_store(tmp_path)
    auth = {"Authorization": f"Bearer {MESH_SECRET}"}
    with ServiceProcess("services.mesh_registry", registry_env(redis_url, AXL_REGISTRY_SECRET=MESH_SECRET),
                        log_path=tmp_path / "registry.log") as registry:
        env = pool_env(store, AXL_REGISTRY_URL=registry.url, AXL_POOL_IDLE_UNLOAD_SECONDS="2")
        with ServiceProcess(WORKER, env, log_path=tmp_path / "pool.log", health_path="/readyz") as pool:

            def instances(**params: str) -> list[dict]:
                return httpx.get(registry.url + "/v1/instances", params=params, headers=auth).json()["data"]

            # The pool's own record: how gateways find it; not a model anyone can ask for.
            assert wait_until(lambda: instances(specialist="on-demand"), timeout_seconds=10)
            assert [p["url"] for p in instances(specialist="on-demand")] == [pool.url]
            assert httpx.get(registry.url + "/v1/models", headers=auth).json()["data"] == []
            loaded = httpx.post(pool.url + "/internal/v1/models/load", json={"model": A}, headers=MESH_AUTH,
                                timeout=60)
            assert loaded.status_code == 200, loaded.text
            # Listed by the time the load answers (the gateway's next lookup finds it), at the pool's URL.
            (record,) = instances(model=A)
            assert record["url"] == pool.url and record["specialist"] == "coder" and record["context_length"] == 128
            assert [m["id"] for m in httpx.get(registry.url + "/v1/models", headers=auth).json()["data"]] == [A]
            started = time.monotonic()
            assert wait_until(lambda: not held(pool.url), timeout_seconds=15, interval=0.2)
            assert time.monotonic() - started >= 1.0  # not before its idle time (2 s from the load)
            assert instances(model=A) == []  # unloaded: deregistered at once, not left to the TTL
            assert len(instances(specialist="on-demand")) == 1
            loaded = httpx.post(pool.url + "/internal/v1/models/load", json={"model": B}, headers=MESH_AUTH,
                                timeout=60)
            assert loaded.status_code == 200 and len(instances(model=B)) == 1
        # SIGTERM: the pool and every model it held leave the registry before it exits (not after the TTL).
        assert instances(specialist="on-demand") == [] and instances(model=B) == []


def test_a_pool_on_another_host_copies_models_from_the_gateway(redis_url: str, tmp_path: Path) -> None:
    """No shared volume: the pool (on 127.0.0.2, "host B") copies a model its own store lacks from the gateway's
    store, authenticated with the mesh secret, every file checked against its SHA-256; a corrupted copy is refused
    and leaves nothing behind."""
    import os

    gateway_store = make_store(tmp_path / "host-a")
    gateway_env = {"AXL_REDIS_URL": redis_url, "AXL_REGISTRY_URL": "http://127.0.0.1:9",
                   "AXL_REGISTRY_SECRET": MESH_SECRET, "AXL_API_KEYS": "sk-fetch-test",
                   "AXL_MODEL_STORE_DIR": str(gateway_store.root), "AXL_LOG_LEVEL": "warning"}
    local_store = ModelStore(tmp_path / "host-b" / "models")
    with ServiceProcess("services.api_gateway", gateway_env, log_path=tmp_path / "gateway.log") as gateway:
        listing_url = f"{gateway.url}/internal/v1/model-store/{A}"
        assert httpx.get(listing_url).status_code == 401  # the store is not public
        assert httpx.get(listing_url, headers={"Authorization": "Bearer sk-fetch-test"}).status_code == 401
        listing = httpx.get(listing_url, headers=MESH_AUTH).json()
        assert {f["name"] for f in listing["files"]} == {"config.json", "metadata.json", "model.safetensors"}
        env = pool_env(local_store, AXL_MODEL_STORE_URL=gateway.url, AXL_POOL_MEMORY_BUDGET_MB="64")
        with ServiceProcess(WORKER, env, host="127.0.0.2", log_path=tmp_path / "pool.log",
                            health_path="/readyz") as pool:
            first = generate(pool.url, A)
            assert first.status_code == 200, first.text
            copied = local_store.path(A)
            for item in listing["files"]:
                assert (copied / item["name"]).read_bytes() == (gateway_store.path(A) / item["name"]).read_bytes()
            assert local_store.get(A)["specialist"] == "coder"
            # B's weights change on host A after their digest was taken (same size and mtime, so the gateway's
            # cached digest is stale): the copy does not match and is refused.
            httpx.get(f"{gateway.url}/internal/v1/model-store/{B}", headers=MESH_AUTH).raise_for_status()
            weights = gateway_store.path(B) / "model.safetensors"
            stat = weights.stat()
            data = bytearray(weights.read_bytes())
            data[-1] ^= 0xFF
            weights.write_bytes(bytes(data))
            os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            refused = generate(pool.url, B)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "model_fetch_failed"
            assert "checksum" in refused.json()["error"]["message"]
            assert local_store.get(B) is None
            assert sorted(p.name for p in local_store.root.iterdir() if p.name.startswith(".fetch-")) == []
            absent = generate(pool.url, "ft:tiny:absent:00000000")
            assert absent.status_code == 404 and absent.json()["error"]["code"] == "model_not_found"
