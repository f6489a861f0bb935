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

What Redis holds is data, never code: RQ's JSON serializer everywhere (``rq_queue``, ``fetch_rq_job``,
``build_worker``; RQ's default unpickles), and a worker runs only the two job functions below. Retention: events
are capped per job and read by page, a finished job's keys expire, and the reaper and metrics read only the set of
active jobs (see :class:`JobStore`).

Why RQ with changed defaults (measured in issue 4): a job timeout of hours (not 180 s), ``Retry`` on every job so
the started-registry cleanup requeues instead of failing, a heartbeat TTL of seconds (RQ's is the monitoring
interval + 60 s, which would put a dead worker's job back only after minutes), and our own cancel flag because
``Job.cancel()`` does not stop a running job.
"""

from __future__ import annotations

import functools
import json
import logging
import re
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
from axl_mesh.process import set_parent_death_signal
from axl_mesh.redis_util import reconnect_policy
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
    # Retention: a job logs about one event a second while it trains; keep its newest events, and let a finished
    # job's keys (record, events, checkpoints list, cancel flag) expire.
    job_events_max: int = Field(default=1000, ge=10, description="events kept per fine-tuning job (older trimmed)")
    finished_job_ttl_seconds: int = Field(default=30 * 24 * 3600, ge=60,
                                          description="a finished job's records are deleted this long after it ends")

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
    return re.fullmatch(_ID_PATTERNS[kind], value) is not None


# --- the record store --------------------------------------------------------------------------------------------

_TERMINAL = frozenset(s.value for s in JobStatus if s.terminal)  # as the scripts spell them

# Set a record's status unless it is already terminal; returns 1 if changed, 0 if it had ended, -1 if missing.
# Keeps the set of active (non-terminal) job ids that the reaper and the metrics read instead of every job ever
# made; a job that ends is counted per status and its keys expire after the retention time.
# KEYS: record, active set, ended counts, then the job's other keys; ARGV: id, ttl, new status, field/JSON pairs.
_SET_STATUS = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return -1 end
current = cjson.decode(current)
if current == 'succeeded' or current == 'failed' or current == 'cancelled' then return 0 end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local status = ARGV[3]
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('HINCRBY', KEYS[3], status, 1)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  for i = 4, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[2]) end
else
  redis.call('SADD', KEYS[2], ARGV[1])
end
return 1
"""

# Append an event to a job's capped list; its id carries its sequence number (``ftevent-<8 hex seq><16 hex>``) so a
# page ``after`` an id is an index range, not a scan. An event of a finished job inherits the record's TTL; a job
# that is gone (deleted, expired) gets no event. KEYS: record, events, sequence; ARGV: cap, random part, the event's
# JSON without its opening brace (the id goes first).
_ADD_EVENT = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return 0 end
local seq = redis.call('INCR', KEYS[3])
local id = 'ftevent-' .. string.format('%08x', seq) .. ARGV[2]
redis.call('RPUSH', KEYS[2], '{"id": "' .. id .. '", ' .. ARGV[3])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[1]), -1)
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return seq
"""

# A page of events, newest first: those older than sequence number ARGV[1] (0: from the newest), at most ARGV[2].
# The list holds the newest ``len`` events, so the event numbered s sits at index s - first. Returns {events oldest
# first, has_more}. KEYS: events, sequence.
_EVENTS_PAGE = """
local len = redis.call('LLEN', KEYS[1])
local last = tonumber(redis.call('GET', KEYS[2]) or len)
local first = last - len + 1
local top = last
local after = tonumber(ARGV[1])
if after > 0 then
  if after > last or after < first then return {{}, 0} end
  top = after - 1
