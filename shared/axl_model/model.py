"""The AXL multi-scale byte transformer.

Three resolutions run side by side: fine (1 byte per token), medium (2) and coarse (4). Each has its own
pre-norm stack (RMSNorm, RoPE attention, SwiGLU). Six cross-scale attentions let every scale read the other
two, and a softmax gate fuses the three at fine resolution before the LM head.

Causality. A medium or coarse token summarises a group of bytes, so a position may only see a group once
all of its bytes are at or before it (the shift used by Hourglass and MEGABYTE). Every token gets an "end
byte" e: fine t -> t, medium group j -> 2j+1, coarse group i -> 4i+3. Each coarse sequence starts with a
learned start token (e = -1) that is always visible, so the grouped sequences are [start, g0, g1, ...] and
index j >= 1 ends at byte k*j - 1. A query may attend a key iff e_key <= e_query. Fine position t therefore
reads medium index (t+1)//2 and coarse index (t+1)//4: the last complete groups. Cross attentions also carry
a learned null key/value so that a query with nothing visible (a start token looking at bytes) is defined.

Shapes. Each scale may have its own depth and width (`ModelConfig.scales`); the byte embedding, the fusion
and the head have the fine width `d_model`. Downsampling projects k byte embeddings to the scale's width, a
cross attention works at its query scale's width (keys and values projected from the key scale's), and the
fusion projects a medium or coarse state of another width to `d_model`. A uniform config builds exactly the
original tensors.

Local windows. A scale with `local_window` W attends only to tokens whose end byte is less than W bytes
before its own (e_query - e_key < W), in its self-attention and in the cross attentions it takes part in
(the tighter window of the two scales). Training computes such self-attention block by block (cost ~ T x W,
not T^2), and decoding keeps only the last W/k tokens of such a scale in a ring buffer.

Incremental decoding keeps a KV cache for every scale and for every cross attention; a medium (coarse)
token is appended when its group of 2 (4) bytes completes. Rows of a batch are independent: each has its
own length, so prompts of any lengths decode together and requests can join or leave a running batch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import SCALE_NAMES, SCALES, ModelConfig, ScaleShape, pair_window
# The six directed (query scale, key scale) pairs of cross-scale attention.
CROSS_PAIRS = tuple((q, k) for q in SCALE_NAMES for k in SCALE_NAMES if q != k)


def cross_name(query: str, key: str) -> str:
    return f"{query}_from_{key}"


# ---------------------------------------------------------------------------------------------- building blocks
class Linear(nn.Linear):
    """nn.Linear that decodes faster: for a few rows without autograd it multiplies by a cached (in, out) copy.

    A decode step is a matrix-vector product per weight, bound by how fast the weights stream from memory.
    CPU BLAS reads a row-major (in, out) matrix about twice as fast for `x @ W_t` as the (out, in) layout for
    `x @ W.T` (bench: 14.5 vs 7.0 GB/s on the development VM), so inference keeps a transposed copy (twice the
    weight memory while decoding). Training, prefill and other dtypes use the standard path. The copy is
    rebuilt when the weight changes (a new tensor or an in-place update).
    """

    FAST_ROWS = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the compiled decode step (axl_model.compiled)
            return self._compiled_forward(x)
        if torch.is_grad_enabled() or x.dtype != torch.float32 or x.numel() > self.FAST_ROWS * self.in_features:
            return super().forward(x)
        out = x @ self._transposed_weight()
        return out if self.bias is None else out + self.bias

    def _compiled_forward(self, x: torch.Tensor) -> torch.Tensor:
        # The compiled decode step cannot trace the cache check above (data pointers); it multiplies by the
        # (in, out) copy `compiled.CompiledDecodeStep` attached as `compiled_weight_t` (weights fixed while serving).
        weight_t = getattr(self, "compiled_weight_t", None)
        if weight_t is None or x.dtype != torch.float32 or x.numel() > self.FAST_ROWS * self.in_features:
            return super().forward(x)
        out = x @ weight_t
        return out if self.bias is None else out + self.bias

    def _transposed_weight(self) -> torch.Tensor:
        weight = self.weight
        key = (weight.data_ptr(), weight._version, weight.dtype)
        cached = self.__dict__.get("_decode_weight")
        if cached is None or cached[0] != key:
            with torch.inference_mode(False):  # a normal tensor, usable under no_grad and inference_mode alike
                cached = (key, weight.detach().t().contiguous())
            self.__dict__["_decode_weight"] = cached
        return cached[1]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_positions, head_dim) in the rotate-half layout (first half pairs with second half)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)  # (P, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (P, D)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin broadcastable to it."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def sliding_window_attention(q, k, v, window: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention where query i sees keys j with 0 <= i - j < window; q, k, v: (B, H, T, D).

    Queries go in blocks of `window // 2` (at least 1); each block reads the keys from `window` before its
    start to its end, so the cost is ~ 1.5 T x window instead of T^2, and the mask is built once per call.
    """
    B, H, T, D = q.shape
    block = max(1, window // 2)
    n_blocks = -(-T // block)
    pad = n_blocks * block - T
    span = window + block  # keys one block reads: positions [m * block - window, (m + 1) * block)

    def key_blocks(x: torch.Tensor) -> torch.Tensor:  # (B, H, T, D) -> (B * n_blocks, H, span, D)
        padded = F.pad(x, (0, 0, window, pad))  # `window` zero keys before position 0 (masked), tail padding
        blocks = padded.unfold(2, span, block).permute(0, 2, 1, 4, 3)  # (B, n_blocks, H, span, D)
        return blocks.reshape(B * n_blocks, H, span, D)

    queries = F.pad(q, (0, 0, 0, pad)).view(B, H, n_blocks, block, D).transpose(1, 2).reshape(B * n_blocks, H, block, D)
    i = torch.arange(block, device=q.device)[:, None]  # query offset in its block
    j = torch.arange(span, device=q.device)[None, :]  # key offset in its block's span
    starts = torch.arange(n_blocks, device=q.device)[:, None, None] * block  # first query position per block
    # key position starts + j - window, query position starts + i: 0 <= i - j + window < window, key position >= 0
    mask = (j > i) & (j <= i + window) & (starts + j >= window)  # (n_blocks, block, span)
    mask = mask.repeat(B, 1, 1)[:, None]  # (B * n_blocks, 1, block, span)
    y = F.scaled_dot_product_attention(queries, key_blocks(k), key_blocks(v), attn_mask=mask, dropout_p=dropout_p)
    return y.view(B, n_blocks, H, block, D).transpose(1, 2).reshape(B, H, n_blocks * block, D)[:, :, :T]


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with RoPE, fused QKV projection, optionally within a local window."""

    def __init__(self, config: ModelConfig, shape: ScaleShape | None = None) -> None:
        super().__init__()
        shape = shape or config.shape("fine")
        self.n_heads, self.head_dim = shape.n_heads, shape.head_dim
        self.qkv = Linear(shape.d_model, 3 * shape.d_model, bias=False)
        self.out = Linear(shape.d_model, shape.d_model, bias=False)
        self.dropout = config.dropout
        self.window = shape.window_tokens  # 0: every earlier token

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, D)
        qk = apply_rope(qkv[:2], cos, sin)  # queries and keys rotate together
        return qk[0], qk[1], qkv[2]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Full causal attention over x (B, T, C). Returns the output and this layer's (k, v) for a cache."""
        q, k, v = self.project(x, cos, sin)
        drop = self.dropout if self.training else 0.0
        if self.window and self.window < x.shape[1]:
            y = sliding_window_attention(q, k, v, self.window, drop)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)  # (B, H, T, D)
        return self.out(y.transpose(1, 2).reshape(x.shape)), (k, v)

    def step(self, x: torch.Tensor, cos, sin, cache_k, cache_v, slot: "Slots", mask):
        """One new token per row (x: (B, 1, C)) written at `slot`; attends the cache slots [0, slot.span)."""
        q, k, v = self.project(x, cos, sin)  # (B, H, 1, D)
        slot.write(cache_k, k)
        slot.write(cache_v, v)
        keys, values = cache_k[:, :, : slot.span], cache_v[:, :, : slot.span]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(x.shape))

    def extend(self, x: torch.Tensor, cos, sin, cache_k, cache_v, span: "ChunkSpan"):
        """Several new tokens of one row (x: (1, T, C)) after the ones its cache holds (the chunked prefill):
        they attend to the held tokens and to each other under `span.mask`, then enter the cache."""
        q, k, v = self.project(x, cos, sin)  # (1, H, T, D)
        keys, values = span.store_and_read(cache_k, k), span.store_and_read(cache_v, v)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=span.mask)
        return self.out(y.transpose(1, 2).reshape(x.shape))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig, shape: ScaleShape | None = None) -> None:
        super().__init__()
        shape = shape or config.shape("fine")
        self.gate_up = Linear(shape.d_model, 2 * shape.d_ff, bias=False)
        self.down = Linear(shape.d_ff, shape.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.dropout(self.down(F.silu(gate) * up))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, shape: ScaleShape | None = None) -> None:
        super().__init__()
        shape = shape or config.shape("fine")
        self.attn_norm = RMSNorm(shape.d_model, config.norm_eps)
        self.attn = SelfAttention(config, shape)
        self.mlp_norm = RMSNorm(shape.d_model, config.norm_eps)
        self.mlp = SwiGLU(config, shape)

    def forward(self, x, cos, sin):
        attended, kv = self.attn(self.attn_norm(x), cos, sin)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x)), kv

    def step(self, x, cos, sin, cache_k, cache_v, slot, mask):
        x = x + self.attn.step(self.attn_norm(x), cos, sin, cache_k, cache_v, slot, mask)
        return x + self.mlp(self.mlp_norm(x))

    def extend(self, x, cos, sin, cache_k, cache_v, span):
        x = x + self.attn.extend(self.attn_norm(x), cos, sin, cache_k, cache_v, span)
        return x + self.mlp(self.mlp_norm(x))


