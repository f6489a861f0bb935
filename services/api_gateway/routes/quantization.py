"""Quantization jobs (our extension): GGUF files (F16, Q8_0, Q4_K_M) of a model-store model, downloadable."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from rq import Retry

from axl_mesh.errors import InvalidRequestError, NotFoundError
from axl_mesh.jobs import QUANTIZE_FUNCTION, JobKind, QueueName, new_id, now, rq_queue, valid_id
from axl_mesh.jobs_protocol import JobStatus, QuantizationJob, QuantizationJobCreate, QuantizationJobList
from axl_mesh.model_store import ModelStoreError
from services.api_gateway.routes.files import JobsContext, JobsDep

router = APIRouter(prefix="/v1/quantization/jobs", tags=["quantization"])

Q = JobKind.QUANTIZE
QUANTIZATION_TIMEOUT_SECONDS = 4 * 3600


def get_record(ctx: JobsContext, job_id: str) -> QuantizationJob:
    record = ctx.store.read(Q, job_id, QuantizationJob) if valid_id("q", job_id) else None
    if record is None:
        raise NotFoundError(f"No quantization job with id {job_id!r}.", param="quantization_job_id")
    return record


@router.post("", response_model=QuantizationJob)
def create_quantization_job(body: QuantizationJobCreate, ctx: JobsDep) -> QuantizationJob:
    """Queue GGUF export of a model-store model in the given types."""
    try:
        entry = ctx.models.get(body.model)
    except ModelStoreError:
        entry = None
    if entry is None:
        names = ", ".join(sorted(ctx.models.entries())) or "none yet"
        raise InvalidRequestError(
            f"Model {body.model!r} is not in the model store (models: {names}).", param="model", code="model_not_found"
        )
    job_id = new_id("qjob")
    record = QuantizationJob(
        id=job_id,
        created_at=int(now()),
        model=body.model,
        types=list(dict.fromkeys(t.value for t in body.types)),
        status=JobStatus.QUEUED,
    )
    ctx.store.create(Q, record)
    rq_queue(QueueName.QUANTIZE, ctx.rq).enqueue(
        QUANTIZE_FUNCTION,
        job_id,
        job_id=job_id,
        job_timeout=QUANTIZATION_TIMEOUT_SECONDS,
        retry=Retry(max=ctx.settings.job_retries),
        description=f"quantize {body.model}",
    )
    return ctx.store.read(Q, job_id, QuantizationJob) or record


@router.get("", response_model=QuantizationJobList)
def list_quantization_jobs(
    ctx: JobsDep, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> QuantizationJobList:
    """Quantization jobs, newest first."""
    records, has_more = ctx.store.read_page(Q, after, limit, QuantizationJob)
    return QuantizationJobList(data=records, has_more=has_more)


@router.get("/{job_id}", response_model=QuantizationJob)
def retrieve_quantization_job(job_id: str, ctx: JobsDep) -> QuantizationJob:
    """One quantization job and, once it succeeded, its files."""
    return get_record(ctx, job_id)


@router.get("/{job_id}/files/{filename}")
def download_file(job_id: str, filename: str, ctx: JobsDep) -> FileResponse:
    """A produced GGUF file (or its Ollama Modelfile); only names the job recorded are served."""
    record = get_record(ctx, job_id)
    modelfiles = {(o.details or {}).get("modelfile") for o in record.outputs}
    allowed = {o.filename for o in record.outputs} | {m for m in modelfiles if isinstance(m, str)}
    if filename not in allowed:
        raise NotFoundError(f"Quantization job {job_id} has no file {filename!r}.", param="filename")
    path = ctx.settings.resolved_jobs_dir / job_id / filename
    if not path.is_file():
        raise NotFoundError(f"File {filename!r} of {job_id} is gone from disk.", param="filename")
    return FileResponse(path, media_type="application/octet-stream", filename=filename)