end
local bottom = math.max(first, top - tonumber(ARGV[2]) + 1)
if top < bottom then return {{}, 0} end
local more = 0
if bottom > first then more = 1 end
return {redis.call('LRANGE', KEYS[1], bottom - first, top - first), more}
"""

_EVENT_ID = re.compile(r"ftevent-([0-9a-f]{8})[0-9a-f]{16}")
_JOB_KINDS = frozenset(JobKind)


class JobStore:
    """Records of files, fine-tuning jobs and quantization jobs in Redis (sync client; RQ is sync too).

    A record is a hash of JSON-encoded fields, so a worker's progress update and the gateway's reads never race
    on a whole document; status changes go through a script that never leaves a terminal status. Retention
    (``JobsSettings``): a job keeps its newest ``job_events_max`` events, and a finished job's keys expire
    ``finished_job_ttl_seconds`` after it ends; the ids of jobs not yet ended are kept in a set per kind.
    """

    def __init__(self, client: redis.Redis, settings: JobsSettings) -> None:
        self.redis = client
        self.prefix = settings.jobs_key_prefix
        self.events_max = settings.job_events_max
        self.finished_ttl_seconds = settings.finished_job_ttl_seconds
        self._set_status = client.register_script(_SET_STATUS)
        self._add_event = client.register_script(_ADD_EVENT)
        self._events_page = client.register_script(_EVENTS_PAGE)

    # keys
    def key(self, kind: str, record_id: str) -> str:
        return f"{self.prefix}:{kind}:{record_id}"

    def index_key(self, kind: str) -> str:
        return f"{self.prefix}:{kind}:index"

    def active_key(self, kind: str) -> str:
        return f"{self.prefix}:{kind}:active"

    def events_key(self, job_id: str) -> str:
        return f"{self.prefix}:ft:{job_id}:events"

    def events_seq_key(self, job_id: str) -> str:
        return f"{self.prefix}:ft:{job_id}:events:seq"

    def checkpoints_key(self, job_id: str) -> str:
        return f"{self.prefix}:ft:{job_id}:checkpoints"

    def cancel_key(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    def durations_key(self, kind: str) -> str:
        return f"{self.prefix}:metrics:duration:{kind}"

    def ended_key(self, kind: str) -> str:
        return f"{self.prefix}:metrics:ended:{kind}"

    def trainers_key(self) -> str:
        return f"{self.prefix}:trainers"

    def _job_keys(self, kind: str, record_id: str) -> list[str]:
        """The keys of a job besides its record, which expire with it."""
        keys = [self.cancel_key(record_id)]
        if kind == JobKind.FINE_TUNE:
            keys += [self.events_key(record_id), self.events_seq_key(record_id), self.checkpoints_key(record_id)]
        return keys

    # records
    def create(self, kind: str, record: dict[str, Any]) -> None:
        record_id = record["id"]
        with self.redis.pipeline() as pipe:
            pipe.hset(self.key(kind, record_id), mapping={k: json.dumps(v) for k, v in record.items()})
            pipe.zadd(self.index_key(kind), {record_id: now()})  # insertion order, finer than created_at
            if kind in _JOB_KINDS and record.get("status") not in _TERMINAL:
                pipe.sadd(self.active_key(kind), record_id)
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
        args: list[Any] = [record_id, self.finished_ttl_seconds, status.value, "status", json.dumps(status.value)]
        for name, value in fields.items():
            args += [name, json.dumps(value)]
        keys = [self.key(kind, record_id), self.active_key(kind), self.ended_key(kind),
                *self._job_keys(kind, record_id)]
        return self._set_status(keys=keys, args=args) == 1

    def delete(self, kind: str, record_id: str) -> bool:
        with self.redis.pipeline() as pipe:
            pipe.delete(self.key(kind, record_id))
            pipe.zrem(self.index_key(kind), record_id)
            pipe.srem(self.active_key(kind), record_id)
            deleted, _, _ = pipe.execute()
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
        """Every id in the index, oldest first (a full read: for one-off passes, not for each tick)."""
        return [_text(i) for i in self.redis.zrange(self.index_key(kind), 0, -1)]

    def active_ids(self, kind: str) -> list[str]:
        """Ids of the jobs not yet ended (what the reaper and the metrics read)."""
        return sorted(_text(i) for i in self.redis.smembers(self.active_key(kind)))

    def forget_active(self, kind: str, record_id: str) -> None:
        self.redis.srem(self.active_key(kind), record_id)

    def prune_index(self, kind: str) -> int:
        """Drop from the index the ids of expired jobs; only ids older than the retention time can be expired, so
        this reads those, not the whole index. Returns how many were dropped."""
        cutoff = now() - self.finished_ttl_seconds
        old = [_text(i) for i in self.redis.zrangebyscore(self.index_key(kind), "-inf", cutoff)]
        if not old:
            return 0
        with self.redis.pipeline(transaction=False) as pipe:
            for record_id in old:
                pipe.exists(self.key(kind, record_id))
            exists = pipe.execute()
        gone = [record_id for record_id, alive in zip(old, exists, strict=True) if not alive]
        if gone:
            self.redis.zrem(self.index_key(kind), *gone)
        return len(gone)

    def adopt_legacy_records(self) -> None:
        """Once per Redis: records written before the active set and retention existed join the active set, or,
        when they had ended, are counted and get their expiry (from ``finished_at``). Idempotent."""
        marker = f"{self.prefix}:retention:v1"
        if self.redis.exists(marker):
            return
        for kind in JobKind:
            for record_id in self.ids(kind):
                record = self.get(kind, record_id)
                if record is None:
                    self.redis.zrem(self.index_key(kind), record_id)
                elif record.get("status") not in _TERMINAL:
                    self.redis.sadd(self.active_key(kind), record_id)
                elif self.redis.ttl(self.key(kind, record_id)) < 0:
                    ended = record.get("finished_at") or now()
                    ttl = max(1, int(ended + self.finished_ttl_seconds - now()))
                    with self.redis.pipeline() as pipe:
                        pipe.hincrby(self.ended_key(kind), record["status"], 1)
                        for key in (self.key(kind, record_id), *self._job_keys(kind, record_id)):
                            pipe.expire(key, ttl)
                        pipe.execute()
        self.redis.set(marker, "1")

    # events and checkpoints of fine-tuning jobs
    def add_event(self, job_id: str, message: str, *, level: str = "info", data: dict[str, Any] | None = None,
                  type: str = "message") -> None:  # noqa: A002 - the wire name
        """Append an event (the oldest beyond ``job_events_max`` are dropped); the id is made in Redis."""
        event = {"object": "fine_tuning.job.event", "created_at": int(now()), "level": level, "message": message,
                 "data": data, "type": type}
        keys = [self.key(JobKind.FINE_TUNE, job_id), self.events_key(job_id), self.events_seq_key(job_id)]
        self._add_event(keys=keys, args=[self.events_max, secrets.token_hex(8), json.dumps(event)[1:]])

    def events_page(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Up to ``limit`` events, newest first, older than the event ``after`` (its id); reads only that range.
        An ``after`` that is not a kept event's id gives an empty page."""
        after_seq = 0
        if after is not None:
            match = _EVENT_ID.fullmatch(after)
            if match is None or int(match.group(1), 16) == 0:
                return [], False
            after_seq = int(match.group(1), 16)
        raw, more = self._events_page(keys=[self.events_key(job_id), self.events_seq_key(job_id)],
                                      args=[after_seq, limit])
        return [json.loads(e) for e in reversed(raw)], bool(more)

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

    def ended_counts(self, kind: str) -> dict[str, int]:
        """How many jobs of ``kind`` ended in each terminal status (counted when they end, kept after they expire)."""
        return {_text(k): int(v) for k, v in self.redis.hgetall(self.ended_key(kind)).items()}

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
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=30,
                                  **reconnect_policy())
    return JobStore(client, settings)


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
                    if record["status"] != JobStatus.VALIDATING_FILES:
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
    """Prometheus view of the job system, read from Redis at scrape time (so every scrape of any worker agrees).

    A scrape reads the active jobs only; jobs that ended are counters kept per status when they end."""

    def __init__(self, store: JobStore, queues: Iterable[str] = tuple(QueueName)) -> None:
        self.store = store
        self.queues = list(queues)

    def collect(self) -> Iterator[Any]:
        depth = GaugeMetricFamily("axl_job_queue_depth", "Jobs waiting per queue", labels=["queue"])
        by_status = GaugeMetricFamily("axl_jobs", "Jobs by kind and status", labels=["kind", "status"])
        step = GaugeMetricFamily("axl_training_step", "Current step of running training jobs", labels=["job_id"])
        loss = GaugeMetricFamily("axl_training_loss", "Last training loss of running jobs", labels=["job_id"])
        speed = GaugeMetricFamily("axl_training_bytes_per_second", "Training throughput", labels=["job_id"])
        try:
            for name in self.queues:
                depth.add_metric([name], rq_queue(name, self.store.redis).count)
            for kind in JobKind:
                counts = {s.value: 0 for s in JobStatus}
                counts.update(self.store.ended_counts(kind))
                for record_id in self.store.active_ids(kind):
                    record = self.store.get(kind, record_id)
                    if record is None or JobStatus(record["status"]).terminal:
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
    return redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, **reconnect_policy())


