"""Training groups: how N trainer workers meet in Redis to run one fine-tuning job as one torch.distributed group.
Imports no torch (the torch side is ``services.trainer_worker.group``).

A job with ``hyperparameters.workers: N`` (N > 1) is dequeued by one trainer worker, the coordinator (rank 0). For
each attempt it:

1. opens a group record (one hash per job: the attempt, N, rank 0's ``host:port`` for torch's TCPStore rendezvous,
   ``state=open``), which expires unless the coordinator keeps refreshing it: members of a dead coordinator give up;
2. enqueues N-1 member jobs (``TRAIN_MEMBER_FUNCTION``) at the front of the train queue; an idle trainer worker on
   any host that reaches Redis dequeues one (RQ: one job per worker, so a busy trainer never joins) and claims a
   slot atomically (:data:`_CLAIM`: never more than N-1, never after the group closed);
3. waits until N-1 members hold a slot or the timeout passes, then closes the group atomically (:data:`_CLOSE`):
   ranks go to the members still alive (each keeps a short-lived ``alive`` key while it waits), in slot order, and
   the world size is fixed. A member that claims after that finds the group closed and ends at once.

Everything in the record is data (JSON and numbers); the member jobs carry only (job id, attempt).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

from axl_mesh.jobs.settings import JobsSettings

OPEN, STARTED = "open", "started"

# Claim a member slot. KEYS: group, the alive prefix; ARGV: attempt, member JSON, alive TTL (ms). Returns the slot
# (1..N-1) or -1 when the group is not open for this attempt or already full.
_CLAIM = """
if redis.call('HGET', KEYS[1], 'state') ~= 'open' then return -1 end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return -1 end
local slots = tonumber(redis.call('HGET', KEYS[1], 'slots'))
if slots >= tonumber(redis.call('HGET', KEYS[1], 'workers')) - 1 then return -1 end
slots = slots + 1
redis.call('HSET', KEYS[1], 'slots', slots, 'member:' .. slots, ARGV[2])
redis.call('SET', KEYS[2] .. slots, '1', 'PX', ARGV[3])
return slots
"""

# Close an open group: the slots whose alive key still exists get ranks 1.. in slot order. KEYS: group, the alive
# prefix; ARGV: attempt, TTL of the started record (ms). Returns the ranked slots ({} when it was not open).
_CLOSE = """
if redis.call('HGET', KEYS[1], 'state') ~= 'open' then return {} end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return {} end
local slots = tonumber(redis.call('HGET', KEYS[1], 'slots'))
local ranked = {}
for slot = 1, slots do
  if redis.call('EXISTS', KEYS[2] .. slot) == 1 then table.insert(ranked, slot) end
