"""Job retention in Redis: events capped per job and read by page, finished jobs expire, and the reaper and the
metrics read only the jobs that have not ended (a set kept on status changes), never every job ever made."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from axl_mesh.jobs import (
    TRAIN_FUNCTION, JobKind, JobsCollector, JobsSettings, JobStore, QueueName, Reaper, new_id, now, rq_queue,
)
from axl_mesh.jobs.reaper import ENQUEUE_GRACE_SECONDS
from axl_mesh.jobs_protocol import JobStatus

FT = JobKind.FINE_TUNE
PREFIX = "axl:retention-test"


def _settings(redis_url: str, **overrides: Any) -> JobsSettings:
    return JobsSettings(redis_url=redis_url, jobs_key_prefix=PREFIX, **overrides)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()


def _job(store: JobStore, kind: str = FT, status: JobStatus = JobStatus.QUEUED) -> str:
    job_id = new_id("ftjob" if kind == FT else "qjob")
    store.create(kind, {"id": job_id, "status": status.value, "created_at": int(now()), "progress": None})
    return job_id


def _messages(events: list[dict[str, Any]]) -> list[str]:
    return [e["message"] for e in events]


def test_events_are_capped_per_job(client: redis.Redis, redis_url: str) -> None:
    store = JobStore(client, _settings(redis_url, job_events_max=10))
    job_id = _job(store)
    for i in range(25):
        store.add_event(job_id, f"event {i}")
    assert client.llen(store.events_key(job_id)) == 10
    page, has_more = store.events_page(job_id, None, 100)
    assert _messages(page) == [f"event {i}" for i in range(24, 14, -1)]  # the newest ten, newest first
    assert not has_more


def test_the_events_cap_default_is_sensible() -> None:
    assert JobsSettings().job_events_max == 1000
    assert JobsSettings().finished_job_ttl_seconds == 30 * 24 * 3600


def test_events_are_paged_with_after_and_limit(client: redis.Redis, redis_url: str) -> None:
    store = JobStore(client, _settings(redis_url))
    job_id = _job(store)
    for i in range(12):
        store.add_event(job_id, f"event {i}", data={"i": i})
    seen: list[str] = []
    after = None
    while True:
        page, has_more = store.events_page(job_id, after, 5)
        assert len(page) <= 5
        seen += _messages(page)
        if not has_more:
            break
        after = page[-1]["id"]
    assert seen == [f"event {i}" for i in range(11, -1, -1)]
    ids = [e["id"] for e in store.events_page(job_id, None, 100)[0]]
    assert len(set(ids)) == 12 and all(i.startswith("ftevent-") and len(i) == len("ftevent-") + 24 for i in ids)
    assert store.events_page(job_id, ids[-1], 5) == ([], False)  # after the oldest: nothing
    assert store.events_page(job_id, "ftevent-nope", 5) == ([], False)
    assert store.events_page(job_id, "ftevent-" + "f" * 24, 5) == ([], False)  # not an event of this job


class _CountingRedis(redis.Redis):
    """Records the commands sent and which keys' hashes were read (HGETALL)."""

    commands: list[tuple[Any, ...]]
    read: list[str]

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands.append(args)
        return super().execute_command(*args, **options)

    def hgetall(self, name: Any) -> Any:
        self.read.append(name if isinstance(name, str) else name.decode())
        return super().hgetall(name)


def _counting(redis_url: str) -> _CountingRedis:
    conn = _CountingRedis.from_url(redis_url)
    conn.commands, conn.read = [], []
    return conn


def test_an_event_page_reads_only_its_range(redis_url: str) -> None:
    """One script call that returns the page, never the old ``LRANGE 0 -1`` of the whole list."""
    conn = _counting(redis_url)
    store = JobStore(conn, _settings(redis_url))
    job_id = _job(store)
    for i in range(300):
        store.add_event(job_id, f"event {i}")
    conn.commands.clear()
    page, has_more = store.events_page(job_id, None, 3)
    assert _messages(page) == ["event 299", "event 298", "event 297"] and has_more
    page, _ = store.events_page(job_id, page[-1]["id"], 2)
    assert _messages(page) == ["event 296", "event 295"]
    names = [str(c[0]).upper() for c in conn.commands]
    assert "LRANGE" not in names and set(names) <= {"EVALSHA", "EVAL", "SCRIPT LOAD"}, names
    conn.close()


