"""torchrun's target in test_distributed.py: `axl train` (axl_model.cli) in float64, one or more runs in one group.

    torchrun --standalone --nproc-per-node 2 tests/axl_model/distributed_harness.py train ... [--- train ...]

float64 makes 2 ranks x batch 4 and 1 process x batch 8 agree to rounding (~1e-15): in float32 their gradients
differ by ~1e-7, enough for Lion's sign() to flip the update of some near-zero components by 2 x lr.
Several runs share one launch (and so one torch import per rank, the slow part of a launch).
AXL_TEST_STEP_SECONDS slows every micro-batch, so that a test can kill a rank mid-run.
"""
from __future__ import annotations

import importlib
import os
import sys
import time

import torch


def main(argv: list[str]) -> int:
    torch.set_default_dtype(torch.float64)
    train_module = importlib.import_module("axl_model.train")
    pause = float(os.environ.get("AXL_TEST_STEP_SECONDS", 0))
    if pause:
        loss = train_module.masked_cross_entropy

        def slow_loss(*args, **kwargs):
            time.sleep(pause)
            return loss(*args, **kwargs)

        train_module.masked_cross_entropy = slow_loss
    from axl_model import cli
    from axl_model.distributed import TrainingGroup

    group = TrainingGroup.from_env()
    group.join()  # one group for every run below: train() leaves a group it did not create in place
    runs, current = [], []
    for arg in argv:
        if arg == "---":
            runs.append(current)
            current = []
        else:
            current.append(arg)
    runs.append(current)
    try:
        return max(cli.main(run) for run in runs)
    finally:
        group.leave()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
