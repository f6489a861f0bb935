"""The mesh's Redis ACL (axl_mesh.redis_acl) on a real redis-server: registry keys are the registry user's alone.

The jobs user (what the gateway, the trainer and the quantizer log in as; the trainer runs user-supplied jobs) can
neither read nor write an ``axl:registry:*`` key, directly, through a Lua script or by wiping the database; the
registry user can, and the real stores (RegistryStore, JobStore with RQ) work under their own users."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError
from redis.retry import Retry

from axl_mesh.jobs import JobKind, JobsSettings, JobStore, QueueName, fetch_rq_job, rq_queue
from axl_mesh.model_store import MODEL_STORE_CHANNEL
from axl_mesh.redis_acl import JOBS_USER, REGISTRY_USER, acl_directives, url_for_user, user_rules
from tests.support import RedisServer

PASSWORDS = {REGISTRY_USER: "registry-test-password", JOBS_USER: "jobs-test-password"}
REGISTRY_KEY = "axl:registry:instance:w1"


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("acl") / "redis.log", acl_users=PASSWORDS).start()
    try:
        yield server
    finally:
        server.stop()


def _client(server: RedisServer, user: str) -> redis.Redis:
    return redis.Redis.from_url(server.url_for(user), decode_responses=True)


def test_the_registry_user_reads_and_writes_registry_keys(acl_redis: RedisServer) -> None:
    registry = _client(acl_redis, REGISTRY_USER)
    registry.hset(REGISTRY_KEY, mapping={"url": "http://127.0.0.1:8901"})
    assert registry.hgetall(REGISTRY_KEY) == {"url": "http://127.0.0.1:8901"}
    assert registry.eval("return redis.call('HGET', KEYS[1], 'url')", 1, REGISTRY_KEY) == "http://127.0.0.1:8901"
    with pytest.raises(NoPermissionError):  # and nothing else
        registry.set("axl:jobs:ft:x", "1")
    with pytest.raises(NoPermissionError):
        registry.publish(MODEL_STORE_CHANNEL, "{}")


@pytest.mark.parametrize("attempt", [
    lambda c: c.set(REGISTRY_KEY, "x"),
    lambda c: c.hset(REGISTRY_KEY, "url", "http://attacker:1"),
    lambda c: c.zadd("axl:registry:model:axl-coder", {"evil": 1e15}),
    lambda c: c.get(REGISTRY_KEY),
    lambda c: c.hgetall(REGISTRY_KEY),
    lambda c: c.zrange("axl:registry:instances", 0, -1),
    lambda c: c.delete(REGISTRY_KEY),
    lambda c: c.rename("axl:jobs:mine", REGISTRY_KEY),
    lambda c: c.copy("axl:jobs:mine", REGISTRY_KEY),
    lambda c: c.eval("return redis.call('HSET', KEYS[1], 'url', 'x')", 1, REGISTRY_KEY),
    # a script declaring an allowed key and touching another: Redis checks the call inside the script too
    lambda c: c.eval("return redis.call('HSET', ARGV[1], 'url', 'x')", 1, "axl:jobs:x", REGISTRY_KEY),
    lambda c: c.flushall(),
    lambda c: c.flushdb(),
    lambda c: c.keys("axl:registry:*"),
    lambda c: c.config_set("protected-mode", "no"),
    lambda c: c.acl_setuser(JOBS_USER, keys=["*"]),
    lambda c: c.swapdb(0, 1),
    lambda c: c.execute_command("CLIENT", "LIST"),
    lambda c: c.execute_command("MONITOR"),
], ids=["set", "hset", "zadd", "get", "hgetall", "zrange", "del", "rename", "copy", "eval", "eval-undeclared",
        "flushall", "flushdb", "keys", "config", "acl", "swapdb", "client-list", "monitor"])
def test_the_jobs_user_cannot_touch_registry_keys(acl_redis: RedisServer, attempt) -> None:
    registry = _client(acl_redis, REGISTRY_USER)
    registry.hset(REGISTRY_KEY, mapping={"url": "http://127.0.0.1:8901"})
    jobs = _client(acl_redis, JOBS_USER)
    jobs.set("axl:jobs:mine", "1")
    with pytest.raises((NoPermissionError, ResponseError)) as refused:
        attempt(jobs)
    message = str(refused.value).lower()
    assert "no permissions" in message or "can't access" in message, message  # NOPERM, or NOPERM inside a script
    assert registry.hgetall(REGISTRY_KEY) == {"url": "http://127.0.0.1:8901"}  # untouched


def test_the_default_user_is_off(acl_redis: RedisServer) -> None:
    once = {"retry": Retry(NoBackoff(), 0)}  # a refused login is final; redis-py would retry it with backoff
    with pytest.raises(AuthenticationError):
        redis.Redis(port=acl_redis.port, **once).get(REGISTRY_KEY)
    with pytest.raises(AuthenticationError):  # the old requirepass style (password only = the default user)
        redis.Redis(port=acl_redis.port, password=PASSWORDS[JOBS_USER], **once).ping()
    with pytest.raises(AuthenticationError):
        redis.Redis.from_url(url_for_user(f"redis://127.0.0.1:{acl_redis.port}/0", JOBS_USER, "wrong"), **once).ping()


def test_registry_store_works_as_the_registry_user(acl_redis: RedisServer) -> None:
    from axl_mesh.redis_util import create_redis
    from axl_mesh.registry_schemas import InstanceLoad, InstanceRegistration
    from services.mesh_registry.store import RegistryStore

    async def round_trip() -> list[str]:
        client = create_redis(acl_redis.url_for(REGISTRY_USER))
        store = RegistryStore(client, prefix="axl:registry", ttl_seconds=30)
        try:
            await store.upsert(InstanceRegistration(
                instance_id="acl-w1", specialist="coder", model_id="axl-coder", url="http://127.0.0.1:8901",
                context_length=256, capabilities=["completions"], checkpoint_version="v1",
                max_concurrency=4, load=InstanceLoad(running=0, waiting=0)))
            # moved to another model: the script's ZREM on a key it computes itself is allowed too
            await store.upsert(InstanceRegistration(
                instance_id="acl-w1", specialist="coder", model_id="axl-other", url="http://127.0.0.1:8901",
                context_length=256, capabilities=["completions"], checkpoint_version="v1",
                max_concurrency=4, load=InstanceLoad(running=0, waiting=0)))
            listed = [r.model_id for r in await store.instances()]
            assert await store.delete("acl-w1")
            return listed
        finally:
            await client.aclose()

    assert asyncio.run(round_trip()) == ["axl-other"]


def test_job_store_and_rq_work_as_the_jobs_user(acl_redis: RedisServer, tmp_path: Path) -> None:
    from axl_mesh.jobs import TRAIN_FUNCTION
    from axl_mesh.jobs_protocol import JobStatus

    settings = JobsSettings(redis_url=acl_redis.url_for(JOBS_USER), data_dir=tmp_path)
    conn = redis.Redis.from_url(settings.redis_url)
    store = JobStore(conn, settings)
    store.create(JobKind.FINE_TUNE, {"id": "ftjob-acl", "status": JobStatus.QUEUED.value})
    store.add_event("ftjob-acl", "hello")
    assert [e["message"] for e in store.events_page("ftjob-acl", None, 10)[0]] == ["hello"]
    assert store.set_status(JobKind.FINE_TUNE, "ftjob-acl", JobStatus.CANCELLED)
    queue = rq_queue(QueueName.TRAIN, conn)
    job = queue.enqueue(TRAIN_FUNCTION, "ftjob-acl", job_id="ftjob-acl")
    assert fetch_rq_job(job.id, conn).get_status() == "queued" and queue.count == 1
    conn.publish("rq:pubsub:some-worker", json.dumps({"command": "shutdown"}))
    conn.publish(MODEL_STORE_CHANNEL, "{}")
    with pytest.raises(NoPermissionError):
        conn.publish("axl:registry:events", "{}")


def test_the_rules_are_what_the_docs_say() -> None:
    assert user_rules(REGISTRY_USER) == ["resetkeys", "resetchannels", "~axl:registry:*", "-@all", "+@all",
                                         "-@dangerous"]
    jobs = user_rules(JOBS_USER, jobs_prefix="axl:e2e-jobs")
    assert "~axl:e2e-jobs:*" in jobs and "~rq:*" in jobs and "&rq:*" in jobs and f"&{MODEL_STORE_CHANNEL}" in jobs
    assert not any("registry" in rule for rule in jobs)
    lines = acl_directives(PASSWORDS)
    assert lines[0].startswith("user default off ")
    with pytest.raises(ValueError, match="jobs"):
        acl_directives({REGISTRY_USER: "x"})
