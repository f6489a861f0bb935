"""Model configuration: a validated, serializable dataclass and the AXL family's named presets.

Config is data: no torch import here, no environment reads. Parameter counts and training-RAM estimates are
computed analytically so `axl presets` answers instantly (a test checks them against the real model).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .tokenizer import BASE_VOCAB_SIZE, FIM_TOKENS

SCALES = (1, 2, 4)  # fine, medium and coarse resolution, in bytes per token
SCALE_NAMES = ("fine", "medium", "coarse")
# What `ModelConfig.scales` may set per scale. The fine stack's width is `d_model` itself (the byte embedding,
# the fusion and the head share it), so only medium and coarse may choose their own width.
PER_SCALE_FIELDS = ("d_model", "n_heads", "d_ff", "n_layers", "local_window")

# Bytes per parameter held during training: fp32 weights + grads + optimizer state (Lion: 1 moment, AdamW: 2).
_OPTIMIZER_STATE_COPIES = {"lion": 1, "adamw": 2, "sgd": 1}

# Upper bounds on what a config may ask for. A config.json or GGUF header is untrusted input, and the model is
# allocated from it: without bounds a one-line edit is an out-of-memory kill instead of a clear error. Generous:
# about 16x the largest preset (code-1b) per dimension, 64x its window, 16x its parameter count.
MAX_DIMENSIONS: dict[str, int] = {
    "d_model": 16_384,
    "n_heads": 256,
    "d_ff": 65_536,
    "n_layers": 96,  # per scale
    "max_seq_len": 65_536,
}
MAX_PARAMS = 1 << 32


@dataclass(frozen=True)
class ScaleShape:
    """The resolved shape of one scale's stack (`ModelConfig.shape(name)`)."""

    name: str
    factor: int  # bytes per token
    d_model: int
    n_heads: int
    d_ff: int
    n_layers: int
    local_window: int  # bytes this scale's attention looks back (the token's own bytes included); 0: all

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def window_tokens(self) -> int:
        """Tokens of this scale a self-attention query sees (itself included); 0: every earlier one."""
        return self.local_window // self.factor


def pair_window(a: ScaleShape, b: ScaleShape) -> int:
    """Bytes a cross-scale attention between scales a and b looks back: the tighter local window; 0: all."""
    windows = [s.local_window for s in (a, b) if s.local_window]
    return min(windows, default=0)


