"""Fine-tune a tiny model over HTTP and get a completion from it through the gateway, as real processes.

The flow is the product's: upload with ``client.files.create``, ``client.fine_tuning.jobs.create``, watch events,
then the model lands in the model store as ``ft:tiny:<suffix>:<id>``. Under ``make up`` the launcher starts a
model worker for each new model-store entry (``deploy/launcher.py``, ``poll_model_store``); here the test starts
that worker itself, from the store entry, the same way.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from axl_mesh.model_store import ModelStore
from axl_mesh.redis_acl import JOBS_USER, REGISTRY_USER
from tests.e2e.conftest import Mesh
from tests.services.trainer_worker.mesh import PAIRS, event_messages, wait_for_status
from tests.support import RedisServer, ServiceProcess

ACL_PASSWORDS = {REGISTRY_USER: "e2e-registry-redis-password", JOBS_USER: "e2e-jobs-redis-password"}


@pytest.fixture
def job_mesh(tmp_path: Path) -> Iterator[tuple[Mesh, dict[str, str]]]:
    """Registry, gateway, trainer and (later) a model worker on a Redis with the mesh's ACL, as under compose and
    ``make up``: the registry logs in as ``registry``, the gateway and the trainer as ``jobs`` (user and password
    in the URL, which must work for every client, RQ's included), and the default user is off."""
    mesh = Mesh(redis_url="", workdir=tmp_path)
    redis_server = RedisServer(tmp_path / "redis.log", acl_users=ACL_PASSWORDS, acl_prefixes={
        "registry_prefix": mesh.registry_key_prefix, "jobs_prefix": "axl:e2e-jobs"}).start()
    mesh.redis_url = redis_server.url_for(JOBS_USER)
    mesh.registry_redis_url = redis_server.url_for(REGISTRY_USER)
    env = {"AXL_REDIS_URL": mesh.redis_url, "AXL_DATA_DIR": str(tmp_path / "data"),
           "AXL_JOBS_KEY_PREFIX": "axl:e2e-jobs", "AXL_REAPER_INTERVAL_SECONDS": "1",
           "AXL_HEARTBEAT_INTERVAL_SECONDS": "1", "AXL_NUM_THREADS": "1"}
    trainer = None
    try:
        mesh.start_registry()
        mesh.start_gateway(**env)
        trainer = ServiceProcess("services.trainer_worker", env, log_path=tmp_path / "trainer.log").start(60)
        yield mesh, env
    finally:
        if trainer is not None:
            trainer.stop()
        mesh.stop()
        redis_server.stop()


def test_fine_tuned_model_is_stored_listed_and_answers(job_mesh: tuple[Mesh, dict[str, str]]) -> None:
    mesh, env = job_mesh
    client = mesh.client()
    file_id = client.files.create(file=("pairs.jsonl", io.BytesIO(PAIRS.encode())), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model="tiny", training_file=file_id, suffix="adder", seed=7,
                                         hyperparameters={"max_steps": 40, "batch_size": 4, "seq_len": 64,
                                                          "specialist": "coder"})
    assert job.status == "queued" and job.seed == 7
    done = wait_for_status(client, job.id, {"succeeded", "failed", "cancelled"}, 180)
    assert done.status == "succeeded", done.error
    name = done.fine_tuned_model
    assert name.startswith("ft:tiny:adder:") and done.trained_tokens == 40 * 4 * 64

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e for e in events if e.type == "metrics"]
    assert any("train_loss" in (e.data or {}) for e in metrics) and any("val_bpb" in (e.data or {}) for e in metrics)
    assert f"New fine-tuned model created: {name}" in event_messages(client, job.id)
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number == 40

    store = ModelStore(Path(env["AXL_DATA_DIR"]) / "models")
    entry = store.get(name)
    assert entry is not None and entry["job_id"] == job.id and entry["specialist"] == "coder"
    assert sorted(p.name for p in store.path(name).iterdir()) == ["config.json", "metadata.json", "model.safetensors"]
    # Listed as soon as the job succeeds, with no replica yet ...
    listed = {m.id: m for m in client.models.list().data}
    assert name in listed and listed[name].model_extra["instances"] == 0
    assert client.models.retrieve(name).id == name
    with pytest.raises(openai.APIStatusError) as not_yet:  # stored, no worker yet: retry later, not "unknown"
        client.completions.create(model=name, prompt="x", max_tokens=1)
    assert not_yet.value.status_code == 503 and not_yet.value.body["code"] == "model_not_served_yet"
    # ... then what the launcher does for a new store entry (make up): a model worker serving it under its name.
    mesh.start_worker(store.path(name), specialist=entry["specialist"], model_id=name)
    listed = {m.id: m for m in client.models.list().data}
    assert listed[name].model_extra["instances"] == 1
    completion = client.completions.create(model=name, prompt="def add_3(a, b):\n", max_tokens=8, temperature=0)
    assert completion.model == name and completion.choices[0].text is not None
    assert completion.usage.completion_tokens >= 1
    # All of it went through the ACL'd Redis: the jobs login reaches RQ's keys, not the registry's instance records
    # (which exist: the registry wrote them under its own login); without a login Redis refuses.
    jobs = redis.Redis.from_url(env["AXL_REDIS_URL"])
    assert jobs.exists(f"rq:job:{job.id}")
    registry = redis.Redis.from_url(mesh.registry_redis_url, decode_responses=True)
    instances_key = f"{mesh.registry_key_prefix}:instances"
    assert registry.zcard(instances_key) >= 1
    for attempt in (lambda: jobs.zrange(instances_key, 0, -1), lambda: jobs.zadd(instances_key, {"evil": 1e15})):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=urlsplit(env["AXL_REDIS_URL"]).port, retry=Retry(NoBackoff(), 0)).ping()
