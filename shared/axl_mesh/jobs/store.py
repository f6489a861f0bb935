"""The job record store in Redis: records of files and jobs, events, checkpoints, cancel flags, the counters the
metrics read, and the trainers' announced memory. Status changes and event appends are Lua scripts (atomic).

Records are the pydantic models of ``axl_mesh.jobs_protocol`` (``RECORD_MODELS``): :meth:`JobStore.create` writes one,
:meth:`JobStore.read` reads one back as its model (or as the public object), and every field an update writes is
checked against the kind's model first, so a writer cannot put in Redis what a reader would refuse."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from typing import Any, TypeVar, overload

import redis
from pydantic import BaseModel
from pydantic_core import to_jsonable_python
from redis.typing import ZSetRangeResponse

from axl_mesh.jobs.names import JobKind, now
from axl_mesh.jobs.settings import JobsSettings
from axl_mesh.jobs_protocol import FileObject, FineTuningJobRecord, JobStatus, QuantizationJob
from axl_mesh.process import set_parent_death_signal
from axl_mesh.redis_util import reconnect_policy

# Buckets of the job-duration histogram: written here when a job ends, read by the collector at scrape time.
DURATION_BUCKETS = (10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)


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

FILE_KIND = "file"
# What a record of each kind is; a field written by update() or set_status() must be one of its fields, of its type.
RECORD_MODELS: dict[str, type[BaseModel]] = {
    FILE_KIND: FileObject,
    JobKind.FINE_TUNE: FineTuningJobRecord,
    JobKind.QUANTIZE: QuantizationJob,
}
R = TypeVar("R", bound=BaseModel)


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
    def create(self, kind: str, record: BaseModel | Mapping[str, Any]) -> None:
        """Write a new record: its model (``RECORD_MODELS[kind]``), or a mapping already in that shape."""
        if isinstance(record, BaseModel):
            record = record.model_dump(mode="json")
        record_id = record["id"]
        with self.redis.pipeline() as pipe:
            pipe.hset(self.key(kind, record_id), mapping={k: json.dumps(v) for k, v in record.items()})
            pipe.zadd(self.index_key(kind), {record_id: now()})  # insertion order, finer than created_at
            if kind in _JOB_KINDS and record.get("status") not in _TERMINAL:
                pipe.sadd(self.active_key(kind), record_id)
            pipe.execute()

    def get(self, kind: str, record_id: str) -> dict[str, Any] | None:
        """The record's fields as stored (JSON values); :meth:`read` gives the typed record."""
        raw = self.redis.hgetall(self.key(kind, record_id))
        if not raw:
            return None
        return {as_text(k): json.loads(v) for k, v in raw.items()}

    @overload
    def read(self, kind: str, record_id: str) -> BaseModel | None: ...
    @overload
    def read(self, kind: str, record_id: str, model: type[R]) -> R | None: ...
    def read(self, kind: str, record_id: str, model: type[BaseModel] | None = None) -> BaseModel | None:
        """The record as ``model`` (default: the kind's record model; a public object such as ``FineTuningJob``
        reads a fine-tuning record without the trainer's fields); None when there is none."""
        raw = self.get(kind, record_id)
        return None if raw is None else (model or RECORD_MODELS[kind]).model_validate(raw)

    def read_page(self, kind: str, after: str | None, limit: int, model: type[R]) -> tuple[list[R], bool]:
        """:meth:`page` with each record read as ``model``."""
        records, has_more = self.page(kind, after, limit)
        return [model.model_validate(r) for r in records], has_more

    def update(self, kind: str, record_id: str, **fields: Any) -> None:
        self.redis.hset(self.key(kind, record_id), mapping=self._encode(kind, fields))

    def _encode(self, kind: str, fields: Mapping[str, Any]) -> dict[Any, str]:  # Any: redis-py's invariant key type
        """Each field checked against the kind's record model (name and type), then as the JSON the record holds."""
        model = RECORD_MODELS.get(kind)
        if model is None:
            return {name: json.dumps(to_jsonable_python(value)) for name, value in fields.items()}
        checked = model.model_construct()
        encoded: dict[Any, str] = {}
        for name, value in fields.items():
            if name not in model.model_fields:
                raise ValueError(f"{model.__name__} has no field {name!r}")
            model.__pydantic_validator__.validate_assignment(checked, name, value)  # raises ValidationError
            encoded[name] = json.dumps(to_jsonable_python(getattr(checked, name)))
        return encoded

    def set_status(self, kind: str, record_id: str, status: JobStatus, **fields: Any) -> bool:
        """Move to ``status`` (with ``fields``) unless the record already ended; True when it changed."""
        if status.terminal:
            fields.setdefault("finished_at", int(now()))
        args: list[Any] = [record_id, self.finished_ttl_seconds, status.value, "status", json.dumps(status.value)]
        for name, value in self._encode(kind, fields).items():
            args += [name, value]
        keys = [
            self.key(kind, record_id),
            self.active_key(kind),
            self.ended_key(kind),
            *self._job_keys(kind, record_id),
        ]
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
            assert isinstance(rank, int)  # read without withscore: the rank alone
            start = rank + 1
        ids = range_members(self.redis.zrevrange(self.index_key(kind), start, start + limit))
        records = [r for r in (self.get(kind, i) for i in ids[:limit]) if r is not None]
        return records, len(ids) > limit

    def ids(self, kind: str) -> list[str]:
        """Every id in the index, oldest first (a full read: for one-off passes, not for each tick)."""
        return range_members(self.redis.zrange(self.index_key(kind), 0, -1))

    def active_ids(self, kind: str) -> list[str]:
        """Ids of the jobs not yet ended (what the reaper and the metrics read)."""
        return sorted(as_text(i) for i in self.redis.smembers(self.active_key(kind)))

    def forget_active(self, kind: str, record_id: str) -> None:
        self.redis.srem(self.active_key(kind), record_id)

    def prune_index(self, kind: str) -> int:
        """Drop from the index the ids of expired jobs; only ids older than the retention time can be expired, so
        this reads those, not the whole index. Returns how many were dropped."""
        cutoff = now() - self.finished_ttl_seconds
        old = range_members(self.redis.zrangebyscore(self.index_key(kind), "-inf", cutoff))
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
    def add_event(
        self,
        job_id: str,
        message: str,
        *,
        level: str = "info",
        data: dict[str, Any] | None = None,
        type: str = "message",
    ) -> None:  # noqa: A002 - the wire name
        """Append an event (the oldest beyond ``job_events_max`` are dropped); the id is made in Redis."""
        event = {
            "object": "fine_tuning.job.event",
            "created_at": int(now()),
            "level": level,
            "message": message,
            "data": data,
            "type": type,
        }
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
        raw, more = self._events_page(
            keys=[self.events_key(job_id), self.events_seq_key(job_id)], args=[after_seq, limit]
        )
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
        return {as_text(k): int(v) for k, v in self.redis.hgetall(self.ended_key(kind)).items()}

    # trainers announce their memory so the gateway can reject jobs that cannot fit
    def announce_trainer(self, name: str, memory_bytes: int, ttl_seconds: float) -> None:
        self.redis.zadd(self.trainers_key(), {f"{name}|{memory_bytes}": now() + ttl_seconds})

    def trainer_memory_bytes(self) -> int | None:
        """The largest RAM a live trainer announced, or None when no trainer is alive."""
        self.redis.zremrangebyscore(self.trainers_key(), 0, now())
        members = range_members(self.redis.zrange(self.trainers_key(), 0, -1))
        sizes = [int(m.rsplit("|", 1)[1]) for m in members if "|" in m]
        return max(sizes) if sizes else None


