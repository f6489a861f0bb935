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

Incremental decoding keeps a KV cache for every scale and for every cross attention; a medium (coarse)
token is appended when its group of 2 (4) bytes completes. Rows of a batch are independent: each has its
own length, so prompts of any lengths decode together and requests can join or leave a running batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import SCALES, ModelConfig

SCALE_NAMES = ("fine", "medium", "coarse")
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
        if torch.is_grad_enabled() or x.dtype != torch.float32 or x.numel() > self.FAST_ROWS * self.in_features:
            return super().forward(x)
        out = x @ self._transposed_weight()
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


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with RoPE, fused QKV projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.qkv = Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = Linear(config.d_model, config.d_model, bias=False)
        self.dropout = config.dropout

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, D)
        qk = apply_rope(qkv[:2], cos, sin)  # queries and keys rotate together
        return qk[0], qk[1], qkv[2]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Full causal attention over x (B, T, C). Returns the output and this layer's (k, v) for a cache."""
        q, k, v = self.project(x, cos, sin)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)  # (B, H, T, D)
        return self.out(y.transpose(1, 2).reshape(x.shape)), (k, v)

    def step(self, x: torch.Tensor, cos, sin, cache_k, cache_v, slot: "Slots", mask):
        """One new token per row (x: (B, 1, C)) written at `slot`; attends cache slots [0, slot] of its row."""
        q, k, v = self.project(x, cos, sin)  # (B, H, 1, D)
        slot.write(cache_k, k)
        slot.write(cache_v, v)
        keys, values = cache_k[:, :, : slot.span], cache_v[:, :, : slot.span]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(x.shape))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up = Linear(config.d_model, 2 * config.d_ff, bias=False)
        self.down = Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.dropout(self.down(F.silu(gate) * up))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = SelfAttention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin):
        attended, kv = self.attn(self.attn_norm(x), cos, sin)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x)), kv

    def step(self, x, cos, sin, cache_k, cache_v, slot, mask):
        x = x + self.attn.step(self.attn_norm(x), cos, sin, cache_k, cache_v, slot, mask)
        return x + self.mlp(self.mlp_norm(x))


