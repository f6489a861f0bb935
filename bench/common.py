"""Shared by the benchmarks: a peak-FLOP/s probe, the FLOP count of a training step, the stdlib data."""
from __future__ import annotations

import argparse
import os
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from axl_model.config import SCALES, ModelConfig

CACHE_DIR = Path(os.environ.get("AXL_BENCH_CACHE", Path(tempfile.gettempdir()) / "axl-bench-cache"))


def defaults(**values) -> argparse.Namespace:
    """The arguments `python -m bench` passes, for running one module alone."""
    base = dict(budget=90.0, threads=os.cpu_count(), json=None)
    base.update(values)
    return argparse.Namespace(**base)


def matmul_peak_flops(n: int = 2048, repeats: int = 8, clock=time.perf_counter) -> float:
    """FLOP/s of a large fp32 matmul (n x n @ n x n) with the current thread count: the 'peak' MFU divides by.
    clock=time.process_time: FLOP per CPU-second of this process (what a loaded machine bends least)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        started = clock()
        a @ b
        best = min(best, clock() - started)
    return 2 * n**3 / best


def training_flops_per_byte(config: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per training byte of a MultiScaleTransformer: 6 x (multiply-adds of every
    weight, weighted by how many tokens of its scale one byte makes) + 6 x attention score/value products
    (full T x T, as the PaLM estimate counts them)."""
    d, f, L, V = config.d_model, config.d_ff, config.n_layers, config.vocab_size
    block = 4 * d * d + 3 * d * f  # qkv + out + SwiGLU
    tokens_per_byte = {"fine": 1.0, "medium": 1 / SCALES[1], "coarse": 1 / SCALES[2]}
    length = {"fine": seq_len, "medium": 1 + seq_len // SCALES[1], "coarse": 1 + seq_len // SCALES[2]}
    macs = sum(tokens_per_byte[s] * L * block for s in tokens_per_byte)  # the three stacks
    macs += tokens_per_byte["medium"] * SCALES[1] * d * d + tokens_per_byte["coarse"] * SCALES[2] * d * d  # downsampling
    attention = sum(tokens_per_byte[s] * L * 2 * d * length[s] for s in tokens_per_byte)  # QK^T and AV per layer
    for q in tokens_per_byte:
        for k in tokens_per_byte:
            if q != k:
                macs += tokens_per_byte[q] * 2 * d * d + tokens_per_byte[k] * 2 * d * d  # q/out, k/v projections
                attention += tokens_per_byte[q] * 2 * d * (1 + length[k])
    macs += 3 * d * 3 + V * d  # fusion gate, LM head
    return 6 * macs + 6 * attention


def single_scale_flops_per_byte(d: int, f: int, n_layers: int, vocab: int, seq_len: int) -> float:
    return 6 * (n_layers * (4 * d * d + 3 * d * f) + vocab * d) + 6 * n_layers * 2 * d * seq_len


def stdlib_sources() -> list[str]:
    """The running Python's standard library without its test suites (what `axl train` reads by default,
    minus the tests, to keep preparation quick): top-level modules and packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "ensurepip", "turtledemo",
            "tkinter", "config-3.11-x86_64-linux-gnu"}
    sources = [str(root / "*.py")]
    sources += sorted(str(p) for p in root.iterdir() if p.is_dir() and p.name not in skip and not p.name.startswith(("config-", ".")))
    return sources
