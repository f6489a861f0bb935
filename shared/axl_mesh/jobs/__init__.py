"""Jobs shared by the gateway and the workers: settings, queue names, Redis keys, job records and events, the
reaper that recovers jobs of dead workers, and the Prometheus collector of the job system. Imports no torch.

One module per concern (``names``, ``settings``, ``store``, ``groups``, ``queues``, ``reaper``, ``metrics``,
``worker``, ``memory``); this package re-exports their public names, so ``from axl_mesh.jobs import X`` is the
import to use.

Who writes what:
- the gateway creates a record (``validating_files`` -> ``queued``) and enqueues an RQ job whose id is the
  record's id (``ftjob-...`` on ``axl-train``, ``qjob-...`` on ``axl-quantize``); a train job with ``quantize``
  gets quantization jobs that depend on it (``allow_failure``: they run after it whatever happens, and end
  ``cancelled`` themselves when training did not succeed);
- the worker's job function moves the record to ``running``, appends events, updates ``progress`` each step, and
  ends it ``succeeded``/``failed``/``cancelled``; for a train job with ``hyperparameters.workers`` N > 1 it is rank
  0 of a group: it writes the group record (``groups``) and enqueues N-1 member jobs (``ftjob-...-attemptA-memberI``,
  ``TRAIN_MEMBER_FUNCTION``, no retries) that idle trainers run as the other ranks (they add events about
  themselves, never record fields);
- :class:`Reaper` (a thread in every worker) cleans RQ's started registries every ``reaper_interval_seconds``,
  which requeues the job of a worker that died (``Retry`` on every job), notes that in the record, and enforces
  cancellation: a running job whose cancel flag is older than the grace period gets RQ's stop-job command.

What Redis holds is data, never code: RQ's JSON serializer everywhere (``rq_queue``, ``fetch_rq_job``,
``build_worker``; RQ's default unpickles), and a worker runs only our job functions (``JOB_FUNCTIONS``).
Retention: events are capped per job and read by page, a finished job's keys expire, and the reaper and metrics
read only the set of active jobs (see :class:`JobStore`).

Why RQ with changed defaults (measured in issue 4): a job timeout of hours (not 180 s), ``Retry`` on every job so
the started-registry cleanup requeues instead of failing, a heartbeat TTL of seconds (RQ's is the monitoring
interval + 60 s, which would put a dead worker's job back only after minutes), and our own cancel flag because
``Job.cancel()`` does not stop a running job.
"""

from axl_mesh.jobs.groups import GroupStore, GroupView, Member
from axl_mesh.jobs.memory import machine_memory_bytes, model_config, preset_names
from axl_mesh.jobs.metrics import JobsCollector
from axl_mesh.jobs.names import (
    QUANTIZE_FUNCTION,
    TRAIN_FUNCTION,
    TRAIN_MEMBER_FUNCTION,
    JobKind,
    QueueName,
    new_id,
    now,
    valid_id,
)
from axl_mesh.jobs.queues import (
    JOB_FUNCTIONS,
    ForeignJobError,
    fetch_rq_job,
    rq_connection,
    rq_job_class,
    rq_queue,
    rq_serializer,
)
from axl_mesh.jobs.reaper import Reaper
from axl_mesh.jobs.settings import JobsSettings
from axl_mesh.jobs.store import DURATION_BUCKETS, FILE_KIND, RECORD_MODELS, JobStore, open_job, open_store
from axl_mesh.jobs.worker import build_worker, run_worker, serve_health_and_metrics

__all__ = [
    "DURATION_BUCKETS",
    "FILE_KIND",
    "JOB_FUNCTIONS",
    "QUANTIZE_FUNCTION",
    "RECORD_MODELS",
    "TRAIN_FUNCTION",
    "TRAIN_MEMBER_FUNCTION",
    "ForeignJobError",
    "GroupStore",
    "GroupView",
    "JobKind",
    "JobStore",
    "JobsCollector",
    "JobsSettings",
    "Member",
    "QueueName",
    "Reaper",
    "build_worker",
    "fetch_rq_job",
    "machine_memory_bytes",
    "model_config",
    "new_id",
    "now",
    "open_job",
    "open_store",
    "preset_names",
    "rq_connection",
    "rq_job_class",
    "rq_queue",
    "rq_serializer",
    "run_worker",
    "serve_health_and_metrics",
    "valid_id",
]
