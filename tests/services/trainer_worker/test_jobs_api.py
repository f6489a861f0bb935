"""Fine-tuning over HTTP with the openai SDK against real processes: upload validation, hyperparameter errors,
cancel (queued and running), and recovery of a job whose worker was SIGKILLed."""

from __future__ import annotations

import io
import json
import time
import zlib

import httpx
import openai
import pytest
import redis

from axl_mesh.jobs import TRAIN_FUNCTION
from tests.services.trainer_worker.mesh import PAIRS, JobMesh, event_messages, wait_for, wait_for_status


@pytest.fixture
def mesh(redis_url, tmp_path, start_service) -> JobMesh:
    return JobMesh(redis_url, tmp_path, start_service)


def _upload_error(client: openai.OpenAI, name: str, data: bytes) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        client.files.create(file=(name, io.BytesIO(data)), purpose="fine-tune")
    return info.value


def test_files_round_trip_and_upload_validation(mesh: JobMesh) -> None:
    client = mesh.client()
    file_id = mesh.upload(client)
    meta = client.files.retrieve(file_id)
    assert (meta.filename, meta.bytes, meta.purpose) == ("pairs.jsonl", len(PAIRS.encode()), "fine-tune")
    assert client.files.content(file_id).content == PAIRS.encode()
    assert file_id in [f.id for f in client.files.list().data]

    bad_line = _upload_error(client, "bad.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n')
    assert bad_line.status_code == 400 and "line 2" in bad_line.message and bad_line.code == "invalid_jsonl"
    wrong_keys = _upload_error(client, "keys.jsonl", b'{"question": "a"}\n')
    assert wrong_keys.status_code == 400 and "line 1" in wrong_keys.message
    not_utf8 = _upload_error(client, "code.py", b"print('ok')\n\xff\xfe\n")
    assert not_utf8.status_code == 400 and "UTF-8" in not_utf8.message and "line 2" in not_utf8.message
    empty = _upload_error(client, "empty.txt", b"  \n")
    assert empty.status_code == 400 and empty.code == "empty_file"

    assert client.files.delete(file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file_id)


def test_upload_over_the_size_limit_is_refused(redis_url, tmp_path, start_service) -> None:
    mesh = JobMesh(redis_url, tmp_path, start_service, AXL_MAX_FILE_BYTES="100")
    error = _upload_error(mesh.client(), "big.txt", b"x = 1\n" * 50)
    assert error.status_code == 413 and "100 bytes" in error.message


def test_bad_hyperparameters_and_models_get_clear_errors(redis_url, tmp_path, start_service) -> None:
    mesh = JobMesh(redis_url, tmp_path, start_service, AXL_TRAINER_MEMORY_BYTES=str(600 * 2**20))
    client = mesh.client()
    file_id = mesh.upload(client)

    def error(**kwargs) -> openai.BadRequestError:
        with pytest.raises(openai.BadRequestError) as info:
            client.fine_tuning.jobs.create(training_file=kwargs.pop("training_file", file_id), **kwargs)
        return info.value

    optimizer = error(model="tiny", hyperparameters={"optimizer": "adam"})
    assert optimizer.param == "hyperparameters.optimizer" and "lion" in optimizer.message
    epochs = error(model="tiny", hyperparameters={"n_epochs": 0})
    assert epochs.param == "hyperparameters.n_epochs"
    window = error(model="tiny", hyperparameters={"seq_len": 4096})
    assert window.param == "hyperparameters.seq_len" and "128" in window.message
    unknown = error(model="gpt-9", hyperparameters={})
    assert unknown.param == "model" and "tiny" in unknown.message
    missing = error(model="tiny", training_file="file-" + "0" * 24)
    assert missing.param == "training_file" and "does not exist" in missing.message
    too_big = error(model="code-1b", hyperparameters={"batch_size": 8})
    assert too_big.code == "insufficient_memory" and "GiB" in too_big.message
    assert client.fine_tuning.jobs.list().data == []  # nothing rejected was queued


def test_cancel_a_queued_job(mesh: JobMesh) -> None:
    client = mesh.client()
    job = client.fine_tuning.jobs.create(model="tiny", training_file=mesh.upload(client),
                                         hyperparameters={"max_steps": 10})
    assert job.status == "queued"
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)
    mesh.start_trainer()
    time.sleep(2)  # a worker must not run it anyway
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"


