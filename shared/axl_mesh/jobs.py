"""Jobs shared by the gateway and the workers: settings, queue names, Redis keys, job records and events, the
reaper that recovers jobs of dead workers, and the Prometheus collector of the job system. Imports no torch.

Who writes what:
- the gateway creates a record (``validating_files`` -> ``queued``) and enqueues an RQ job whose id is the
  record's id (``ftjob-...`` on ``axl-train``, ``qjob-...`` on ``axl-quantize``); a train job with ``quantize``
  gets quantization jobs that depend on it (``allow_failure``: they run after it whatever happens, and end
  ``cancelled`` themselves when training did not succeed);
- the worker's job function moves the record to ``running``, appends events, updates ``progress`` each step, and
  ends it ``succeeded``/``failed``/``cancelled``;
- :class:`Reaper` (a thread in every worker) cleans RQ's started registries every ``reaper_interval_seconds``,
  which requeues the job of a worker that died (``Retry`` on every job), notes that in the record, and enforces
  cancellation: a running job whose cancel flag is older than the grace period gets RQ's stop-job command.

Why RQ with changed defaults (measured in issue 4): a job timeout of hours (not 180 s), ``Retry`` on every job so
the started-registry cleanup requeues instead of failing, a heartbeat TTL of seconds (RQ's is the monitoring
interval + 60 s, which would put a dead worker's job back only after minutes), and our own cancel flag because
``Job.cancel()`` does not stop a running job.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from pydantic import Field

from axl_mesh.jobs_protocol import FILE_ID_PATTERN, FT_JOB_ID_PATTERN, QUANT_JOB_ID_PATTERN, JobStatus
from axl_mesh.settings import ServiceSettings
from axl_model.config import PRESETS, ModelConfig, memory_bytes

logger = logging.getLogger(__name__)


class QueueName(StrEnum):
    TRAIN = "axl-train"
    QUANTIZE = "axl-quantize"


class JobKind(StrEnum):
    FINE_TUNE = "ft"
    QUANTIZE = "q"


# Functions the workers run, named by import path so the gateway never imports them (nor torch).
TRAIN_FUNCTION = "services.trainer_worker.jobs.run_training_job"
QUANTIZE_FUNCTION = "services.quantizer.jobs.run_quantization_job"

DURATION_BUCKETS = (10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)


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

    @property
    def resolved_files_dir(self) -> Path:
        return self.files_dir or self.data_dir / "files"

    @property
    def resolved_jobs_dir(self) -> Path:
        return self.jobs_dir or self.data_dir / "jobs"

    @property
    def resolved_model_store_dir(self) -> Path:
        return self.model_store_dir or self.data_dir / "models"


def new_id(kind: str) -> str:
    """``file-…``, ``ftjob-…``, ``qjob-…``, ``ftevent-…``, ``ftckpt-…``: 24 hex characters of randomness."""
    return f"{kind}-{secrets.token_hex(12)}"


def now() -> float:
    return time.time()


_ID_PATTERNS = {"file": FILE_ID_PATTERN, "ft": FT_JOB_ID_PATTERN, "q": QUANT_JOB_ID_PATTERN}


def valid_id(kind: str, value: str) -> bool:
    import re

    return re.fullmatch(_ID_PATTERNS[kind], value) is not None


# --- the record store --------------------------------------------------------------------------------------------

# Set a record's status unless it is already terminal; returns 1 if changed. Fields are JSON strings.
_SET_STATUS = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return -1 end
current = cjson.decode(current)
if current == 'succeeded' or current == 'failed' or current == 'cancelled' then return 0 end
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


class JobStore:
    """Records of files, fine-tuning jobs and quantization jobs in Redis (sync client; RQ is sync too).

    A record is a hash of JSON-encoded fields, so a worker's progress update and the gateway's reads never race
    on a whole document; status changes go through a script that never leaves a terminal status.
    """

    def __init__(self, client: redis.Redis, prefix: str = "axl:jobs") -> None:
        self.redis = client
        self.prefix = prefix
        self._set_status = client.register_script(_SET_STATUS)

    # keys
    def key(self, kind: str, record_id: str) -> str:
        return f"{self.prefix}:{kind}:{record_id}"

    def index_key(self, kind: str) -> str:
        return f"{self.prefix}:{kind}:index"

    def events_key(self, job_id: str) -> str:
        return f"{self.prefix}:ft:{job_id}:events"

    def checkpoints_key(self, job_id: str) -> str:
        return f"{self.prefix}:ft:{job_id}:checkpoints"

    def cancel_key(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    def durations_key(self, kind: str) -> str:
        return f"{self.prefix}:metrics:duration:{kind}"

    def trainers_key(self) -> str:
        return f"{self.prefix}:trainers"

    # records
    def create(self, kind: str, record: dict[str, Any]) -> None:
        record_id = record["id"]
        with self.redis.pipeline() as pipe:
            pipe.hset(self.key(kind, record_id), mapping={k: json.dumps(v) for k, v in record.items()})
            pipe.zadd(self.index_key(kind), {record_id: now()})  # insertion order, finer than created_at
            pipe.execute()

    def get(self, kind: str, record_id: str) -> dict[str, Any] | None:
        raw = self.redis.hgetall(self.key(kind, record_id))
        if not raw:
            return None
        return {_text(k): json.loads(v) for k, v in raw.items()}

    def update(self, kind: str, record_id: str, **fields: Any) -> None:
        self.redis.hset(self.key(kind, record_id), mapping={k: json.dumps(v) for k, v in fields.items()})

    def set_status(self, kind: str, record_id: str, status: JobStatus, **fields: Any) -> bool:
        """Move to ``status`` (with ``fields``) unless the record already ended; True when it changed."""
        if status.terminal:
            fields.setdefault("finished_at", int(now()))
        args: list[str] = ["status", json.dumps(status.value)]
        for name, value in fields.items():
            args += [name, json.dumps(value)]
        return self._set_status(keys=[self.key(kind, record_id)], args=args) == 1

    def delete(self, kind: str, record_id: str) -> bool:
        with self.redis.pipeline() as pipe:
            pipe.delete(self.key(kind, record_id))
            pipe.zrem(self.index_key(kind), record_id)
            deleted, _ = pipe.execute()
        return bool(deleted)

    def page(self, kind: str, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Newest first; ``after`` is the id of the last record of the previous page."""
        start = 0
        if after is not None:
            rank = self.redis.zrevrank(self.index_key(kind), after)
            if rank is None:
                return [], False
            start = rank + 1
        ids = [_text(i) for i in self.redis.zrevrange(self.index_key(kind), start, start + limit)]
        records = [r for r in (self.get(kind, i) for i in ids[:limit]) if r is not None]
        return records, len(ids) > limit

    def ids(self, kind: str) -> list[str]:
        return [_text(i) for i in self.redis.zrange(self.index_key(kind), 0, -1)]

    # events and checkpoints of fine-tuning jobs
    def add_event(self, job_id: str, message: str, *, level: str = "info", data: dict[str, Any] | None = None,
                  type: str = "message") -> None:  # noqa: A002 - the wire name
        event = {"id": new_id("ftevent"), "object": "fine_tuning.job.event", "created_at": int(now()),
                 "level": level, "message": message, "data": data, "type": type}
        self.redis.rpush(self.events_key(job_id), json.dumps(event))

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """Oldest first."""
        return [json.loads(e) for e in self.redis.lrange(self.events_key(job_id), 0, -1)]

    def add_checkpoint(self, job_id: str, checkpoint: dict[str, Any]) -> None:
        self.redis.rpush(self.checkpoints_key(job_id), json.dumps(checkpoint))

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(c) for c in self.redis.lrange(self.checkpoints_key(job_id), 0, -1)]

    # cancellation
    def request_cancel(self, job_id: str) -> None:
        self.redis.set(self.cancel_key(job_id), str(now()), nx=True)

    def cancel_requested_at(self, job_id: str) -> float | None:
        value = self.redis.get(self.cancel_key(job_id))
        return float(value) if value is not None else None

    # metrics written by workers, read by any scrape
    def observe_duration(self, kind: str, status: str, seconds: float) -> None:
        key = self.durations_key(kind)
        with self.redis.pipeline() as pipe:
            for bound in DURATION_BUCKETS:
                if seconds <= bound:
                    pipe.hincrby(key, f"{status}:{bound}", 1)
            pipe.hincrby(key, f"{status}:+Inf", 1)
            pipe.hincrbyfloat(key, f"{status}:sum", seconds)
            pipe.execute()

    # trainers announce their memory so the gateway can reject jobs that cannot fit
    def announce_trainer(self, name: str, memory_bytes: int, ttl_seconds: float) -> None:
        self.redis.zadd(self.trainers_key(), {f"{name}|{memory_bytes}": now() + ttl_seconds})

    def trainer_memory_bytes(self) -> int | None:
        """The largest RAM a live trainer announced, or None when no trainer is alive."""
        self.redis.zremrangebyscore(self.trainers_key(), 0, now())
        members = [_text(m) for m in self.redis.zrange(self.trainers_key(), 0, -1)]
        sizes = [int(m.rsplit("|", 1)[1]) for m in members if "|" in m]
        return max(sizes) if sizes else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def open_job(settings: JobsSettings, kind: JobKind, job_id: str) -> tuple[JobStore, dict[str, Any]]:
    """In a job's forked process: die with the worker, open the store and read the job's record."""
    set_parent_death_signal()
    store = open_store(settings)
    record = store.get(kind, job_id)
    if record is None:
        noun = "fine-tuning" if kind == JobKind.FINE_TUNE else "quantization"
        raise ValueError(f"no {noun} job {job_id} in Redis")
    return store, record