def as_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def range_members(reply: ZSetRangeResponse) -> list[str]:
    """The members of a sorted-set range read without scores, as text (redis-py types a range reply as either
    form; these reads never ask for (member, score) pairs)."""
    members = []
    for member in reply:
        assert isinstance(member, bytes | str), f"a range read without scores returned {member!r}"
        members.append(as_text(member))
    return members


@overload
def open_job(settings: JobsSettings, kind: JobKind, job_id: str) -> tuple[JobStore, dict[str, Any]]: ...
@overload
def open_job(settings: JobsSettings, kind: JobKind, job_id: str, model: type[R]) -> tuple[JobStore, R]: ...
def open_job(
    settings: JobsSettings, kind: JobKind, job_id: str, model: type[BaseModel] | None = None
) -> tuple[JobStore, Any]:
    """In a job's forked process: die with the worker, open the store and read the job's record (as ``model``,
    e.g. ``QuantizationJob``; without one, the stored fields)."""
    set_parent_death_signal()
    store = open_store(settings)
    record = store.get(kind, job_id)
    if record is None:
        noun = "fine-tuning" if kind == JobKind.FINE_TUNE else "quantization"
        raise ValueError(f"no {noun} job {job_id} in Redis")
    return store, record if model is None else model.model_validate(record)


def open_store(settings: JobsSettings) -> JobStore:
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=30, **reconnect_policy())
    return JobStore(client, settings)
