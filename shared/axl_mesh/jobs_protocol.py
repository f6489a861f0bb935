"""Wire schemas of the files, fine-tuning and quantization APIs (OpenAI's shapes, so the ``openai`` SDK works), and
the records Redis holds for them.

Fields follow OpenAI's reference order; our extensions sit in blocks marked ``# --- AXL extensions``. Services
import these; they do not redefine them. A record in Redis is the public object (:class:`FileObject`,
:class:`QuantizationJob`) or, for a fine-tuning job, the public object and the trainer's fields
(:class:`FineTuningJobRecord`); ``axl_mesh.jobs.JobStore`` writes and reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator

# Ids we mint; validated wherever they come back from a client (they name Redis keys and files, never raw paths).
FILE_ID_PATTERN = r"^file-[0-9a-f]{24}$"
FT_JOB_ID_PATTERN = r"^ftjob-[0-9a-f]{24}$"
QUANT_JOB_ID_PATTERN = r"^qjob-[0-9a-f]{24}$"
SUFFIX_PATTERN = r"^[A-Za-z0-9_-]{1,40}$"
# What "auto" (or nothing) means for a fine-tuning job's batch_size and seq_len.
DEFAULT_BATCH_SIZE = 8
DEFAULT_SEQ_LEN = 256
MAX_TRAIN_WORKERS = 64  # hyperparameters.workers: trainer workers in one job's torch.distributed group


class FilePurpose(StrEnum):
    FINE_TUNE = "fine-tune"


class JobStatus(StrEnum):
    """Status of a fine-tuning or quantization job; the last three are terminal."""

    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class Optimizer(StrEnum):
    LION = "lion"
    ADAMW = "adamw"
    SGD = "sgd"


class GGUFType(StrEnum):
    """GGUF types the quantizer produces (llama.cpp's names, lower case)."""

    F16 = "f16"
    Q8_0 = "q8_0"
    Q4_K_M = "q4_k_m"


# --- files ----------------------------------------------------------------------------------------------------


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str = FilePurpose.FINE_TUNE.value
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    # --- AXL extensions
    format: Literal["jsonl", "text"] = Field(description="how the trainer reads it: JSONL pairs or plain text/code")
    lines: int = 0


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# --- fine-tuning ----------------------------------------------------------------------------------------------


def _auto_or(kind: type, low: float, high: float) -> Callable[[Any], Any]:
    """ "auto" or a number of ``kind`` in [low, high], with one clear message (a plain union reports per branch)."""

    def check(value: Any) -> Any:
        if value == "auto":
            return value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and kind is int and float(value) != int(value):
            ok = False
        if not ok or not low <= value <= high:
            raise ValueError(
                f"must be 'auto' or {'an integer' if kind is int else 'a number'} from {low:g} to "
                f"{high:g}, got {value!r}"
            )
        return kind(value)

    return check


def _auto_or_schema(kind: type, low: float, high: float) -> WithJsonSchema:
    """The JSON schema of :func:`_auto_or` (the union's own schema would allow any string)."""
    number = {"type": "integer" if kind is int else "number", "minimum": low, "maximum": high}
    return WithJsonSchema({"anyOf": [{"type": "string", "enum": ["auto"]}, number], "default": "auto"})


class Hyperparameters(BaseModel):
    """OpenAI's three knobs ("auto" means our default), then our extensions."""

    model_config = ConfigDict(extra="forbid")

    batch_size: Annotated[int | str, BeforeValidator(_auto_or(int, 1, 512)), _auto_or_schema(int, 1, 512)] = "auto"
    learning_rate_multiplier: Annotated[
        float | str, BeforeValidator(_auto_or(float, 1e-6, 100)), _auto_or_schema(float, 1e-6, 100)
    ] = "auto"
    n_epochs: Annotated[int | str, BeforeValidator(_auto_or(int, 1, 1000)), _auto_or_schema(int, 1, 1000)] = "auto"
    # --- AXL extensions: bounds of a run on the CPU and the shape of training
    max_time_seconds: Annotated[float, Field(gt=0, le=7 * 24 * 3600)] | None = None
    max_steps: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    optimizer: Optimizer = Optimizer.LION
    seq_len: Annotated[int, Field(ge=8, le=65536)] | None = None
    specialist: Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,40}$")] | None = None
    checkpoint_interval: Annotated[int, Field(ge=1)] | None = None
    # Trainer workers that train the job together as one torch.distributed group (batch_size is per worker), and
    # the fewest it may start with when no more join within AXL_TRAIN_GROUP_TIMEOUT_SECONDS (None: 1, run with what
    # it has; = workers: fail instead). JSON integers only: a group size is never "2.5" or true.
    workers: Annotated[int, Field(ge=1, le=MAX_TRAIN_WORKERS, strict=True)] = 1
    min_workers: Annotated[int, Field(ge=1, le=MAX_TRAIN_WORKERS, strict=True)] | None = None

    @field_validator("min_workers")
    @classmethod
    def _min_within_workers(cls, value: int | None, info: ValidationInfo) -> int | None:
        workers = info.data.get("workers")
        if value is not None and workers is not None and value > workers:
            raise ValueError(f"min_workers ({value}) cannot exceed workers ({workers})")
        return value

    def resolved_batch_size(self) -> int:
        return DEFAULT_BATCH_SIZE if self.batch_size == "auto" else int(self.batch_size)

    def resolved_seq_len(self, window: int) -> int:
        """``seq_len``, or DEFAULT_SEQ_LEN bytes (at most the model's ``window``) when it is not given."""
        return self.seq_len or min(DEFAULT_SEQ_LEN, window)


