"""A fine-tuning job trained by a group of trainer workers (``hyperparameters.workers: N``), the torch side.

The trainer worker that dequeues the job is rank 0, the coordinator (:func:`coordinate`, called by
``jobs.run_training_job``): it opens a torch TCPStore on a free port, publishes ``host:port`` and its training
configuration in the job's group record (``axl_mesh.jobs.groups``), enqueues N-1 member jobs at the front of the
train queue and waits up to ``AXL_TRAIN_GROUP_TIMEOUT_SECONDS`` for idle trainers (any host that reaches Redis) to
claim them. Then it closes the group, ranks the members that are still alive, and every rank joins one gloo process
group through that store (static rendezvous: rank, world size, rank 0's address), exactly as under torchrun, so
``axl_model.train`` runs DDP across them. Rank 0 alone writes checkpoints, progress and events.

Too few workers: the job records "Got W of N workers after T s" and runs with W when W >= ``min_workers``
(default 1), else fails with ``insufficient_workers``. A member that dies mid-run breaks rank 0's next collective
(gloo sees the closed connection); rank 0 records which rank was lost and the job is requeued through RQ's retries,
so the next attempt forms a new group and resumes from the last checkpoint. A member of a dead coordinator fails
the same way and returns to its queue; the reaper requeues the coordinator's job as for any dead worker.

:func:`run_group_member` is the member job (``TRAIN_MEMBER_FUNCTION``): claim a slot, keep it alive until the group
starts, join with its rank, train with rank 0's configuration (paths and threads its own), quietly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from axl_mesh.advertise import is_wildcard, local_address_toward, url_host
from axl_mesh.jobs import (
    TRAIN_MEMBER_FUNCTION,
    GroupStore,
    GroupView,
    JobKind,
    JobStore,
    Member,
    QueueName,
    fetch_rq_job,
    open_job,
    rq_queue,
    valid_id,
)
from axl_mesh.jobs.groups import OPEN, STARTED
from axl_mesh.jobs_protocol import FineTuningJobRecord
from services.trainer_worker.settings import Settings

logger = logging.getLogger(__name__)

FT = JobKind.FINE_TUNE
POLL_SECONDS = 0.2
MEMBER_RESULT_TTL_SECONDS = 24 * 3600


class GroupLost(RuntimeError):
    """A rank of the group cannot be reached (or was lost): the job is requeued while it has retries."""


class NotEnoughWorkers(Exception):
    """Fewer trainer workers than ``min_workers`` joined within the timeout (the job fails, not retried)."""

    code = "insufficient_workers"


def is_group_loss(exc: BaseException) -> bool:
    """Whether ``exc`` is the group breaking (a peer died or went silent), not the training failing: gloo raises
    torch.distributed's errors (or a RuntimeError naming gloo or the connection) when a peer's socket closes or a
    collective times out."""
    import torch.distributed as dist

    if isinstance(exc, (GroupLost, dist.DistError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("gloo", "Connection closed", "Connection reset", "Socket Timeout", "timed out")
    )


def worker_identity() -> dict[str, str]:
    """This rank's trainer worker: its name (as the worker's main process, this horse's parent, calls itself in
    ``__main__``) and host (ranks on one host share its CPUs and RAM)."""
    return {"name": f"trainer-{socket.gethostname()}-{os.getppid()}", "host": socket.gethostname()}


def rendezvous_host(settings: Settings) -> str:
    """The address the group's other trainers reach rank 0 at: ``AXL_ADVERTISE_HOST`` (or the host of
    ``AXL_ADVERTISE_URL``), else the local address this host reaches Redis from (every member reaches Redis, so
    they share its network), else ``AXL_HOST`` when it is one address, else loopback."""
    if settings.advertise_host:
        return settings.advertise_host.strip("[]")
    if settings.advertise_url and urlsplit(settings.advertise_url).hostname:
        return str(urlsplit(settings.advertise_url).hostname)
    toward_redis = local_address_toward(settings.redis_url)
    if toward_redis:
        return toward_redis
    return "127.0.0.1" if is_wildcard(settings.host) else settings.host


def training_group(members: list[Member], rank: int) -> Any:
    """The ``TrainingGroup`` of ``rank``: local ranks count the members on its host (its CPUs and RAM are shared by
    them; the first of them builds the data cache, the others reuse it)."""
    from axl_model.distributed import TrainingGroup

    host = members[rank].host
    same_host = [m.rank for m in members if m.host == host]
    return TrainingGroup(
        rank=rank, world_size=len(members), local_rank=same_host.index(rank), local_world_size=len(same_host)
    )


def _join(
    master: str, rank: int, world_size: int, job_id: str, attempt: int, settings: Settings, store: Any = None
) -> None:
    """Join the gloo process group of ``attempt`` through rank 0's TCPStore (``store`` on rank 0 itself).

    Reaching rank 0 is bounded by ``AXL_TRAIN_GROUP_TIMEOUT_SECONDS``, not by the collective timeout: a member
    that cannot connect (a firewall, a wrong advertised address) raises :class:`GroupLost` within it, and rank 0
    waits that long for every member's "reached" key before it starts gloo's own rendezvous."""
    import torch.distributed as dist

    reach = timedelta(seconds=settings.train_group_timeout_seconds)
    timeout = timedelta(seconds=settings.train_group_collective_timeout_seconds)
    prefix = f"axl/{job_id}/attempt_{attempt}"  # per job and attempt: nothing of a broken attempt is read again
    if store is None:
        host, port = master.rsplit(":", 1)
        try:
            store = dist.TCPStore(host.strip("[]"), int(port), is_master=False, timeout=reach)
        except Exception as exc:  # noqa: BLE001 - whatever torch raises for an unreachable store
            raise GroupLost(
                f"rank {rank} cannot reach rank 0 at {master} within {reach.total_seconds():g} s "
                f"({type(exc).__name__}); trainer hosts must be able to connect to each other "
                "(AXL_ADVERTISE_HOST, firewalls)"
            ) from exc
        store.set_timeout(timeout)
        store.set(f"{prefix}/reached/{rank}", "1")
    else:
        keys = [f"{prefix}/reached/{r}" for r in range(1, world_size)]
        try:
            store.wait(keys, reach)
        except Exception as exc:  # noqa: BLE001 - torch's store timeout
            missing = [r for r, key in enumerate(keys, start=1) if not store.check([key])]
            raise GroupLost(
                f"rank(s) {', '.join(map(str, missing))} did not reach rank 0 at {master} within "
                f"{reach.total_seconds():g} s; trainer hosts must be able to connect to each other "
                "(AXL_ADVERTISE_HOST, firewalls)"
            ) from exc
    dist.init_process_group(
        "gloo", store=dist.PrefixStore(prefix, store), rank=rank, world_size=world_size, timeout=timeout
    )


def _enqueue_members(store: JobStore, settings: Settings, job_id: str, attempt: int, count: int) -> list[str]:
    """N-1 member jobs at the front of the train queue: idle trainers take them before any other job. No retries:
    a member lost mid-run is the coordinator's to handle (the whole job is requeued)."""
    from rq import get_current_job

    queue = rq_queue(QueueName.TRAIN, store.redis)
    coordinator_job = get_current_job()
    # The coordinator's own time limit (the gateway lengthens it for long max_time_seconds): members train as long.
    timeout = (
        coordinator_job.timeout
        if coordinator_job is not None and coordinator_job.timeout
        else settings.job_timeout_seconds
    )
    ids = []
    for index in range(1, count + 1):
        rq_id = f"{job_id}-attempt{attempt}-member{index}"
        queue.enqueue(
            TRAIN_MEMBER_FUNCTION,
            job_id,
            attempt,
            job_id=rq_id,
            at_front=True,
            job_timeout=timeout,
            result_ttl=MEMBER_RESULT_TTL_SECONDS,
            failure_ttl=MEMBER_RESULT_TTL_SECONDS,
            description=f"fine-tune {job_id} (group member)",
        )
        ids.append(rq_id)
    return ids


