"""The group record of a job trained by several trainers (axl_mesh.jobs.groups) on a real Redis: slots are claimed
atomically and never beyond N-1, never after the close or for another attempt; the close ranks only members still
alive, in slot order; a coordinator that stops refreshing its record lets it expire."""

from __future__ import annotations

import threading
import time

import redis

from axl_mesh.jobs import GroupStore, JobsSettings

JOB = "ftjob-" + "a" * 24


def _store(redis_url: str) -> GroupStore:
    return GroupStore(redis.Redis.from_url(redis_url), JobsSettings(jobs_key_prefix="axl:test-groups"))


def _open(groups: GroupStore, workers: int, attempt: int = 1, ttl: float = 30.0) -> None:
    groups.open(JOB, attempt=attempt, workers=workers, master="10.0.0.1:29500",
                coordinator={"name": "trainer-a-1", "host": "a"}, config={"batch_size": 2}, resume_step=10,
                ttl_seconds=ttl)


def test_concurrent_claims_get_distinct_slots_and_never_more_than_n_minus_1(redis_url: str) -> None:
    groups = _store(redis_url)
    _open(groups, workers=4)
    slots: list[int | None] = []
    lock = threading.Lock()

    def claim(i: int) -> None:
        slot = _store(redis_url).claim(JOB, attempt=1, member={"name": f"trainer-b-{i}", "host": "b"},
                                       alive_seconds=30)
        with lock:
            slots.append(slot)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(s for s in slots if s is not None) == [1, 2, 3] and slots.count(None) == 7
    assert groups.live_slots(JOB) == 3


def test_close_ranks_the_live_members_and_refuses_later_claims(redis_url: str) -> None:
    groups = _store(redis_url)
    _open(groups, workers=4)
    member = {"host": "b"}
    assert groups.claim(JOB, attempt=2, member={**member, "name": "late"}, alive_seconds=30) is None  # other attempt
    assert groups.claim(JOB, attempt=1, member={**member, "name": "m1"}, alive_seconds=0.2) == 1  # will go silent
    assert groups.claim(JOB, attempt=1, member={**member, "name": "m2"}, alive_seconds=30) == 2
    time.sleep(0.4)
    assert groups.live_slots(JOB) == 1
    view = groups.close(JOB, attempt=1, ttl_seconds=60)
    assert view is not None and view.state == "started" and view.world_size == 2
    assert [(m.rank, m.name) for m in view.members] == [(0, "trainer-a-1"), (1, "m2")]
    assert view.rank_of(2) == 1 and view.rank_of(1) is None  # the silent member is left out
    assert view.master == "10.0.0.1:29500" and view.config == {"batch_size": 2} and view.resume_step == 10
    assert groups.claim(JOB, attempt=1, member={**member, "name": "m3"}, alive_seconds=30) is None
    assert groups.close(JOB, attempt=1, ttl_seconds=60) is not None  # closing twice changes nothing
    assert groups.read(JOB).world_size == 2  # type: ignore[union-attr]


def test_a_group_nobody_joined_closes_with_rank_0_alone(redis_url: str) -> None:
    groups = _store(redis_url)
    _open(groups, workers=2)
    view = groups.close(JOB, attempt=1, ttl_seconds=60)
    assert view is not None and view.world_size == 1 and view.ranked == []


def test_the_record_of_a_silent_coordinator_expires(redis_url: str) -> None:
    groups = _store(redis_url)
    _open(groups, workers=2, ttl=0.3)
    groups.keep_open(JOB, 0.3)
    assert groups.read(JOB) is not None
    time.sleep(0.5)
    assert groups.read(JOB) is None  # members waiting on it give up
    assert groups.claim(JOB, attempt=1, member={"name": "m", "host": "b"}, alive_seconds=30) is None
    assert groups.close(JOB, attempt=1, ttl_seconds=60) is None