def _running_step(client: openai.OpenAI, job_id: str, at_least: int) -> int | None:
    job = client.fine_tuning.jobs.retrieve(job_id)
    step = (job.progress or {}).get("step", 0) if job.status == "running" else 0
    return step if step >= at_least else None


def test_cancel_a_running_job_checkpoints_and_ends_cancelled(mesh: JobMesh) -> None:
    client = mesh.client()
    mesh.start_trainer()
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=mesh.upload(client),
        hyperparameters={"max_steps": 1_000_000, "max_time_seconds": 600, "batch_size": 2, "seq_len": 32})
    wait_for(lambda: _running_step(client, job.id, 3), 90, "the job to run a few steps")
    client.fine_tuning.jobs.cancel(job.id)
    ended = wait_for_status(client, job.id, {"cancelled", "failed", "succeeded"}, 30)
    assert ended.status == "cancelled"
    assert any("cancelled at step" in m for m in event_messages(client, job.id))
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data  # the stop wrote one


def test_sigkilled_worker_job_resumes_from_its_checkpoint(mesh: JobMesh) -> None:
    client = mesh.client()
    trainer = mesh.start_trainer()
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=mesh.upload(client), suffix="phoenix",
        hyperparameters={"max_steps": 120, "checkpoint_interval": 10, "batch_size": 2, "seq_len": 32})

    def checkpointed() -> int | None:
        steps = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data]
        return max(steps) if steps and max(steps) >= 10 else None

    wait_for(checkpointed, 90, "a first checkpoint")
    assert trainer.proc is not None
    trainer.proc.kill()  # SIGKILL: no cleanup, no goodbye; the job's process dies with it
    trainer.proc.wait()
    started = time.monotonic()
    mesh.start_trainer()

    def resumed() -> str | None:
        return next((m for m in event_messages(client, job.id) if m.startswith("Resuming from the checkpoint")), None)

    message = wait_for(resumed, 60, "the job to resume on the new worker")
    assert time.monotonic() - started < 60
    resumed_step = int(message.split("step ")[1].split(" ")[0])
    assert resumed_step >= 10  # from the checkpoint, not from step 0
    ended = wait_for_status(client, job.id, {"succeeded", "failed", "cancelled"}, 120)
    assert ended.status == "succeeded", ended.error
    assert ended.attempt == 2 and ended.fine_tuned_model.startswith("ft:tiny:phoenix:")
    assert any("requeued" in m for m in event_messages(client, job.id))


def test_list_pagination_and_metrics(mesh: JobMesh) -> None:
    client = mesh.client()
    file_id = mesh.upload(client)
    ids = [client.fine_tuning.jobs.create(model="tiny", training_file=file_id, hyperparameters={"max_steps": 5}).id
           for _ in range(3)]
    first = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == ids[::-1][:2] and first.has_more
    second = client.fine_tuning.jobs.list(limit=2, after=first.data[-1].id)
    assert [j.id for j in second.data] == [ids[0]] and not second.has_more
    # What the gateway enqueued is JSON in Redis, not a pickle (RQ's default)
    raw = redis.Redis.from_url(mesh.env["AXL_REDIS_URL"]).hget(f"rq:job:{ids[0]}", "data")
    assert json.loads(zlib.decompress(raw)) == [TRAIN_FUNCTION, None, [ids[0]], {}]
    trainer = mesh.start_trainer()
    text = httpx.get(trainer.url + "/metrics", timeout=5).text
    assert 'axl_job_queue_depth{queue="axl-train"}' in text and 'axl_jobs{kind="ft",status=' in text
    for job_id in ids:
        assert wait_for_status(client, job_id, {"succeeded", "failed"}, 120).status == "succeeded"
    text = httpx.get(trainer.url + "/metrics", timeout=5).text
    assert 'axl_job_duration_seconds_count{kind="ft",status="succeeded"} 3.0' in text
    assert 'axl_jobs{kind="ft",status="succeeded"} 3.0' in text
    store = redis.Redis.from_url(mesh.env["AXL_REDIS_URL"])
    manifest = json.loads((mesh.root / "data" / "models" / "manifest.json").read_text())
    assert len(manifest["models"]) == 3 and store.ping()
