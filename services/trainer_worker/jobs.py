"""The training job: what the trainer worker runs (in RQ's forked process) for one ``ftjob-…`` record.

    run_training_job("ftjob-…")

Start (or resume) -> train with callbacks that publish progress/events to Redis and check the cancel flag every
step -> on success, move the checkpoint into the model store as ``ft:<base>:<suffix>:<id>``. The job's folder
``<jobs_dir>/<job id>/checkpoint`` survives the process, so a requeued attempt (after the worker was killed)
resumes from the last checkpoint: ``axl_model.train`` continues exactly where the checkpoint stopped.

Failure: any exception marks the record ``failed`` with the message, turns RQ's retries off (retries are for dead
workers, not for a job that fails the same way each time) and re-raises, so RQ records the traceback in its
failed registry and the worker keeps running.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

from axl_mesh.jobs import FILE_KIND, JobKind, JobStore, now, open_job
from axl_mesh.jobs_protocol import FileObject, FineTuningJobRecord, JobError, JobProgress, JobStatus, TrainingResult
from axl_mesh.model_store import ModelStore, fine_tuned_name
from services.trainer_worker.group import NotEnoughWorkers, coordinate, is_group_loss
from services.trainer_worker.settings import Settings

logger = logging.getLogger(__name__)

FT = JobKind.FINE_TUNE
METRICS_EVENT_INTERVAL_SECONDS = 1.0


def job_folder(settings: Settings, job_id: str) -> Path:
    return settings.resolved_jobs_dir / job_id


def data_path(settings: Settings, store: JobStore, file_id: str) -> str:
    record = store.read(FILE_KIND, file_id, FileObject)
    if record is None:
        raise ValueError(f"file {file_id} was deleted before training started")
    return str(settings.uploaded_file(file_id, record.format))


def checkpoint_step(folder: Path) -> int | None:
    """The step of the checkpoint a previous attempt left in ``folder`` (None when there is none)."""
    from axl_model.checkpoint import is_checkpoint, load_metadata

    if not is_checkpoint(folder):
        return None
    try:
        return int(load_metadata(folder).get("step", 0))
    except (ValueError, OSError, TypeError):
        return None


class _Progress:
    """The training callbacks: progress into the record each step, a metrics event at most once a second,
    checkpoints and evaluations as events, and the cancel flag read every step."""

    def __init__(self, store: JobStore, job_id: str, model_name: str) -> None:
        self.store, self.job_id, self.model_name = store, job_id, model_name
        self.last_event = 0.0
        self.last: dict[str, Any] = {}
        self.val_bpb: float | None = None

    def on_step(self, record: dict[str, Any]) -> None:
        self.last = record
        progress = JobProgress(
            step=record["step"],
            loss=record.get("loss"),
            val_bpb=self.val_bpb,
            bytes_per_s=record.get("bytes_per_s"),
            updated_at=now(),
        )
        self.store.update(FT, self.job_id, progress=progress, trained_tokens=record.get("tokens_seen"))
        if time.monotonic() - self.last_event >= METRICS_EVENT_INTERVAL_SECONDS:
            self.last_event = time.monotonic()
            self.store.add_event(
                self.job_id,
                f"Step {record['step']}: training loss={record['loss']:.4f}",
                type="metrics",
                data={
                    "step": record["step"],
                    "train_loss": record["loss"],
                    "bytes_per_s": record.get("bytes_per_s"),
                    "elapsed_s": record.get("elapsed_s"),
                },
            )

    def on_eval(self, record: dict[str, Any]) -> None:
        self.val_bpb = record["val_bpb"]
        self.store.add_event(
            self.job_id,
            f"Step {record['step']}: validation bits per byte={record['val_bpb']:.4f}",
            type="metrics",
            data={"step": record["step"], "val_bpb": record["val_bpb"]},
        )

    def on_checkpoint(self, path: str, step: int) -> None:
        checkpoint = {
            "id": f"ftckpt-{self.job_id.rsplit('-', 1)[-1][:12]}{step:012d}",
            "object": "fine_tuning.job.checkpoint",
            "created_at": int(now()),
            "fine_tuned_model_checkpoint": f"{self.model_name}:ckpt-step-{step}",
            "fine_tuning_job_id": self.job_id,
            "step_number": step,
            "metrics": {"step": step, "train_loss": self.last.get("loss"), "valid_loss": self.val_bpb},
        }
        self.store.add_checkpoint(self.job_id, checkpoint)
        self.store.add_event(self.job_id, f"Checkpoint saved at step {step}.", data={"step": step})

    def should_stop(self) -> bool:
        return self.store.cancel_requested_at(self.job_id) is not None


def run_training_job(job_id: str) -> dict[str, Any]:
    """Run (or resume) fine-tuning job ``job_id``; returns a small summary (RQ keeps it as the job's result)."""
    settings = Settings()
    store, record = open_job(settings, FT, job_id, FineTuningJobRecord)
    if record.status.terminal:
        return {"status": record.status.value}
    if store.cancel_requested_at(job_id) is not None:
        store.set_status(FT, job_id, JobStatus.CANCELLED)
        store.add_event(job_id, "Job cancelled before it started.")
        return {"status": "cancelled"}

    started = time.monotonic()
    attempt = record.attempt + 1
    folder = job_folder(settings, job_id)
    out_dir = folder / "checkpoint"
    resume_step = checkpoint_step(out_dir)
    store.set_status(FT, job_id, JobStatus.RUNNING, attempt=attempt, started_at=record.started_at or int(now()))
    if resume_step is not None:
        store.add_event(
            job_id,
            f"Resuming from the checkpoint at step {resume_step} (attempt {attempt}).",
            data={"resumed_from_step": resume_step, "attempt": attempt},
        )
    else:
        store.add_event(job_id, f"Fine-tuning job started (attempt {attempt}).", data={"attempt": attempt})

    model_name = fine_tuned_name(record.base_preset, record.suffix, job_id)
    try:
        result = _train(settings, store, record, out_dir, model_name, attempt, resume_step)
    except BaseException as exc:
        if (
            record.hyperparameters.workers > 1
            and is_group_loss(exc)
            and _requeue_after_group_loss(store, job_id, exc, out_dir)
        ):
            raise  # RQ puts the job back on its queue (a retry is left)
        _fail(store, job_id, exc, started)
        raise

    if result.status == "stopped":
        store.set_status(FT, job_id, JobStatus.CANCELLED)
        store.add_event(
            job_id, f"Job cancelled at step {result.steps}; its last checkpoint was kept.", data={"step": result.steps}
        )
        store.observe_duration(FT, "cancelled", time.monotonic() - started)
        return {"status": "cancelled", "steps": result.steps}

    models = ModelStore(settings.resolved_model_store_dir, redis_client=store.redis)
    from axl_model.checkpoint import STATE_JSON, STATE_TENSORS
    from axl_model.config import ModelConfig

    config = ModelConfig.from_checkpoint(out_dir)
    entry = models.add(
        model_name,
        out_dir,
        base=record.base_preset,
        base_model=record.model,
        specialist=record.specialist,
        job_id=job_id,
        context_length=config.max_seq_len,
        val_bpb=result.val_bpb,
        steps=result.steps,
    )
    shutil.rmtree(f"{out_dir}.run", ignore_errors=True)  # prepared data and logs of the run
    for state_file in (STATE_JSON, STATE_TENSORS):  # optimizer state: needed to resume this job, not to serve
        (models.path(model_name) / state_file).unlink(missing_ok=True)
    store.set_status(
        FT,
        job_id,
        JobStatus.SUCCEEDED,
        fine_tuned_model=model_name,
        result_metrics=TrainingResult(
            val_bpb=result.val_bpb, train_loss=result.train_loss, steps=result.steps, bytes_per_s=result.bytes_per_s
        ),
    )
    store.add_event(
        job_id,
        f"New fine-tuned model created: {model_name}",
        data={"model": model_name, "val_bpb": result.val_bpb, "steps": result.steps, "folder": entry["folder"]},
    )
    store.add_event(job_id, "The job has successfully completed.")
    store.observe_duration(FT, "succeeded", time.monotonic() - started)
    return {"status": "succeeded", "model": model_name, "steps": result.steps, "val_bpb": result.val_bpb}


def train_config(settings: Settings, store: JobStore, record: FineTuningJobRecord, out_dir: Path) -> Any:
    """The ``axl_model.train.TrainConfig`` of a job (a group's members take rank 0's; see ``group``)."""
    from axl_model.optim import DEFAULT_LR
    from axl_model.train import TrainConfig

    hp = record.hyperparameters
    if not isinstance(hp.batch_size, int) or hp.seq_len is None:  # the gateway resolves both when it creates a job
        raise ValueError(f"job {record.id} has no resolved batch_size and seq_len")
    optimizer = hp.optimizer or "lion"
    multiplier = hp.learning_rate_multiplier
    lr = DEFAULT_LR[optimizer] * float(multiplier) if multiplier not in (None, "auto") else None
    n_epochs = hp.n_epochs
    init_from = None
    if record.base_kind == "store":
        init_from = str(ModelStore(settings.resolved_model_store_dir).path(record.model))
    return TrainConfig(
        out_dir=str(out_dir),
        preset=record.base_preset,
        init_from=init_from,
        data=[data_path(settings, store, record.training_file)],
        val_data=[data_path(settings, store, record.validation_file)] if record.validation_file else None,
        max_steps=hp.max_steps,
        max_time=hp.max_time_seconds,
        epochs=None if n_epochs in (None, "auto") else float(n_epochs),
        batch_size=hp.batch_size,
        seq_len=hp.seq_len,
        lr=lr,
        optimizer=optimizer,
        eval_interval=settings.default_eval_interval,
        checkpoint_interval=hp.checkpoint_interval or settings.default_checkpoint_interval,
        seed=record.seed,
        resume=True,
        num_threads=settings.num_threads,
        progress=False,
        min_lines=1,  # an uploaded plain-text file is one document, however short
        check_ram=True,
    )


def _train(
    settings: Settings,
    store: JobStore,
    record: FineTuningJobRecord,
    out_dir: Path,
    model_name: str,
    attempt: int,
    resume_step: int | None,
) -> Any:
    """Train as rank 0 of the job's group (alone unless ``hyperparameters.workers`` > 1)."""
    from axl_model.train import TrainCallbacks, train

    config = train_config(settings, store, record, out_dir)
    progress = _Progress(store, record.id, model_name)
    callbacks = TrainCallbacks(
        on_step=progress.on_step,
        on_eval=progress.on_eval,
        on_checkpoint=progress.on_checkpoint,
        should_stop=progress.should_stop,
    )
    with coordinate(settings, store, record, attempt, config.to_dict(), resume_step) as group:
        return train(config, callbacks, group=group)


def _requeue_after_group_loss(store: JobStore, job_id: str, exc: BaseException, folder: Path) -> bool:
    """A rank of the job's group died or went silent: requeue the job through RQ's retries (the next attempt forms
    a new group and resumes from the last checkpoint) and say so. False when no retry is left."""
    from rq import get_current_job

    job = get_current_job()
    if job is None or not job.retries_left:
        return False
    step = checkpoint_step(folder)
    where = f"the checkpoint at step {step}" if step is not None else "the start (no checkpoint yet)"
    # gloo's message starts with its source file ("[.../pair.cc:553] Connection closed by peer [addr]:port. ...")
    reason = re.sub(r"^\[[^\]]*\]\s*", "", (str(exc).strip().splitlines() or [type(exc).__name__])[0])
    reason = reason.split(". ")[0].rstrip(".")
    store.set_status(FT, job_id, JobStatus.QUEUED)
    store.add_event(
        job_id,
        f"The training group lost a rank ({reason}); requeued ({job.retries_left - 1} retries "
        f"left). The next attempt forms a new group and resumes from {where}.",
        level="warn",
        data={"resume_step": step, "error": str(exc)[:500]},
    )
    return True


def _fail(store: JobStore, job_id: str, exc: BaseException, started: float) -> None:
    """Record the failure and keep RQ from retrying a job that would fail the same way again."""
    from rq import get_current_job

    job = get_current_job()
    if job is not None:
        job.retries_left = 0
    if isinstance(exc, NotEnoughWorkers):
        code, message = exc.code, str(exc)
    elif isinstance(exc, ValueError):
        code, message = "invalid_training_job", str(exc)
    elif isinstance(exc, MemoryError):
        code, message = "out_of_memory", "The trainer ran out of memory; lower batch_size or seq_len."
    elif isinstance(exc, (SystemExit, KeyboardInterrupt)):
        code, message = "worker_stopped", f"The worker stopped the job ({type(exc).__name__})."
    elif is_group_loss(exc):  # only a job trained by a group raises these; its retries are spent
        code, message = "training_group_lost", f"The training group lost a rank and no retry is left: {exc}"
    else:
        code, message = "training_error", f"{type(exc).__name__}: {exc}"
    logger.exception("fine-tuning job %s failed", job_id)
    if store.set_status(FT, job_id, JobStatus.FAILED, error=JobError(code=code, message=message)):
        store.add_event(job_id, f"Job failed: {message}", level="error")
        store.observe_duration(FT, "failed", time.monotonic() - started)
