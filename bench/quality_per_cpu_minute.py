"""Quality per CPU-minute: held-out bits per byte after the same wall-clock training budget, on the same
standard-library data, for the multi-scale micro model and a single-scale transformer of about the same
parameter count (the fine stack alone, made deeper; the same blocks, optimizer, schedule and batches)."""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from axl_model.config import ModelConfig
from axl_model.data import WindowSampler, prepare_data
from axl_model.model import MultiScaleTransformer, RMSNorm, ScaleStack, rope_tables
from axl_model.optim import build_optimizer, lr_at, set_lr
from axl_model.train import evaluate_bpb, masked_cross_entropy

from .common import CACHE_DIR, defaults, single_scale_flops_per_byte, stdlib_sources, training_flops_per_byte

BATCH, SEQ_LEN, EVAL_TOKENS, WARMUP = 8, 256, 65_536, 20


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


def matched_baseline(micro: ModelConfig) -> ModelConfig:
    """Same width as micro; the layer count whose parameter count is closest to micro's."""
    target = micro.param_count()

    def params(n_layers: int) -> int:  # embedding (tied head) + blocks + final norm, as SingleScaleTransformer
        d, f = micro.d_model, micro.d_ff
        return micro.vocab_size * d + n_layers * (2 * d + 4 * d * d + 3 * d * f) + d

    best = min(range(6, 16), key=lambda n: abs(params(n) - target))
    return ModelConfig.from_name("micro", n_layers=best)


def train_for(model: nn.Module, prepared, budget: float, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    sampler = WindowSampler(prepared.train, SEQ_LEN, BATCH, seed=seed)  # the same batches for both models
    optimizer = build_optimizer(model, "lion")
    base_lr = optimizer.param_groups[0]["lr"]
    model.train()
    step, started = 0, time.monotonic()
    while (elapsed := time.monotonic() - started) < budget:
        set_lr(optimizer, lr_at(elapsed / budget, step, base_lr, WARMUP))
        x, y, mask = sampler.next_batch()
        loss = masked_cross_entropy(model(x), y, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
    train_seconds = time.monotonic() - started
    val_bpb = evaluate_bpb(model, prepared.val, SEQ_LEN, BATCH, EVAL_TOKENS)
    return {"steps": step, "bytes": step * BATCH * SEQ_LEN, "train_s": train_seconds, "val_bpb": val_bpb,
            "last_loss_bpb": float(loss.detach()) / math.log(2)}


def run(args) -> dict:
    started = time.monotonic()
    prepared = prepare_data(stdlib_sources(), CACHE_DIR / "data", progress=True)
    print(f"data: standard library (tests excluded), {prepared.stats.tokens['train']:,} train / "
          f"{prepared.stats.tokens['val']:,} held-out tokens, prepared in {time.monotonic() - started:.0f} s "
          f"(cached in {prepared.folder})")
    micro = ModelConfig.from_name("micro")
    baseline = matched_baseline(micro)
    torch.manual_seed(0)
    multi = MultiScaleTransformer(micro)
    torch.manual_seed(0)
    single = SingleScaleTransformer(baseline)
    n_multi, n_single = multi.num_parameters(), sum(p.numel() for p in single.parameters())
    print(f"budget {args.budget:.0f} s each, batch {BATCH} x {SEQ_LEN}, Lion, same batches; "
          f"held-out bits per byte over {EVAL_TOKENS:,} tokens")
    figures = {}
    for name, model, params, flops in (
            ("multiscale_micro", multi, n_multi, training_flops_per_byte(micro, SEQ_LEN)),
            (f"single_scale_{baseline.n_layers}L", single, n_single,
             single_scale_flops_per_byte(baseline.d_model, baseline.d_ff, baseline.n_layers, baseline.vocab_size, SEQ_LEN))):
        result = train_for(model, prepared, args.budget)
        print(f"{name:>22}: {params / 1e6:.2f}M params, {flops / 1e6:.0f} MFLOP/byte, {result['steps']} steps, "
              f"{result['bytes'] / result['train_s']:,.0f} bytes/s -> val {result['val_bpb']:.3f} bits/byte")
        figures[f"{name}_val_bpb"] = result["val_bpb"]
        figures[f"{name}_steps"] = result["steps"]
        figures[f"{name}_params_m"] = params / 1e6
    names = [k for k in figures if k.endswith("_val_bpb")]
    figures["multiscale_minus_single_bpb"] = figures[names[0]] - figures[names[1]]
    print(f"multi-scale minus single-scale: {figures['multiscale_minus_single_bpb']:+.3f} bits/byte "
          f"(negative: the multi-scale model is better per CPU-minute)")
    return figures


if __name__ == "__main__":
    torch.set_num_threads(defaults().threads)
    run(defaults())
