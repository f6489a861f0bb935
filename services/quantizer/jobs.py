"""The quantization job: GGUF files of one model-store model, written to ``<jobs_dir>/<qjob id>/``.

    run_quantization_job("qjob-…")

A job created by a fine-tuning job runs after it whatever happened (RQ dependency with ``allow_failure``) and
ends ``cancelled`` when training did not succeed. Files are exported with ``axl_model.export.gguf`` (llama.cpp's
own quantizer for the llama kind); each output's per-tensor types and warnings land in the record, and the
model-store entry lists the files.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, cast

from axl_mesh.jobs import JobKind, now, open_job
from axl_mesh.jobs_protocol import FineTuningJob, JobError, JobStatus, QuantizationJob, QuantizationOutput
from axl_mesh.model_store import ModelStore
from services.quantizer.settings import Settings

if TYPE_CHECKING:
    from axl_model.export.formats import GGUFType

logger = logging.getLogger(__name__)

Q, FT = JobKind.QUANTIZE, JobKind.FINE_TUNE


def run_quantization_job(job_id: str) -> dict[str, Any]:
    """Run quantization job ``job_id``; returns the produced file names."""
    settings = Settings()
    store, record = open_job(settings, Q, job_id, QuantizationJob)
    if record.status.terminal:
        return {"status": record.status.value}
    model = record.model
    if record.fine_tuning_job_id:
        training = store.read(FT, record.fine_tuning_job_id, FineTuningJob)
        ended = training.status.value if training is not None else None
        if training is None or training.status != JobStatus.SUCCEEDED or not training.fine_tuned_model:
            store.set_status(
                Q,
                job_id,
                JobStatus.CANCELLED,
                error=JobError(
                    code="training_not_succeeded",
                    message=f"fine-tuning job {record.fine_tuning_job_id} ended {ended!r}; nothing to quantize",
                ),
            )
            return {"status": "cancelled"}
        model = training.fine_tuned_model
    if store.cancel_requested_at(job_id) is not None:
        store.set_status(Q, job_id, JobStatus.CANCELLED)
        return {"status": "cancelled"}

    started = time.monotonic()
    store.set_status(Q, job_id, JobStatus.RUNNING, model=model)
    try:
        # The gateway took only jobs_protocol.GGUFType values, which are export's names too.
        outputs = _export(settings, model, job_id, cast("list[GGUFType]", record.types))
    except BaseException as exc:
        from rq import get_current_job

        job = get_current_job()
        if job is not None:
            job.retries_left = 0  # retries are for dead workers, not for an export that fails the same way again
        code = "invalid_quantization_job" if isinstance(exc, ValueError) else "quantization_error"
        logger.exception("quantization job %s failed", job_id)
        store.set_status(Q, job_id, JobStatus.FAILED, error=JobError(code=code, message=f"{type(exc).__name__}: {exc}"))
        store.observe_duration(Q, "failed", time.monotonic() - started)
        raise
    store.set_status(Q, job_id, JobStatus.SUCCEEDED, outputs=outputs)
    store.observe_duration(Q, "succeeded", time.monotonic() - started)
    if record.fine_tuning_job_id:
        store.add_event(
            record.fine_tuning_job_id,
            f"GGUF files written by {job_id}: " + ", ".join(o.filename for o in outputs),
            data={"quantization_job": job_id},
        )
    return {"status": "succeeded", "files": [o.filename for o in outputs]}


def _export(settings: Settings, model: str, job_id: str, types: list[GGUFType]) -> list[QuantizationOutput]:
    from axl_model.export.gguf import export_checkpoint

    models = ModelStore(settings.resolved_model_store_dir)
    entry = models.get(model)
    if entry is None:
        raise ValueError(f"the model store has no model {model!r}")
    out_dir = settings.resolved_jobs_dir / job_id
    safe_name = model.replace(":", "-")  # a validated model name; ':' only makes shell use awkward
    report = export_checkpoint(
        models.path(model),
        out_dir,
        types=types,
        kinds=settings.kinds(),
        specialist=entry.get("specialist"),
        name=safe_name,
        progress=False,
    )
    outputs: list[QuantizationOutput] = []
    gguf = dict(entry.get("gguf", {}))
    for file in report.files:
        details = {
            "kind": file.kind,
            "tensor_types": file.type_counts(),
            "fallbacks": file.fallbacks,
            "warnings": list(file.warnings) + list(report.warnings) if file.kind == "llama" else list(file.warnings),
            "modelfile": file.modelfile.name if file.modelfile else None,
        }
        outputs.append(
            QuantizationOutput(
                type=file.type,
                filename=file.path.name,
                bytes=file.size_bytes,
                url=f"/v1/quantization/jobs/{job_id}/files/{file.path.name}",
                details=details,
            )
        )
        gguf[f"{file.kind}-{file.type}"] = {"job": job_id, "filename": file.path.name, "created": int(now())}
    models.set_field(model, "gguf", gguf)
    return outputs
