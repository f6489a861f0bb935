"""Compute-optimal sizing: which preset to train when all that is given is a wall-clock budget.

    plan = plan_for_budget(3600)             # measures (or reads cached) bytes/s of each candidate preset here
    plan.choice, plan.reason                 # "comment", "the largest preset that sees >= 20 bytes per ..."
    choose_preset([("a", 1e6, 5e4), ...], max_time=3600)   # the rule alone, on given throughputs

The rule. Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models", the Chinchilla paper) find
that for a fixed training compute the loss is lowest when the model sees about 20 training tokens per parameter
(their Table 3: 20.2 tokens/parameter at 1e21 FLOPs and about 20 across their range). This model's tokens are
bytes (the medium and coarse scales are built from the same bytes), so here: pick the largest candidate preset
whose bytes seen in the budget, measured bytes/s x T, reach k x its parameter count, k = 20 (`--tokens-per-param`).
A BPE token is about 4 bytes of code, so counting the paper's tokens as bytes favours larger models than a
strict reading would; k = 80 is the other end. When no candidate reaches k, the smallest is picked (and the plan
says that every shape is short of the rule in that budget).

What is adapted and what is not: the 20 comes from transformers trained on BPE text on accelerators, at 1e18 to
1e24 FLOPs; nothing here re-fits it to byte-level code models at CPU budgets. Throughput is measured, not
assumed: a few training steps of each candidate on random bytes (batch and window as training will run them,
the optimizer included), on this machine with the threads training will use, cached per machine, torch version
and shape (`cache_path`; `--remeasure` measures again, e.g. when the machine was busy). Training also spends
time on validation and checkpoints, so a run sees somewhat fewer bytes than throughput x T.

Candidates are measured smallest first and the search stops at the first one that misses the rule: a larger
preset trains no faster and needs more bytes, so it would miss it too (the plan lists those as not measured).
Presets left out: `tiny` (the tests' shape, a 128-byte window), the `-q` variants (their base's shape with
d_ff rounded for llama.cpp's K-quants) and `micro-long` (its cost is its 4,096-byte window).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import PRESETS, ModelConfig, memory_bytes

__all__ = ["CANDIDATES", "TOKENS_PER_PARAM", "SizingPlan", "cache_path", "choose_preset", "measure_throughput",
           "plan_for_budget", "throughput"]

TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022 (Chinchilla), Table 3: ~20 tokens per parameter
RULE_SOURCE = "Hoffmann et al. 2022 (Chinchilla), ~20 training tokens per parameter; here a token is a byte"
CANDIDATES = ("comment", "docs", "micro", "testgen", "refactor", "reasoning", "code-1b")
MEASURE_STEPS = 2  # timed training steps per preset, after one untimed warm-up step


@dataclasses.dataclass(frozen=True)
class SizingPlan:
    """The choice, why, and the table it came from (rows smallest preset first)."""

    max_time: float
    tokens_per_param: float
    choice: str
    reason: str
    # each: {"preset", "params", "bytes_per_s" (None: not measured), "bytes_in_budget", "bytes_per_param", "meets"}
    rows: tuple[dict[str, Any], ...]


def choose_preset(measured: Sequence[tuple[str, int, float | None]], max_time: float,
                  tokens_per_param: float = TOKENS_PER_PARAM) -> SizingPlan:
    """The rule alone: measured is (preset, parameters, bytes/s or None if not measured), in any order.

    The pick is the largest preset (by parameters) with bytes/s x max_time >= tokens_per_param x parameters;
    when none has, the smallest measured one."""
    if max_time <= 0:
        raise ValueError(f"the time budget must be > 0 seconds, got {max_time:g}")
    if tokens_per_param <= 0:
        raise ValueError(f"tokens per parameter must be > 0, got {tokens_per_param:g}")
    rows = []
    for preset, params, rate in sorted(measured, key=lambda m: m[1]):
        seen = None if rate is None else rate * max_time
        rows.append({"preset": preset, "params": params, "bytes_per_s": rate, "bytes_in_budget": seen,
                     "bytes_per_param": None if seen is None else seen / params,
                     "meets": seen is not None and seen >= tokens_per_param * params})
    measured_rows = [r for r in rows if r["bytes_per_s"] is not None]
    if not measured_rows:
        raise ValueError("no preset's throughput was measured")
    meeting = [r for r in rows if r["meets"]]
    budget = _duration(max_time)
    if meeting:
        pick = meeting[-1]
        larger = next((r for r in rows if r["params"] > pick["params"]), None)
        reason = (f"{pick['preset']} ({pick['params'] / 1e6:.1f}M parameters) is the largest preset that sees at least "
                  f"{tokens_per_param:g} bytes per parameter in {budget}: {pick['bytes_per_s']:,.0f} bytes/s x "
                  f"{max_time:,.0f} s = {pick['bytes_in_budget'] / 1e6:,.1f}M bytes, {pick['bytes_per_param']:,.1f} "
                  f"per parameter")
        if larger is not None:
            reason += (f"; the next, {larger['preset']} ({larger['params'] / 1e6:.1f}M), would see "
                       f"{larger['bytes_per_param']:,.1f}" if larger["bytes_per_param"] is not None else
                       f"; the next, {larger['preset']}, was not measured (its training does not fit in the RAM "
                       f"available)")
    else:
        pick = measured_rows[0]
        reason = (f"no preset sees {tokens_per_param:g} bytes per parameter in {budget}; the smallest, "
                  f"{pick['preset']} ({pick['params'] / 1e6:.1f}M parameters), sees {pick['bytes_per_param']:,.2g} "
                  f"({pick['bytes_per_s']:,.0f} bytes/s); it reaches the rule in "
                  f"{_duration(tokens_per_param * pick['params'] / pick['bytes_per_s'])}")
    reason += f" (rule: {RULE_SOURCE})"
    return SizingPlan(max_time=max_time, tokens_per_param=tokens_per_param, choice=pick["preset"], reason=reason,
                      rows=tuple(rows))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------------------------- measuring
def cache_path() -> Path:
    """Where measured throughputs are kept: $AXL_CACHE_DIR/throughput.json (default ~/.cache/axl)."""
    root = os.environ.get("AXL_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "axl"
    return Path(root) / "throughput.json"


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _key(config: ModelConfig, batch_size: int, seq_len: int, threads: int, optimizer: str) -> str:
    import torch

    shape = hashlib.sha256(config.to_json().encode()).hexdigest()[:12]
    return (f"{config.name}|{shape}|b{batch_size}|s{seq_len}|{optimizer}|t{threads}|torch {torch.__version__}|"
            f"{_cpu()}|{os.cpu_count()} CPUs")


def measure_throughput(config: ModelConfig, *, batch_size: int = 8, seq_len: int = 256, threads: int | None = None,
                       optimizer: str = "lion", steps: int = MEASURE_STEPS) -> float:
    """Training bytes/s of this shape here: one warm-up step, then `steps` timed ones (forward, backward, gradient
    clipping, optimizer step) on random bytes, at `threads` torch threads (restored after)."""
    import torch
    import torch.nn.functional as F

    from .model import MultiScaleTransformer
    from .optim import build_optimizer

    seq_len = min(seq_len, config.max_seq_len)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        model = MultiScaleTransformer(config)
        opt = build_optimizer(model, optimizer)
        ids = torch.randint(0, 256, (batch_size, seq_len + 1), generator=generator)

        def step() -> None:
            logits = model(ids[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # the first step allocates the optimizer state and warms the allocator
        started = time.perf_counter()
        for _ in range(steps):
            step()
        return steps * batch_size * seq_len / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous)


def throughput(config: ModelConfig, *, batch_size: int = 8, seq_len: int = 256, threads: int | None = None,
               optimizer: str = "lion", remeasure: bool = False) -> tuple[float, dict[str, Any]]:
    """(bytes/s, its cache entry): read from the cache, or measured and cached."""
    import torch

    threads = threads or torch.get_num_threads()
    seq_len = min(seq_len, config.max_seq_len)
    path = cache_path()
    key = _key(config, batch_size, seq_len, threads, optimizer)
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        cache = {}
    entry = cache.get(key) if isinstance(cache, dict) else None
    if remeasure or not isinstance(entry, dict) or not isinstance(entry.get("bytes_per_s"), (int, float)):
        rate = measure_throughput(config, batch_size=batch_size, seq_len=seq_len, threads=threads, optimizer=optimizer)
        entry = {"bytes_per_s": rate, "measured_at": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                 "steps": MEASURE_STEPS, "cached": False}
        cache = cache if isinstance(cache, dict) else {}
        cache[key] = {k: v for k, v in entry.items() if k != "cached"}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)  # a concurrent writer loses an entry at worst, never corrupts the file
        return rate, entry
    return float(entry["bytes_per_s"]), {**entry, "cached": True}


def plan_for_budget(max_time: float, *, batch_size: int = 8, seq_len: int = 256, threads: int | None = None,
                    optimizer: str = "lion", tokens_per_param: float = TOKENS_PER_PARAM, remeasure: bool = False,
                    candidates: Sequence[str] = CANDIDATES,
                    on_measured: Callable[[str, float, dict], None] | None = None) -> SizingPlan:
    """Measure (or read) the candidates' throughput smallest first, stop at the first that misses the rule, and
    apply `choose_preset`. Presets whose training does not fit in the available RAM are left out."""
    if max_time <= 0:
        raise ValueError(f"the time budget must be > 0 seconds, got {max_time:g}")
    unknown = [c for c in candidates if c not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; choose from {', '.join(PRESETS)}")
    configs = sorted((ModelConfig.from_name(name) for name in candidates), key=ModelConfig.param_count)
    available = memory_bytes("MemAvailable")
    measured: list[tuple[str, int, float | None]] = []
    stopped = False
    for config in configs:
        seq = min(seq_len, config.max_seq_len)
        fits = available is None or config.training_ram_bytes(batch_size, seq, optimizer) <= available
        if stopped or not fits:
            measured.append((config.name, config.param_count(), None))
            continue
        rate, entry = throughput(config, batch_size=batch_size, seq_len=seq, threads=threads, optimizer=optimizer,
                                 remeasure=remeasure)
        if on_measured is not None:
            on_measured(config.name, rate, entry)
        measured.append((config.name, config.param_count(), rate))
        stopped = rate * max_time < tokens_per_param * config.param_count()
    return choose_preset(measured, max_time, tokens_per_param)
