"""A fine-tuning job trained by a group of trainer workers (``hyperparameters.workers``), over HTTP with the openai
SDK against real processes: a real Redis, the gateway, and two ``python -m services.trainer_worker`` processes that
meet through Redis and train as one gloo group.

- two workers, ``workers: 2``: both join, the job succeeds, its events name the 2 ranks, each checkpoint is recorded
  once (rank 0 writes for the group) and every step trained the global batch of 2 ranks;
- one worker, ``workers: 2``: after AXL_TRAIN_GROUP_TIMEOUT_SECONDS the job says it got 1 of 2 and runs with 1; with
  ``min_workers: 2`` it fails with ``insufficient_workers`` instead, and no member job is left in the queue;
- bad ``workers`` / ``min_workers`` get OpenAI-style 400s naming the parameter;
- a member SIGKILLed mid-job: rank 0 records the lost rank, the job is requeued and resumes from its checkpoint.
"""

from __future__ import annotations

import openai
import pytest
import redis

from axl_mesh.jobs import QueueName
from axl_mesh.model_store import ModelStore
from tests.services.trainer_worker.mesh import JobMesh, wait_for, wait_for_status

pytestmark = pytest.mark.timeout(240)

MAX_STEPS, INTERVAL, BATCH, SEQ_LEN = 12, 8, 2, 32  # 12 is no multiple of 8: one save per step
HP = {"max_steps": MAX_STEPS, "checkpoint_interval": INTERVAL, "batch_size": BATCH, "seq_len": SEQ_LEN}
ENDED = {"succeeded", "failed", "cancelled"}


def _events(client: openai.OpenAI, job_id: str) -> list:
    """Every event of the job, oldest first."""
    return list(reversed(client.fine_tuning.jobs.list_events(job_id, limit=1000).data))


def _group_event(client: openai.OpenAI, job_id: str):  # noqa: ANN202 - an openai event
    return next(e for e in _events(client, job_id) if e.message.startswith("Training as a group of"))


def test_two_trainer_workers_train_one_job_as_a_group(redis_url, tmp_path, start_service) -> None:
    mesh = JobMesh(redis_url, tmp_path, start_service, AXL_TRAIN_GROUP_TIMEOUT_SECONDS="60")
    trainers = [mesh.start_trainer(), mesh.start_trainer()]
    client = mesh.client()
    job = client.fine_tuning.jobs.create(model="tiny", training_file=mesh.upload(client), suffix="duo",
                                         hyperparameters={**HP, "workers": 2})
    assert job.hyperparameters.workers == 2  # echoed back as an AXL extension

    done = wait_for_status(client, job.id, ENDED, 150)
    assert done.status == "succeeded", (done.error, [t.logs() for t in trainers])
    group = _group_event(client, job.id)
    assert group.message.startswith("Training as a group of 2 rank(s): rank 0 trainer-")
    ranks = group.data["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["name"] != ranks[1]["name"]
    messages = [e.message for e in _events(client, job.id)]
    assert not any(m.startswith("Got ") for m in messages), messages  # nobody was missing
    # Rank 0 alone records (and writes) checkpoints: each step once, not once per rank.
    steps = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id, limit=100).data]
    assert sorted(steps) == [INTERVAL, MAX_STEPS], steps
    # Every step trained the group's global batch: 2 ranks x batch x window.
    assert done.trained_tokens == MAX_STEPS * 2 * BATCH * SEQ_LEN
    from axl_model.checkpoint import load_metadata

    stored = ModelStore(tmp_path / "data" / "models").path(done.fine_tuned_model)
    assert load_metadata(stored)["world_size"] == 2
    # The member's worker ran rank 1 (in its own process, found through Redis).
    member_logs = [t.logs(400) for t in trainers if "joining as rank 1 of 2" in t.logs(400)]
    assert len(member_logs) == 1, [t.logs() for t in trainers]


def test_too_few_workers_runs_with_what_it_has_or_fails_below_min_workers(redis_url, tmp_path, start_service) -> None:
    mesh = JobMesh(redis_url, tmp_path, start_service, AXL_TRAIN_GROUP_TIMEOUT_SECONDS="3")
    trainer = mesh.start_trainer()
    client = mesh.client()
    file_id = mesh.upload(client)
    alone = client.fine_tuning.jobs.create(model="tiny", training_file=file_id, hyperparameters={**HP, "workers": 2})
    strict = client.fine_tuning.jobs.create(model="tiny", training_file=file_id,
                                            hyperparameters={**HP, "workers": 2, "min_workers": 2})

    done = wait_for_status(client, alone.id, ENDED, 120)
    assert done.status == "succeeded", (done.error, trainer.logs())
    short = next(e for e in _events(client, alone.id) if e.message.startswith("Got "))
    assert short.level == "warn" and short.message.startswith("Got 1 of 2 workers after ")
    assert short.message.endswith("; running with 1.") and short.data["world_size"] == 1
    assert _group_event(client, alone.id).data["world_size"] == 1
    assert done.trained_tokens == MAX_STEPS * BATCH * SEQ_LEN  # one rank's batches

    failed = wait_for_status(client, strict.id, ENDED, 60)
    assert failed.status == "failed" and failed.error.code == "insufficient_workers", failed.error
    assert "Got 1 of 2 workers" in failed.error.message and "min_workers is 2" in failed.error.message
    assert any(e.level == "error" and "min_workers is 2" in e.message for e in _events(client, strict.id))
    # The member jobs nobody took were taken out of the queue again.
    queue = redis.Redis.from_url(mesh.env["AXL_REDIS_URL"]).llen(f"rq:queue:{QueueName.TRAIN.value}")
    assert queue == 0