class FineTuningJobCreate(BaseModel):
    """``POST /v1/fine_tuning/jobs``: ``model`` is a preset (train from scratch) or a model-store id (continue)."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=200)]
    training_file: Annotated[str, Field(pattern=FILE_ID_PATTERN)]
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    suffix: Annotated[str, Field(pattern=SUFFIX_PATTERN)] | None = None
    validation_file: Annotated[str, Field(pattern=FILE_ID_PATTERN)] | None = None
    integrations: list[Any] | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: dict[str, str] | None = None
    # --- AXL extensions
    quantize: list[GGUFType] = Field(default_factory=list, description="GGUF types to produce when training succeeds")

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("integrations are not supported by this server")
        return value


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class HyperparametersOut(BaseModel):
    batch_size: int | Literal["auto"] | None = None
    learning_rate_multiplier: float | Literal["auto"] | None = None
    n_epochs: int | Literal["auto"] | None = None
    # --- AXL extensions
    max_time_seconds: float | None = None
    max_steps: int | None = None
    optimizer: str | None = None
    seq_len: int | None = None
    specialist: str | None = None
    checkpoint_interval: int | None = None
    workers: int = 1
    min_workers: int | None = None


class JobProgress(BaseModel):
    """Live numbers of a running job (AXL extension)."""

    step: int = 0
    loss: float | None = None
    val_bpb: float | None = None
    bytes_per_s: float | None = None
    updated_at: float | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: HyperparametersOut
    model: str
    organization_id: str = "axl"
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: JobStatus
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None
    # --- AXL extensions
    suffix: str | None = None
    quantize: list[str] = Field(default_factory=list)
    quantization_jobs: list[str] = Field(default_factory=list)
    attempt: int = 0
    progress: JobProgress | None = None
    ram_estimate_bytes: int | None = None


class TrainingResult(BaseModel):
    """What a succeeded training job measured (kept in its record for the operator; not in OpenAI's object)."""

    val_bpb: float | None = None
    train_loss: float | None = None
    steps: int | None = None
    bytes_per_s: float | None = None


class FineTuningJobRecord(FineTuningJob):
    """A fine-tuning job as Redis holds it (``axl_mesh.jobs.JobStore``): the public object, which the gateway's
    routes read and return, and what only the trainer reads. The gateway writes it when the job is created; the
    trainer worker reads it and updates its fields (each write is checked against this model)."""

    base_kind: Literal["preset", "store"]  # train a preset from scratch, or continue a model-store model
    base_preset: str  # the preset at the root of ``model`` (names the fine-tuned model)
    specialist: str  # the prompt layout the model serves with
    started_at: int | None = None  # when the first attempt started (attempts after a requeue keep it)
    result_metrics: TrainingResult | None = None

    def public(self) -> FineTuningJob:
        """The object the API returns."""
        return FineTuningJob.model_validate(self.model_dump(include=set(FineTuningJob.model_fields)))


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool = False


class EventType(StrEnum):
    MESSAGE = "message"
    METRICS = "metrics"


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"] = "info"
    message: str
    data: dict[str, Any] | None = None
    type: EventType = EventType.MESSAGE


class FineTuningJobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool = False


class CheckpointMetrics(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    valid_loss: float | None = None
    full_valid_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class FineTuningJobCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


# --- quantization (AXL extension) ------------------------------------------------------------------------------


class QuantizationJobCreate(BaseModel):
    """``POST /v1/quantization/jobs``: GGUF files of a model-store model."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=200)]
    types: Annotated[list[GGUFType], Field(min_length=1, max_length=3)] = Field(default_factory=lambda: [GGUFType.Q8_0])


class QuantizationOutput(BaseModel):
    type: str
    filename: str
    bytes: int
    url: str = Field(description="where to download it from this gateway")
    details: dict[str, Any] | None = None


class QuantizationJob(BaseModel):
    id: str
    object: Literal["quantization.job"] = "quantization.job"
    created_at: int
    finished_at: int | None = None
    model: str
    types: list[str]
    status: JobStatus
    error: JobError | None = None
    outputs: list[QuantizationOutput] = Field(default_factory=list)
    fine_tuning_job_id: str | None = Field(default=None, description="set when training asked for this job")


class QuantizationJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[QuantizationJob]
    has_more: bool = False
