"""Weight-only int8 for serving: int8 weights with one scale per output channel, activations stay float.

`quantize_int8(model)` swaps every `Linear` with at least `INT8_MIN_OUT_FEATURES` outputs for an `Int8Linear`
holding only the int8 matrix and its scales (a quarter of float32's bytes); the embedding, norms and the fusion
gate's 3-row matrix stay float. The worker serves it with `AXL_DTYPE=int8`; an axl-multiscale Q8_0 GGUF loads
straight into it (`export.gguf.load_gguf_model(path, int8=True)`), nothing dequantized to float32 at load.

How a matmul runs (torch 2.13, CPU; micro-benchmark on the development VM, one thread, 1,376 x 256 matrix):
* decode (at most `FAST_ROWS` rows): `torch._weight_int8pack_mm` with the activations rounded to bfloat16,
  the product back in float32. Its float32-activation path is a slow reference loop (~300 us vs ~27 us for
  the float32 matvec); with bfloat16 activations it takes the vectorised kernel (~21-42 us, 2.4x faster than
  float32 at 2,048 x 2,048, about even at micro's small matrices, which fit in cache).
* prefill (more rows): the int8 matrix is dequantized on the fly and multiplied in float32: exact for the
  stored weights, about as fast as float32 at 1,024 rows (the int8 kernel is ~1.6x slower there).

Scales are bfloat16 values (the kernel's scale type) of at least `MIN_SCALE`, so each is also exactly an
IEEE half: a Q8_0 block (32 int8 values, one half scale) can carry it. The Q8_0 multiscale export writes every
block of a row with the row's scale, so such a file loads into exactly the int8 weights `quantize_int8` makes.
A Q8_0 file whose blocks have their own scales (another writer) is served exactly too, per block, by
dequantizing on the fly at every matmul (slower than float32; the loader says so).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .model import Linear, MultiScaleTransformer

INT8_MIN_OUT_FEATURES = 32  # smaller matrices (the fusion gate's 3 rows) stay float, as GGUF export keeps them
FAST_ROWS = Linear.FAST_ROWS  # up to this many rows a matmul takes the int8 kernel; more rows dequantize
MIN_SCALE = 2.0**-17  # a bfloat16 at or above it is exactly an IEEE half (whose subnormal step is 2^-24)
Q8_0_BLOCK = 32


def per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 values (out, in) and float32 scales (out,), each scale a bfloat16 value."""
    weight = weight.detach().float()
    absmax = weight.abs().amax(dim=1)
    scale = (absmax / 127).clamp(min=MIN_SCALE).to(torch.bfloat16).float()
    values = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)  # a scale rounded down clips
    return values, scale


def is_int8_scale(scale: torch.Tensor) -> torch.Tensor:
    """Which float32 scales the int8 kernel uses exactly (bfloat16 values, not below MIN_SCALE)."""
    return (scale.to(torch.bfloat16).float() == scale) & (scale >= MIN_SCALE)