class ScaleStack(nn.Module):
    """The layers of one resolution, with a final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)

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


class CrossScaleAttention(nn.Module):
    """Queries from one scale read keys/values of another, under the end-byte visibility rule.

    No RoPE here: the scales have different resolutions, and the mask already encodes order. A learned
    null key/value at slot 0 is always visible, so no query row is empty.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.query_norm = RMSNorm(config.d_model, config.norm_eps)
        self.key_norm = RMSNorm(config.d_model, config.norm_eps)
        self.q = Linear(config.d_model, config.d_model, bias=False)
        self.kv = Linear(config.d_model, 2 * config.d_model, bias=False)
        self.out = Linear(config.d_model, config.d_model, bias=False)
        self.null_kv = nn.Parameter(torch.zeros(2, config.n_heads, 1, config.head_dim))

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
    """Softmax gate over the three scales, computed per fine position."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = Linear(3 * config.d_model, 3)

    def forward(self, fine, medium, coarse):
        """Each (B, T, C) -> (B, T, C)."""
        scales = torch.cat([fine, medium, coarse], dim=-1)  # (B, T, 3C)
        weights = self.gate(scales).softmax(dim=-1)  # (B, T, 3)
        return (scales.unflatten(-1, (3, -1)) * weights[..., None]).sum(dim=-2)


# ---------------------------------------------------------------------------------------------- cache
class Slots:
    """Where each row writes its new token and how far attention reaches (`span`) in one decode step."""

    def __init__(self, index: torch.Tensor | None, rows: torch.Tensor | None, uniform: int | None) -> None:
        self.index, self.rows, self.uniform = index, rows, uniform  # uniform: shared slot when rows agree
        self.span = (uniform if uniform is not None else int(index.max())) + 1

    def write(self, cache: torch.Tensor, value: torch.Tensor) -> None:
        """cache: (B, H, S, D); value: (B, H, 1, D)."""
        if self.uniform is not None:
            cache[:, :, self.uniform] = value[:, :, 0]
        else:
            cache[self.rows, :, self.index] = value[:, :, 0]


@dataclass
class KVCache:
    """Decoding state for a batch of independent rows.

    lengths[b] is the number of bytes row b holds; medium and coarse counts follow from it. Cross caches
    hold the null slot at index 0 followed by the key scale's tokens.
    """

    lengths: torch.Tensor  # (B,) long
    self_k: dict[str, list[torch.Tensor]]  # scale -> per layer (B, H, S_scale, D)
    self_v: dict[str, list[torch.Tensor]]
    cross_k: dict[str, torch.Tensor]  # cross name -> (B, H, 1 + S_key, D)
    cross_v: dict[str, torch.Tensor]
    recent_embeddings: torch.Tensor  # (B, 4, C): fine embeddings of the current coarse group, slot t % 4
    fused_medium: torch.Tensor  # (B, C): cross-updated latest medium token, what fine positions read
    fused_coarse: torch.Tensor  # (B, C)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return self.self_k["fine"][0].shape[2]

    def tensors(self) -> list[torch.Tensor]:
        """Every per-row tensor (first dimension = row), lengths included."""
        stacks = [t for scale in self.self_k for t in self.self_k[scale] + self.self_v[scale]]
        return [self.lengths, *stacks, *self.cross_k.values(), *self.cross_v.values(),
                self.recent_embeddings, self.fused_medium, self.fused_coarse]

    def narrow(self, n: int) -> "KVCache":
        """A cache over rows [0, n) that shares memory with this one (lengths excepted: copy them back)."""
        return KVCache(
            lengths=self.lengths[:n].clone(),
            self_k={s: [t[:n] for t in ts] for s, ts in self.self_k.items()},
            self_v={s: [t[:n] for t in ts] for s, ts in self.self_v.items()},
            cross_k={k: t[:n] for k, t in self.cross_k.items()},
            cross_v={k: t[:n] for k, t in self.cross_v.items()},
            recent_embeddings=self.recent_embeddings[:n],
            fused_medium=self.fused_medium[:n],
            fused_coarse=self.fused_coarse[:n],
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
        self.embed = nn.Embedding(config.vocab_size, d)
        self.stacks = nn.ModuleDict({name: ScaleStack(config) for name in SCALE_NAMES})
        # Learned downsampling: concatenate k neighbouring byte embeddings and project to d_model.
        self.downsample = nn.ModuleDict({
            "medium": Linear(SCALES[1] * d, d, bias=False),
            "coarse": Linear(SCALES[2] * d, d, bias=False),
        })
        self.start_tokens = nn.ParameterDict({
            "medium": nn.Parameter(torch.zeros(d)),
            "coarse": nn.Parameter(torch.zeros(d)),
        })
        self.cross = nn.ModuleDict({cross_name(q, k): CrossScaleAttention(config) for q, k in CROSS_PAIRS})
        self.fusion = GatedFusion(config)
        self.final_norm = RMSNorm(d, config.norm_eps)
        self.lm_head = Linear(d, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # RoPE tables cover the longest sequence at any scale (fine is the longest).
        cos, sin = rope_tables(config.head_dim, config.max_seq_len + 1, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():  # scaled init of residual projections (GPT-2)
            if name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(param, std=config.init_std / (2 * config.n_layers) ** 0.5)

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
            start = self.start_tokens[name].expand(B, 1, C)
            inputs[name] = torch.cat([start, self.downsample[name](groups)], dim=1)  # (B, 1 + T/k, C)
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
            stacked[name], self_kvs[name] = self.stacks[name](inputs[name], self.rope_cos[:n], self.rope_sin[:n])

        updated = dict(stacked)
        cross_kvs = {}
        for query, key in CROSS_PAIRS:
            module = self.cross[cross_name(query, key)]
            k, v = module.with_null(*module.keys_values(stacked[key]))  # (B, H, 1 + S, D)
            cross_kvs[cross_name(query, key)] = (k, v)
            visible = ends[key][None, :] <= ends[query][:, None]  # (Tq, S)
            mask = F.pad(visible, (1, 0), value=True)  # the null slot is always visible
            updated[query] = updated[query] + module.attend(stacked[query], k, v, mask)

        positions = torch.arange(T, device=ids.device)
        medium_up = updated["medium"][:, (positions + 1) // SCALES[1]]  # (B, T, C): last complete pair
        coarse_up = updated["coarse"][:, (positions + 1) // SCALES[2]]  # (B, T, C): last complete quad
        fused = self.fusion(updated["fine"], medium_up, coarse_up)
        logits = self.lm_head(self.final_norm(fused))  # (B, T, V)
        return logits, (embeddings, self_kvs, cross_kvs, updated)

    def forward_fine_only(self, ids: torch.Tensor) -> torch.Tensor:
        """The fine stack alone (ending in its own norm), then the head.

        This is exactly what a plain llama-architecture GGUF can hold (output_norm = the fine stack's norm).
        It skips the medium/coarse scales, so it is a degraded model, not the one that was trained.
        """
        T = ids.shape[1]
        hidden, _ = self.stacks["fine"](self.embed(ids), self.rope_cos[:T], self.rope_sin[:T])
        return self.lm_head(hidden)

    # ------------------------------------------------------------------ incremental decoding
    def new_cache(self, batch_size: int, capacity: int | None = None) -> KVCache:
        """An empty cache for `batch_size` rows of up to `capacity` bytes (default: max_seq_len)."""
        cfg = self.config
        capacity = capacity or cfg.max_seq_len
        if capacity > cfg.max_seq_len or capacity % SCALES[-1]:
            raise ValueError(f"cache capacity must be a multiple of 4 and <= {cfg.max_seq_len}, got {capacity}")
        weight = self.embed.weight
        sizes = dict(zip(SCALE_NAMES, cfg.scale_lengths(capacity)))

        def buffer(length: int) -> torch.Tensor:
            return weight.new_zeros(batch_size, cfg.n_heads, length, cfg.head_dim)

        return KVCache(
            lengths=torch.zeros(batch_size, dtype=torch.long, device=weight.device),
            self_k={s: [buffer(sizes[s]) for _ in range(cfg.n_layers)] for s in SCALE_NAMES},
            self_v={s: [buffer(sizes[s]) for _ in range(cfg.n_layers)] for s in SCALE_NAMES},
            cross_k={cross_name(q, k): buffer(1 + sizes[k]) for q, k in CROSS_PAIRS},
            cross_v={cross_name(q, k): buffer(1 + sizes[k]) for q, k in CROSS_PAIRS},
            recent_embeddings=weight.new_zeros(batch_size, SCALES[-1], cfg.d_model),
            fused_medium=weight.new_zeros(batch_size, cfg.d_model),
            fused_coarse=weight.new_zeros(batch_size, cfg.d_model),
        )

    @torch.no_grad()
    def copy_into_cache(self, cache: KVCache, rows: torch.Tensor, embeddings, self_kvs, cross_kvs, updated) -> None:
        """Store the states of a full forward pass over a prefix into cache rows `rows`."""
        T = embeddings.shape[1]
        for scale in SCALE_NAMES:
            for layer, (k, v) in enumerate(self_kvs[scale]):
                cache.self_k[scale][layer][rows, :, : k.shape[2]] = k
                cache.self_v[scale][layer][rows, :, : v.shape[2]] = v
        for name, (k, v) in cross_kvs.items():
            cache.cross_k[name][rows, :, : k.shape[2]] = k
            cache.cross_v[name][rows, :, : v.shape[2]] = v
        for t in range(max(0, T - SCALES[-1]), T):
            cache.recent_embeddings[rows, t % SCALES[-1]] = embeddings[:, t]
        cache.fused_medium[rows] = updated["medium"][:, -1]
        cache.fused_coarse[rows] = updated["coarse"][:, -1]
        cache.lengths[rows] = T

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, cache: KVCache, row: int) -> torch.Tensor:
        """Run prompt `ids` (1-D or (1, T)) into row `row` of a cache, replacing its content.

        Returns the logits after the last prompt token (vocab_size,).
        """
        ids = ids.view(1, -1)
        if not 0 < ids.shape[1] <= cache.capacity:
            raise ValueError(f"prompt of {ids.shape[1]} tokens must be between 1 and the cache capacity {cache.capacity}")
        logits, states = self._forward_with_states(ids)
        self.copy_into_cache(cache, torch.tensor([row], device=ids.device), *states)
        return logits[0, -1]

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
            plan = _RaggedPlan(cache.lengths)
        x = self.embed(tokens)  # (B, C)
        plan.write_ring(cache.recent_embeddings, x)

        # 1. Self-attention stacks. Fine always steps; medium/coarse step when some row completes a group.
        outputs = {}
        for scale, k in zip(SCALE_NAMES, SCALES):
            if not plan.any_complete(k):
                continue
            if k == 1:
                token = x[:, None]  # (B, 1, C)
            else:
                group = plan.group(cache.recent_embeddings, k)  # (B, k, C), oldest byte first
                token = self.downsample[scale](group.reshape(group.shape[0], 1, -1))  # (B, 1, C)
            offset = 0 if k == 1 else 1  # grouped scales start with their start token
            slot = plan.slot(k, offset)
            cos, sin = plan.rope(self.rope_cos, slot), plan.rope(self.rope_sin, slot)
            outputs[scale] = self.stacks[scale].step(
                token, cos, sin, cache.self_k[scale], cache.self_v[scale], slot, plan.self_mask(k, offset, slot.span))

        # 2. Key/value projections of the new tokens for the cross attentions that read them.
        for query, key in CROSS_PAIRS:
            if key in outputs:
                name, k = cross_name(query, key), SCALE_FACTOR[key]
                slot = plan.slot(k, offset=1 if k == 1 else 2)  # after the null slot (and the start token)
                keys, values = self.cross[name].keys_values(outputs[key])  # (B, H, 1, D)
                slot.write(cache.cross_k[name], keys)
                slot.write(cache.cross_v[name], values)

        # 3. Cross-scale updates of the new tokens, then fusion at the fine position.
        def cross_update(query: str, key: str, x_query: torch.Tensor) -> torch.Tensor:
            name, k = cross_name(query, key), SCALE_FACTOR[key]
            span, mask = plan.visible(k, offset=1 if k == 1 else 2)
            return self.cross[name].attend(x_query, cache.cross_k[name][:, :, :span], cache.cross_v[name][:, :, :span], mask)

        for scale, target in (("medium", cache.fused_medium), ("coarse", cache.fused_coarse)):
            if scale in outputs:
                others = [s for s in SCALE_NAMES if s != scale]
                updated = outputs[scale] + sum(cross_update(scale, other, outputs[scale]) for other in others)
                plan.keep_completed(target, updated[:, 0], SCALE_FACTOR[scale])
        fine = outputs["fine"]
        fine = fine + cross_update("fine", "medium", fine) + cross_update("fine", "coarse", fine)
        fused = self.fusion(fine, cache.fused_medium[:, None], cache.fused_coarse[:, None])
        cache.lengths += 1
        return self.lm_head(self.final_norm(fused))[:, 0]  # (B, V)


SCALE_FACTOR = dict(zip(SCALE_NAMES, SCALES))


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

    def slot(self, k: int, offset: int) -> Slots:
        return Slots(None, None, offset + self.n // k)

    def rope(self, table: torch.Tensor, slot: Slots) -> torch.Tensor:
        return table[slot.uniform]  # (D,) broadcasts over (B, H, 1, D)

    def self_mask(self, k: int, offset: int, span: int) -> None:
        return None

    def visible(self, k: int, offset: int) -> tuple[int, None]:
        return offset + (self.n + 1) // k, None

    def keep_completed(self, target: torch.Tensor, updated: torch.Tensor, k: int) -> None:
        target.copy_(updated)  # only called when the group completed (for every row alike)


class _RaggedPlan:
    """Decode-step bookkeeping for rows of different lengths: per-row slots and masks."""

    def __init__(self, lengths: torch.Tensor) -> None:
        self.lengths, self.new_lengths = lengths, lengths + 1
        self.rows = torch.arange(lengths.shape[0], device=lengths.device)

    def write_ring(self, ring: torch.Tensor, x: torch.Tensor) -> None:
        ring[self.rows, self.lengths % SCALES[-1]] = x

    def any_complete(self, k: int) -> bool:
        return bool((self.new_lengths % k == 0).any())

    def group(self, ring: torch.Tensor, k: int) -> torch.Tensor:
        ring_slots = [(self.lengths - i) % SCALES[-1] for i in range(k - 1, -1, -1)]
        return torch.stack([ring[self.rows, s] for s in ring_slots], 1)

    def slot(self, k: int, offset: int) -> Slots:
        # Every row writes at its token count so far; rows whose group did not complete write past their
        # valid length, which is masked now and overwritten later.
        return Slots(offset + self.lengths // k, self.rows, None)

    def rope(self, table: torch.Tensor, slot: Slots) -> torch.Tensor:
        return table[slot.index][:, None, None, :]  # (B, 1, 1, D)

    def _mask(self, valid: torch.Tensor, span: int) -> torch.Tensor:
        return (torch.arange(span, device=valid.device)[None, :] < valid[:, None])[:, None, None, :]  # (B, 1, 1, S)

    def self_mask(self, k: int, offset: int, span: int) -> torch.Tensor:
        incomplete = (self.new_lengths % k != 0).long()
        return self._mask(offset + self.new_lengths // k + incomplete, span)  # includes the slot just written

    def visible(self, k: int, offset: int) -> tuple[int, torch.Tensor]:
        valid = offset + self.new_lengths // k  # null (+ start) + everything complete so far
        span = int(valid.max())
        return span, self._mask(valid, span)

    def keep_completed(self, target: torch.Tensor, updated: torch.Tensor, k: int) -> None:
        completed = (self.new_lengths % k == 0)[:, None]
        target.copy_(torch.where(completed, updated, target))