def test_bad_workers_are_rejected_openai_style(redis_url, tmp_path, start_service) -> None:
    mesh = JobMesh(redis_url, tmp_path, start_service)
    client = mesh.client()
    file_id = mesh.upload(client)

    def error(**hyperparameters) -> openai.BadRequestError:
        with pytest.raises(openai.BadRequestError) as info:
            client.fine_tuning.jobs.create(model="tiny", training_file=file_id, hyperparameters=hyperparameters)
        return info.value

    for bad in (0, 65, "2", 2.5, True):
        assert error(workers=bad).param == "hyperparameters.workers", bad
    over = error(workers=2, min_workers=3)
    assert over.param == "hyperparameters.min_workers" and "cannot exceed workers (2)" in over.message
    assert client.fine_tuning.jobs.list().data == []  # nothing rejected was queued
    ok = client.fine_tuning.jobs.create(model="tiny", training_file=file_id, hyperparameters={"workers": 3,
                                                                                              "min_workers": 2})
    assert (ok.hyperparameters.workers, ok.hyperparameters.min_workers) == (3, 2)



def test_a_member_killed_mid_job_requeues_it_and_it_resumes_from_the_checkpoint(redis_url, tmp_path,
                                                                                start_service) -> None:
    from tests.faults.conftest import sigkill

    # A timeout long enough for a trainer to arrive on a loaded machine: each attempt forms its group of 2.
    mesh = JobMesh(redis_url, tmp_path, start_service, AXL_TRAIN_GROUP_TIMEOUT_SECONDS="90")
    trainers = [mesh.start_trainer(), mesh.start_trainer()]
    client = mesh.client()
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=mesh.upload(client),
        hyperparameters={**HP, "max_steps": 40, "checkpoint_interval": 10, "workers": 2})

    def checkpointed() -> bool:
        return any(c.step_number >= 10 for c in client.fine_tuning.jobs.checkpoints.list(job.id).data)

    wait_for(checkpointed, 120, "a first checkpoint of the group")
    assert _group_event(client, job.id).data["world_size"] == 2
    member = next(t for t in trainers if "joining as rank 1 of 2" in t.logs(400))
    sigkill(member, with_children=True)  # the worker and its work horse (rank 1), no goodbye
    trainers.append(mesh.start_trainer())  # a replacement: the next attempt's group is 2 again

    done = wait_for_status(client, job.id, ENDED, 180)
    assert done.status == "succeeded", (done.error, [t.logs() for t in trainers])
    events = _events(client, job.id)
    messages = [e.message for e in events]
    lost = next(e for e in events if e.message.startswith("The training group lost a rank"))
    assert lost.level == "warn" and "requeued" in lost.message and lost.data["resume_step"] >= 10, lost
    resumed = next(e for e in events if e.message.startswith("Resuming from the checkpoint"))
    assert resumed.data["attempt"] == 2 and resumed.data["resumed_from_step"] >= 10
    groups = [e for e in events if e.message.startswith("Training as a group of")]
    assert [g.data["world_size"] for g in groups] == [2, 2]  # one group per attempt, both full
    assert messages.index(groups[0].message) < messages.index(lost.message) < messages.index(resumed.message)
    assert done.attempt == 2
    # Steps before the kill were not trained again from 0: the job's tokens are the 40 steps' of 2 ranks.
    assert done.trained_tokens == 40 * 2 * BATCH * SEQ_LEN


def test_a_trainer_that_cannot_see_the_jobs_data_stays_out_and_says_why(redis_url, tmp_path, start_service) -> None:
    # A long timeout, so the second trainer certainly arrives while the group forms; the test ends at its refusal.
    mesh = JobMesh(redis_url, tmp_path, start_service, AXL_TRAIN_GROUP_TIMEOUT_SECONDS="120")
    mesh.start_trainer()
    client = mesh.client()
    job = client.fine_tuning.jobs.create(model="tiny", training_file=mesh.upload(client),
                                         hyperparameters={**HP, "max_steps": 4, "workers": 2})
    wait_for(lambda: any(e.message.startswith("Waiting up to") for e in _events(client, job.id)), 60,
             "the first trainer to wait for a second")
    # A second trainer on "another host": its own data folder, without the gateway's uploads.
    mesh.start_trainer(AXL_DATA_DIR=str(tmp_path / "elsewhere"))

    refused = wait_for(lambda: next((e for e in _events(client, job.id) if "cannot join the group" in e.message),
                                    None), 90, "the second trainer's refusal")
    assert refused.level == "warn" and "does not see" in refused.message and "AXL_DATA_DIR" in refused.message
    assert not any(e.message.startswith("Training as a group") for e in _events(client, job.id))  # still waiting
    client.fine_tuning.jobs.cancel(job.id)  # it stops waiting: no second worker is coming
    assert wait_for_status(client, job.id, ENDED, 60).status == "cancelled"
