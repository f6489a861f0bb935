"""Quality per CPU-minute: held-out bits per byte after the same training budget, on the same standard-library
data, for the multi-scale micro model and a single-scale transformer matched on training FLOPs per byte (the
fine stack alone at micro's width, as many layers as makes its FLOPs per byte closest to micro's; the same
blocks, optimizer, schedule and batches), over several seeds; beside them zlib-9 / zstd-19 / xz-9e on the
very same held-out bytes.

    python -m bench quality_per_cpu_minute --budget 90 --seeds 3          # 90 s per model per seed
    python -m bench quality_per_cpu_minute --budget 60 --clock cpu         # budget in process CPU seconds

Fairness, stated:
- FLOPs per byte analytically (bench.common): 6 x multiply-adds of every weight per byte of its scale, plus
  attention as full T x T, for both models; the baseline's layer count is the one whose FLOPs per byte are
  closest to the multi-scale model's.
- Each seed s: both models start from torch seed s and draw batch n from WindowSampler(seed=s) (batch n depends
  only on (s, n)), so they see the same batches in the same order; the faster one sees more of them in the budget.
  The model trained first alternates with the seed, so a drift in the machine's load does not favour one arm.
- Budget: wall-clock seconds by default; `--clock cpu` counts this process's CPU seconds instead (all its
  threads), which a busy shared machine disturbs less.
- Scoring: whole held-out files (the split's validation files, in a fixed order by content hash, up to
  --eval-bytes; and the PyPI corpus, when fetched, `load_corpus` with the same byte cap), every byte scored in
  consecutive windows (`train.evaluate_bpb`); the compressors compress exactly those files.
"""
from __future__ import annotations

import hashlib
import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from axl_model.config import ModelConfig
from axl_model.corpora import CorpusSplit, corpus_files, load_corpus
from axl_model.data import WindowSampler, prepare_data
from axl_model.model import MultiScaleTransformer, RMSNorm, ScaleStack, rope_tables
from axl_model.nextline import split_file_bytes
from axl_model.optim import build_optimizer, lr_at, set_lr
from axl_model.train import evaluate_bpb, masked_cross_entropy

from .common import CACHE_DIR, defaults, single_scale_flops_per_byte, stdlib_sources, training_flops_per_byte

BATCH, SEQ_LEN, WARMUP = 8, 256, 20
SEEDS, EVAL_BYTES = 3, 262_144
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.monotonic, "cpu": time.process_time}


class SingleScaleTransformer(nn.Module):
    """The baseline: byte embedding -> one pre-norm stack (RMSNorm, RoPE attention, SwiGLU) -> tied head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.stack = ScaleStack(config)
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        cos, sin = rope_tables(config.head_dim, config.max_seq_len + 1, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=config.init_std)
        for name, param in self.named_parameters():
            if name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(param, std=config.init_std / (2 * config.n_layers) ** 0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        hidden, _ = self.stack(self.embed(ids), self.rope_cos[:T], self.rope_sin[:T])  # (B, T, C)
        return self.final_norm(hidden) @ self.embed.weight.T  # (B, T, V)


def single_scale_flops(config: ModelConfig, seq_len: int) -> float:
    return single_scale_flops_per_byte(config.d_model, config.d_ff, config.n_layers, config.vocab_size, seq_len)


def flop_matched_baseline(multi: ModelConfig, seq_len: int, max_layers: int = 48) -> ModelConfig:
    """The multi-scale config's fine shape alone, with the layer count whose training FLOPs per byte are closest
    to the multi-scale model's."""
    target = training_flops_per_byte(multi, seq_len)

    def config(n_layers: int) -> ModelConfig:
        return ModelConfig.from_dict({**multi.to_dict(), "n_layers": n_layers, "scales": {},
                                      "name": f"{multi.name}-single-scale"})

    best = min(range(1, max_layers + 1), key=lambda n: abs(single_scale_flops(config(n), seq_len) - target))
    return config(best)