class ScaleStack(nn.Module):
    """The layers of one resolution, with a final norm (default: the fine scale's shape)."""

    def __init__(self, config: ModelConfig, shape: ScaleShape | None = None) -> None:
        super().__init__()
        shape = shape or config.shape("fine")
        self.blocks = nn.ModuleList(Block(config, shape) for _ in range(shape.n_layers))
        self.norm = RMSNorm(shape.d_model, config.norm_eps)

    def forward(self, x, cos, sin):
        """x: (B, T, C) -> (B, T, C), plus [(k, v)] per layer."""
        kvs = []
        for block in self.blocks:
            x, kv = block(x, cos, sin)
            kvs.append(kv)
        return self.norm(x), kvs

    def step(self, x, cos, sin, cache_ks, cache_vs, slot, mask):
        for block, cache_k, cache_v in zip(self.blocks, cache_ks, cache_vs):
            x = block.step(x, cos, sin, cache_k, cache_v, slot, mask)
        return self.norm(x)

    def extend(self, x, cos, sin, cache_ks, cache_vs, span):
        for block, cache_k, cache_v in zip(self.blocks, cache_ks, cache_vs):
            x = block.extend(x, cos, sin, cache_k, cache_v, span)
        return self.norm(x)


class CrossScaleAttention(nn.Module):
    """Queries from one scale read keys/values of another, under the end-byte visibility rule.

    No RoPE here: the scales have different resolutions, and the mask already encodes order. A learned
    null key/value at slot 0 is always visible, so no query row is empty. Attention runs at the query
    scale's width and heads; keys and values are projected into it from the key scale's width.
    """

    def __init__(self, config: ModelConfig, query: ScaleShape | None = None, key: ScaleShape | None = None) -> None:
        super().__init__()
        query, key = query or config.shape("fine"), key or config.shape("fine")
        d = query.d_model
        self.n_heads, self.head_dim = query.n_heads, query.head_dim
        self.query_norm = RMSNorm(d, config.norm_eps)
        self.key_norm = RMSNorm(key.d_model, config.norm_eps)
        self.q = Linear(d, d, bias=False)
        self.kv = Linear(key.d_model, 2 * d, bias=False)
        self.out = Linear(d, d, bias=False)
        self.null_kv = nn.Parameter(torch.zeros(2, query.n_heads, 1, query.head_dim))

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """source: (B, S, C) -> k, v: (B, H, S, D) each."""
        B, S, _ = source.shape
        k, v = self.kv(self.key_norm(source)).view(B, S, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def with_null(self, k: torch.Tensor, v: torch.Tensor):
        B = k.shape[0]
        null_k, null_v = self.null_kv[0].expand(B, -1, -1, -1), self.null_kv[1].expand(B, -1, -1, -1)
        return torch.cat([null_k, k], dim=2), torch.cat([null_v, v], dim=2)

    def attend(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask) -> torch.Tensor:
        """x: (B, T, C) queries; keys/values (B, H, 1+S, D) with the null slot first."""
        B, T, C = x.shape
        q = self.q(self.query_norm(x)).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class GatedFusion(nn.Module):
    """Softmax gate over the three scales, computed per fine position.

    A medium or coarse stack of another width than d_model is first projected to it (`to_fine_width`, applied
    at the scale's own resolution, before its states are spread over the fine positions).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = Linear(3 * config.d_model, 3)
        self.inputs = nn.ModuleDict({s.name: Linear(s.d_model, config.d_model, bias=False)
                                     for s in config.shapes() if s.d_model != config.d_model})

    def to_fine_width(self, scale: str, x: torch.Tensor) -> torch.Tensor:
        return self.inputs[scale](x) if scale in self.inputs else x

    def forward(self, fine, medium, coarse):
        """Each (B, T, C) -> (B, T, C)."""
        scales = torch.cat([fine, medium, coarse], dim=-1)  # (B, T, 3C)
        weights = self.gate(scales).softmax(dim=-1)  # (B, T, 3)
        return (scales.unflatten(-1, (3, -1)) * weights[..., None]).sum(dim=-2)


# ---------------------------------------------------------------------------------------------- cache
class Slots:
    """Where each row writes its new token and how far attention reaches (`span`) in one decode step.

    A cache holds `base` fixed slots (a cross cache's null key) and then a ring of `ring` slots: token j (its
    position, also its RoPE index) lives at slot base + j % ring. Without a local window the ring holds the
    whole window, so j % ring = j. Ragged rows: `write` lists the rows whose token exists this step (None:
    every row), `top` is the largest index (a Python int, known to the caller without reading a tensor).
    """

    def __init__(self, index: torch.Tensor | None, rows: torch.Tensor | None, uniform: int | None,
                 ring: int, base: int = 0, write: torch.Tensor | None = None, top: int | None = None) -> None:
        self.index, self.rows, self.uniform = index, rows, uniform  # uniform: shared position when rows agree
        self.ring, self.base = ring, base
        if uniform is None:
            top = int(index.max()) if top is None else top
            # Where each writing row's token goes, worked out once for every layer's K and V cache. Only rows
            # whose token completed write: in a ring, the slot past a row's tokens may hold its oldest token.
            slots = base + index % ring
            self.write_rows, self.write_slots = (rows, slots) if write is None else (write, slots[write])
        self.span = base + min((uniform if uniform is not None else top) + 1, ring)

    def write(self, cache: torch.Tensor, value: torch.Tensor) -> None:
        """cache: (B, H, S, D); value: (B, H, 1, D)."""
        if self.uniform is not None:
            cache[:, :, self.base + self.uniform % self.ring] = value[:, :, 0]
        else:
            cache[self.write_rows, :, self.write_slots] = value[self.write_rows, :, 0]


class ChunkSpan:
    """What a chunk of new tokens of one row reads from and writes to one cache (`MultiScaleTransformer.extend`).

    The row holds tokens [0, held) of a scale, of which its ring keeps the last `ring` after `base` fixed slots
    (see `Slots`); `count` new tokens follow. Attention reads the fixed slots, the held tokens oldest first, then
    the new ones (`key_indices`: the token each non-fixed key is), under `mask`; the new tokens then enter the ring.
    """

    def __init__(self, row: int, held: int, count: int, ring: int, base: int = 0, device=None) -> None:
        self.row, self.base = row, base
        # Nothing wraps: the held tokens sit in slots [base, base + held) oldest first and the new ones go right
        # after them, so the keys are a view of the cache once the new ones are stored (no copy of the held ones).
        self.in_place = held + count <= ring
        self.end = base + held + count
        held_indices = torch.arange(max(0, held - ring), held, device=device)
        self.held_slots = base + held_indices % ring
        self.new_indices = torch.arange(held, held + count, device=device)
        self.key_indices = torch.cat([held_indices, self.new_indices])
        self.kept = min(count, ring)  # a chunk longer than the ring leaves only its newest tokens there
        self.store_slots = base + self.new_indices[count - self.kept:] % ring
        self.mask: torch.Tensor | None = None

    def store(self, cache: torch.Tensor, new: torch.Tensor) -> None:
        if self.kept:
            cache[self.row, :, self.store_slots] = new[0, :, new.shape[2] - self.kept:]

    def store_and_read(self, cache: torch.Tensor, new: torch.Tensor | None) -> torch.Tensor:
        """Store the new tokens (None: none) and return what attention reads: the fixed slots, the held tokens oldest
        first, then the new ones. cache (B, H, S, D), new (1, H, count, D) -> (1, H, base + held + count, D).

        When nothing wraps that is a view of the cache (a prefix cache hit's chunk would otherwise copy every held
        key per layer); in a ring, a copy gathered before the new tokens overwrite the oldest held ones."""
        if self.in_place:
            if new is not None:
                cache[self.row, :, self.end - new.shape[2] : self.end] = new[0]
            return cache[self.row : self.row + 1, :, : self.end]
        row = cache[self.row]  # (H, S, D)
        parts = [row[:, : self.base], row[:, self.held_slots]] + ([new[0]] if new is not None else [])
        keys = torch.cat(parts, dim=1)[None]
        if new is not None:
            self.store(cache, new)
        return keys


@dataclass
class KVCache:
    """Decoding state for a batch of independent rows.

    lengths[b] is the number of bytes row b holds; medium and coarse counts follow from it. Cross caches
    hold the null slot at index 0 followed by the key scale's tokens. A scale (or cross attention) with a
    local window keeps only its last window of tokens, in a ring (see `Slots`).
    """

    lengths: torch.Tensor  # (B,) long
    self_k: dict[str, list[torch.Tensor]]  # scale -> per layer (B, H, S_scale, D)
    self_v: dict[str, list[torch.Tensor]]
    cross_k: dict[str, torch.Tensor]  # cross name -> (B, H, 1 + S_key, D)
    cross_v: dict[str, torch.Tensor]
    recent_embeddings: torch.Tensor  # (B, 4, C): fine embeddings of the current coarse group, slot t % 4
    fused_medium: torch.Tensor  # (B, C): cross-updated latest medium token, what fine positions read
    fused_coarse: torch.Tensor  # (B, C)
    capacity: int  # bytes a row may hold

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        """Every per-row tensor (first dimension = row), lengths included."""
        stacks = [t for scale in self.self_k for t in self.self_k[scale] + self.self_v[scale]]
        return [self.lengths, *stacks, *self.cross_k.values(), *self.cross_v.values(),
                self.recent_embeddings, self.fused_medium, self.fused_coarse]

    def narrow(self, n: int) -> "KVCache":
        """A cache over rows [0, n) that shares memory with this one (lengths excepted: copy them back)."""
        if n == self.batch_size:  # every row: the same tensors (no per-step views of each of them)
            return dataclasses.replace(self, lengths=self.lengths.clone())
        return KVCache(
            lengths=self.lengths[:n].clone(),
            self_k={s: [t[:n] for t in ts] for s, ts in self.self_k.items()},
            self_v={s: [t[:n] for t in ts] for s, ts in self.self_v.items()},
            cross_k={k: t[:n] for k, t in self.cross_k.items()},
            cross_v={k: t[:n] for k, t in self.cross_v.items()},
            recent_embeddings=self.recent_embeddings[:n],
            fused_medium=self.fused_medium[:n],
            fused_coarse=self.fused_coarse[:n],
            capacity=self.capacity,
        )

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of rows [start, stop) (lengths too: a view, not a copy)."""
        part = slice(start, stop)
        return KVCache(
            lengths=self.lengths[part],
            self_k={s: [t[part] for t in ts] for s, ts in self.self_k.items()},
            self_v={s: [t[part] for t in ts] for s, ts in self.self_v.items()},
            cross_k={k: t[part] for k, t in self.cross_k.items()},
            cross_v={k: t[part] for k, t in self.cross_v.items()},
            recent_embeddings=self.recent_embeddings[part],
            fused_medium=self.fused_medium[part],
            fused_coarse=self.fused_coarse[part],
            capacity=self.capacity,
        )

    def move_row(self, source: int, target: int) -> None:
        for tensor in self.tensors():
            tensor[target] = tensor[source]


# ---------------------------------------------------------------------------------------------- the model
class MultiScaleTransformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        shapes = {s.name: s for s in config.shapes()}
        self.embed = nn.Embedding(config.vocab_size, d)
        self.stacks = nn.ModuleDict({name: ScaleStack(config, shapes[name]) for name in SCALE_NAMES})
        # Learned downsampling: concatenate k neighbouring byte embeddings and project to the scale's width.
        self.downsample = nn.ModuleDict({
            "medium": Linear(SCALES[1] * d, shapes["medium"].d_model, bias=False),
            "coarse": Linear(SCALES[2] * d, shapes["coarse"].d_model, bias=False),
        })
        self.start_tokens = nn.ParameterDict({
            "medium": nn.Parameter(torch.zeros(shapes["medium"].d_model)),
            "coarse": nn.Parameter(torch.zeros(shapes["coarse"].d_model)),
        })
        self.cross = nn.ModuleDict({cross_name(q, k): CrossScaleAttention(config, shapes[q], shapes[k])
                                    for q, k in CROSS_PAIRS})
        # Bytes each cross attention looks back (0: all), by the end-byte rule in the module docstring.
        self.cross_windows = {cross_name(q, k): pair_window(shapes[q], shapes[k]) for q, k in CROSS_PAIRS}
        self.fusion = GatedFusion(config)
        self.final_norm = RMSNorm(d, config.norm_eps)
        self.lm_head = Linear(d, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # RoPE tables per scale (its head width), covering its longest sequence (start token included).
        for name, length in zip(SCALE_NAMES, config.scale_lengths(config.max_seq_len)):
            cos, sin = rope_tables(shapes[name].head_dim, length + 1, config.rope_theta)
            self.register_buffer(f"rope_cos_{name}", cos, persistent=False)
            self.register_buffer(f"rope_sin_{name}", sin, persistent=False)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():  # scaled init of residual projections (GPT-2), per stack depth
            if name.endswith(("attn.out.weight", "mlp.down.weight")):
                n_layers = shapes[name.split(".")[1]].n_layers
                nn.init.normal_(param, std=config.init_std / (2 * n_layers) ** 0.5)

    def rope(self, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"rope_cos_{scale}"), getattr(self, f"rope_sin_{scale}")

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ full sequence
    @staticmethod
    def end_bytes(n_bytes: int, device) -> dict[str, torch.Tensor]:
        """The last byte each token covers, per scale (start tokens: -1)."""
        fine = torch.arange(n_bytes, device=device)
        return {
            "fine": fine,
            "medium": SCALES[1] * torch.arange(1 + n_bytes // SCALES[1], device=device) - 1,
            "coarse": SCALES[2] * torch.arange(1 + n_bytes // SCALES[2], device=device) - 1,
        }

    def _grouped_inputs(self, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-scale input sequences: fine embeddings, and [start, groups...] for medium and coarse."""
        B, T, C = embeddings.shape
        inputs = {"fine": embeddings}
        for name, k in (("medium", SCALES[1]), ("coarse", SCALES[2])):
            groups = embeddings[:, : (T // k) * k].reshape(B, T // k, k * C)  # (B, T/k, k*C)
            start = self.start_tokens[name].expand(B, 1, -1)
            inputs[name] = torch.cat([start, self.downsample[name](groups)], dim=1)  # (B, 1 + T/k, C_scale)
        return inputs

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits for every position.

        Args:
            ids: (B, T) token ids, T <= max_seq_len.
        Returns:
            logits (B, T, vocab_size); position t depends on ids[:, :t+1] only.
        """
        return self._forward_with_states(ids)[0]

    def _forward_with_states(self, ids: torch.Tensor):
        B, T = ids.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        ends = self.end_bytes(T, ids.device)
        embeddings = self.embed(ids)  # (B, T, C)
        inputs = self._grouped_inputs(embeddings)
        stacked, self_kvs = {}, {}
        for name in SCALE_NAMES:
            n = inputs[name].shape[1]
            cos, sin = self.rope(name)
            stacked[name], self_kvs[name] = self.stacks[name](inputs[name], cos[:n], sin[:n])

        updated = dict(stacked)
        cross_kvs = {}
        for query, key in CROSS_PAIRS:
            module = self.cross[cross_name(query, key)]
            k, v = module.with_null(*module.keys_values(stacked[key]))  # (B, H, 1 + S, D)
            cross_kvs[cross_name(query, key)] = (k, v)
            behind = ends[query][:, None] - ends[key][None, :]  # (Tq, S): bytes from the key's end to the query's
            visible = behind >= 0
            window = self.cross_windows[cross_name(query, key)]
            if window:
                visible = visible & (behind < window)
            mask = F.pad(visible, (1, 0), value=True)  # the null slot is always visible
            updated[query] = updated[query] + module.attend(stacked[query], k, v, mask)

        # Medium and coarse at the fine width (identity for a uniform config), at their own resolution.
        fused_inputs = {name: self.fusion.to_fine_width(name, updated[name]) for name in ("medium", "coarse")}
        positions = torch.arange(T, device=ids.device)
        medium_up = fused_inputs["medium"][:, (positions + 1) // SCALES[1]]  # (B, T, C): last complete pair
        coarse_up = fused_inputs["coarse"][:, (positions + 1) // SCALES[2]]  # (B, T, C): last complete quad
        fused = self.fusion(updated["fine"], medium_up, coarse_up)
        logits = self.lm_head(self.final_norm(fused))  # (B, T, V)
        return logits, (embeddings, self_kvs, cross_kvs, fused_inputs)

    def forward_fine_only(self, ids: torch.Tensor) -> torch.Tensor:
        """The fine stack alone (ending in its own norm), then the head.

        This is exactly what a plain llama-architecture GGUF can hold (output_norm = the fine stack's norm).
        It skips the medium/coarse scales, so it is a degraded model, not the one that was trained.
        """
        T = ids.shape[1]
        cos, sin = self.rope("fine")
        hidden, _ = self.stacks["fine"](self.embed(ids), cos[:T], sin[:T])
        return self.lm_head(hidden)

    # ------------------------------------------------------------------ incremental decoding
    def new_cache(self, batch_size: int, capacity: int | None = None) -> KVCache:
        """An empty cache for `batch_size` rows of up to `capacity` bytes (default: max_seq_len)."""
        cfg = self.config
        capacity = capacity or cfg.max_seq_len
        if capacity > cfg.max_seq_len or capacity % SCALES[-1]:
            raise ValueError(f"cache capacity must be a multiple of 4 and <= {cfg.max_seq_len}, got {capacity}")
        weight = self.embed.weight
        shapes = {s.name: s for s in cfg.shapes()}
        sizes = dict(zip(SCALE_NAMES, cfg.scale_lengths(capacity)))

        def ring(scale: str, window: int) -> int:  # tokens of `scale` a cache keeps: its last window, or all
            return min(sizes[scale], window // shapes[scale].factor) if window else sizes[scale]

        def buffer(shape: ScaleShape, length: int) -> torch.Tensor:
            return weight.new_zeros(batch_size, shape.n_heads, length, shape.head_dim)

        def self_buffers(s: str) -> list[torch.Tensor]:
            return [buffer(shapes[s], ring(s, shapes[s].local_window)) for _ in range(shapes[s].n_layers)]

        def cross_buffer(q: str, k: str) -> torch.Tensor:  # the null slot, then the key scale's tokens
            return buffer(shapes[q], 1 + ring(k, self.cross_windows[cross_name(q, k)]))

        return KVCache(
            lengths=torch.zeros(batch_size, dtype=torch.long, device=weight.device),
            self_k={s: self_buffers(s) for s in SCALE_NAMES},
            self_v={s: self_buffers(s) for s in SCALE_NAMES},
            cross_k={cross_name(q, k): cross_buffer(q, k) for q, k in CROSS_PAIRS},
            cross_v={cross_name(q, k): cross_buffer(q, k) for q, k in CROSS_PAIRS},
            recent_embeddings=weight.new_zeros(batch_size, SCALES[-1], cfg.d_model),
            fused_medium=weight.new_zeros(batch_size, cfg.d_model),
            fused_coarse=weight.new_zeros(batch_size, cfg.d_model),
            capacity=capacity,
        )

    @torch.no_grad()
    def copy_into_cache(self, cache: KVCache, rows: torch.Tensor, embeddings, self_kvs, cross_kvs, fused_inputs) -> None:
        """Store the states of a full forward pass over a prefix into cache rows `rows`."""
        T = embeddings.shape[1]
        for scale in SCALE_NAMES:
            for layer, (k, v) in enumerate(self_kvs[scale]):
                _copy_into_ring(cache.self_k[scale][layer], rows, k, base=0)
                _copy_into_ring(cache.self_v[scale][layer], rows, v, base=0)
        for name, (k, v) in cross_kvs.items():
            _copy_into_ring(cache.cross_k[name], rows, k, base=1)
            _copy_into_ring(cache.cross_v[name], rows, v, base=1)
        for t in range(max(0, T - SCALES[-1]), T):
            cache.recent_embeddings[rows, t % SCALES[-1]] = embeddings[:, t]
        cache.fused_medium[rows] = fused_inputs["medium"][:, -1]
        cache.fused_coarse[rows] = fused_inputs["coarse"][:, -1]
        cache.lengths[rows] = T

    def prefill(self, ids: torch.Tensor, cache: KVCache, row: int) -> torch.Tensor:
        """Run prompt `ids` (1-D or (1, T)) into row `row` of a cache, replacing its content.

        Returns the logits after the last prompt token (vocab_size,).
        """
        return self.prefill_with_states(ids, cache, row)[0]

    @torch.no_grad()
    def prefill_with_states(self, ids: torch.Tensor, cache: KVCache, row: int) -> tuple[torch.Tensor, tuple]:
        """`prefill`, also returning every token's states it computed (`_forward_with_states`: embeddings, self and
        cross K/V, fused inputs), before the cache's rings keep only their windows: what a prefix cache keeps."""
        ids = ids.view(1, -1)
        if not 0 < ids.shape[1] <= cache.capacity:
            raise ValueError(f"prompt of {ids.shape[1]} tokens must be between 1 and the cache capacity {cache.capacity}")
        logits, states = self._forward_with_states(ids)
        self.copy_into_cache(cache, torch.tensor([row], device=ids.device), *states)
        return logits[0, -1], states

    @torch.no_grad()
    def extend(self, ids: torch.Tensor, cache: KVCache, row: int) -> torch.Tensor:
        """Append `ids` (1-D or (1, T)) to row `row` of a cache, with the result a one-shot prefill of the row's
        bytes and `ids` would give: the step of a chunked prefill (other rows can decode between two chunks).

        The row must hold a multiple of 4 bytes (so no medium or coarse group straddles two chunks: every chunk
        but a prompt's last is a multiple of 4 long); an empty row starts a prompt. Only the last token of
        each scale needs its cross-scale update (the cross caches keep keys of the stacks' outputs, and the
        fusion reads the newest medium and coarse tokens), so the chunk pays for those once, not per token.
        Returns the logits after the last new token (vocab_size,).
        """
        ids = ids.view(1, -1)
        n, T = int(cache.lengths[row]), ids.shape[1]
        if n % SCALES[-1]:
            raise ValueError(f"a chunk must follow a multiple of {SCALES[-1]} bytes; row {row} holds {n}")
        if not 0 < T <= cache.capacity - n:
            raise ValueError(f"a chunk of {T} tokens after {n} does not fit the cache capacity {cache.capacity}")
        device = ids.device
        embeddings = self.embed(ids)  # (1, T, C)
        tokens, held = {"fine": embeddings}, {"fine": n}
        for name, k in (("medium", SCALES[1]), ("coarse", SCALES[2])):
            groups = embeddings[:, : (T // k) * k].reshape(1, T // k, k * embeddings.shape[-1])
            tokens[name] = self.downsample[name](groups)
            if n == 0:  # a new prompt: the scale's start token comes first
                tokens[name] = torch.cat([self.start_tokens[name].expand(1, 1, -1), tokens[name]], dim=1)
            held[name] = 1 + n // k if n else 0

        def end_bytes(scale: str, indices: torch.Tensor) -> torch.Tensor:  # token index -> its last byte
            k = SCALE_FACTOR[scale]
            return indices if k == 1 else k * indices - 1

        def visibility(behind: torch.Tensor, window: int) -> torch.Tensor:
            return (behind >= 0) & (behind < window) if window else behind >= 0

        # 1. Self-attention stacks over the new tokens of each scale (a short chunk may complete no group).
        stacked, spans = {}, {}
        for name in SCALE_NAMES:
            count = tokens[name].shape[1]
            spans[name] = span = ChunkSpan(row, held[name], count, cache.self_k[name][0].shape[2], 0, device)
            if not count:
                continue
            span.mask = visibility(span.new_indices[:, None] - span.key_indices[None, :],
                                   self.stacks[name].blocks[0].attn.window)
            cos, sin = (table[span.new_indices] for table in self.rope(name))
            stacked[name] = self.stacks[name].extend(tokens[name], cos, sin, cache.self_k[name], cache.self_v[name], span)

        # 2. Cross-scale attention: the new keys enter the cross caches; the newest token of each scale is updated.
        updated = {name: x[:, -1:] for name, x in stacked.items()}
        for query, key in CROSS_PAIRS:
            name, module = cross_name(query, key), self.cross[cross_name(query, key)]
            cache_k, cache_v = cache.cross_k[name], cache.cross_v[name]
            if n == 0:
                cache_k[row, :, 0], cache_v[row, :, 0] = module.null_kv[0, :, 0], module.null_kv[1, :, 0]
            span = ChunkSpan(row, held[key], tokens[key].shape[1], cache_k.shape[2] - 1, 1, device)
            k, v = module.keys_values(stacked[key]) if key in stacked else (None, None)
            if query in stacked:
                behind = end_bytes(query, spans[query].new_indices[-1:])[:, None] - end_bytes(key, span.key_indices)[None, :]
                mask = F.pad(visibility(behind, self.cross_windows[name]), (1, 0), value=True)  # null slot visible
                keys, values = span.store_and_read(cache_k, k), span.store_and_read(cache_v, v)
                updated[query] = updated[query] + module.attend(stacked[query][:, -1:], keys, values, mask)
            elif k is not None:
                span.store(cache_k, k)
                span.store(cache_v, v)

        # 3. The newest medium/coarse states (what the next fine positions read), fusion at the last byte.
        for name, target in (("medium", cache.fused_medium), ("coarse", cache.fused_coarse)):
            if name in updated:
                target[row] = self.fusion.to_fine_width(name, updated[name])[0, -1]
        fused = self.fusion(updated["fine"], cache.fused_medium[row][None, None], cache.fused_coarse[row][None, None])
        for t in range(max(n, n + T - SCALES[-1]), n + T):
            cache.recent_embeddings[row, t % SCALES[-1]] = embeddings[0, t - n]
        cache.lengths[row] = n + T
        return self.lm_head(self.final_norm(fused))[0, -1]

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Append one token per row and return next-token logits (B, V). Every row must have room left.

        When all rows hold the same number of bytes (always at batch 1) the bookkeeping is plain Python
        integers and attention needs no mask; ragged rows use per-row slots and masks.
        """
        lengths_list = cache.lengths.tolist()
        if max(lengths_list) >= cache.capacity:
            raise ValueError("a cache row is full; slide the window (re-prefill) before decoding further")
        if min(lengths_list) == max(lengths_list):
            plan = _UniformPlan(lengths_list[0])
        else:
            plan = _RaggedPlan(cache.lengths, lengths_list)
        x = self.embed(tokens)  # (B, C)
        plan.write_ring(cache.recent_embeddings, x)

        # 1. Self-attention stacks. Fine always steps; medium/coarse step when some row completes a group, on
        # the rows that do when they are consecutive (a ragged batch ordered by phase), else on every row.
        outputs, views = {}, {}
        for scale, k in zip(SCALE_NAMES, SCALES):
            if not plan.any_complete(k):
                continue
            views[scale] = (p, c) = plan.completing(k, cache)
            if k == 1:
                token = x[:, None]  # (B, 1, C)
            else:
                group = p.group(c.recent_embeddings, k)  # (b, k, C), oldest byte first
                token = self.downsample[scale](group.reshape(group.shape[0], 1, -1))  # (b, 1, C_scale)
            start = 0 if k == 1 else 1  # grouped scales start with their start token
            ring = c.self_k[scale][0].shape[2]
            slot = p.slot(k, start, ring, base=0)
            cos, sin = (p.rope(table, slot) for table in self.rope(scale))
            outputs[scale] = self.stacks[scale].step(
                token, cos, sin, c.self_k[scale], c.self_v[scale], slot, p.self_mask(k, start, ring, slot.span))

        # 2. Key/value projections of the new tokens for the cross attentions that read them.
        for query, key in CROSS_PAIRS:
            if key in outputs:
                (p, c), name, k = views[key], cross_name(query, key), SCALE_FACTOR[key]
                ring = c.cross_k[name].shape[2] - 1
                slot = p.slot(k, 0 if k == 1 else 1, ring, base=1)  # after the null slot
                keys, values = self.cross[name].keys_values(outputs[key])  # (b, H, 1, D)
                slot.write(c.cross_k[name], keys)
                slot.write(c.cross_v[name], values)

        # 3. Cross-scale updates of the new tokens, then fusion at the fine position.
        def cross_update(query: str, key: str, x_query: torch.Tensor) -> torch.Tensor:
            (p, c), name, k = views[query], cross_name(query, key), SCALE_FACTOR[key]
            span, mask = p.visible(k, 0 if k == 1 else 1, c.cross_k[name].shape[2] - 1)
            return self.cross[name].attend(x_query, c.cross_k[name][:, :, :span], c.cross_v[name][:, :, :span], mask)

        for scale in ("medium", "coarse"):
            if scale in outputs:
                (p, c), others = views[scale], [s for s in SCALE_NAMES if s != scale]
                updated = outputs[scale] + sum(cross_update(scale, other, outputs[scale]) for other in others)
                target = c.fused_medium if scale == "medium" else c.fused_coarse
                p.keep_completed(target, self.fusion.to_fine_width(scale, updated)[:, 0], SCALE_FACTOR[scale])
        fine = outputs["fine"]
        fine = fine + cross_update("fine", "medium", fine) + cross_update("fine", "coarse", fine)
        fused = self.fusion(fine, cache.fused_medium[:, None], cache.fused_coarse[:, None])
        cache.lengths += 1
        return self.lm_head(self.final_norm(fused))[:, 0]  # (B, V)


SCALE_FACTOR = dict(zip(SCALE_NAMES, SCALES))


def _copy_into_ring(cache: torch.Tensor, rows: torch.Tensor, states: torch.Tensor, base: int) -> None:
    """Write `states` (len(rows), H, base + n, D: fixed slots, then tokens 0..n-1) into cache rows: the fixed
    slots as they are, token j at base + j % ring; a ring shorter than n keeps the newest tokens."""
    ring, n = cache.shape[2] - base, states.shape[2] - base
    first = max(0, n - ring)
    slots = base + torch.arange(first, n, device=cache.device) % ring
    for i, row in enumerate(rows.tolist()):
        target = cache[row]  # (H, S, D), a view: writing into it writes the cache
        target[:, :base] = states[i, :, :base]
        target[:, slots] = states[i, :, base + first:]


class _UniformPlan:
    """Decode-step bookkeeping when every row holds n bytes: Python integers, no masks."""

    def __init__(self, n: int) -> None:
        self.n = n

    def write_ring(self, ring: torch.Tensor, x: torch.Tensor) -> None:
        ring[:, self.n % SCALES[-1]] = x

    def any_complete(self, k: int) -> bool:
        return (self.n + 1) % k == 0

    def group(self, ring: torch.Tensor, k: int) -> torch.Tensor:
        first = (self.n + 1 - k) % SCALES[-1]  # a complete group occupies consecutive ring slots
        return ring[:, first : first + k]

    def slot(self, k: int, start: int, ring: int, base: int) -> Slots:
        return Slots(None, None, start + self.n // k, ring, base)

    def rope(self, table: torch.Tensor, slot: Slots) -> torch.Tensor:
        return table[slot.uniform]  # (D,) broadcasts over (B, H, 1, D)

    def self_mask(self, k: int, start: int, ring: int, span: int) -> None:
        return None  # every slot in the span holds one of the row's visible tokens

    def visible(self, k: int, start: int, ring: int) -> tuple[int, None]:
        return 1 + min(start + (self.n + 1) // k, ring), None  # null + the key tokens held

    def keep_completed(self, target: torch.Tensor, updated: torch.Tensor, k: int) -> None:
        target.copy_(updated)  # only called when the group completed (for every row alike)

    def completing(self, k: int, cache: KVCache) -> tuple["_UniformPlan", KVCache]:
        return self, cache  # every row completes its group together


class _RaggedPlan:
    """Decode-step bookkeeping for rows of different lengths: per-row slots and masks.

    What depends only on the lengths (which rows complete a group, slot indices, masks) is worked out once per
    step from the Python list of lengths and shared by every layer and cache that needs it: the step's cost
    beyond the uniform one is then the medium/coarse stacks running whenever any row completes a group.
    """

    def __init__(self, lengths: torch.Tensor, lengths_list: list[int]) -> None:
        self.lengths, self.new_lengths = lengths, lengths + 1
        self.lengths_list = lengths_list
        self.rows = torch.arange(lengths.shape[0], device=lengths.device)
        self._memo: dict[tuple, object] = {}

    def _once(self, key: tuple, build):
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def write_ring(self, ring: torch.Tensor, x: torch.Tensor) -> None:
        ring[self.rows, self.lengths % SCALES[-1]] = x

    def any_complete(self, k: int) -> bool:
        return any((n + 1) % k == 0 for n in self.lengths_list)

    def completing(self, k: int, cache: KVCache) -> tuple["_UniformPlan | _RaggedPlan", KVCache]:
        """The plan and cache rows a scale of k bytes per token steps on: the rows that complete a group when
        they are consecutive (their K/V reads and matmuls only), else every row (the others' outputs dropped)."""
        complete = [row for row, n in enumerate(self.lengths_list) if (n + 1) % k == 0]
        first, stop = complete[0], complete[-1] + 1
        if len(complete) == len(self.lengths_list) or stop - first != len(complete):
            return self, cache
        lengths = self.lengths_list[first:stop]
        part = (_UniformPlan(lengths[0]) if min(lengths) == max(lengths)
                else _RaggedPlan(self.lengths[first:stop], lengths))
        return part, cache.rows(first, stop)

    def _writers(self, k: int) -> torch.Tensor | None:
        """Rows whose group of k bytes completes this step; None when every row's does."""
        def build():
            complete = [row for row, n in enumerate(self.lengths_list) if (n + 1) % k == 0]
            return None if len(complete) == len(self.lengths_list) else torch.tensor(complete, device=self.rows.device)
        return self._once(("writers", k), build)

    def group(self, ring: torch.Tensor, k: int) -> torch.Tensor:
        offsets = torch.arange(k - 1, -1, -1, device=ring.device)  # oldest byte first
        return ring[self.rows[:, None], (self.lengths[:, None] - offsets) % SCALES[-1]]  # (B, k, C)

    def slot(self, k: int, start: int, ring: int, base: int) -> Slots:
        # Every row computes a token at its next position; only rows whose group completed write it. The
        # others' outputs are discarded, and they attend to the tokens they already hold.
        index = self._once(("index", k, start), lambda: start + self.lengths // k)
        return Slots(index, self.rows, None, ring, base, write=self._writers(k), top=start + max(self.lengths_list) // k)

    def rope(self, table: torch.Tensor, slot: Slots) -> torch.Tensor:
        return table[slot.index][:, None, None, :]  # (B, 1, 1, D)

    def _valid_mask(self, k: int, start: int, ring: int, base: int, span: int | None = None) -> tuple[int, torch.Tensor]:
        """(span, mask (B, 1, 1, span)): a row sees its base slots and the tokens it holds, the new one included
        (a grouped scale always holds its start token, so no row is empty); span: the widest row's, unless given."""
        def build():
            valid = [base + min(start + (n + 1) // k, ring) for n in self.lengths_list]
            width = max(valid) if span is None else span
            held = torch.tensor(valid, device=self.rows.device)
            return width, (torch.arange(width, device=self.rows.device)[None, :] < held[:, None])[:, None, None, :]
        return self._once(("mask", k, start, ring, base, span), build)

    def self_mask(self, k: int, start: int, ring: int, span: int) -> torch.Tensor:
        return self._valid_mask(k, start, ring, 0, span)[1]

    def visible(self, k: int, start: int, ring: int) -> tuple[int, torch.Tensor]:
        return self._valid_mask(k, start, ring, 1)  # null + the key tokens held

    def keep_completed(self, target: torch.Tensor, updated: torch.Tensor, k: int) -> None:
        writers = self._writers(k)
        if writers is None:
            target.copy_(updated)
        else:
            target[writers] = updated[writers]
