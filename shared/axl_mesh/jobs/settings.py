"""Settings of the job system (env prefix ``AXL_``): data folders, retention, and RQ's timeouts and heartbeats."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from axl_mesh.settings import ServiceSettings


class JobsSettings(ServiceSettings):
    """Settings of the job system, read by the gateway's job routes and by both workers (env prefix ``AXL_``)."""

    data_dir: Path = Field(default=Path("data"), description="uploaded files, job folders and the model store")
    files_dir: Path | None = None  # default data_dir/files
    jobs_dir: Path | None = None  # default data_dir/jobs: one folder per training job (its checkpoint)
    model_store_dir: Path | None = None  # default data_dir/models
    jobs_key_prefix: str = Field(default="axl:jobs", min_length=1)
    max_file_bytes: int = Field(default=64 << 20, ge=1)
    # The RAM a training job may use; None: what live trainers announce, else this machine's MemTotal.
    trainer_memory_bytes: int | None = Field(default=None, ge=1)
    job_timeout_seconds: int = Field(default=24 * 3600, ge=60, description="RQ's per-job time limit")
    job_retries: int = Field(default=5, ge=1, description="requeues after a worker died mid-job")
    heartbeat_interval_seconds: int = Field(default=5, ge=1)
    heartbeat_ttl_seconds: int = Field(default=15, ge=3, description="a started job not heard from this long is dead")
    reaper_interval_seconds: float = Field(default=5.0, gt=0)
    cancel_grace_seconds: float = Field(default=30.0, ge=0)
    # Retention: a job logs about one event a second while it trains; keep its newest events, and let a finished
    # job's keys (record, events, checkpoints list, cancel flag) expire.
    job_events_max: int = Field(default=1000, ge=10, description="events kept per fine-tuning job (older trimmed)")
    finished_job_ttl_seconds: int = Field(
        default=30 * 24 * 3600, ge=60, description="a finished job's records are deleted this long after it ends"
    )

    @property
    def resolved_files_dir(self) -> Path:
        return self.files_dir or self.data_dir / "files"

    def uploaded_file(self, file_id: str, fmt: str) -> Path:
        """Where an uploaded file lives (the gateway writes it, the trainer reads it): built from our validated id
        and its format (``FileObject.format``), never from the client's filename."""
        return self.resolved_files_dir / f"{file_id}{'.jsonl' if fmt == 'jsonl' else '.txt'}"

    @property
    def resolved_jobs_dir(self) -> Path:
        return self.jobs_dir or self.data_dir / "jobs"

    @property
    def resolved_model_store_dir(self) -> Path:
        return self.model_store_dir or self.data_dir / "models"