def open_store(settings: JobsSettings) -> JobStore:
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=30)
    return JobStore(client, settings.jobs_key_prefix)


# --- memory ----------------------------------------------------------------------------------------------------


def machine_memory_bytes() -> int | None:
    """MemTotal of this machine (None where it cannot be read)."""
    return memory_bytes("MemTotal")


def model_config(preset: str | None = None, config_file: Path | None = None) -> ModelConfig:
    """A ``ModelConfig`` from a preset name or a checkpoint's config.json (raises ValueError when unknown)."""
    if config_file is not None:
        return ModelConfig.from_file(config_file)
    assert preset is not None
    return ModelConfig.from_name(preset)


def preset_names() -> list[str]:
    return list(PRESETS)


# --- the reaper ----------------------------------------------------------------------------------------------------


class Reaper:
    """Recovers jobs of dead workers and enforces cancellation; one per worker process, in a thread.

    Every ``interval``: RQ's started-registry cleanup on each queue (a job whose worker stopped heart-beating is
    requeued while it has retries left, else failed), then a pass over non-terminal records to mirror what RQ did
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
        from rq.job import Job
        from rq.job import JobStatus as RQStatus
        from rq.registry import StartedJobRegistry

        if self.on_tick is not None:
            self.on_tick()
        conn = self.store.redis
        for name in self.queue_names:
            StartedJobRegistry(name, connection=conn).cleanup()
        for kind in (JobKind.FINE_TUNE, JobKind.QUANTIZE):
            for record_id in self.store.ids(kind):
                record = self.store.get(kind, record_id)
                if record is None or JobStatus(record["status"]).terminal:
                    continue
                try:
                    job = Job.fetch(record_id, connection=conn)
                    rq_status = job.get_status()
                except (NoSuchJobError, InvalidJobOperation):
                    if record["status"] != JobStatus.VALIDATING_FILES:
                        self._fail(kind, record_id, "The job disappeared from the queue.", "job_lost")
                    continue
                cancel_at = self.store.cancel_requested_at(record_id)
                if rq_status == RQStatus.STARTED:
                    if cancel_at is not None and now() - cancel_at > self.settings.cancel_grace_seconds:
                        try:
                            send_stop_job_command(conn, record_id)
                            self._note(kind, record_id, "Cancel grace period over; stopping the job's process.")
                        except InvalidJobOperation:
                            pass
                elif rq_status in (RQStatus.QUEUED, RQStatus.SCHEDULED) and record["status"] == JobStatus.RUNNING:
                    if cancel_at is not None:
                        job.cancel(enqueue_dependents=True)
                        self.store.set_status(kind, record_id, JobStatus.CANCELLED)
                        continue
                    self.store.set_status(kind, record_id, JobStatus.QUEUED)
                    self._note(kind, record_id, "The worker running this job stopped; requeued "
                               f"({job.retries_left} retries left). The next attempt resumes from the last checkpoint.",
                               level="warn")
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
        if self.store.set_status(kind, record_id, JobStatus.FAILED, error={"code": code, "message": message,
                                                                           "param": None}):
            self._note(kind, record_id, f"Job failed: {message}", level="error")


def _last_failure(job: Any) -> str:
    try:
        result = job.latest_result()
        text = (getattr(result, "exc_string", None) or "").strip()
    except Exception:  # noqa: BLE001 - a missing result is not worth failing the reaper
        text = ""
    last = text.splitlines()[-1] if text else "the worker stopped while running the job too many times"
    return f"The job failed in the worker: {last}"


# --- metrics ------------------------------------------------------------------------------------------------------


class JobsCollector(Collector):
    """Prometheus view of the job system, read from Redis at scrape time (so every scrape of any worker agrees)."""

    def __init__(self, store: JobStore, queues: Iterable[str] = tuple(QueueName)) -> None:
        self.store = store
        self.queues = list(queues)

    def collect(self) -> Iterator[Any]:
        from rq import Queue

        depth = GaugeMetricFamily("axl_job_queue_depth", "Jobs waiting per queue", labels=["queue"])
        by_status = GaugeMetricFamily("axl_jobs", "Jobs by kind and status", labels=["kind", "status"])
        step = GaugeMetricFamily("axl_training_step", "Current step of running training jobs", labels=["job"])
        loss = GaugeMetricFamily("axl_training_loss", "Last training loss of running jobs", labels=["job"])
        speed = GaugeMetricFamily("axl_training_bytes_per_second", "Training throughput", labels=["job"])
        try:
            for name in self.queues:
                depth.add_metric([name], Queue(name, connection=self.store.redis).count)
            for kind in JobKind:
                counts = {s.value: 0 for s in JobStatus}
                for record_id in self.store.ids(kind):
                    record = self.store.get(kind, record_id)
                    if record is None:
                        continue
                    counts[record["status"]] = counts.get(record["status"], 0) + 1
                    progress = record.get("progress")
                    if kind == JobKind.FINE_TUNE and record["status"] == JobStatus.RUNNING and progress:
                        step.add_metric([record_id], progress.get("step") or 0)
                        if progress.get("loss") is not None:
                            loss.add_metric([record_id], progress["loss"])
                        if progress.get("bytes_per_s") is not None:
                            speed.add_metric([record_id], progress["bytes_per_s"])
                for status, count in counts.items():
                    by_status.add_metric([kind.value, status], count)
            durations = self._durations()
        except redis.RedisError:
            logger.warning("jobs metrics: Redis unavailable")
            return
        yield from (depth, by_status, step, loss, speed, *durations)

    def _durations(self) -> list[Any]:
        family = HistogramMetricFamily("axl_job_duration_seconds", "Wall time of ended jobs by kind and status",
                                       labels=["kind", "status"])
        for kind in JobKind:
            raw = {_text(k): float(v) for k, v in self.store.redis.hgetall(self.store.durations_key(kind)).items()}
            statuses = {k.split(":", 1)[0] for k in raw}
            for status in sorted(statuses):
                buckets = [(str(b), raw.get(f"{status}:{b}", 0.0)) for b in DURATION_BUCKETS]
                buckets.append(("+Inf", raw.get(f"{status}:+Inf", 0.0)))
                family.add_metric([kind.value, status], buckets, raw.get(f"{status}:sum", 0.0))
        return [family]


def rq_connection(settings: JobsSettings) -> redis.Redis:
    """The plain (bytes) client RQ wants."""
    return redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5)



# --- the worker process ------------------------------------------------------------------------------------------


def _worker_class() -> type:
    from rq import Worker

    class AxlWorker(Worker):
        """RQ's forking worker with a heartbeat TTL of seconds, not RQ's ``monitoring interval + 60 s``, so the
        reaper finds the job of a killed worker quickly (``AXL_HEARTBEAT_TTL_SECONDS``)."""

        heartbeat_ttl_seconds = 15

        def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
            return int(self.heartbeat_ttl_seconds)

    return AxlWorker


def serve_health_and_metrics(host: str, port: int, registry: Any) -> Any:
    """``/healthz`` and ``/metrics`` on a thread of the worker's main process (the job runs in a forked child)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == "/healthz":
                body, ctype, status = b'{"status":"ok"}', "application/json", 200
            elif self.path == "/metrics":
                body, ctype, status = generate_latest(registry), CONTENT_TYPE_LATEST, 200
            else:
                body, ctype, status = b'{"error":{"message":"not found","type":"invalid_request_error",' \
                                      b'"param":null,"code":null}}', "application/json", 404
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            logger.debug("http: " + format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="axl-worker-http", daemon=True).start()
    return server