# --- RQ, JSON only ------------------------------------------------------------------------------------------------
# Nothing read from Redis is unpickled. RQ's default serializer pickles a job's call and meta and unpickles them on
# every fetch (a worker dequeuing, a registry cleanup, a status read), so whoever can write to Redis could run code
# in a worker. Every queue, worker and job fetch goes through the helpers below: RQ's JSON serializer, and a job
# class that runs only our job functions and no callbacks (those are names in the job's hash too).

JOB_FUNCTIONS = frozenset({TRAIN_FUNCTION, QUANTIZE_FUNCTION})


class ForeignJobError(RuntimeError):
    """A job in our queues names a function that is not one of ``JOB_FUNCTIONS``."""


def rq_serializer() -> Any:
    from rq.serializers import JSONSerializer

    return JSONSerializer


@functools.cache
def rq_job_class() -> type:
    from rq.job import Job

    class AxlJob(Job):
        @property
        def func(self) -> Any:
            if self.func_name not in JOB_FUNCTIONS:
                raise ForeignJobError(f"refusing to run {self.func_name!r}: not an AXL job function")
            return super().func

        # Ours never set callbacks; a job hash written by someone else must not make the worker import and run one.
        success_callback = failure_callback = stopped_callback = property(lambda self: None)

    return AxlJob


