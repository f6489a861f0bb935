"""Training: the loop, validation bits per byte, checkpoints that resume exactly, and distillation.

    from axl_model.train import TrainConfig, train
    result = train(TrainConfig(out_dir="checkpoints/axl-micro", preset="micro", data=["src/"], max_time=180))
    print(result.val_bpb)

The final model is a checkpoint folder at `out_dir` that also holds the training state (optimizer, step, RNG
of torch and Python, sampler position, the run's config). With `resume=True` a later call continues from it
exactly: a run stopped at step k (or killed) and resumed reaches the same weights at step n as one that never
stopped. Logs, the prepared data and plots live beside it in the run folder `<out_dir>.run/` (the checkpoint
folder is replaced atomically on every save, so nothing else may live inside it).

Under torchrun the same call trains as one rank of a group (`axl_model.distributed`): DDP over gloo, each rank on
its rows of every global batch, rank 0 writing for the group; a resumed group continues exactly, as one process does.

The honest quality number is validation bits per byte: mean cross-entropy (nats) over held-out bytes / ln 2.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import (
    initialised_from,
    is_checkpoint,
    load_checkpoint,
    load_config,
    load_metadata,
    load_training_state,
    save_checkpoint,
)
from .config import PRESETS, ModelConfig, memory_bytes
from .corpora import refuse_held_out_training
from .data import MIX_PREFIX, FilterConfig, PreparedData, TokenDataset, WindowSampler, eval_windows, prepare_data
from .distributed import TrainingGroup
from .logger import NullLogger, TrainLogger
from .model import MultiScaleTransformer
from .optim import DEFAULT_LR, OPTIMIZERS, build_optimizer, lr_at, set_lr

LN2 = math.log(2.0)


@dataclass
class TrainConfig:
    """Everything one training run needs. Architecture comes from `preset` (+ `model_overrides`), from
    `init_from` (fine-tune a checkpoint), or, when resuming, from the checkpoint in `out_dir`."""

    out_dir: str
    preset: str = "micro"
    init_from: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # --- data
    data: list[str] | None = None  # files, folders, globs; None: the running Python's standard library
    val_data: list[str] | None = None  # None: hold out files of `data` by hash of their path
    val_fraction: float = 0.05  # 0 needs val_data: validation is never scored on training data
    min_lines: int = 3
    max_lines: int = 20_000
    drop_generated: bool | None = None  # files whose header says they are generated; None: dropped from a --mix
    fim_rate: float = 0.5  # share of windows in fill-in-the-middle order, for models with config.fim
    # --- budget: whichever comes first; none given means one epoch
    max_steps: int | None = None
    max_time: float | None = None  # seconds of wall-clock time, summed over resumed segments
    epochs: float | None = None
    # --- optimisation
    batch_size: int = 8
    seq_len: int = 256
    lr: float | None = None  # None: the optimizer's default (optim.DEFAULT_LR)
    optimizer: str = "lion"
    weight_decay: float | None = None
    grad_accum: int = 1
    grad_clip: float = 1.0
    warmup_steps: int | None = None  # None: 5% of a step budget, capped at 100 (50 for a time budget)
    # --- evaluation and checkpoints (in optimizer steps; 0 disables the periodic ones)
    eval_interval: int = 100
    eval_tokens: int = 65_536  # validation tokens per evaluation (the final one too): a fixed sample over the split
    checkpoint_interval: int = 200
    # --- distillation from a larger checkpoint
    distill_from: str | None = None
    distill_temperature: float = 2.0
    distill_alpha: float = 0.5  # weight of the KL term; 1 - alpha goes to the usual cross-entropy
    # --- runtime
    seed: int = 0
    resume: bool = True
    num_threads: int | None = None  # None: os.cpu_count()
    progress: bool = True
    run_dir: str | None = None  # None: "<out_dir>.run"
    data_cache_dir: str | None = None  # None: "<run_dir>/data"
    check_ram: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.init_from is None and self.preset not in PRESETS:
            problems.append(f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        for name in ("batch_size", "seq_len", "grad_accum"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_time", "epochs"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{name} must be > 0, got {value}")
        if self.lr is not None and self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.val_fraction == 0 and not self.val_data:
            problems.append("val_fraction 0 holds out no file, and without val_data validation would score the "
                            "training data; pass val_data (--val-data) or a val_fraction > 0")
        if not 0.0 <= self.distill_alpha <= 1.0 or self.distill_temperature <= 0:
            problems.append(f"distill_alpha must be in [0, 1] and distill_temperature > 0, got "
                            f"{self.distill_alpha} and {self.distill_temperature}")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))
        for name in ("data", "val_data"):  # one path is a list of one
            value = getattr(self, name)
            if isinstance(value, (str, os.PathLike)):
                setattr(self, name, [str(value)])
        self.out_dir = str(self.out_dir)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(f"{self.out_dir}.run")

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainCallbacks:
    on_step: Callable[[dict], None] | None = None  # after each optimizer step: step, loss, lr, bytes_per_s, ...
    on_eval: Callable[[dict], None] | None = None  # after each validation: step, val_bpb
    on_checkpoint: Callable[[str, int], None] | None = None  # (checkpoint dir, step) after each save
    should_stop: Callable[[], bool] | None = None  # checked every step; True: checkpoint and return "stopped"


@dataclass
class TrainResult:
    status: Literal["completed", "stopped"]
    steps: int
    val_bpb: float | None
    checkpoint_dir: str
    elapsed_s: float
    bytes_per_s: float
    resumed_from_step: int | None = None
    train_loss: float | None = None


# ---------------------------------------------------------------------------------------------- losses
def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                         denominator: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy (nats) over positions where mask is 1. logits (B, T, V), targets/mask (B, T).
    `denominator` replaces the mask's own sum (a rank's share of a global batch: `data.Batch.targets_per_rank`)."""
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")  # (B*T,)
    mask = mask.flatten()
    return (losses * mask).sum() / (mask.sum().clamp_min(1.0) if denominator is None else denominator)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                      temperature: float, alpha: float, denominator: torch.Tensor | None = None) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, targets), both over masked positions."""
    t = temperature
    teacher_logp = F.log_softmax(teacher / t, dim=-1)
    student_logp = F.log_softmax(student / t, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)  # (B, T)
    kl = (kl * mask).sum() / (mask.sum().clamp_min(1.0) if denominator is None else denominator)
    return alpha * t * t * kl + (1 - alpha) * masked_cross_entropy(student, targets, mask, denominator)


def evaluate_bpb(model: MultiScaleTransformer, dataset: TokenDataset, seq_len: int, batch_size: int = 8,
                 max_tokens: int | None = None, group: TrainingGroup | None = None) -> float:
    """Bits per byte on a split: summed cross-entropy over predicted tokens / their count / ln 2.

    Without max_tokens (or with one at least the split's size) windows are consecutive and non-overlapping, so
    every held-out token is scored once; otherwise a fixed seeded sample of about max_tokens tokens spread over
    the whole split (`data.eval_window_spans`), the same at every call. With a `group`, each rank scores its
    share of the windows and the sums are added up (every rank gets the same answer).
    """
    group = group or TrainingGroup()
    nats, count = score_windows(model, group.shard(eval_windows(dataset, seq_len, max_tokens)), batch_size)
    nats, count = group.sum(nats, count)
    if count == 0:
        raise ValueError("the validation split has no tokens to score")
    return nats / count / LN2


@torch.no_grad()
def score_windows(model: MultiScaleTransformer, windows: Iterable[tuple[np.ndarray, np.ndarray]], batch_size: int = 8,
                  on_batch: Callable[[int], None] | None = None) -> tuple[float, float]:
    """(summed cross-entropy in nats, number of predicted tokens) over windows (tokens, mask); windows of equal
    length are batched together. on_batch(n) after each batch of n windows (progress bars)."""
    was_training = model.training
    model.eval()
    total_nats, total_count = 0.0, 0.0
    pending: list[tuple[np.ndarray, np.ndarray]] = []

    def score(batch: list[tuple[np.ndarray, np.ndarray]]) -> None:
        nonlocal total_nats, total_count
        tokens = torch.from_numpy(np.stack([w[0] for w in batch]).astype(np.int64))
        mask = torch.from_numpy(np.stack([w[1][1:] for w in batch]).astype(np.float32))
        logits = model(tokens[:, :-1])
        losses = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        total_nats += float((losses * mask.flatten()).sum())
        total_count += float(mask.sum())
        if on_batch is not None:
            on_batch(len(batch))

    try:
        for window in windows:
            if pending and len(window[0]) != len(pending[0][0]):
                score(pending)
                pending = []
            pending.append(window)
            if len(pending) == batch_size:
                score(pending)
                pending = []
        if pending:
            score(pending)
    finally:
        model.train(was_training)
    return total_nats, total_count


# ---------------------------------------------------------------------------------------------- helpers
def check_ram(model_config: ModelConfig, config: TrainConfig, extra_bytes: int = 0, processes: int = 1) -> None:
    """`processes`: training processes on this machine (torchrun's ranks here), each needing as much."""
    need = (model_config.training_ram_bytes(config.batch_size, config.seq_len, config.optimizer) + extra_bytes) * processes
    have = memory_bytes("MemAvailable")
    if have is not None and need > have:
        ranks = f" x {processes} ranks" if processes > 1 else ""
        raise ValueError(f"training {model_config.name!r} at batch {config.batch_size} x {config.seq_len}{ranks} needs about "
                         f"{need / 2**30:.1f} GiB of RAM but only {have / 2**30:.1f} GiB is available; use a smaller "
                         f"preset (`axl presets --ram {have / 2**30:.0f}`) or a smaller batch")


def _warmup_steps(config: TrainConfig, total_steps: int | None) -> int:
    if config.warmup_steps is not None:
        return config.warmup_steps
    if total_steps is not None:
        return min(100, max(1, total_steps // 20))
    return 50


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_rng_state(state: list) -> None:
    random.setstate((state[0], tuple(state[1]), state[2]))


# ---------------------------------------------------------------------------------------------- the loop
def train(config: TrainConfig, callbacks: TrainCallbacks | None = None, group: TrainingGroup | None = None) -> TrainResult:
    """Train (or resume) as `config` says; returns how it ended. User-fixable problems raise ValueError.

    Under torchrun (`group`, default: what the environment says; see axl_model.distributed) every rank calls
    this with the same config: rank r trains on its rows of each global batch, DDP averages the gradients,
    rank 0 alone saves, logs and calls `callbacks` (except should_stop, asked on every rank: any stops all).
    """
    group = group or TrainingGroup.from_env()
    created_group = group.join()
    try:
        return _train(config, callbacks or TrainCallbacks(), group)
    finally:
        if created_group:
            group.leave()


def _train(config: TrainConfig, callbacks: TrainCallbacks, group: TrainingGroup) -> TrainResult:
    refuse_held_out_training(config.data)  # evaluation-only corpora (axl_model.corpora) are never trained on
    torch.set_num_threads(config.num_threads or group.default_threads())
    out_dir, run_dir = Path(config.out_dir), config.run_path
    progress = config.progress and group.is_main  # the other ranks stay quiet

    # 1. The model: resumed from out_dir, initialised from a checkpoint, or fresh from a preset.
    state = load_training_state(out_dir) if config.resume and is_checkpoint(out_dir) else None
    source = out_dir if state is not None else config.init_from
    model_config = load_config(source) if source is not None else ModelConfig.from_name(config.preset, **config.model_overrides)
    if config.seq_len > model_config.max_seq_len:
        raise ValueError(f"seq_len {config.seq_len} exceeds the model's window max_seq_len {model_config.max_seq_len}")
    teacher_config = load_config(config.distill_from) if config.distill_from else None
    if teacher_config is not None:
        if teacher_config.vocab_size != model_config.vocab_size:
            raise ValueError(f"teacher vocab {teacher_config.vocab_size} differs from student vocab {model_config.vocab_size}")
        if teacher_config.max_seq_len < config.seq_len:
            raise ValueError(f"teacher window {teacher_config.max_seq_len} is shorter than seq_len {config.seq_len}")
    if config.check_ram:  # before anything big is allocated
        check_ram(model_config, config, extra_bytes=teacher_config.param_count() * 8 if teacher_config else 0,
                  processes=group.local_world_size)
    # A run started from another checkpoint carries that one's training history (a resume keeps what it recorded).
    history = (load_metadata(out_dir).get("initialised_from") if state is not None
               else initialised_from(config.init_from) if config.init_from else None)
    if source is not None:
        model = load_checkpoint(source)
    else:
        torch.manual_seed(config.seed)
        model = MultiScaleTransformer(model_config)
    model.train()
    net = group.wrap(model)  # what forward/backward run through: DDP under torchrun (rank 0's weights everywhere)
    teacher = load_checkpoint(config.distill_from).requires_grad_(False) if config.distill_from else None

    # 2. Data.
    drop_generated = config.drop_generated
    if drop_generated is None:  # the mix's default; a resumed run keeps the filter its split was made with
        recorded = (load_metadata(out_dir).get("data_split") or {}).get("filters") if state is not None else None
        drop_generated = (bool(recorded.get("generated")) if recorded is not None
                          else any(str(p).startswith(MIX_PREFIX) for p in config.data or ()))
    filters = FilterConfig(config.min_lines, config.max_lines, generated=drop_generated)
    with group.local_main_first():  # one process per machine builds the data cache; its other ranks reuse it
        prepared: PreparedData = prepare_data(
            config.data, config.data_cache_dir or run_dir / "data", val_data=config.val_data,
            val_fraction=config.val_fraction, filters=filters, progress=progress)
    if len(prepared.val) < 2:  # never fall back to scoring the training data
        raise ValueError(f"the validation data {config.val_data} has nothing left to score after filtering "
                         f"({prepared.stats.rejected}); pass other --val-data")
    data_split = prepared.split  # what it trained on and held out, in every checkpoint: `axl eval` scores this split
    sampler = WindowSampler(prepared.train, config.seq_len, config.batch_size, seed=config.seed,
                            fim_rate=config.fim_rate if model.config.fim else 0.0,
                            rank=group.rank, world_size=group.world_size)
    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum * group.world_size  # the group's

    # 3. Optimizer and the state to resume.
    optimizer = build_optimizer(model, config.optimizer, config.lr, config.weight_decay)
    step, prior_elapsed, tokens_seen, last_val = 0, 0.0, 0, None
    resumed_from, world_size_was = None, None
    if state is not None:
        # Every rank restores the same state (rank 0's), so the ranks stay identical. Another group size
        # resumes too, but its global batches differ from the ones the saved run would have drawn next.
        world_size_was = int(state.get("world_size", 1))
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        _set_python_rng_state(state["python_rng"])
        step, prior_elapsed = int(state["step"]), float(state["elapsed_s"])
        tokens_seen, last_val = int(state["tokens_seen"]), state.get("val_bpb")
        resumed_from = step

    total_steps = config.max_steps
    epochs = config.epochs if (config.epochs or config.max_steps or config.max_time) else 1.0
    if epochs:
        epoch_steps = max(1, math.ceil(epochs * len(prepared.train) / tokens_per_step))
        total_steps = min(total_steps, epoch_steps) if total_steps else epoch_steps
    warmup = _warmup_steps(config, total_steps)

    def progress_fraction(elapsed: float) -> float:
        fractions = [step / total_steps] if total_steps else []
        if config.max_time:
            fractions.append(elapsed / config.max_time)
        return max(fractions)

    def training_state(elapsed: float) -> dict:
        return {"step": step, "elapsed_s": elapsed, "tokens_seen": tokens_seen, "val_bpb": last_val,
                "optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(),
                "torch_rng": torch.get_rng_state(), "python_rng": _python_rng_state(),
                "world_size": group.world_size, "train_config": _jsonable(config.to_dict())}

    def save(elapsed: float) -> None:
        if not group.is_main:  # rank 0 writes for the group: its weights are every rank's
            return
        metadata = {"step": step, "val_bpb": last_val, "elapsed_s": round(elapsed, 2), "tokens_seen": tokens_seen,
                    "preset": model.config.name, "data": asdict(prepared.stats), "run_dir": str(run_dir),
                    "train_config": _jsonable(config.to_dict()), "world_size": group.world_size,
                    "elastic_run_id": group.run_id,
                    "data_split": data_split}
        if history:
            metadata["initialised_from"] = history
        save_checkpoint(model, out_dir, training_state=training_state(elapsed), metadata=metadata)
        logger.log("event", event="checkpoint", step=step, path=str(out_dir))
        if callbacks.on_checkpoint:  # rank 0 only (above)
            callbacks.on_checkpoint(str(out_dir), step)

    def run_eval(elapsed: float) -> float:
        nonlocal last_val
        last_val = evaluate_bpb(model, prepared.val, config.seq_len, config.batch_size, config.eval_tokens, group)
        record = {"step": step, "val_bpb": last_val, "elapsed_s": round(elapsed, 3)}
        logger.log("eval", **record)
        if callbacks.on_eval and group.is_main:
            callbacks.on_eval(record)
        return last_val

    from tqdm import tqdm

    logger = TrainLogger(run_dir, resume_from_step=resumed_from) if group.is_main else NullLogger()
    logger.log("event", event="resume" if state else "start", step=step, params=model.num_parameters(),
               preset=model.config.name, train_tokens=len(prepared.train), val_tokens=len(prepared.val),
               world_size=group.world_size, restart_count=group.restart_count,
               **({"world_size_was": world_size_was} if state else {}), config=_jsonable(config.to_dict()))
    bar = tqdm(total=total_steps, initial=step, unit="step", disable=not progress, dynamic_ncols=True,
               desc=f"train {model.config.name}")
    started = time.monotonic()
    train_time, session_tokens, status, loss_value = 0.0, 0, "completed", None
    evaluated_at = saved_at = -1
    try:
        while True:
            # The group decides together: the same clock (a time budget's learning rate) and the same end.
            elapsed, stop_asked = group.agree(prior_elapsed + time.monotonic() - started,
                                              bool(callbacks.should_stop and callbacks.should_stop()))
            if (total_steps and step >= total_steps) or (config.max_time and elapsed >= config.max_time):
                break
            if stop_asked:
                status = "stopped"
                break
            step_started = time.monotonic()
            lr = lr_at(progress_fraction(elapsed), step, config.base_lr, warmup)
            set_lr(optimizer, lr)
            loss_sum = 0.0
            for micro in range(config.grad_accum):
                x, y, mask, targets_per_rank = sampler.next_shard()
                # DDP all-reduces on the last micro-batch's backward only; the others accumulate locally.
                last = micro == config.grad_accum - 1
                with contextlib.nullcontext() if last or net is model else net.no_sync():
                    logits = net(x)
                    if teacher is not None:
                        with torch.no_grad():
                            teacher_logits = teacher(x)
                        loss = distillation_loss(logits, teacher_logits, y, mask, config.distill_temperature,
                                                 config.distill_alpha, targets_per_rank)
                    else:
                        loss = masked_cross_entropy(logits, y, mask, targets_per_rank)
                    (loss / config.grad_accum).backward()
                loss_sum += loss.detach().item()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            session_tokens += tokens_per_step
            train_time += time.monotonic() - step_started
            loss_value = group.mean(loss_sum / config.grad_accum)  # the global batch's loss, on every rank
            if not math.isfinite(loss_value):
                raise ValueError(f"the loss became {loss_value} at step {step}; lower the learning rate (now {lr:.2e})")
            elapsed = prior_elapsed + time.monotonic() - started
            bytes_per_s = session_tokens / max(train_time, 1e-9)
            record = {"step": step, "loss": loss_value, "lr": lr, "bytes_per_s": bytes_per_s,
                      "elapsed_s": round(elapsed, 3), "tokens_seen": tokens_seen}
            logger.log("train", **record)
            if callbacks.on_step and group.is_main:
                callbacks.on_step(record)
            if config.eval_interval and step % config.eval_interval == 0:
                run_eval(elapsed)
                evaluated_at = step
            if config.checkpoint_interval and step % config.checkpoint_interval == 0:
                save(prior_elapsed + time.monotonic() - started)
                saved_at = step
            bar.update(1)
            bar.set_postfix_str(_postfix(loss_value, last_val, bytes_per_s, _eta(config, total_steps, step, elapsed,
                                                                                 train_time, session_tokens, tokens_per_step)))
        elapsed = prior_elapsed + time.monotonic() - started
        if evaluated_at != step:
            run_eval(elapsed)
            saved_at = -1  # the checkpoint must carry the new val_bpb
        if saved_at != step:
            save(prior_elapsed + time.monotonic() - started)
        logger.log("event", event=status, step=step, val_bpb=last_val)
    finally:
        bar.close()
        logger.close()
    return TrainResult(status=status, steps=step, val_bpb=last_val, checkpoint_dir=str(out_dir),
                       elapsed_s=prior_elapsed + time.monotonic() - started,
                       bytes_per_s=session_tokens / train_time if train_time else 0.0,
                       resumed_from_step=resumed_from, train_loss=loss_value)


def _eta(config: TrainConfig, total_steps, step, elapsed, train_time, session_tokens, tokens_per_step) -> float | None:
    candidates = []
    if config.max_time:
        candidates.append(max(0.0, config.max_time - elapsed))
    if total_steps and session_tokens:
        seconds_per_step = train_time / (session_tokens / tokens_per_step)
        candidates.append((total_steps - step) * seconds_per_step)
    return min(candidates) if candidates else None


def _postfix(loss: float, val_bpb: float | None, bytes_per_s: float, eta: float | None) -> str:
    parts = [f"loss {loss:.3f}", f"val {val_bpb:.3f} bpb" if val_bpb is not None else "val -",
             f"{bytes_per_s:,.0f} B/s"]
    if eta is not None:
        parts.append(f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
    return ", ".join(parts)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: list[str] | None, *, split: str = "val",
                        seq_len: int | None = None, batch_size: int = 8, max_tokens: int | None = None,
                        cache_dir: str | os.PathLike | None = None, val_fraction: float = 0.05,
                        progress: bool = False) -> dict:
    """Bits per byte of a checkpoint on the held-out split of `data` (the same split training used) or on
    all of it (split="all"). Returns {"val_bpb", "tokens", "split"}."""
    import tempfile

    model = load_checkpoint(checkpoint)
    seq_len = min(seq_len or 256, model.config.max_seq_len)
    with tempfile.TemporaryDirectory(prefix="axl-eval-") as tmp:
        prepared = prepare_data(data, cache_dir or tmp, val_fraction=val_fraction if split == "val" else 0.0,
                                progress=progress)
        dataset = prepared.val if split == "val" else prepared.train
        if len(dataset) < 2:
            raise ValueError(f"the {split} split of {data} is empty; use split='all'")
        bpb = evaluate_bpb(model, dataset, seq_len, batch_size, max_tokens)
        scored = len(dataset) if max_tokens is None else min(len(dataset), max_tokens)
    return {"val_bpb": bpb, "tokens": scored, "split": split}