def train_for(model: nn.Module, prepared, budget: float, seed: int, *, seq_len: int = SEQ_LEN, batch: int = BATCH,
              clock: str = "wall") -> dict:
    """Train with Lion on batches n = 0, 1, ... of WindowSampler(seed) until `budget` seconds of `clock` pass."""
    now = CLOCKS[clock]
    sampler = WindowSampler(prepared.train, seq_len, batch, seed=seed)  # the same batches for both models
    optimizer = build_optimizer(model, "lion")
    base_lr = optimizer.param_groups[0]["lr"]
    model.train()
    step, started, wall_started = 0, now(), time.monotonic()
    loss = torch.tensor(float("nan"))
    while (elapsed := now() - started) < budget:
        set_lr(optimizer, lr_at(elapsed / budget, step, base_lr, WARMUP))
        x, y, mask = sampler.next_batch()
        loss = masked_cross_entropy(model(x), y, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
    return {"steps": step, "bytes": step * batch * seq_len, "train_s": now() - started,
            "wall_s": time.monotonic() - wall_started, "last_loss_bpb": float(loss.detach()) / math.log(2)}


def held_out_files(dataset, max_bytes: int | None) -> list[bytes]:
    """Whole validation files in a fixed order (sha256 of their content), until max_bytes (None: all)."""
    files = sorted((body for _, body in split_file_bytes(dataset)), key=lambda b: hashlib.sha256(b).digest())
    chosen, total = [], 0
    for body in files:
        if max_bytes is not None and total >= max_bytes:
            break
        chosen.append(body)
        total += len(body)
    return chosen


def score(model: nn.Module, files: Sequence[bytes], seq_len: int, batch: int) -> float:
    return evaluate_bpb(model, CorpusSplit([("", f) for f in files]), seq_len, batch)


def spread(values: Sequence[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values), "values": list(values)}


def compare(config: ModelConfig, prepared, eval_sets: dict[str, list[bytes]], *, budget: float, seeds: int = SEEDS,
            seq_len: int = SEQ_LEN, batch: int = BATCH, clock: str = "wall",
            log: Callable[[str], None] = print) -> dict:
    """Train the multi-scale `config` and its FLOP-matched single-scale baseline for `budget` each, `seeds` times;
    held-out bits/byte of every run on each eval set, and the compressors on the same files."""
    from axl_model.compressors import compressor_baselines, compressor_names

    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    if seeds < 1 or budget <= 0:
        raise ValueError(f"need seeds >= 1 and budget > 0, got {seeds} and {budget}")
    seq_len = min(seq_len, config.max_seq_len)
    baseline = flop_matched_baseline(config, seq_len)
    arms: dict[str, tuple[Callable[[], nn.Module], float]] = {
        "multiscale": (lambda: MultiScaleTransformer(config), training_flops_per_byte(config, seq_len)),
        "single_scale": (lambda: SingleScaleTransformer(baseline), single_scale_flops(baseline, seq_len)),
    }
    params = {}
    for name, (build, _) in arms.items():
        params[name] = sum(p.numel() for p in build().parameters())
    log(f"multi-scale {config.name}: {params['multiscale'] / 1e6:.2f}M params, "
        f"{arms['multiscale'][1] / 1e6:.1f} MFLOP/byte; single-scale {baseline.n_layers} layers x d "
        f"{baseline.d_model}: {params['single_scale'] / 1e6:.2f}M params, "
        f"{arms['single_scale'][1] / 1e6:.1f} MFLOP/byte (FLOP-matched)")
    log(f"budget {budget:g} s ({clock} clock) per model per seed, {seeds} seeds, batch {batch} x {seq_len}, Lion, "
        f"same batches per seed; held-out: " + ", ".join(f"{k} {len(v)} files {sum(map(len, v)):,} B"
                                                       for k, v in eval_sets.items()))
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for seed in range(seeds):
        order = list(arms) if seed % 2 == 0 else list(reversed(arms))
        for name in order:
            build, _ = arms[name]
            torch.manual_seed(seed)
            model = build()
            result = train_for(model, prepared, budget, seed, seq_len=seq_len, batch=batch, clock=clock)
            result["bpb"] = {set_name: score(model, files, seq_len, batch) for set_name, files in eval_sets.items()}
            result["seed"] = seed
            runs[name].append(result)
            rate = result["bytes"] / result["train_s"]
            log(f"  seed {seed} {name:>12}: {result['steps']} steps, {rate:,.0f} bytes/s ({result['wall_s']:.0f} s "
                f"wall) -> " + ", ".join(f"{k} {v:.3f}" for k, v in result["bpb"].items()))
            del model
    compressors = {set_name: compressor_baselines(files) for set_name, files in eval_sets.items()}
    summary: dict = {"config": config.name, "baseline_layers": baseline.n_layers, "params": params,
                     "flops_per_byte": {name: flops for name, (_, flops) in arms.items()}, "budget_s": budget,
                     "clock": clock, "seeds": seeds, "runs": runs, "compressors": compressors, "bpb": {}}
    for set_name, files in eval_sets.items():
        stats = summary["bpb"][set_name] = {name: spread([r["bpb"][set_name] for r in runs[name]]) for name in arms}
        pairs = zip(runs["multiscale"], runs["single_scale"], strict=True)  # the same seed, the same batches
        diff = stats["multiscale_minus_single"] = spread([m["bpb"][set_name] - s["bpb"][set_name] for m, s in pairs])
        line = ", ".join(f"{name} {stats[name]['mean']:.3f} ± {stats[name]['std']:.3f} "
                         f"[{stats[name]['min']:.3f}-{stats[name]['max']:.3f}]" for name in arms)
        base = compressors[set_name]
        comp = ", ".join(f"{c} {base[c]['per_file_bpb']:.3f} / {base[c]['concatenated_bpb']:.3f}"
                         for c in compressor_names(base))
        log(f"{set_name} ({len(files)} files, {sum(map(len, files)):,} B), bits/byte mean ± std [min-max] over "
            f"{seeds} seeds: {line}; multi minus single {diff['mean']:+.3f} ± {diff['std']:.3f}")
        log(f"  compressors on the same bytes (per file / concatenated): {comp}"
            + "".join(f"; {c} unavailable: {why}" for c, why in base["unavailable"].items()))
    return summary


def run(args) -> dict:
    started = time.monotonic()
    prepared = prepare_data(stdlib_sources(), CACHE_DIR / "data", progress=True)
    print(f"data: standard library (tests excluded), {prepared.stats.tokens['train']:,} train / "
          f"{prepared.stats.tokens['val']:,} held-out tokens, prepared in {time.monotonic() - started:.0f} s "
          f"(cached in {prepared.folder})")
    eval_bytes = getattr(args, "eval_bytes", EVAL_BYTES)
    eval_sets = {"stdlib_held_out": held_out_files(prepared.val, eval_bytes)}
    root = getattr(args, "corpora_root", None)
    if corpus_files("pypi", root):
        eval_sets["pypi"] = [data for _, data in load_corpus("pypi", root, max_bytes=eval_bytes)]
    else:
        print("the PyPI corpus is not fetched (`axl data corpus pypi`): scoring the stdlib held-out files only")
    summary = compare(ModelConfig.from_name("micro"), prepared, eval_sets, budget=args.budget,
                      seeds=getattr(args, "seeds", SEEDS), clock=getattr(args, "clock", "wall"))
    figures: dict = {"baseline_layers": summary["baseline_layers"],
                     "multiscale_params_m": summary["params"]["multiscale"] / 1e6,
                     "single_scale_params_m": summary["params"]["single_scale"] / 1e6,
                     "multiscale_mflop_per_byte": summary["flops_per_byte"]["multiscale"] / 1e6,
                     "single_scale_mflop_per_byte": summary["flops_per_byte"]["single_scale"] / 1e6}
    for set_name, result in summary["bpb"].items():
        for arm in ("multiscale", "single_scale", "multiscale_minus_single"):
            figures[f"{set_name}_{arm}_bpb_mean"] = result[arm]["mean"]
            figures[f"{set_name}_{arm}_bpb_std"] = result[arm]["std"]
        for name, base in summary["compressors"][set_name].items():
            if isinstance(base, dict) and "per_file_bpb" in base:
                figures[f"{set_name}_{name}_per_file_bpb"] = base["per_file_bpb"]
                figures[f"{set_name}_{name}_concatenated_bpb"] = base["concatenated_bpb"]
    for arm, runs in summary["runs"].items():
        figures[f"{arm}_steps"] = [r["steps"] for r in runs]
    return figures


if __name__ == "__main__":
    torch.set_num_threads(defaults().threads)
    run(defaults())
