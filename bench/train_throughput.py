"""Training throughput of micro: bytes/s, model FLOPs per byte, and model FLOP utilisation (MFU) against a
large fp32 matmul measured in the same run with the same threads."""
from __future__ import annotations

import time

import torch

from axl_model.config import ModelConfig
from axl_model.model import MultiScaleTransformer
from axl_model.optim import build_optimizer
from axl_model.train import masked_cross_entropy

from .common import defaults, matmul_peak_flops, training_flops_per_byte

BATCH, SEQ_LEN, WARMUP_STEPS, MEASURE_SECONDS = 8, 256, 3, 30.0


def run(args) -> dict:
    peak_before = matmul_peak_flops()
    torch.manual_seed(0)
    config = ModelConfig.from_name("micro")
    model = MultiScaleTransformer(config).train()
    optimizer = build_optimizer(model, "lion")
    ids = torch.randint(0, 256, (BATCH, SEQ_LEN + 1))
    x, y, mask = ids[:, :-1], ids[:, 1:], torch.ones(BATCH, SEQ_LEN)

    def step() -> None:
        loss = masked_cross_entropy(model(x), y, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(WARMUP_STEPS):
        step()
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < MEASURE_SECONDS or steps < 3:
        step()
        steps += 1
    seconds = (time.perf_counter() - started) / steps
    # The peak is the best of a probe before and one after the training steps, so a busy neighbour during
    # one probe does not inflate the ratio.
    peak = max(peak_before, matmul_peak_flops())
    print(f"fp32 matmul peak (2048^3, best of before/after): {peak / 1e9:.1f} GFLOP/s")
    bytes_per_s = BATCH * SEQ_LEN / seconds
    flops_per_byte = training_flops_per_byte(config, SEQ_LEN)
    mfu = flops_per_byte * bytes_per_s / peak
    print(f"micro ({config.param_count() / 1e6:.1f}M params), batch {BATCH} x {SEQ_LEN}, Lion: "
          f"{seconds * 1000:.0f} ms/step, {bytes_per_s:,.0f} bytes/s")
    print(f"model FLOPs per byte (fwd+bwd): {flops_per_byte / 1e6:.1f} MFLOP -> "
          f"{flops_per_byte * bytes_per_s / 1e9:.1f} GFLOP/s = {mfu:.1%} of the matmul peak")
    return {"bytes_per_s": bytes_per_s, "ms_per_step": seconds * 1000, "mflop_per_byte": flops_per_byte / 1e6,
            "peak_gflops": peak / 1e9, "model_gflops": flops_per_byte * bytes_per_s / 1e9, "mfu": mfu}


if __name__ == "__main__":
    torch.set_num_threads(defaults().threads)
    run(defaults())