class Int8Linear(nn.Module):
    """A linear layer whose weight is stored as int8 values times scales, per output channel or per block.

    `scale` is (out, 1) for one scale per output channel (the fast path) or (out, in / block) for a scale per
    block of `block` inputs (Q8_0 files from other writers; exact, dequantized at every call). Not trainable.
    """

    def __init__(self, values: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if values.dtype != torch.int8 or values.dim() != 2:
            raise ValueError(f"int8 values must be a 2-D int8 tensor, got {values.dtype} {tuple(values.shape)}")
        scale = scale.float().reshape(values.shape[0], -1)
        if values.shape[1] % scale.shape[1]:
            raise ValueError(f"{scale.shape[1]} scales per row do not divide {values.shape[1]} inputs")
        self.out_features, self.in_features = values.shape
        self.register_buffer("weight_int8", values.contiguous())
        self.register_buffer("weight_scale", scale.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        values, scale = per_channel_int8(linear.weight)
        return cls(values, scale, linear.bias)

    @property
    def per_channel(self) -> bool:
        return self.weight_scale.shape[1] == 1

    @property
    def weight(self) -> torch.Tensor:
        """The weight as float32 (out, in), computed on each access (export, inspection); not stored."""
        out, n_scales = self.weight_scale.shape
        blocks = self.weight_int8.view(out, n_scales, -1).float() * self.weight_scale[:, :, None]
        return blocks.view(out, self.in_features)

    def _kernel_scale(self) -> torch.Tensor:
        """The scales as the kernel takes them (bfloat16, (out,)), cached until the buffer changes."""
        scale = self.weight_scale
        key = (scale.data_ptr(), scale._version)
        cached = self.__dict__.get("_bf16_scale")
        if cached is None or cached[0] != key:
            if not bool(is_int8_scale(scale.float()).all()):
                raise ValueError("per-channel int8 scales must be bfloat16 values >= MIN_SCALE (per_channel_int8)")
            cached = (key, scale.view(-1).to(torch.bfloat16))
            self.__dict__["_bf16_scale"] = cached
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.per_channel and rows <= _kernel_rows:
            flat = x.reshape(rows, self.in_features).to(torch.bfloat16)
            # The compiled step (axl_model.compiled) cannot trace `_kernel_scale`'s cache check (data pointers): it
            # reads the copy `compiled.CompiledDecodeStep` attached as `compiled_scale` (weights fixed while serving).
            scale = self.compiled_scale if torch.compiler.is_compiling() else self._kernel_scale()
            out = torch._weight_int8pack_mm(flat, self.weight_int8, scale)
            out = out.to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
            out = F.linear(x, self.weight.to(x.dtype))
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        kind = "per channel" if self.per_channel else f"per block of {self.in_features // self.weight_scale.shape[1]}"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 {kind}"


_kernel_rows = FAST_ROWS  # read at each call: `int8_kernel_everywhere` raises it for a measurement


@contextmanager
def int8_kernel_everywhere() -> Iterator[None]:
    """Every int8 matmul takes the decode kernel (bfloat16 activations), prefill-sized ones too: scoring a long
    text this way measures the arithmetic that decoding does, window by window instead of token by token."""
    global _kernel_rows
    saved, _kernel_rows = _kernel_rows, 1 << 62
    try:
        yield
    finally:
        _kernel_rows = saved


def int8_targets(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers `quantize_int8` replaces, by module name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module.out_features >= INT8_MIN_OUT_FEATURES}


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


ModuleT = TypeVar("ModuleT", bound=nn.Module)


@torch.no_grad()
def quantize_int8(model: ModuleT) -> ModuleT:
    """Swap the model's linear layers for per-channel int8 ones, in place; returns the model (eval mode).

    A head tied to the embedding gets its own int8 copy; the embedding lookup stays float.
    """
    for name, linear in int8_targets(model).items():
        replace_module(model, name, Int8Linear.from_linear(linear))
    return model.eval()


def int8_weight_bytes(model: nn.Module) -> int:
    """Bytes of int8 weight values held by the model's Int8Linear layers."""
    return sum(m.weight_int8.numel() for m in model.modules() if isinstance(m, Int8Linear))


def load_serving_model(path, dtype: str = "float32") -> MultiScaleTransformer:
    """The model the worker serves from a checkpoint folder or an axl-multiscale .gguf, at `dtype`.

    float32 / float16 / bfloat16: float weights at that precision (float32 is exact), except that a GGUF's
    Q8_0 matrices stay int8 as stored. int8: every linear layer int8 (`quantize_int8`), float32 elsewhere.
    """
    from pathlib import Path

    from .checkpoint import load_checkpoint

    if Path(path).suffix.lower() == ".gguf":
        from .checkpoint import CheckpointError
        from .export.gguf import load_gguf_model

        try:
            model = load_gguf_model(path, int8=True)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
    else:
        model = load_checkpoint(path)
    if dtype == "int8":
        return quantize_int8(model).float()
    return model.to(getattr(torch, dtype)).eval()
