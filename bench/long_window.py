"""Training cost per byte of long windows: bytes/s of a training step (forward, backward, Lion update) at
windows of 1,024 and 4,096 bytes, for micro as it is (every scale attends to the whole window) and for micro
with a local window on its fine stack (`scales={"fine": {"local_window": 512}}`), and for micro-long.
Every step trains on the same number of bytes (batch x window = 8,192), so bytes/s compare directly.

    python -m bench long_window --threads 2
"""
from __future__ import annotations

import time

import torch

from axl_model.config import ModelConfig
from axl_model.model import MultiScaleTransformer
from axl_model.optim import build_optimizer
from axl_model.train import masked_cross_entropy

from .common import defaults

BYTES_PER_STEP, WARMUP_STEPS, MEASURE_STEPS = 8192, 1, 3
FINE_WINDOW = 512
VARIANTS = {  # name -> (preset, per-scale overrides)
    "micro": ("micro", {}),
    f"micro, fine window {FINE_WINDOW}": ("micro", {"fine": {"local_window": FINE_WINDOW}}),
    "micro-long": ("micro-long", None),
}


def step_seconds(config: ModelConfig, seq_len: int) -> float:
    """Best of MEASURE_STEPS training steps of batch BYTES_PER_STEP / seq_len (best: the VM is shared)."""
    torch.manual_seed(0)
    model = MultiScaleTransformer(config).train()
    optimizer = build_optimizer(model, "lion")
    batch = BYTES_PER_STEP // seq_len
    ids = torch.randint(0, 256, (batch, seq_len + 1))
    x, y, mask = ids[:, :-1], ids[:, 1:], torch.ones(batch, seq_len)
    best = float("inf")
    for i in range(WARMUP_STEPS + MEASURE_STEPS):
        started = time.perf_counter()
        masked_cross_entropy(model(x), y, mask).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= WARMUP_STEPS:
            best = min(best, time.perf_counter() - started)
    return best


def run(args) -> dict:
    results = {}
    for name, (preset, scales) in VARIANTS.items():
        base = {}
        for seq_len in (1024, 4096):
            overrides = {"max_seq_len": max(seq_len, ModelConfig.from_name(preset).max_seq_len)}
            if scales is not None:
                overrides["scales"] = scales
            seconds = step_seconds(ModelConfig.from_name(preset, **overrides), seq_len)
            bytes_per_s = BYTES_PER_STEP / seconds
            base.setdefault("bytes_per_s", bytes_per_s)
            key = f"{preset}{'_fine' + str(FINE_WINDOW) if scales else ''}_seq{seq_len}_bytes_per_s"
            results[key] = bytes_per_s
            print(f"{name:28s} seq {seq_len:5d} (batch {BYTES_PER_STEP // seq_len}): {seconds * 1000:7.0f} ms/step, "
                  f"{bytes_per_s:8,.0f} bytes/s ({bytes_per_s / base['bytes_per_s']:.2f}x its seq-1024 rate)")
    return results


if __name__ == "__main__":
    torch.set_num_threads(defaults().threads)
    run(defaults())
