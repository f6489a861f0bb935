"""Fine-tuning jobs (OpenAI's fine-tuning API): create, list, retrieve, cancel, events, checkpoints.

``model`` is a preset (train from scratch) or a model-store model (continue training it). A job is checked before
it is queued: its files exist, its hyperparameters fit the model, and its RAM estimate fits the trainer.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from rq import Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Dependency

from axl_mesh.errors import InvalidRequestError, NotFoundError
from axl_mesh.jobs import (
    QUANTIZE_FUNCTION,
    TRAIN_FUNCTION,
    JobKind,
    QueueName,
    fetch_rq_job,
    machine_memory_bytes,
    model_config,
    new_id,
    now,
    rq_queue,
    valid_id,
)
from axl_mesh.jobs_protocol import (
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCheckpointList,
    FineTuningJobCreate,
    FineTuningJobEvent,
    FineTuningJobEventList,
    FineTuningJobList,
    FineTuningJobRecord,
    HyperparametersOut,
    JobStatus,
    QuantizationJob,
)
from axl_mesh.model_store import ModelStoreError
from services.api_gateway.routes.files import JobsContext, JobsDep, get_file_record

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

FT = JobKind.FINE_TUNE
RESULT_TTL_SECONDS = 7 * 24 * 3600


def get_job_record(ctx: JobsContext, job_id: str) -> FineTuningJob:
    """The job as the API shows it (its record without the trainer's fields); a 404 when there is none."""
    record = ctx.store.read(FT, job_id, FineTuningJob) if valid_id("ft", job_id) else None
    if record is None:
        raise _no_such_job(job_id)
    return record


def require_job(ctx: JobsContext, job_id: str) -> None:
    """A 404 unless the job exists (its events and checkpoints need nothing else of its record)."""
    if not valid_id("ft", job_id) or not ctx.store.redis.exists(ctx.store.key(FT, job_id)):
        raise _no_such_job(job_id)


def _no_such_job(job_id: str) -> NotFoundError:
    return NotFoundError(f"No fine-tuning job with id {job_id!r}.", param="fine_tuning_job_id")


def _base(ctx: JobsContext, model: str) -> tuple[str, str, Any, dict[str, Any] | None]:
    """(kind, root preset, ModelConfig, store entry) of the model to start from."""
    from axl_mesh.jobs import preset_names

    if model in preset_names():
        return "preset", model, model_config(preset=model), None
    try:
        entry = ctx.models.get(model)
        path = ctx.models.path(model) if entry else None
    except ModelStoreError:
        entry, path = None, None
    if entry is None or path is None:
        raise InvalidRequestError(
            f"Model {model!r} is neither a preset ({', '.join(preset_names())}) nor a model in the model store.",
            param="model",
            code="model_not_found",
        )
    return "store", entry.get("base") or model, model_config(config_file=path / "config.json"), entry


def _require_file(ctx: JobsContext, file_id: str, param: str) -> None:
    try:
        get_file_record(ctx, file_id, param=param)
    except NotFoundError:
        raise InvalidRequestError(
            f"File {file_id} ({param}) does not exist; upload it with POST /v1/files.", param=param, code="invalid_file"
        ) from None


def _memory_limit(ctx: JobsContext) -> tuple[int | None, str]:
    if ctx.settings.trainer_memory_bytes:
        return ctx.settings.trainer_memory_bytes, "AXL_TRAINER_MEMORY_BYTES"
    announced = ctx.store.trainer_memory_bytes()
    if announced:
        return announced, "the largest live trainer's memory"
    return machine_memory_bytes(), "this machine's memory"


@router.post("", response_model=FineTuningJob)
def create_job(body: FineTuningJobCreate, ctx: JobsDep) -> FineTuningJob:
    """Create a fine-tuning job: validated, checked against the trainer's RAM, then queued."""
    from axl_model.specialists import SPECIALISTS

    _require_file(ctx, body.training_file, "training_file")
    if body.validation_file:
        _require_file(ctx, body.validation_file, "validation_file")
    base_kind, base_preset, config, entry = _base(ctx, body.model)
    hp = body.hyperparameters
    specialist = hp.specialist or (entry or {}).get("specialist") or "coder"
    if specialist not in SPECIALISTS:
        raise InvalidRequestError(
            f"Unknown specialist {specialist!r}; choose one of: {', '.join(SPECIALISTS)}.",
            param="hyperparameters.specialist",
        )
    seq_len = hp.resolved_seq_len(config.max_seq_len)
    if seq_len > config.max_seq_len:
        raise InvalidRequestError(
            f"seq_len {seq_len} exceeds the model's window of {config.max_seq_len} bytes.",
            param="hyperparameters.seq_len",
        )
    batch_size = hp.resolved_batch_size()
    ram = config.training_ram_bytes(batch_size, seq_len, hp.optimizer.value)
    limit, source = _memory_limit(ctx)
    if limit is not None and ram > limit:
        raise InvalidRequestError(
            f"This job needs about {ram / 2**30:.2f} GiB of RAM to train ({body.model}, batch_size {batch_size}, "
            f"seq_len {seq_len}, {hp.optimizer.value}) but the trainer has {limit / 2**30:.2f} GiB ({source}). "
            "Lower batch_size or seq_len, or pick a smaller model.",
            param="hyperparameters",
            code="insufficient_memory",
        )

    job_id = new_id("ftjob")
    seed = body.seed if body.seed is not None else int.from_bytes(job_id.encode()[-4:], "big") % (2**31)
    hyperparameters = HyperparametersOut(**{**hp.model_dump(mode="json"), "batch_size": batch_size, "seq_len": seq_len})
    record = FineTuningJobRecord(
        id=job_id,
        created_at=int(now()),
        hyperparameters=hyperparameters,
        model=body.model,
        seed=seed,
        status=JobStatus.VALIDATING_FILES,
        training_file=body.training_file,
        validation_file=body.validation_file,
        metadata=body.metadata,
        suffix=body.suffix,
        quantize=[t.value for t in body.quantize],
        ram_estimate_bytes=ram,
        base_kind=base_kind,
        base_preset=base_preset,
        specialist=specialist,
    )
    ctx.store.create(FT, record)
    ctx.store.add_event(job_id, f"Created fine-tuning job: {job_id}", data={"ram_estimate_bytes": ram})
    ctx.store.add_event(job_id, "Validating training file: " + body.training_file)

    # Queued before it is enqueued: a fast worker may set "running" the moment the RQ job exists.
    quantization_id = _create_quantization_record(ctx, record) if body.quantize else None
    ctx.store.set_status(FT, job_id, JobStatus.QUEUED, quantization_jobs=[quantization_id] if quantization_id else [])
    ctx.store.add_event(job_id, "Files validated; job queued.")
    timeout = ctx.settings.job_timeout_seconds
    if hp.max_time_seconds:
        timeout = max(timeout, int(hp.max_time_seconds) + 3600)
    rq_queue(QueueName.TRAIN, ctx.rq).enqueue(
        TRAIN_FUNCTION,
        job_id,
        job_id=job_id,
        job_timeout=timeout,
        retry=Retry(max=ctx.settings.job_retries),
        result_ttl=RESULT_TTL_SECONDS,
        failure_ttl=RESULT_TTL_SECONDS,
        description=f"fine-tune {body.model}",
    )
    if quantization_id:
        from services.api_gateway.routes.quantization import QUANTIZATION_TIMEOUT_SECONDS

        # Runs once training ends, whatever way (it cancels itself unless training succeeded).
        rq_queue(QueueName.QUANTIZE, ctx.rq).enqueue(
            QUANTIZE_FUNCTION,
            quantization_id,
            job_id=quantization_id,
            job_timeout=QUANTIZATION_TIMEOUT_SECONDS,
            retry=Retry(max=ctx.settings.job_retries),
            depends_on=Dependency(jobs=[job_id], allow_failure=True),
            result_ttl=RESULT_TTL_SECONDS,
            failure_ttl=RESULT_TTL_SECONDS,
            description=f"quantize {job_id}",
        )
    return ctx.store.read(FT, job_id, FineTuningJob) or record.public()


def _create_quantization_record(ctx: JobsContext, record: FineTuningJobRecord) -> str:
    q_id = new_id("qjob")
    ctx.store.create(
        JobKind.QUANTIZE,
        QuantizationJob(
            id=q_id,
            created_at=int(now()),
            model=f"(the model of {record.id})",
            types=record.quantize,
            status=JobStatus.QUEUED,
            fine_tuning_job_id=record.id,
        ),
    )
    return q_id


@router.get("", response_model=FineTuningJobList)
def list_jobs(
    ctx: JobsDep, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> FineTuningJobList:
    """Fine-tuning jobs, newest first; ``after`` is the last id of the previous page."""
    records, has_more = ctx.store.read_page(FT, after, limit, FineTuningJob)
    return FineTuningJobList(data=records, has_more=has_more)


@router.get("/{job_id}", response_model=FineTuningJob)
def retrieve_job(job_id: str, ctx: JobsDep) -> FineTuningJob:
    """One fine-tuning job, with live progress while it runs."""
    return get_job_record(ctx, job_id)


@router.post("/{job_id}/cancel", response_model=FineTuningJob)
def cancel_job(job_id: str, ctx: JobsDep) -> FineTuningJob:
    """Cancel a job: a queued one never starts; a running one checkpoints and stops at its next step (or is
    killed after the grace period). The status ends ``cancelled`` either way."""
    record = get_job_record(ctx, job_id)
    if record.status.terminal:
        raise InvalidRequestError(
            f"Job {job_id} has already {record.status.value}; it cannot be cancelled.",
            param="fine_tuning_job_id",
            code="job_not_cancellable",
        )
    ctx.store.request_cancel(job_id)
    ctx.store.add_event(job_id, "Cancellation requested.")
    try:
        job = fetch_rq_job(job_id, ctx.rq)
        if job.get_status() in ("queued", "scheduled", "deferred"):
            job.cancel(enqueue_dependents=True)
            if ctx.store.set_status(FT, job_id, JobStatus.CANCELLED):
                ctx.store.add_event(job_id, "Job cancelled before it started.")
    except (NoSuchJobError, InvalidJobOperation):
        pass  # the worker (or the reaper) sees the flag and ends it
    return ctx.store.read(FT, job_id, FineTuningJob) or record


@router.get("/{job_id}/events", response_model=FineTuningJobEventList)
def list_events(
    job_id: str, ctx: JobsDep, after: str | None = None, limit: Annotated[int, Query(ge=1, le=10000)] = 20
) -> FineTuningJobEventList:
    """Events newest first (info messages and metrics: step, loss, validation bits per byte, bytes/s); ``after``
    is the last id of the previous page. Only the newest ``AXL_JOB_EVENTS_MAX`` events of a job are kept."""
    require_job(ctx, job_id)
    events, has_more = ctx.store.events_page(job_id, after, limit)
    return FineTuningJobEventList(data=[FineTuningJobEvent(**e) for e in events], has_more=has_more)


@router.get("/{job_id}/checkpoints", response_model=FineTuningJobCheckpointList)
def list_checkpoints(
    job_id: str, ctx: JobsDep, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 10
) -> FineTuningJobCheckpointList:
    """Checkpoints the job saved, newest first (the latest one is kept on disk and resumed from)."""
    require_job(ctx, job_id)
    checkpoints = list(reversed(ctx.store.checkpoints(job_id)))
    if after is not None:
        ids = [c["id"] for c in checkpoints]
        checkpoints = checkpoints[ids.index(after) + 1 :] if after in ids else []
    page = [FineTuningJobCheckpoint(**c) for c in checkpoints[:limit]]
    return FineTuningJobCheckpointList(
        data=page,
        has_more=len(checkpoints) > limit,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
    )
