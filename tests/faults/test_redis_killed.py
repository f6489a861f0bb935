"""SIGKILL the mesh's Redis and start it again on its port from its append-only file, with every service running.

Nothing acknowledged before the kill is lost (the worker's registration, with its first registration time; the
file, its bytes and its record; the job, its events and checkpoints; the model-store entry), every service
reconnects by itself (same processes: the registry takes heartbeats again, the gateway serves completions and
job calls, the trainer runs a new job), and while Redis is down the gateway answers 503 with ``Retry-After``,
not a 500 and not a wait.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from axl_mesh.model_store import ModelStore
from tests.faults.conftest import AppendOnlyRedis, FaultMesh, jobs_env, wait_until
from tests.services.trainer_worker.mesh import PAIRS, wait_for_status

pytestmark = [pytest.mark.timeout(180), pytest.mark.needs_redis_server]

CODER = "axl-coder"
TINY_JOB = {"max_steps": 4, "checkpoint_interval": 2, "batch_size": 2, "seq_len": 32}


@pytest.fixture
def redis_mesh(append_only_redis: AppendOnlyRedis, tmp_path: Path) -> Iterator[FaultMesh]:
    mesh = FaultMesh(redis_url=append_only_redis.url, workdir=tmp_path)
    try:
        yield mesh
    finally:
        mesh.stop()


def _run_job(client: openai.OpenAI, file_id: str, suffix: str):  # noqa: ANN202 - openai's FineTuningJob
    job = client.fine_tuning.jobs.create(model="tiny", training_file=file_id, suffix=suffix,
                                         hyperparameters=TINY_JOB)
    done = wait_for_status(client, job.id, {"succeeded", "failed", "cancelled"}, 90)
    assert done.status == "succeeded", done.error
    return done


def _event_ids(client: openai.OpenAI, job_id: str) -> list[str]:
    return [e.id for e in client.fine_tuning.jobs.list_events(job_id, limit=1000).data]


def test_redis_killed_and_restarted_from_its_append_only_file_loses_nothing(
        append_only_redis: AppendOnlyRedis, redis_mesh: FaultMesh, checkpoints: dict) -> None:
    mesh = redis_mesh
    env = jobs_env(append_only_redis.url, mesh.workdir)
    mesh.start_registry(default_registry=True)  # the shipped TTL: an outage of seconds must not drop anyone
    gateway = mesh.start_gateway(**env)
    mesh.start_worker(checkpoints["plain"], "coder")
    trainer = mesh.start_trainer(env)
    services = [mesh.registry, gateway, trainer, *mesh.workers]
    pids = [s.proc.pid for s in services]  # type: ignore[union-attr]
    client = mesh.client().with_options(timeout=20)

    # What the mesh holds before the crash: a registration, a file, a finished job and its model.
    [registration] = mesh.instances(CODER)
    file_id = client.files.create(file=("pairs.jsonl", io.BytesIO(PAIRS.encode())), purpose="fine-tune").id
    job = _run_job(client, file_id, "before")
    events = _event_ids(client, job.id)
    steps = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data]
    assert client.completions.create(model=CODER, prompt="a", max_tokens=2).choices

    append_only_redis.kill()
    try:
        # Down: the gateway's job routes fail fast and say when to come back.
        with pytest.raises(openai.APIStatusError) as down:
            client.with_options(timeout=15).fine_tuning.jobs.list()
        assert down.value.status_code == 503 and down.value.response.headers.get("retry-after"), down.value
    finally:
        append_only_redis.start()
    restarted_at = time.time()

    # Nothing lost: the registry knows the worker since its first registration, not since a re-announcement.
    [again] = mesh.instances(CODER)
    assert (again["instance_id"], again["registered_at"]) == (registration["instance_id"],
                                                              registration["registered_at"])
    assert client.files.retrieve(file_id).bytes == len(PAIRS.encode())
    assert client.files.content(file_id).content == PAIRS.encode()
    assert file_id in [f.id for f in client.files.list().data]
    kept = client.fine_tuning.jobs.retrieve(job.id)
    assert (kept.status, kept.fine_tuned_model, kept.trained_tokens) == ("succeeded", job.fine_tuned_model,
                                                                         job.trained_tokens)
    assert job.id in [j.id for j in client.fine_tuning.jobs.list().data]
    assert _event_ids(client, job.id) == events
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data] == steps
    assert job.fine_tuned_model in [m.id for m in client.models.list().data]
    assert ModelStore(mesh.workdir / "data" / "models").get(job.fine_tuned_model) is not None

    # Every service reconnected by itself: heartbeats land again, completions route, the trainer takes new work.
    wait_until(lambda: mesh.instances(CODER)[0]["last_heartbeat"] > restarted_at, 20,
               "a heartbeat from the worker after the restart")
    assert client.completions.create(model=CODER, prompt="a", max_tokens=2).choices
    second_file = client.files.create(file=("more.jsonl", io.BytesIO(PAIRS.encode())), purpose="fine-tune").id
    assert _run_job(client, second_file, "after").fine_tuned_model != job.fine_tuned_model
    alive = [s.proc.pid for s in services if s.proc is not None and s.proc.poll() is None]
    assert alive == pids, "a service died or was restarted"
