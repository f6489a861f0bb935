"""The reaper: recovers the jobs of dead workers and enforces cancellation (a thread in every worker)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from axl_mesh.jobs.names import JobKind, now
from axl_mesh.jobs.queues import fetch_rq_job, rq_queue, rq_serializer
from axl_mesh.jobs.settings import JobsSettings
from axl_mesh.jobs.store import open_store
from axl_mesh.jobs_protocol import JobError, JobStatus

logger = logging.getLogger(__name__)


# How long a new job's record may exist without its RQ job (the gateway enqueues right after writing it).
ENQUEUE_GRACE_SECONDS = 30.0


class Reaper:
    """Recovers jobs of dead workers and enforces cancellation; one per worker process, in a thread.

    Every ``interval``: RQ's started-registry cleanup on each queue (a job whose worker stopped heart-beating is
    requeued while it has retries left, else failed), then a pass over the active (non-terminal) records only, never
    over every job ever made, to mirror what RQ did
    (requeued -> ``queued`` + an event; failed -> ``failed`` with the reason) and to stop cancelled jobs that did
    not stop themselves within the grace period. Several reapers may run at once: every step is idempotent.
    """

    def __init__(self, settings: JobsSettings, queues: Iterable[str], *, on_tick: Any = None) -> None:
        self.settings = settings
        self.queue_names = list(queues)
        self.store = open_store(settings)
        self.on_tick = on_tick
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Reaper:
        self._thread = threading.Thread(target=self._run, name="axl-reaper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the reaper must outlive a Redis hiccup
                logger.exception("reaper pass failed")
            self._stop.wait(self.settings.reaper_interval_seconds)

    def tick(self) -> None:
        from rq.command import send_stop_job_command
        from rq.exceptions import InvalidJobOperation, NoSuchJobError
        from rq.job import JobStatus as RQStatus

        if self.on_tick is not None:
            self.on_tick()
        conn = self.store.redis
        for name in self.queue_names:
            rq_queue(name, conn).started_job_registry.cleanup()
        for kind in (JobKind.FINE_TUNE, JobKind.QUANTIZE):
            self.store.prune_index(kind)
            for record_id in self.store.active_ids(kind):
                record = self.store.get(kind, record_id)
                if record is None or JobStatus(record["status"]).terminal:
                    self.store.forget_active(kind, record_id)  # gone or ended: nothing to watch
                    continue
                try:
                    job = fetch_rq_job(record_id, conn)
                    rq_status = job.get_status()
                except (NoSuchJobError, InvalidJobOperation):
                    # The gateway writes the record (validating, then queued) before it enqueues the RQ job: a tick
                    # between the two must not fail a job that is being created (it did: a flaky test's job ended
                    # before it began). Missing for longer than the grace, the job is lost.
                    age = now() - float(record.get("created_at") or 0)
                    if record["status"] != JobStatus.VALIDATING_FILES and age > ENQUEUE_GRACE_SECONDS:
                        self._fail(kind, record_id, "The job disappeared from the queue.", "job_lost")
                    continue
                cancel_at = self.store.cancel_requested_at(record_id)
                if rq_status == RQStatus.STARTED:
                    if cancel_at is not None and now() - cancel_at > self.settings.cancel_grace_seconds:
                        try:
                            send_stop_job_command(conn, record_id, serializer=rq_serializer())
                            self._note(kind, record_id, "Cancel grace period over; stopping the job's process.")
                        except InvalidJobOperation:
                            pass
                elif rq_status in (RQStatus.QUEUED, RQStatus.SCHEDULED) and record["status"] == JobStatus.RUNNING:
                    if cancel_at is not None:
                        job.cancel(enqueue_dependents=True)
                        self.store.set_status(kind, record_id, JobStatus.CANCELLED)
                        continue
                    self.store.set_status(kind, record_id, JobStatus.QUEUED)
                    self._note(
                        kind,
                        record_id,
                        "The worker running this job stopped; requeued "
                        f"({job.retries_left} retries left). The next attempt resumes from the last checkpoint.",
                        level="warn",
                    )
                elif rq_status in (RQStatus.FAILED, RQStatus.STOPPED):
                    if cancel_at is not None:
                        if self.store.set_status(kind, record_id, JobStatus.CANCELLED):
                            self._note(kind, record_id, "Job cancelled.")
                    else:
                        self._fail(kind, record_id, _last_failure(job), "worker_failed")
                elif rq_status == RQStatus.CANCELED:
                    self.store.set_status(kind, record_id, JobStatus.CANCELLED)
                elif rq_status == RQStatus.FINISHED:
                    # The function always ends its record; a finished RQ job with a live record lost that write.
                    self._fail(kind, record_id, "The job ended without recording its result.", "job_lost")

    def _note(self, kind: str, record_id: str, message: str, level: str = "info") -> None:
        if kind == JobKind.FINE_TUNE:
            self.store.add_event(record_id, message, level=level)

    def _fail(self, kind: str, record_id: str, message: str, code: str) -> None:
        if self.store.set_status(kind, record_id, JobStatus.FAILED, error=JobError(code=code, message=message)):
            self._note(kind, record_id, f"Job failed: {message}", level="error")


def _last_failure(job: Any) -> str:
    try:
        result = job.latest_result()
        text = (getattr(result, "exc_string", None) or "").strip()
    except Exception:  # noqa: BLE001 - a missing result is not worth failing the reaper
        text = ""
    last = text.splitlines()[-1] if text else "the worker stopped while running the job too many times"
    return f"The job failed in the worker: {last}"