def test_the_events_api_pages_through_the_store(client: redis.Redis, redis_url: str) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from axl_mesh.errors import install_error_handlers
    from services.api_gateway.routes import fine_tuning
    from services.api_gateway.routes.files import JobsContext

    settings = _settings(redis_url, job_events_max=50)
    store = JobStore(client, settings)
    job_id = _job(store)
    for i in range(60):
        store.add_event(job_id, f"event {i}")
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(fine_tuning.router)
    app.state.axl_jobs = JobsContext(settings, store, None, client)  # type: ignore[arg-type]
    http = TestClient(app)
    first = http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 20}).json()
    assert [e["message"] for e in first["data"]] == [f"event {i}" for i in range(59, 39, -1)] and first["has_more"]
    after = first["data"][-1]["id"]
    rest = http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100, "after": after}).json()
    assert [e["message"] for e in rest["data"]] == [f"event {i}" for i in range(39, 9, -1)]  # 50 kept in all
    assert rest["has_more"] is False


def test_a_finished_job_expires_and_an_active_one_does_not(client: redis.Redis, redis_url: str) -> None:
    store = JobStore(client, _settings(redis_url, finished_job_ttl_seconds=3600))
    running, done = _job(store), _job(store)
    for job_id in (running, done):
        store.add_event(job_id, "started")
        store.add_checkpoint(job_id, {"id": "ftckpt-x", "step_number": 1})
        store.request_cancel(job_id)
        store.set_status(FT, job_id, JobStatus.RUNNING)
    store.set_status(FT, done, JobStatus.SUCCEEDED)
    store.add_event(done, "The job has successfully completed.")  # written after the end: expires with the job
    done_keys = [store.key(FT, done), store.events_key(done), store.events_seq_key(done), store.checkpoints_key(done),
                 store.cancel_key(done)]
    for key in done_keys:
        assert 3500 < client.ttl(key) <= 3600, key
    for key in (store.key(FT, running), store.events_key(running), store.checkpoints_key(running),
                store.cancel_key(running)):
        assert client.ttl(key) == -1, key
    # Once it expired, it is gone for good: no event recreates its list.
    client.delete(*done_keys)
    store.add_event(done, "late")
    assert not client.exists(store.events_key(done))


def test_quantization_jobs_expire_too(client: redis.Redis, redis_url: str) -> None:
    store = JobStore(client, _settings(redis_url, finished_job_ttl_seconds=60))
    job_id = _job(store, JobKind.QUANTIZE)
    store.set_status(JobKind.QUANTIZE, job_id, JobStatus.FAILED, error={"code": "x", "message": "y", "param": None})
    assert 0 < client.ttl(store.key(JobKind.QUANTIZE, job_id)) <= 60


def test_the_active_set_follows_status_changes(client: redis.Redis, redis_url: str) -> None:
    store = JobStore(client, _settings(redis_url))
    a, b, c = _job(store), _job(store), _job(store, status=JobStatus.VALIDATING_FILES)
    assert store.active_ids(FT) == sorted([a, b, c])
    store.set_status(FT, a, JobStatus.RUNNING)
    store.set_status(FT, b, JobStatus.CANCELLED)
    store.set_status(FT, c, JobStatus.FAILED, error=None)
    assert store.active_ids(FT) == [a]
    store.set_status(FT, a, JobStatus.SUCCEEDED)
    assert store.active_ids(FT) == []
    assert store.ended_counts(FT) == {"cancelled": 1, "failed": 1, "succeeded": 1}
    assert not store.set_status(FT, a, JobStatus.FAILED)  # a terminal status is never left, nor counted twice
    assert store.ended_counts(FT)["succeeded"] == 1 and "failed" in store.ended_counts(FT)
    assert store.ended_counts(FT)["failed"] == 1


