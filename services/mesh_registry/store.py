"""Instance state in Redis.

Per instance, a hash ``<prefix>:instance:<id>`` expiring after the TTL; per model, per specialist and for all
instances, a sorted set of ids scored by expiry time (ms, Redis's clock). A write updates all of them in one Lua
script (atomic, and moves the id out of its old model/specialist sets when a re-assertion changes them);
lookups first drop members whose score has passed, then read the hashes that are still there.
"""

from __future__ import annotations

import json
from collections import defaultdict

import redis.asyncio as aioredis

from axl_mesh.registry_schemas import (
    ON_DEMAND_SPECIALIST,
    InstanceAck,
    InstanceLoad,
    InstanceRecord,
    InstanceRegistration,
    ModelSummary,
)

# KEYS: 1 instance hash, 2 all-instances set, 3 model set, 4 specialist set.
# ARGV: 1 ttl ms, 2 instance id, 3 model id, 4 specialist, 5 model-set prefix, 6 specialist-set prefix,
#       7.. field/value pairs of the registration.
_UPSERT = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl_ms = tonumber(ARGV[1])
local expires_ms = now_ms + ttl_ms
local id = ARGV[2]
local old = redis.call('HMGET', KEYS[1], 'model_id', 'specialist', 'registered_at_ms')
local created = 0
if not old[1] then created = 1 end
if old[1] and old[1] ~= ARGV[3] then redis.call('ZREM', ARGV[5] .. old[1], id) end
if old[2] and old[2] ~= ARGV[4] then redis.call('ZREM', ARGV[6] .. old[2], id) end
local registered_ms = old[3] or tostring(now_ms)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'registered_at_ms', registered_ms, 'last_heartbeat_ms', tostring(now_ms),
           'expires_at_ms', tostring(expires_ms), unpack(ARGV, 7))
redis.call('PEXPIRE', KEYS[1], ttl_ms)
redis.call('ZADD', KEYS[2], expires_ms, id)
redis.call('ZADD', KEYS[3], expires_ms, id)
redis.call('ZADD', KEYS[4], expires_ms, id)
return {created, expires_ms}
"""

# KEYS: 1 instance hash, 2 all-instances set. ARGV: 1 instance id, 2 model-set prefix, 3 specialist-set prefix.
_DELETE = """
local old = redis.call('HMGET', KEYS[1], 'model_id', 'specialist')
redis.call('ZREM', KEYS[2], ARGV[1])
if not old[1] then return 0 end
redis.call('ZREM', ARGV[2] .. old[1], ARGV[1])
redis.call('ZREM', ARGV[3] .. old[2], ARGV[1])
redis.call('DEL', KEYS[1])
return 1
"""


class RegistryStore:
    """Register, refresh, drop and look up instances; every method is one or two Redis round trips."""

    def __init__(self, redis: aioredis.Redis, *, prefix: str, ttl_seconds: float) -> None:
        self.redis = redis
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self._instance_prefix = f"{prefix}:instance:"
        self._model_prefix = f"{prefix}:model:"
        self._specialist_prefix = f"{prefix}:specialist:"
        self._all_key = f"{prefix}:instances"
        self._upsert = redis.register_script(_UPSERT)
        self._delete = redis.register_script(_DELETE)

    async def upsert(self, registration: InstanceRegistration) -> InstanceAck:
        """Create or re-assert an instance and push its expiry one TTL ahead."""
        reg = registration
        fields = {
            "instance_id": reg.instance_id,
            "specialist": reg.specialist,
            "model_id": reg.model_id,
            "url": reg.url,
            "context_length": reg.context_length,
            "capabilities": json.dumps(reg.capabilities),
            "checkpoint_version": reg.checkpoint_version,
            "max_concurrency": reg.max_concurrency,
            "running": reg.load.running,
            "waiting": reg.load.waiting,
        }
        pairs = [str(item) for pair in fields.items() for item in pair]
        created, expires_ms = await self._upsert(
            keys=[
                self._instance_prefix + reg.instance_id,
                self._all_key,
                self._model_prefix + reg.model_id,
                self._specialist_prefix + reg.specialist,
            ],
            args=[
                self.ttl_ms,
                reg.instance_id,
                reg.model_id,
                reg.specialist,
                self._model_prefix,
                self._specialist_prefix,
                *pairs,
            ],
        )
        return InstanceAck(
            instance_id=reg.instance_id,
            created=bool(created),
            ttl_seconds=self.ttl_ms / 1000,
            expires_at=int(expires_ms) / 1000,
        )

    async def delete(self, instance_id: str) -> bool:
        """Forget an instance now; False when it was not (or no longer) registered."""
        removed = await self._delete(
            keys=[self._instance_prefix + instance_id, self._all_key],
            args=[instance_id, self._model_prefix, self._specialist_prefix],
        )
        return bool(removed)

    async def instances(self, *, model: str | None = None, specialist: str | None = None) -> list[InstanceRecord]:
        """Healthy instances, optionally of one model and/or specialist, least busy first."""
        if model is not None:
            index = self._model_prefix + model
        elif specialist is not None:
            index = self._specialist_prefix + specialist
        else:
            index = self._all_key
        records = [r for r in await self._live(index) if specialist is None or r.specialist == specialist]
        return sorted(records, key=lambda r: (r.busyness, r.instance_id))

    async def models(self) -> list[ModelSummary]:
        """Distinct served models: the smallest context length and the capabilities every instance shares.

        Pool workers' own records (specialist ``on-demand``) are not models: they are left out."""
        by_model: dict[str, list[InstanceRecord]] = defaultdict(list)
        for record in await self._live(self._all_key):
            if record.specialist != ON_DEMAND_SPECIALIST:
                by_model[record.model_id].append(record)
        summaries = []
        for model_id, records in sorted(by_model.items()):
            newest = max(records, key=lambda r: r.last_heartbeat)
            shared = set(records[0].capabilities).intersection(*(r.capabilities for r in records[1:]))
            summaries.append(
                ModelSummary(
                    id=model_id,
                    created=int(min(r.registered_at for r in records)),
                    specialist=newest.specialist,
                    context_length=min(r.context_length for r in records),
                    capabilities=sorted(shared),
                    instances=len(records),
                )
            )
        return summaries

    async def _live(self, index_key: str) -> list[InstanceRecord]:
        seconds, micros = await self.redis.time()
        now_ms = seconds * 1000 + micros // 1000
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(index_key, "-inf", now_ms)
            pipe.zrange(index_key, 0, -1)
            _, ids = await pipe.execute()
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for instance_id in ids:
                pipe.hgetall(self._instance_prefix + instance_id)
            hashes = await pipe.execute()
        return [_record_from_hash(h) for h in hashes if h]  # an empty hash expired between the two reads


def _record_from_hash(h: dict[str, str]) -> InstanceRecord:
    return InstanceRecord(
        instance_id=h["instance_id"],
        specialist=h["specialist"],
        model_id=h["model_id"],
        url=h["url"],
        context_length=int(h["context_length"]),
        capabilities=json.loads(h["capabilities"]),
        checkpoint_version=h["checkpoint_version"],
        max_concurrency=int(h["max_concurrency"]),
        load=InstanceLoad(running=int(h["running"]), waiting=int(h["waiting"])),
        registered_at=int(h["registered_at_ms"]) / 1000,
        last_heartbeat=int(h["last_heartbeat_ms"]) / 1000,
        expires_at=int(h["expires_at_ms"]) / 1000,
    )