def _drop_unclaimed(store: JobStore, rq_ids: list[str]) -> None:
    """Member jobs nobody dequeued: out of the queue (one that is dequeued later finds the group closed anyway)."""
    from rq.exceptions import InvalidJobOperation, NoSuchJobError

    for rq_id in rq_ids:
        try:
            job = fetch_rq_job(rq_id, store.redis)
            if job.get_status() == "queued":
                job.cancel()
                job.delete()
        except (NoSuchJobError, InvalidJobOperation):
            pass


@contextlib.contextmanager
def coordinate(
    settings: Settings,
    store: JobStore,
    record: FineTuningJobRecord,
    attempt: int,
    config: dict[str, Any],
    resume_step: int | None,
) -> Iterator[Any]:
    """Rank 0 of job ``record``: form its group (see the module docstring) and yield this rank's
    ``TrainingGroup`` with the process group joined; a lone ``TrainingGroup()`` when the job wants one worker or
    only one is there. Raises :class:`NotEnoughWorkers` below ``min_workers``."""
    from axl_model.distributed import TrainingGroup

    hp = record.hyperparameters
    job_id, workers = record.id, hp.workers
    min_workers = hp.min_workers or 1
    if workers <= 1:
        yield TrainingGroup()
        return

    import torch.distributed as dist

    groups = GroupStore(store.redis, settings)
    ttl = float(settings.heartbeat_ttl_seconds)
    host = rendezvous_host(settings)
    collective_timeout = timedelta(seconds=settings.train_group_collective_timeout_seconds)
    # Port 0: the kernel picks a free one, so two coordinators on one host never collide. The store's server listens
    # on every interface; its own client (this process) connects over loopback, whatever address is advertised.
    tcp_store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=collective_timeout)
    master = f"{url_host(host)}:{tcp_store.port}"
    groups.open(
        job_id,
        attempt=attempt,
        workers=workers,
        master=master,
        coordinator=worker_identity(),
        config=config,
        resume_step=resume_step,
        ttl_seconds=ttl,
    )
    member_jobs = _enqueue_members(store, settings, job_id, attempt, workers - 1)
    timeout = settings.train_group_timeout_seconds
    store.add_event(
        job_id,
        f"Waiting up to {timeout:g} s for {workers - 1} more trainer worker(s) to join (a group of {workers}).",
        data={"workers": workers, "min_workers": min_workers, "rendezvous": master},
    )
    started = time.monotonic()
    try:
        while groups.live_slots(job_id) < workers - 1 and time.monotonic() - started < timeout:
            if store.cancel_requested_at(job_id) is not None:
                break  # training starts and stops at its first step, as a cancelled single worker does
            groups.keep_open(job_id, ttl)
            time.sleep(POLL_SECONDS)
        view = groups.close(job_id, attempt=attempt, ttl_seconds=max(ttl, 60.0))
        waited = time.monotonic() - started
        _drop_unclaimed(store, member_jobs)
        if view is None:
            raise RuntimeError("the training group's record vanished from Redis while it formed")
        world = view.world_size
        if world < workers:
            got = f"Got {world} of {workers} workers after {waited:.0f} s"
            if world < min_workers and store.cancel_requested_at(job_id) is None:  # cancelled: it ends as such
                raise NotEnoughWorkers(
                    f"{got}; min_workers is {min_workers}. Start more trainer workers, or lower "
                    "workers or min_workers, and create the job again."
                )
            store.add_event(
                job_id,
                f"{got}; running with {world}.",
                level="warn",
                data={"workers": workers, "world_size": world, "waited_s": round(waited, 1)},
            )
        store.add_event(
            job_id,
            f"Training as a group of {world} rank(s): "
            + ", ".join(f"rank {m.rank} {m.name}" for m in view.members)
            + ".",
            data={"world_size": world, "ranks": [m.as_dict() for m in view.members], "waited_s": round(waited, 1)},
        )
    except BaseException:
        groups.delete(job_id)  # members still waiting see it gone and return to their queues
        raise
    if world == 1:
        groups.delete(job_id)
        del tcp_store
        yield TrainingGroup()
        return
    try:
        _join(master, 0, world, job_id, attempt, settings, store=tcp_store)
        yield training_group(view.members, 0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        groups.delete(job_id)


def run_group_member(job_id: str, attempt: int) -> dict[str, Any]:
    """A member job (RQ runs it in a trainer's forked process): join the group of ``job_id``'s ``attempt`` if it
    is still forming, then train as the rank it is given. Returns what it did (RQ keeps it as the result).

    It gets ready before it claims a slot (torch imported, rank 0's configuration applied, the job's files and
    checkpoint visible from this host), so a claimed slot joins at once; a host that cannot see the job's data
    says why in the job's events and stays out of the group."""
    if not valid_id("ft", job_id):  # it names Redis keys and folders: only ids we mint
        raise ValueError(f"not a fine-tuning job id: {job_id!r}")
    settings = Settings()
    store, record = open_job(settings, FT, job_id, FineTuningJobRecord)
    groups = GroupStore(store.redis, settings)
    view = groups.read(job_id)
    if record.status.terminal or view is None or view.attempt != int(attempt) or view.state != OPEN:
        logger.info("job %s attempt %s: its group is not forming any more; not joining", job_id, attempt)
        return {"status": "group not forming"}
    me = worker_identity()
    try:
        config = _member_config(settings, store, record, view)
    except ValueError as exc:
        store.add_event(
            job_id,
            f"Trainer {me['name']} cannot join the group: {exc}",
            level="warn",
            data={"trainer": me["name"], "host": me["host"]},
        )
        return {"status": "cannot join", "reason": str(exc)}
    alive = float(settings.heartbeat_ttl_seconds)
    slot = groups.claim(job_id, attempt=int(attempt), member=me, alive_seconds=alive)
    if slot is None:  # closed or full meanwhile
        logger.info("job %s attempt %s: its group is not forming any more; not joining", job_id, attempt)
        return {"status": "group not forming"}
    started = _wait_for_start(groups, job_id, int(attempt), slot, alive, settings)
    rank = started.rank_of(slot) if started is not None else None
    if started is None or rank is None:
        logger.info("job %s attempt %s: its group started without this worker", job_id, attempt)
        return {"status": "left out"}
    logger.info("job %s attempt %s: joining as rank %d of %d", job_id, attempt, rank, started.world_size)
    import torch.distributed as dist

    from axl_model.train import TrainCallbacks, train

    callbacks = TrainCallbacks(should_stop=lambda: store.cancel_requested_at(job_id) is not None)
    try:
        _join(started.master, rank, started.world_size, job_id, int(attempt), settings)
        result = train(config, callbacks, group=training_group(started.members, rank))
    except BaseException as exc:
        # Rank 0 reports a lost group; what broke here (its own error, rank 0 out of reach) only this rank can tell.
        if isinstance(exc, GroupLost) or not is_group_loss(exc):
            store.add_event(
                job_id,
                f"Rank {rank} ({me['name']}) failed: {exc}"
                if isinstance(exc, GroupLost)
                else f"Rank {rank} ({me['name']}) failed: {type(exc).__name__}: {exc}",
                level="error",
                data={"rank": rank, "trainer": me["name"]},
            )
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return {"status": result.status, "rank": rank, "world_size": started.world_size, "steps": result.steps}


def _member_config(settings: Settings, store: JobStore, record: FineTuningJobRecord, view: GroupView) -> Any:
    """Rank 0's training configuration with this host's paths and threads; ValueError when this host cannot see
    the job's training files or the checkpoint rank 0 resumes from (every rank must start from the same state)."""
    import torch.distributed  # noqa: F401 - the slow import, done before the slot is claimed

    from axl_model.train import TrainConfig
    from services.trainer_worker.jobs import checkpoint_step, job_folder, train_config

    out_dir = job_folder(settings, record.id) / "checkpoint"
    mine = train_config(settings, store, record, out_dir)
    wanted = [*(mine.data or []), *(mine.val_data or []), *([mine.init_from] if mine.init_from else [])]
    missing = [path for path in wanted if not os.path.exists(path)]
    if missing:
        raise ValueError(
            f"this host does not see {', '.join(missing)}: every trainer in a group needs the "
            "gateway's data folder and the model store (AXL_DATA_DIR on a shared filesystem)"
        )
    if checkpoint_step(out_dir) != view.resume_step:
        raise ValueError(
            f"rank 0 resumes from the checkpoint at step {view.resume_step} but this host sees "
            f"{checkpoint_step(out_dir)} in {out_dir}: the job folders must be on a shared filesystem"
        )
    # Where files are and how many threads this host gives are this host's; everything else is rank 0's.
    own = {name: getattr(mine, name) for name in ("out_dir", "init_from", "data", "val_data", "num_threads")}
    return TrainConfig(**{**view.config, **own})


def _wait_for_start(
    groups: GroupStore, job_id: str, attempt: int, slot: int, alive: float, settings: Settings
) -> GroupView | None:
    """Keep ``slot`` alive until the coordinator starts the group; None when it will not (it died: its record
    expired; another attempt replaced it; or it never closed within the timeout and a margin)."""
    deadline = time.monotonic() + settings.train_group_timeout_seconds + 2 * alive
    while time.monotonic() < deadline:
        view = groups.read(job_id)
        if view is None or view.attempt != attempt:
            return None
        if view.state == STARTED:
            return view
        groups.heartbeat(job_id, slot, alive)
        time.sleep(POLL_SECONDS)
    return None