def run_worker(settings: JobsSettings, queue: QueueName, *, burst: bool = False, name: str | None = None,
               on_tick: Any = None) -> bool:
    """Work ``queue`` until stopped (or, with ``burst``, until it is empty): the RQ worker, the reaper thread and
    the ``/healthz`` + ``/metrics`` endpoints. Returns whether any job ran."""
    from prometheus_client import CollectorRegistry
    from rq import Queue

    conn = rq_connection(settings)
    store = JobStore(conn, settings.jobs_key_prefix)
    registry = CollectorRegistry()
    registry.register(JobsCollector(store))
    server = serve_health_and_metrics(settings.host, settings.port, registry)
    reaper = Reaper(settings, [q.value for q in QueueName], on_tick=on_tick)
    reaper.tick()  # recover what a previous crash left behind before taking new work
    reaper.start()
    worker_class = _worker_class()
    worker_class.heartbeat_ttl_seconds = settings.heartbeat_ttl_seconds
    worker = worker_class(
        [Queue(queue.value, connection=conn)], connection=conn, name=name,
        job_monitoring_interval=settings.heartbeat_interval_seconds,
        # RQ also cleans registries while idle; the reaper does it on time whatever the worker is doing.
        maintenance_interval=max(15, int(settings.reaper_interval_seconds)),
        worker_ttl=max(30, settings.heartbeat_ttl_seconds * 2),
    )
    # RQ logs each registry clean-up at INFO (every 15 s here): keep job lines, drop the routine.
    logging.getLogger("rq.worker").addFilter(lambda record: "cleaning" not in record.getMessage())
    try:
        return worker.work(burst=burst, logging_level=settings.log_level.upper())
    finally:
        reaper.stop()
        server.shutdown()


def set_parent_death_signal() -> None:
    """Make this (forked job) process die with its worker: a SIGKILLed worker must not leave an orphan training
    in the job's folder while the requeued attempt starts writing there too (Linux only; a no-op elsewhere)."""
    import ctypes
    import os
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the worker died before prctl took effect
        os._exit(1)