end
redis.call('HSET', KEYS[1], 'state', 'started', 'ranked', table.concat(ranked, ','), 'world_size', #ranked + 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return ranked
"""


@dataclass(frozen=True)
class Member:
    """One rank of a started group: who and where (the host name decides which ranks share a machine)."""

    rank: int
    name: str
    host: str

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "name": self.name, "host": self.host}


@dataclass(frozen=True)
class GroupView:
    """A group record as read back: what a member needs to join, once the group has started."""

    attempt: int
    workers: int
    master: str  # host:port of rank 0's TCPStore
    state: str
    members: list[Member]  # rank order, rank 0 first (only once started)
    ranked: list[int]  # the member slots that got ranks 1.., in order (only once started)
    config: dict[str, Any]  # rank 0's training configuration
    resume_step: int | None  # the checkpoint step rank 0 resumes from

    @property
    def world_size(self) -> int:
        return len(self.members)

    def rank_of(self, slot: int) -> int | None:
        """The rank of the member holding ``slot``; None when it was left out (it was not alive at the close)."""
        return self.ranked.index(slot) + 1 if slot in self.ranked else None


class GroupStore:
    """The group records of fine-tuning jobs in Redis (same key prefix as :class:`~axl_mesh.jobs.JobStore`)."""

    def __init__(self, client: redis.Redis, settings: JobsSettings) -> None:
        self.redis = client
        self.prefix = settings.jobs_key_prefix
        self._claim = client.register_script(_CLAIM)
        self._close = client.register_script(_CLOSE)

    def key(self, job_id: str) -> str:
        return f"{self.prefix}:ft:{job_id}:group"

    def alive_prefix(self, job_id: str) -> str:
        return f"{self.prefix}:ft:{job_id}:group:alive:"

    # --- the coordinator (rank 0)
    def open(
        self,
        job_id: str,
        *,
        attempt: int,
        workers: int,
        master: str,
        coordinator: dict[str, str],
        config: dict[str, Any],
        resume_step: int | None,
        ttl_seconds: float,
    ) -> None:
        """A fresh open record for ``attempt`` (replacing any earlier attempt's). ``config`` is rank 0's training
        configuration: every rank must run the same one (another eval interval on one rank would desynchronise
        the group's collectives), so members take it from here, not from their own settings. ``resume_step``:
        the step of the checkpoint rank 0 resumes from, which a member must see too (None: a fresh start)."""
        with self.redis.pipeline() as pipe:
            pipe.delete(self.key(job_id))
            pipe.hset(
                self.key(job_id),
                mapping={
                    "attempt": str(attempt),
                    "workers": workers,
                    "master": master,
                    "state": OPEN,
                    "slots": 0,
                    "member:0": json.dumps(coordinator),
                    "config": json.dumps(config),
                    "resume_step": json.dumps(resume_step),
                },
            )
            pipe.pexpire(self.key(job_id), int(ttl_seconds * 1000))
            pipe.execute()

    def keep_open(self, job_id: str, ttl_seconds: float) -> None:
        """The coordinator is alive: members that find the record gone know it is not."""
        self.redis.pexpire(self.key(job_id), int(ttl_seconds * 1000))

    def live_slots(self, job_id: str) -> int:
        """How many claimed slots have a member still alive."""
        slots = int(self.redis.hget(self.key(job_id), "slots") or 0)
        if not slots:
            return 0
        return int(self.redis.exists(*(f"{self.alive_prefix(job_id)}{s}" for s in range(1, slots + 1))))

    def close(self, job_id: str, *, attempt: int, ttl_seconds: float) -> GroupView | None:
        """Close the group and fix its ranks (None when it was not open for ``attempt``)."""
        ranked = self._close(
            keys=[self.key(job_id), self.alive_prefix(job_id)], args=[str(attempt), int(ttl_seconds * 1000)]
        )
        if not ranked and self.redis.hget(self.key(job_id), "state") != STARTED.encode():
            return None
        return self.read(job_id)

    def delete(self, job_id: str) -> None:
        self.redis.delete(self.key(job_id))

    # --- a member
    def claim(self, job_id: str, *, attempt: int, member: dict[str, str], alive_seconds: float) -> int | None:
        """A slot in the open group of ``attempt``, or None (closed, full, another attempt, gone)."""
        slot = int(
            self._claim(
                keys=[self.key(job_id), self.alive_prefix(job_id)],
                args=[str(attempt), json.dumps(member), int(alive_seconds * 1000)],
            )
        )
        return slot if slot > 0 else None

    def heartbeat(self, job_id: str, slot: int, alive_seconds: float) -> None:
        self.redis.set(f"{self.alive_prefix(job_id)}{slot}", "1", px=int(alive_seconds * 1000))

    def read(self, job_id: str) -> GroupView | None:
        raw = self.redis.hgetall(self.key(job_id))
        if not raw:
            return None
        fields = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
        members: list[Member] = []
        ranked = [int(s) for s in fields.get("ranked", "").split(",") if s]
        if fields["state"] == STARTED:
            for rank, slot in enumerate([0, *ranked]):
                who = json.loads(fields[f"member:{slot}"])
                members.append(Member(rank=rank, name=who["name"], host=who["host"]))
        return GroupView(
            attempt=int(fields["attempt"]),
            workers=int(fields["workers"]),
            master=fields["master"],
            state=fields["state"],
            members=members,
            ranked=ranked,
            config=json.loads(fields.get("config") or "{}"),
            resume_step=json.loads(fields.get("resume_step") or "null"),
        )
