"""`axl plot RUN`: a PNG of a run's training loss and validation bits per byte against steps."""
from __future__ import annotations

import math
import os
from pathlib import Path

from .logger import read_metrics


def find_run_dir(run: str | os.PathLike) -> Path:
    """The folder holding metrics.jsonl: RUN itself, or the run folder of checkpoint RUN ("RUN.run")."""
    run = Path(run)
    for candidate in (run, Path(f"{run}.run")):
        if (candidate / "metrics.jsonl").is_file():
            return candidate
    raise ValueError(f"no metrics.jsonl in {run} or {run}.run: pass a training run folder or its checkpoint")


def plot_run(run: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the loss curve of `run` to `out` (default: <run folder>/loss.png) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = find_run_dir(run)
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no training steps yet")
    out = Path(out) if out else run_dir / "loss.png"

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    steps = [r["step"] for r in train]
    bits = [r["loss"] / math.log(2) for r in train]  # nats per byte -> bits per byte, comparable with validation
    ax.plot(steps, bits, color="tab:blue", alpha=0.35, linewidth=0.8, label="train (per step)")
    window = max(1, len(bits) // 50)
    if window > 1:
        smooth = [sum(bits[max(0, i - window + 1) : i + 1]) / len(bits[max(0, i - window + 1) : i + 1])
                  for i in range(len(bits))]
        ax.plot(steps, smooth, color="tab:blue", linewidth=1.6, label=f"train (mean of {window})")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_bpb"] for r in evals], "o-", color="tab:orange",
                linewidth=1.6, markersize=4, label="validation")
        last = evals[-1]
        ax.annotate(f"{last['val_bpb']:.3f}", (last["step"], last["val_bpb"]), textcoords="offset points",
                    xytext=(4, 6), color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title(f"{run_dir.name.removesuffix('.run')}: training loss and validation")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
