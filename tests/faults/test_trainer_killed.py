"""SIGKILL the trainer worker and its work horse (the forked process running the job) together, mid-job, with the
product's heartbeat, reaper and retry defaults: a new trainer resumes the job from its last checkpoint within 60 s
(the README's promise), the job succeeds, and nothing recorded before the kill is lost.

tests/services/trainer_worker/test_jobs_api.py kills only the worker's main process (the horse follows it by its
parent-death signal) with a 4 s heartbeat TTL; this kills both at once and checks the record end to end.
"""

from __future__ import annotations

import io
import time

import pytest

from axl_mesh.model_store import ModelStore
from tests.faults.conftest import FaultMesh, jobs_env, pid_alive, sigkill, wait_until
from tests.services.trainer_worker.mesh import PAIRS, wait_for_status

pytestmark = pytest.mark.timeout(240)

RESUME_WITHIN_SECONDS = 60.0  # the README's promise
MAX_STEPS, INTERVAL, BATCH, SEQ_LEN = 60, 10, 2, 32


def _events(client, job_id: str) -> list:  # noqa: ANN001 - an openai.OpenAI
    """Every event of the job, oldest first."""
    return list(reversed(client.fine_tuning.jobs.list_events(job_id, limit=1000).data))


def _checkpoint_steps(client, job_id: str) -> list[int]:  # noqa: ANN001
    return sorted(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job_id, limit=100).data)


def test_trainer_and_work_horse_killed_mid_job_resume_from_the_last_checkpoint(fault_mesh: FaultMesh) -> None:
    env = jobs_env(fault_mesh.redis_url, fault_mesh.workdir)
    fault_mesh.start_registry()
    fault_mesh.start_gateway(**env)
    trainer = fault_mesh.start_trainer(env)
    client = fault_mesh.client()
    file_id = client.files.create(file=("pairs.jsonl", io.BytesIO(PAIRS.encode())), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=file_id, suffix="phoenix",
        hyperparameters={"max_steps": MAX_STEPS, "checkpoint_interval": INTERVAL, "batch_size": BATCH,
                         "seq_len": SEQ_LEN})

    wait_until(lambda: any(s >= INTERVAL for s in _checkpoint_steps(client, job.id)), 90, "a first checkpoint",
               interval=0.1)
    killed = sigkill(trainer, with_children=True)
    killed_at = time.monotonic()
    assert killed, "the trainer had no work horse running the job"
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
    before = _events(client, job.id)  # everything the dead attempt recorded (it can record nothing more)
    steps_before = _checkpoint_steps(client, job.id)
    assert steps_before[-1] < MAX_STEPS, "the job ended before the kill: nothing to resume"

    fault_mesh.start_trainer(env)

    def resumed() -> dict | None:
        return next((e.data for e in _events(client, job.id) if e.message.startswith("Resuming from")), None)

    data = wait_until(resumed, RESUME_WITHIN_SECONDS + 10, "the job to resume on the new trainer", interval=0.5)
    waited = time.monotonic() - killed_at
    assert waited < RESUME_WITHIN_SECONDS, f"resumed {waited:.1f}s after the kill"
    assert not any(pid_alive(pid) for pid in killed), "a killed work horse is still running"
    # From the newest checkpoint: the one last recorded, or one the horse wrote just before it died unrecorded.
    assert data["attempt"] == 2
    assert steps_before[-1] <= data["resumed_from_step"] <= steps_before[-1] + INTERVAL, (data, steps_before)

    done = wait_for_status(client, job.id, {"succeeded", "failed", "cancelled"}, 120)
    assert done.status == "succeeded", done.error
    assert done.attempt == 2 and done.trained_tokens == MAX_STEPS * BATCH * SEQ_LEN
    after = _events(client, job.id)
    assert [e.id for e in after[:len(before)]] == [e.id for e in before], "events of the first attempt were lost"
    messages = [e.message for e in after]
    requeued = next(i for i, m in enumerate(messages) if "requeued" in m)
    resumed_at = next(i for i, m in enumerate(messages) if m.startswith("Resuming from"))
    assert len(before) <= requeued < resumed_at < messages.index(f"New fine-tuned model created: "
                                                                  f"{done.fine_tuned_model}")
    steps_after = _checkpoint_steps(client, job.id)
    assert set(steps_before) <= set(steps_after) and steps_after[-1] == MAX_STEPS
    store = ModelStore(fault_mesh.workdir / "data" / "models")
    assert store.get(done.fine_tuned_model) is not None