def rq_queue(name: str, connection: redis.Redis) -> Any:
    """The RQ queue ``name`` with the JSON serializer and our job class (enqueue, count, registries)."""
    from rq import Queue

    return Queue(str(name), connection=connection, serializer=rq_serializer(), job_class=rq_job_class())


def fetch_rq_job(job_id: str, connection: redis.Redis) -> Any:
    """RQ's job ``job_id``, read as JSON (raises ``rq.exceptions.NoSuchJobError``)."""
    return rq_job_class().fetch(job_id, connection=connection, serializer=rq_serializer())



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


def build_worker(settings: JobsSettings, queue: QueueName, conn: redis.Redis, *, name: str | None = None) -> Any:
    """The RQ worker for ``queue``: JSON only, our job class, our heartbeat TTL."""
    worker_class = _worker_class()
    worker_class.heartbeat_ttl_seconds = settings.heartbeat_ttl_seconds
    return worker_class(
        [rq_queue(queue.value, conn)], connection=conn, name=name,
        serializer=rq_serializer(), job_class=rq_job_class(),
        job_monitoring_interval=settings.heartbeat_interval_seconds,
        # RQ also cleans registries while idle; the reaper does it on time whatever the worker is doing.
        maintenance_interval=max(15, int(settings.reaper_interval_seconds)),
        worker_ttl=max(30, settings.heartbeat_ttl_seconds * 2),
    )


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

    conn = rq_connection(settings)
    store = JobStore(conn, settings)
    store.adopt_legacy_records()
    registry = CollectorRegistry()
    registry.register(JobsCollector(store))
    server = serve_health_and_metrics(settings.host, settings.port, registry)
    reaper = Reaper(settings, [q.value for q in QueueName], on_tick=on_tick)
    reaper.tick()  # recover what a previous crash left behind before taking new work
    reaper.start()
    worker = build_worker(settings, queue, conn, name=name)
    # RQ logs each registry clean-up at INFO (every 15 s here): keep job lines, drop the routine.
    logging.getLogger("rq.worker").addFilter(lambda record: "cleaning" not in record.getMessage())
    try:
        return worker.work(burst=burst, logging_level=settings.log_level.upper())
    finally:
        reaper.stop()
        server.shutdown()
