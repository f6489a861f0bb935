"""Settings of the trainer worker (env prefix ``AXL_``); the job system's own settings come from JobsSettings."""

from __future__ import annotations

from pydantic import Field

from axl_mesh.jobs import JobsSettings


class Settings(JobsSettings):
    """The trainer serves ``/healthz`` and ``/metrics`` on :8960 and trains one job at a time."""

    port: int = Field(default=8960, ge=0, le=65535)
    num_threads: int | None = Field(default=None, ge=1, description="torch threads per job; None: every core")
    default_checkpoint_interval: int = Field(default=50, ge=1, description="steps between checkpoints")
    default_eval_interval: int = Field(default=100, ge=0)
    default_specialist: str = "coder"
    # A job with hyperparameters.workers = N > 1 (services.trainer_worker.group): how long its first trainer waits
    # for N - 1 others to join before it runs with what it has (or fails, below min_workers), and how long one
    # collective step (gradients, barriers) may wait for a silent peer before the group is declared lost.
    train_group_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    train_group_collective_timeout_seconds: float = Field(default=600.0, ge=10)

    def memory_bytes(self) -> int | None:
        """What a job may use: AXL_TRAINER_MEMORY_BYTES, else this machine's MemTotal."""
        from axl_mesh.jobs import machine_memory_bytes

        return self.trainer_memory_bytes or machine_memory_bytes()