@dataclass
class ModelConfig:
    """Shape and behaviour of one MultiScaleTransformer.

    Attributes are grouped: identity, width/depth (`n_layers` is per scale), context, numerics, tokens.

    `d_model`, `n_heads`, `d_ff` and `n_layers` shape every scale alike unless `scales` overrides them for one:
    `scales={"fine": {"n_layers": 1, "local_window": 512}, "coarse": {"d_model": 512, "n_heads": 8,
    "d_ff": 1376, "n_layers": 4}}` is a shallow fine stack that attends to its last 512 bytes and a deep, wide
    coarse stack that sees the whole window. `local_window` (bytes, a multiple of 4; 0 or absent: the whole
    window) bounds a scale's self-attention and the cross-scale attentions it takes part in. A config without
    `scales` is the original uniform model, tensor for tensor.
    """

    name: str = "micro"
    # --- width and depth
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 688
    n_layers: int = 3
    # --- context: the fine-scale window in bytes (a multiple of the coarsest scale)
    max_seq_len: int = 1024
    # --- numerics
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    init_std: float = 0.02
    # --- tokens
    fim: bool = False  # append fill-in-the-middle prefix/suffix/middle tokens after EOS
    tie_embeddings: bool = True
    # --- per-scale overrides: scale name -> {field in PER_SCALE_FIELDS: value}; empty: uniform
    scales: dict[str, dict[str, int]] = field(default_factory=dict)
    # --- derived in __post_init__
    vocab_size: int = field(default=0)
    head_dim: int = field(default=0)

    def __post_init__(self) -> None:
        problems = []
        for attr in ("d_model", "n_heads", "d_ff", "n_layers", "max_seq_len"):
            value = getattr(self, attr)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{attr} must be a positive integer, got {value!r}")
            elif value > MAX_DIMENSIONS[attr]:
                problems.append(f"{attr} must be at most {MAX_DIMENSIONS[attr]}, got {value}")
        for attr in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, attr)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                problems.append(f"{attr} must be a positive finite number, got {value!r}")
        problems += self._scale_problems()
        if not problems:
            for shape in self.shapes():
                where = "" if not self.scales else f"{shape.name} "
                if shape.d_model % shape.n_heads:
                    problems.append(f"{where}d_model ({shape.d_model}) must be divisible by n_heads ({shape.n_heads})")
                elif (shape.d_model // shape.n_heads) % 2:
                    problems.append(f"{where}head_dim ({shape.d_model // shape.n_heads}) must be even for RoPE")
            problems = list(dict.fromkeys(problems))  # a uniform config reports its one shape once
            if self.max_seq_len % SCALES[-1]:
                problems.append(f"max_seq_len ({self.max_seq_len}) must be a multiple of {SCALES[-1]}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))
        self.head_dim = self.d_model // self.n_heads
        self.vocab_size = BASE_VOCAB_SIZE + (len(FIM_TOKENS) if self.fim else 0)
        if self.param_count() > MAX_PARAMS:  # each dimension in bounds, their product not
            raise ValueError(f"invalid ModelConfig: param_count ({self.param_count():,}) must be at most "
                             f"{MAX_PARAMS:,}; lower d_model, d_ff or n_layers")

    def _scale_problems(self) -> list[str]:
        """What is wrong with `scales` (each value bounded like the uniform field it overrides)."""
        if not isinstance(self.scales, dict):
            return [f"scales must be a mapping of scale name to fields, got {self.scales!r}"]
        problems = []
        for scale, fields in self.scales.items():
            if scale not in SCALE_NAMES:
                problems.append(f"scales: unknown scale {scale!r}; choose from {', '.join(SCALE_NAMES)}")
                continue
            if not isinstance(fields, dict):
                problems.append(f"scales.{scale} must be a mapping of fields, got {fields!r}")
                continue
            for attr, value in fields.items():
                if attr not in PER_SCALE_FIELDS or (scale == "fine" and attr == "d_model"):
                    allowed = [f for f in PER_SCALE_FIELDS if scale != "fine" or f != "d_model"]
                    problems.append(f"scales.{scale}.{attr} is not a per-scale field; choose from {', '.join(allowed)}"
                                    + (" (the fine width is d_model)" if attr == "d_model" else ""))
                elif not isinstance(value, int) or isinstance(value, bool) or value < (0 if attr == "local_window" else 1):
                    kind = "a non-negative" if attr == "local_window" else "a positive"
                    problems.append(f"scales.{scale}.{attr} must be {kind} integer, got {value!r}")
                elif attr == "local_window":
                    if value % SCALES[-1] or value > MAX_DIMENSIONS["max_seq_len"]:
                        problems.append(f"scales.{scale}.local_window must be a multiple of {SCALES[-1]} and at most "
                                        f"{MAX_DIMENSIONS['max_seq_len']}, got {value}")
                elif value > MAX_DIMENSIONS[attr]:
                    problems.append(f"scales.{scale}.{attr} must be at most {MAX_DIMENSIONS[attr]}, got {value}")
        return problems

    def shape(self, scale: str) -> ScaleShape:
        """The resolved shape of one scale: its overrides in `scales`, the uniform fields otherwise."""
        fields = {attr: getattr(self, attr) for attr in PER_SCALE_FIELDS if attr != "local_window"}
        fields["local_window"] = 0
        fields.update(self.scales.get(scale, {}))
        return ScaleShape(name=scale, factor=SCALES[SCALE_NAMES.index(scale)], **fields)

    def shapes(self) -> tuple[ScaleShape, ScaleShape, ScaleShape]:
        return tuple(self.shape(name) for name in SCALE_NAMES)

    @property
    def uniform(self) -> bool:
        """Every scale has the uniform shape and sees the whole window (the original model)."""
        return all((s.d_model, s.n_heads, s.d_ff, s.n_layers, s.local_window)
                   == (self.d_model, self.n_heads, self.d_ff, self.n_layers, 0) for s in self.shapes())

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named preset, optionally with fields overridden (`from_name("micro", max_seq_len=512)`)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], "name": name, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"vocab_size", "head_dim"}
        unknown = set(data) - known - {"vocab_size", "head_dim", "format_version"}
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        # vocab_size and head_dim are stored for readers but always derived: a stored value is never used.
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {path} is not valid JSON: {exc}") from None

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> "ModelConfig":
        return cls.from_file(Path(checkpoint_dir) / "config.json")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not self.scales:  # a uniform config reads as it always did (and older readers still accept it)
            del data["scales"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # ------------------------------------------------------------------ sizes
    def scale_lengths(self, n_bytes: int) -> tuple[int, int, int]:
        """Tokens per scale for n_bytes of input: fine bytes, then medium and coarse incl. their start token."""
        return n_bytes, 1 + n_bytes // SCALES[1], 1 + n_bytes // SCALES[2]

    def param_count(self) -> int:
        """Exact number of parameters of MultiScaleTransformer(self)."""
        d = self.d_model
        shapes = self.shapes()
        stacks = downsample = cross = 0
        for s in shapes:
            block = 2 * s.d_model + 4 * s.d_model ** 2 + 3 * s.d_model * s.d_ff  # two norms, qkv, out, SwiGLU
            stacks += s.n_layers * block + s.d_model  # each stack ends in a norm
            if s.factor > 1:
                downsample += s.factor * d * s.d_model + s.d_model  # projection of k byte embeddings + start token
        for q in shapes:
            for k in shapes:
                if q is not k:  # norms, q/out, k/v (into the query's width), null key/value
                    cross += q.d_model + k.d_model + 2 * q.d_model ** 2 + 2 * k.d_model * q.d_model + 2 * q.d_model
        # gate projection (with bias), final norm, and a projection to d_model for each scale of another width
        fusion = 3 * d * 3 + 3 + d + sum(s.d_model * d for s in shapes if s.d_model != d)
        embed = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return embed + stacks + downsample + cross + fusion + head

    def training_ram_bytes(self, batch_size: int = 8, seq_len: int | None = None, optimizer: str = "lion") -> int:
        """Rough peak RAM to train: weights, grads, optimizer state and activations (fp32), plus runtime overhead."""
        if optimizer not in _OPTIMIZER_STATE_COPIES:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of: {', '.join(_OPTIMIZER_STATE_COPIES)}")
        seq_len = seq_len or self.max_seq_len
        params = self.param_count()
        state = params * 4 * (2 + _OPTIMIZER_STATE_COPIES[optimizer])
        # Floats saved for backward per token: per layer ~ (18 d + 5 d_ff) (norms, projections, SwiGLU, attention
        # output); per scale ~ 24 d (embeddings, grouping, cross-scale attention, fusion) and 4 V (logits, softmax).
        # Calibrated against the peak RSS of micro and testgen training steps (batch 8 x 1024).
        floats = 0.0
        for s in self.shapes():
            per_token = s.n_layers * (18 * s.d_model + 5 * s.d_ff) + 24 * s.d_model + 4 * self.vocab_size
            floats += batch_size * seq_len / s.factor * per_token
        activations = int(floats * 4)
        overhead = 400 * 2**20  # the Python interpreter, torch and data loading
        return state + activations + overhead


# The AXL family's shapes. Widths are those the original release published; `*-q` variants round d_ff to a
# multiple of 256 so every weight row quantizes with llama.cpp's K-quants (Q4_K_M etc.).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=64, n_heads=2, d_ff=128, n_layers=1, max_seq_len=128),
    "comment": dict(d_model=192, n_heads=3, d_ff=512, n_layers=3),
    "docs": dict(d_model=224, n_heads=4, d_ff=608, n_layers=3),
    "micro": dict(d_model=256, n_heads=4, d_ff=688, n_layers=3),
    "micro-q": dict(d_model=256, n_heads=4, d_ff=768, n_layers=3),
    "testgen": dict(d_model=256, n_heads=4, d_ff=688, n_layers=4),
    "refactor": dict(d_model=288, n_heads=4, d_ff=768, n_layers=4),
    "reasoning": dict(d_model=512, n_heads=8, d_ff=1376, n_layers=5),
    "reasoning-q": dict(d_model=512, n_heads=8, d_ff=1536, n_layers=5),
    "code-1b": dict(d_model=1024, n_heads=16, d_ff=2752, n_layers=6),
    # micro's width with a 4,096-byte window: the fine stack shallower and local (its last 512 bytes), the
    # medium stack local over 2,048 bytes, the coarse stack deeper and wider over the whole window
    # (docs/results.md has its training cost per byte and its A/B against micro).
    "micro-long": dict(d_model=256, n_heads=4, d_ff=688, n_layers=3, max_seq_len=4096,
                       scales={"fine": {"n_layers": 2, "local_window": 512}, "medium": {"local_window": 2048},
                               "coarse": {"d_model": 384, "n_heads": 6, "d_ff": 1024, "n_layers": 4}}),
}


def memory_bytes(field: str = "MemAvailable") -> int | None:
    """A /proc/meminfo field in bytes (MemAvailable, MemTotal, ...); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def suggest_models(available_ram_gb: float, batch_size: int = 8, optimizer: str = "lion") -> list[ModelConfig]:
    """Presets whose training fits in `available_ram_gb`, largest first (the original release's helper)."""
    budget = available_ram_gb * 2**30
    fitting = [ModelConfig.from_name(n) for n in PRESETS if n != "tiny"]
    fitting = [c for c in fitting if c.training_ram_bytes(batch_size, optimizer=optimizer) <= budget]
    return sorted(fitting, key=lambda c: c.param_count(), reverse=True)
