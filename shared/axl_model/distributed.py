"""Training as one group of processes: torchrun's environment, the gloo process group, and the few collective
steps the training loop needs.

    torchrun --nproc-per-node 2 -m axl_model.cli train --preset micro --batch-size 4 --out checkpoints/axl-micro

torchrun starts one process per rank and tells each who it is through environment variables (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/MASTER_PORT of its c10d store, TORCHELASTIC_RESTART_COUNT). `axl train`
reads them (`TrainingGroup.from_env`), joins the group over gloo (CPU) and wraps the model in
DistributedDataParallel, which averages the gradients of every step across ranks. `--batch-size` is per rank (as
with torch's DataLoader under DDP): N ranks x batch B train on global batches of N x B windows, rank r taking
rows r, r + N, ... of each (`data.WindowSampler`). Rank 0 alone writes checkpoints, logs and the progress bar; all
ranks read the checkpoint when resuming, so across machines `--out` must be on a filesystem every host sees.

Without torchrun (or with one rank) every method here is a no-op and training is the single-process loop.
"""
from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

BACKEND = "gloo"  # CPU training; gloo is the backend torch.distributed supports on every CPU platform
T = TypeVar("T")


@dataclass(frozen=True)
class TrainingGroup:
    """Who this process is in the training group; `TrainingGroup()` is a lone process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # rank among the processes on this machine
    local_world_size: int = 1
    restart_count: int = 0  # how often torchrun's elastic agent has restarted the group (--max-restarts)
    run_id: str | None = None  # torchrun's --rdzv-id: a fresh uuid per `torchrun --standalone`, else "none" or the job's

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "TrainingGroup":
        """The group torchrun's environment describes, or a lone process when not launched by torchrun."""
        env = os.environ if environ is None else environ
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return cls()
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        return cls(rank=rank, world_size=world, local_rank=int(env.get("LOCAL_RANK", rank)),
                   local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
                   restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
                   run_id=env.get("TORCHELASTIC_RUN_ID"))

    @property
    def active(self) -> bool:
        """True when there are other ranks to talk to."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, logs and progress."""
        return self.rank == 0

    def default_threads(self) -> int:
        """Torch threads per rank when none are asked for: this machine's CPUs shared by its ranks."""
        return max(1, (os.cpu_count() or 1) // self.local_world_size)

    # ------------------------------------------------------------------------------------------ lifetime
    def join(self) -> bool:
        """Join the process group (rendezvous through torchrun's store: MASTER_ADDR/MASTER_PORT). Returns True
        when this call created it (and so `leave` should destroy it), False when it already existed or is not
        needed."""
        if not self.active or dist.is_initialized():
            return False
        store, _, _ = next(dist.rendezvous("env://", self.rank, self.world_size))
        # torchrun's agent keeps one store for all restarts, and every attempt's process group would write the
        # same keys: a restarted rank could read the dead group's address of rank 0 and fail to connect. The
        # keys of each attempt get their own prefix.
        attempt_store = dist.PrefixStore(f"axl/attempt_{self.restart_count}", store)
        dist.init_process_group(BACKEND, store=attempt_store, rank=self.rank, world_size=self.world_size)
        return True

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to run forward/backward through: DDP (gradients averaged across ranks) when active.
        Buffers are not broadcast each step: the model's (RoPE tables) are computed, the same on every rank."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, forward_sync_buffers=False)

    # ------------------------------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    @contextlib.contextmanager
    def local_main_first(self) -> Iterator[None]:
        """Run the block on this machine's local rank 0 first, then on the other local ranks: they find what it
        prepared (the data cache) instead of building it again at the same time."""
        if self.active and self.local_rank != 0:
            dist.barrier()
        yield
        if self.active and self.local_rank == 0:
            dist.barrier()

    def agree(self, elapsed: float, stop: bool) -> tuple[float, bool]:
        """(elapsed seconds, stop?) every rank uses for this step: the largest clock and any rank's stop request.
        The learning rate of a time budget and the decision to end depend on them; ranks that differed would
        diverge or wait forever on each other."""
        if not self.active:
            return elapsed, stop
        values = torch.tensor([elapsed, float(stop)], dtype=torch.float64)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return float(values[0]), bool(values[1])

    def sum(self, *values: float) -> tuple[float, ...]:
        """Each value summed over the ranks (float64)."""
        if not self.active:
            return values
        total = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return tuple(float(v) for v in total)

    def mean(self, value: float) -> float:
        return self.sum(value)[0] / self.world_size

    def shard(self, items: Iterable[T]) -> Iterable[T]:
        """This rank's share of a sequence every rank enumerates the same way: items r, r + N, ..."""
        return itertools.islice(items, self.rank, None, self.world_size) if self.active else items


def all_reduce_bytes_per_step(param_count: int, world_size: int, bytes_per_value: int = 4) -> float:
    """Bytes each rank sends (and receives) per optimizer step in a ring all-reduce of the gradients:
    2 (N - 1) / N x the gradient size (reduce-scatter, then all-gather)."""
    return 2 * (world_size - 1) / world_size * param_count * bytes_per_value
