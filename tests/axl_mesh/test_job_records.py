"""Job records are pydantic models in Redis: what the gateway writes the workers read back as the same model, the
public view leaves the trainer's fields out, and a write that the model would refuse never reaches Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis
from pydantic import ValidationError

from axl_mesh.jobs import FILE_KIND, JobKind, JobsSettings, JobStore, new_id, now
from axl_mesh.jobs_protocol import (
    FileObject,
    FineTuningJob,
    FineTuningJobRecord,
    HyperparametersOut,
    JobError,
    JobProgress,
    JobStatus,
    QuantizationJob,
    QuantizationOutput,
)

FT, Q = JobKind.FINE_TUNE, JobKind.QUANTIZE


@pytest.fixture
def store(redis_url: str) -> Iterator[JobStore]:
    conn = redis.Redis.from_url(redis_url)
    yield JobStore(conn, JobsSettings(redis_url=redis_url, jobs_key_prefix="axl:records-test"))
    conn.close()


def _training_record() -> FineTuningJobRecord:
    return FineTuningJobRecord(
        id=new_id("ftjob"), created_at=int(now()), hyperparameters=HyperparametersOut(batch_size=4, seq_len=64),
        model="tiny", seed=7, status=JobStatus.VALIDATING_FILES, training_file=new_id("file"), quantize=["q8_0"],
        ram_estimate_bytes=1 << 20, base_kind="preset", base_preset="tiny", specialist="coder")


def test_a_record_reads_back_as_the_model_it_was_written_as(store: JobStore) -> None:
    record = _training_record()
    store.create(FT, record)
    assert store.read(FT, record.id) == record  # the kind's record model by default
    public = store.read(FT, record.id, FineTuningJob)
    assert type(public) is FineTuningJob and public == record.public()
    assert "base_kind" not in public.model_dump() and public.model_dump()["hyperparameters"]["seq_len"] == 64
    # Redis keeps one JSON value per field (the layout the status script and older records share).
    raw = store.redis.hgetall(store.key(FT, record.id))
    assert json.loads(raw[b"status"]) == "validating_files" and json.loads(raw[b"base_preset"]) == "tiny"

    upload = FileObject(id=new_id("file"), created_at=int(now()), filename="pairs.jsonl", bytes=35, format="jsonl",
                        lines=1)
    store.create(FILE_KIND, upload)
    assert store.read(FILE_KIND, upload.id) == upload
    quantization = QuantizationJob(id=new_id("qjob"), created_at=int(now()), model="m", types=["q8_0"],
                                   status=JobStatus.QUEUED, fine_tuning_job_id=record.id)
    store.create(Q, quantization)
    assert store.read_page(Q, None, 10, QuantizationJob)[0][0] == quantization


def test_updates_are_checked_against_the_record_model(store: JobStore) -> None:
    record = _training_record()
    store.create(FT, record)
    progress = JobProgress(step=3, loss=2.5, bytes_per_s=100.0, updated_at=now())
    store.update(FT, record.id, progress=progress, trained_tokens=3 * 64)
    store.set_status(FT, record.id, JobStatus.RUNNING, attempt=1, started_at=int(now()))
    read = store.read(FT, record.id, FineTuningJobRecord)
    assert read is not None and read.progress == progress and read.status == JobStatus.RUNNING and read.attempt == 1

    with pytest.raises(ValueError, match="no field 'progres'"):
        store.update(FT, record.id, progres=progress)  # a typo is an error, not a field nobody reads
    with pytest.raises(ValidationError):
        store.update(FT, record.id, progress={"step": "three"})
    with pytest.raises(ValidationError):
        store.set_status(FT, record.id, JobStatus.FAILED, error={"message": "no code"})
    after = store.read(FT, record.id, FineTuningJobRecord)
    assert after is not None and after.progress == progress and after.status == JobStatus.RUNNING  # untouched

    store.set_status(FT, record.id, JobStatus.FAILED, error=JobError(code="x", message="it broke"))
    failed = store.read(FT, record.id, FineTuningJob)
    assert failed is not None and failed.error == JobError(code="x", message="it broke") and failed.finished_at

    quantization = QuantizationJob(id=new_id("qjob"), created_at=int(now()), model="m", types=["f16"],
                                   status=JobStatus.RUNNING)
    store.create(Q, quantization)
    output = QuantizationOutput(type="f16", filename="m-f16.gguf", bytes=10, url="/x", details={"kind": "llama"})
    store.set_status(Q, quantization.id, JobStatus.SUCCEEDED, outputs=[output])
    done = store.read(Q, quantization.id)
    assert isinstance(done, QuantizationJob) and done.outputs == [output]


def test_the_gateway_and_the_trainer_find_an_upload_in_one_place(tmp_path) -> None:
    settings = JobsSettings(data_dir=tmp_path)
    assert settings.uploaded_file("file-1", "jsonl") == tmp_path / "files" / "file-1.jsonl"
    assert settings.uploaded_file("file-1", "text") == tmp_path / "files" / "file-1.txt"
