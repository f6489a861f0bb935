"""Reaching the group (services.trainer_worker.group._join) with real torch TCPStores, in this process: a rank 0
whose members never arrive and a member whose rank 0 is out of reach both raise GroupLost within
AXL_TRAIN_GROUP_TIMEOUT_SECONDS (not gloo's collective timeout of minutes), and which errors count as a lost group.
The whole job path (two trainer processes, events, requeue) is test_group_jobs.py's."""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from services.trainer_worker.group import GroupLost, NotEnoughWorkers, _join, is_group_loss
from services.trainer_worker.settings import Settings

JOB = "ftjob-" + "b" * 24


def _settings() -> Settings:
    return Settings(train_group_timeout_seconds=1.0, train_group_collective_timeout_seconds=600.0)


def test_rank_0_gives_up_on_members_that_never_reach_it_within_the_group_timeout() -> None:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    started = time.monotonic()
    with pytest.raises(GroupLost, match=r"rank\(s\) 1, 2 did not reach rank 0 at 10\.0\.0\.9:29500 within 1 s"):
        _join("10.0.0.9:29500", 0, 3, JOB, 1, _settings(), store=store)
    assert time.monotonic() - started < 30
    assert not dist.is_initialized()


def test_rank_0_names_only_the_members_that_did_not_reach_it() -> None:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    store.set(f"axl/{JOB}/attempt_2/reached/1", "1")  # what a member that connected writes
    with pytest.raises(GroupLost, match=r"rank\(s\) 2 did not reach"):
        _join("10.0.0.9:29500", 0, 3, JOB, 2, _settings(), store=store)


def test_a_member_that_cannot_reach_rank_0_says_so_within_the_group_timeout() -> None:
    started = time.monotonic()
    # 192.0.2.0/24 (TEST-NET-1) is never routed: as a firewall or a wrong AXL_ADVERTISE_HOST would make it.
    with pytest.raises(GroupLost, match=r"rank 1 cannot reach rank 0 at 192\.0\.2\.1:29500 within 1 s"):
        _join("192.0.2.1:29500", 1, 2, JOB, 1, _settings())
    assert time.monotonic() - started < 30
    assert not dist.is_initialized()


def test_which_errors_count_as_a_lost_group() -> None:
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:62189")
    assert is_group_loss(gloo) and is_group_loss(GroupLost("x")) and is_group_loss(dist.DistNetworkError("x"))
    # Training's own failures are not: they fail the job instead of requeueing it.
    assert not is_group_loss(ValueError("the loss became nan")) and not is_group_loss(MemoryError())
    assert not is_group_loss(RuntimeError("shape mismatch")) and not is_group_loss(NotEnoughWorkers("x"))