def test_the_reaper_and_the_metrics_read_only_active_jobs(redis_url: str) -> None:
    settings = _settings(redis_url, reaper_interval_seconds=60)
    conn = _counting(redis_url)
    store = JobStore(conn, settings)
    ended = []
    for _ in range(30):
        job_id = _job(store)
        store.set_status(FT, job_id, JobStatus.SUCCEEDED)
        ended.append(job_id)
    active = _job(store)
    rq_queue(QueueName.TRAIN, conn).enqueue(TRAIN_FUNCTION, active, job_id=active)  # queued, as the gateway does

    reaper = Reaper(settings, [QueueName.TRAIN.value])
    reaper.store = store
    conn.read.clear()
    reaper.tick()
    record_reads = {k for k in conn.read if k.startswith(f"{PREFIX}:ft:") and k.count(":") == 3}
    assert record_reads == {store.key(FT, active)}
    assert store.get(FT, active)["status"] == "queued"  # seen, and left alone

    store.set_status(FT, active, JobStatus.RUNNING, progress={"step": 7, "loss": 1.5, "bytes_per_s": 10.0})
    conn.read.clear()
    families = {f.name: f for f in JobsCollector(store).collect()}
    record_reads = {k for k in conn.read if k.startswith(f"{PREFIX}:ft:") and k.count(":") == 3}
    assert record_reads == {store.key(FT, active)}
    counts = {s.labels["status"]: s.value for s in families["axl_jobs"].samples if s.labels["kind"] == "ft"}
    assert counts["succeeded"] == 30 and counts["running"] == 1 and counts["queued"] == 0
    steps = {s.labels["job_id"]: s.value for s in families["axl_training_step"].samples}
    assert steps == {active: 7}
    conn.close()


def test_the_index_forgets_expired_jobs(client: redis.Redis, redis_url: str) -> None:
    store = JobStore(client, _settings(redis_url, finished_job_ttl_seconds=60))
    old, kept, fresh = _job(store), _job(store), _job(store)
    client.zadd(store.index_key(FT), {old: now() - 3600, kept: now() - 3600})  # created an hour ago
    store.set_status(FT, old, JobStatus.SUCCEEDED)
    client.delete(store.key(FT, old))  # as if its TTL ran out
    assert store.prune_index(FT) == 1
    assert set(store.ids(FT)) == {kept, fresh}
    records, has_more = store.page(FT, None, 10)
    assert {r["id"] for r in records} == {kept, fresh} and not has_more


def test_records_from_before_retention_are_adopted_once(client: redis.Redis, redis_url: str) -> None:
    """Records written by the previous version (no active set, no TTL) join the set or get their expiry."""
    store = JobStore(client, _settings(redis_url, finished_job_ttl_seconds=3600))
    running, finished = _job(store), _job(store)
    client.hset(store.key(FT, running), "status", '"running"')
    client.hset(store.key(FT, finished), mapping={"status": '"succeeded"', "finished_at": str(int(now()) - 600)})
    client.delete(store.active_key(FT))
    store.adopt_legacy_records()
    assert store.active_ids(FT) == [running]
    assert 2900 < client.ttl(store.key(FT, finished)) <= 3000
    assert store.ended_counts(FT) == {"succeeded": 1}
    client.delete(store.active_key(FT))
    store.adopt_legacy_records()  # done once: the marker stops a second full pass
    assert store.active_ids(FT) == []


def test_the_reaper_leaves_a_job_being_enqueued_and_fails_one_whose_queue_entry_is_gone(client: redis.Redis,
                                                                                            redis_url: str) -> None:
    """The gateway writes a job's record before it enqueues the RQ job: a tick in between must not fail it (it did,
    and the trainer then found the new job already ended). An RQ job still missing after the grace is lost."""
    settings = _settings(redis_url, reaper_interval_seconds=60)
    store = JobStore(client, settings)
    new, old = _job(store), _job(store)
    client.hset(store.key(FT, old), "created_at", str(int(now() - ENQUEUE_GRACE_SECONDS - 5)))
    reaper = Reaper(settings, [QueueName.TRAIN.value])
    reaper.store = store
    reaper.tick()
    assert store.get(FT, new)["status"] == "queued"  # being enqueued: left alone
    assert store.get(FT, old)["status"] == "failed"
    assert store.get(FT, old)["error"]["code"] == "job_lost"
