"""A compiled decode step with static shapes (the gpt-fast recipe, on CPU with inductor's C++ backend).

`MultiScaleTransformer.decode_step` is exact and flexible, but its shapes change every step: attention reads the
cache slots [0, span) as the rows grow, and ragged rows run the medium/coarse stacks on a row range. A compiler
would see a new graph every step. `static_decode_step` computes the same thing with one shape per step kind:

* the KV caches keep their fixed capacity (the ring of each scale and cross attention, `new_cache`); a new token's
  key and value are written by index (`index_put_` at slot `position % ring`), and attention is one opaque
  operator (`axl::held_attention`) taking the whole ring, which reads only the slots the rows hold at run time
  (the graph's shapes stay the ring's; the work follows the context, as in the eager step);
* every row runs the stacks the step needs; a row whose medium (coarse) group does not complete this step keeps
  its cache slot and fused state as they were (a `where` on the write), so its output is computed and dropped;
* what depends on the rows' lengths (slots, RoPE rows, held slots, which rows complete a group) is computed from the
  lengths tensor inside the graph, never from Python integers, so the graph does not change as the rows grow.

The step kinds are fine only (no row completes a pair), fine + medium (some row completes a pair, none a quad) and
fine + medium + coarse (some row completes a quad): three graphs. Batch 1 gets its own three (a size of 1 is
always specialised); larger batches share three with a symbolic batch size, so rows joining and leaving a running
batch do not recompile. Window slides re-prefill a row eagerly and only change the lengths: no recompile either.

`CompiledDecodeStep` compiles each kind on first use (or in `warm_up`) with inductor and counts its compilations.
The weights enter the graphs in the layouts the eager decode path caches (`model.Linear`'s (in, out) copy, the int8
kernel's bfloat16 scales), made once when the step is built: the compiled step serves fixed weights. Where
compilation is unavailable (no C++ compiler, an inductor failure) it says so once in the log and runs
`decode_step` eagerly from then on, the exact reference path. Batches above `Linear.FAST_ROWS` rows decode eagerly
too (their matmuls leave the matrix-vector regime, where the step's overhead mattered). Once built, a graph is
called directly (`_DirectGraph`), without dynamo's per-call guard checks of every input.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .config import SCALE_NAMES, SCALES
from .model import CROSS_PAIRS, SCALE_FACTOR, KVCache, Linear, MultiScaleTransformer, cross_name
from .quantize import Int8Linear

logger = logging.getLogger(__name__)

STEP_KINDS = ("fine", "fine+medium", "fine+medium+coarse")  # index = how many grouped scales step


def step_kind(lengths: list[int]) -> int:
    """Which stacks a decode step over rows holding `lengths` bytes runs: 0 fine only, 1 + medium, 2 + coarse."""
    if any((n + 1) % SCALES[2] == 0 for n in lengths):
        return 2
    return 1 if any((n + 1) % SCALES[1] == 0 for n in lengths) else 0


class _StaticSlots:
    """Where each row writes its new token in one cache of fixed size (the `model.Slots` interface, static).

    Token j of a row lives at slot base + j % ring. `writes` (B,) bool says which rows' tokens exist this step
    (None: every row's); the others rewrite the slot's old value. Attention always reads every slot (`span`)."""

    def __init__(self, rows: torch.Tensor, index: torch.Tensor, ring: int, base: int,
                 writes: torch.Tensor | None) -> None:
        self.rows, self.slots, self.writes = rows, base + index % ring, writes
        self.span = base + ring

    def write(self, cache: torch.Tensor, value: torch.Tensor) -> None:
        """cache: (B, H, S, D); value: (B, H, 1, D)."""
        new = value[:, :, 0]  # (B, H, D)
        if self.writes is not None:
            new = torch.where(self.writes[:, None, None], new, cache[self.rows, :, self.slots])
        cache[self.rows, :, self.slots] = new


# Attention over the slots a row holds, as one opaque operator in the graph. The graph's shapes are the rings' whole
# capacity; a compiled SDPA over the whole ring reads every slot each step (micro's 1,024-byte window: ~11 MB of
# keys and values per token whatever the context, measured at ~half of a fine step). This operator reads only
# slots [0, the most any row holds) at run time, as the eager step does, with no new graph as the rows grow.
_LIBRARY = torch.library.Library("axl", "DEF")
_LIBRARY.define("held_attention(Tensor q, Tensor k, Tensor v, Tensor held) -> Tensor")


def held_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """SDPA of q (B, H, 1, D) over the slots [0, held[b]) of row b of k, v (B, H, S, D): the eager decode step's call
    (`decode_step`'s slice of the cache, with no mask when every row holds as many slots)."""
    spans = held.tolist()
    span = max(spans)
    mask = None
    if min(spans) != span:  # ragged rows: each reads its own slots
        mask = (torch.arange(span, device=held.device)[None, :] < held[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(q, k[:, :, :span], v[:, :, :span], attn_mask=mask)


_LIBRARY.impl("held_attention", held_attention, "CompositeExplicitAutograd")


@torch.library.register_fake("axl::held_attention")
def _held_attention_shape(q, k, v, held):
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    return torch.ops.axl.held_attention(q, k, v, held)


def _stack_step(stack, x: torch.Tensor, cos, sin, cache_ks, cache_vs, slot: _StaticSlots, held: torch.Tensor):
    """`ScaleStack.step` with attention over the held slots (`held_attention`) instead of an SDPA over a span."""
    for block, cache_k, cache_v in zip(stack.blocks, cache_ks, cache_vs):
        attn = block.attn
        q, k, v = attn.project(block.attn_norm(x), cos, sin)  # (B, H, 1, D)
        slot.write(cache_k, k)
        slot.write(cache_v, v)
        y = _attend(q, cache_k, cache_v, held)
        x = x + attn.out(y.transpose(1, 2).reshape(x.shape))
        x = x + block.mlp(block.mlp_norm(x))
    return stack.norm(x)


def _cross_attend(module, x: torch.Tensor, cache_k, cache_v, held: torch.Tensor) -> torch.Tensor:
    """`CrossScaleAttention.attend` over the held slots (the null slot and the key tokens held)."""
    B, T, C = x.shape
    q = module.q(module.query_norm(x)).view(B, T, module.n_heads, module.head_dim).transpose(1, 2)
    y = _attend(q, cache_k, cache_v, held)
    return module.out(y.transpose(1, 2).reshape(B, T, C))


def static_decode_step(model: MultiScaleTransformer, kind: int, tokens: torch.Tensor, lengths: torch.Tensor,
                       self_k: dict[str, list[torch.Tensor]], self_v: dict[str, list[torch.Tensor]],
                       cross_k: dict[str, torch.Tensor], cross_v: dict[str, torch.Tensor],
                       recent_embeddings: torch.Tensor, fused_medium: torch.Tensor,
                       fused_coarse: torch.Tensor) -> torch.Tensor:
    """`decode_step` with shapes that depend only on the batch size and `kind` (`step_kind` of the lengths).

    Args:
        tokens: (B,) the new token of each row; lengths: (B,) bytes each row holds before it (not advanced here).
        The cache tensors as in `KVCache`, updated in place.
    Returns:
        next-token logits (B, V).
    """
    B = tokens.shape[0]
    rows = torch.arange(B, device=tokens.device)
    x = model.embed(tokens)  # (B, C)
    recent_embeddings.index_put_((rows, lengths % SCALES[-1]), x)

    # 1. Self-attention stacks: fine, and the grouped scales this kind runs, on every row.
    outputs, completes = {}, {}
    for scale in SCALE_NAMES[: kind + 1]:
        k = SCALE_FACTOR[scale]
        start = 0 if k == 1 else 1  # grouped scales start with their start token
        if k == 1:
            token, completes[scale] = x[:, None], None  # (B, 1, C)
        else:
            offsets = torch.arange(k - 1, -1, -1, device=tokens.device)  # oldest byte first
            group = recent_embeddings[rows[:, None], (lengths[:, None] - offsets) % SCALES[-1]]  # (B, k, C)
            token = model.downsample[scale](group.reshape(B, 1, -1))  # (B, 1, C_scale)
            completes[scale] = (lengths + 1) % k == 0  # (B,) rows whose group exists this step
        index = start + lengths // k  # (B,) the new token's position (its RoPE row)
        ring = self_k[scale][0].shape[2]
        slot = _StaticSlots(rows, index, ring, 0, completes[scale])
        cos, sin = (table[index][:, None, None, :] for table in model.rope(scale))  # (B, 1, 1, D)
        held = torch.clamp(start + (lengths + 1) // k, max=ring)  # the tokens a row holds, a new one included
        outputs[scale] = _stack_step(model.stacks[scale], token, cos, sin, self_k[scale], self_v[scale], slot, held)

    # 2. Key/value projections of the new tokens for the cross attentions that read them.
    for query, key in CROSS_PAIRS:
        if key in outputs:
            name, k = cross_name(query, key), SCALE_FACTOR[key]
            start = 0 if k == 1 else 1
            slot = _StaticSlots(rows, start + lengths // k, cross_k[name].shape[2] - 1, 1, completes[key])
            keys, values = model.cross[name].keys_values(outputs[key])  # (B, H, 1, D)
            slot.write(cross_k[name], keys)
            slot.write(cross_v[name], values)

    # 3. Cross-scale updates of the new tokens, then fusion at the fine position.
    def cross_update(query: str, key: str, x_query: torch.Tensor) -> torch.Tensor:
        name, k = cross_name(query, key), SCALE_FACTOR[key]
        ring = cross_k[name].shape[2] - 1
        held = 1 + torch.clamp((0 if k == 1 else 1) + (lengths + 1) // k, max=ring)  # null + the key tokens held
        return _cross_attend(model.cross[name], x_query, cross_k[name], cross_v[name], held)

    for scale, target in (("medium", fused_medium), ("coarse", fused_coarse)):
        if scale in outputs:
            others = [s for s in SCALE_NAMES if s != scale]
            updated = outputs[scale] + sum(cross_update(scale, other, outputs[scale]) for other in others)
            fresh = model.fusion.to_fine_width(scale, updated)[:, 0]  # (B, C)
            target.copy_(torch.where(completes[scale][:, None], fresh, target))
    fine = outputs["fine"]
    fine = fine + cross_update("fine", "medium", fine) + cross_update("fine", "coarse", fine)
    fused = model.fusion(fine, fused_medium[:, None], fused_coarse[:, None])
    return model.lm_head(model.final_norm(fused))[:, 0]  # (B, V)


def cache_arguments(cache: KVCache) -> tuple:
    """The cache tensors in `static_decode_step`'s argument order (after tokens and lengths)."""
    return (cache.self_k, cache.self_v, cache.cross_k, cache.cross_v, cache.recent_embeddings,
            cache.fused_medium, cache.fused_coarse)


def compiler_available() -> str | None:
    """None when inductor's C++ backend can run here; else why not (said once in the log by the caller)."""
    try:
        from torch._inductor import config as inductor_config
    except Exception as exc:  # noqa: BLE001 - any import failure means no compiler; the reason is reported
        return f"torch._inductor does not import ({exc})"
    compiler = inductor_config.cpp.cxx[0] if isinstance(inductor_config.cpp.cxx, tuple) else None
    candidates = [compiler] if compiler else ["g++", "clang++", "c++"]
    if not any(shutil.which(c) for c in candidates if c):
        return f"no C++ compiler found ({', '.join(c for c in candidates if c)})"
    return None


class CompiledDecodeStep:
    """A drop-in for `model.decode_step(tokens, cache)`: the static-shape step compiled per kind, or eager.

    `compilations` counts the graphs inductor built (each kind once per batch family: batch 1, batch >= 2);
    after `warm_up` a decoding run must leave it unchanged. `fallback_reason` is set (and logged once) when the
    step runs eagerly because compilation is unavailable or failed.
    """

    def __init__(self, model: MultiScaleTransformer) -> None:
        self.model = model
        # The decode layouts the eager layers cache on first use (by data pointer, which a graph cannot check), made
        # now and attached for the graphs: (in, out) float32 weights, bfloat16 int8 scales (ValueError if unsuited).
        for module in model.modules():
            if isinstance(module, Linear) and module.weight.dtype == torch.float32:
                module.compiled_weight_t = module._transposed_weight()
            elif isinstance(module, Int8Linear) and module.per_channel:
                module.compiled_scale = module._kernel_scale()
        self.compilations = 0
        self.compile_seconds = 0.0
        self.fallback_reason: str | None = None
        # Graphs called directly, by (kind, batch > 1, cache capacity); the tensors a graph may take as fixed
        # (the model's weights and tables) by id; the per-call inputs of a call being compiled.
        self._graphs: dict[tuple, _DirectGraph] = {}
        self._constants = {id(t): t for t in _model_tensors(model)}
        self._pending: tuple | None = None
        unavailable = compiler_available()
        if unavailable is not None:
            self._fall_back(unavailable)
            return
        # Up to 6 graphs of one function per model (3 kinds x 2 batch families): a process holding several compiled
        # models (the bench's float32 and int8) needs more than dynamo's default of 8; past the limit dynamo
        # raises (fullgraph), and the step falls back to eager, logged.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._compiled = torch.compile(self._step, backend=self._backend, fullgraph=True, dynamic=False)

    def _step(self, kind, tokens, lengths, *cache):
        return static_decode_step(self.model, kind, tokens, lengths, *cache)

    def _backend(self, graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        """Inductor, counted and timed; the graph is also kept for `_DirectGraph` calls where its inputs allow."""
        from torch._inductor.compile_fx import compile_fx

        started = time.perf_counter()
        compiled = compile_fx(graph, example_inputs)
        self.compilations += 1
        self.compile_seconds += time.perf_counter() - started
        if self._pending is not None:
            key, flat = self._pending
            direct = _DirectGraph.build(compiled, graph, example_inputs, flat, self._constants)
            if direct is not None:
                self._graphs[key] = direct
            else:
                logger.debug("compiled decode step %s: graph inputs not all known, called through dynamo", key)
        return compiled

    def _fall_back(self, reason: str) -> None:
        self.fallback_reason = reason
        logger.warning("compiled decode step unavailable, decoding eagerly (exact, slower): %s", reason)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if self.fallback_reason is not None:
            return self.model.decode_step(tokens, cache)
        lengths_list = cache.lengths.tolist()
        if max(lengths_list) >= cache.capacity:
            raise ValueError("a cache row is full; slide the window (re-prefill) before decoding further")
        batch = tokens.shape[0]
        if batch > Linear.FAST_ROWS:  # past the matrix-vector sizes the step's overhead is amortised
            return self.model.decode_step(tokens, cache)
        key = (step_kind(lengths_list), batch > 1, cache.capacity)
        lengths = torch.tensor(lengths_list, device=tokens.device)
        direct = self._graphs.get(key)
        if direct is not None:  # the graph inductor built for this key, without dynamo's per-call guards
            try:
                logits = direct(tokens, lengths, cache, batch)
            except AssertionError:  # an input of another layout than the graph's (its size/stride checks)
                del self._graphs[key]
            else:
                cache.lengths += 1
                return logits
        # Dynamo guards on whether a tensor was made under inference mode: the decoder's lengths and tokens are,
        # its cache is not. Fresh plain copies of the two small ones keep every call on the same graphs.
        with torch.inference_mode(False):
            tokens, lengths = tokens.clone(), torch.tensor(lengths_list, device=tokens.device)
        arguments = (tokens, lengths, *cache_arguments(cache))
        if batch > 1:  # one graph per kind for every batch size from 2 to FAST_ROWS
            for tensor in _flat_tensors(arguments):
                torch._dynamo.mark_dynamic(tensor, 0, min=2, max=Linear.FAST_ROWS)
        self._pending = (key, [tokens, lengths, *_flat_tensors(arguments[2:])])
        try:
            logits = self._compiled(key[0], *arguments)
        except Exception as exc:  # noqa: BLE001 - a compiler failure must not fail decoding; said once, then eager
            if self.compilations and not _is_compile_error(exc):
                raise
            self._fall_back(f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
            return self.model.decode_step(tokens, cache)
        finally:
            self._pending = None
        cache.lengths += 1
        return logits

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 2), capacity: int | None = None) -> None:
        """Compile every step kind for each batch family now (on a scratch cache of the decoder's `capacity`: the
        graphs' shapes are the cache's), not during a request."""
        if self.fallback_reason is not None:
            return
        for batch_size in batch_sizes:
            with torch.inference_mode(False):  # plain tensors, as BatchDecoder's cache (dynamo guards on the kind)
                cache = self.model.new_cache(batch_size, capacity)
            for _ in range(SCALES[-1]):  # lengths 0, 1, 2, 3: every kind once
                self(torch.zeros(batch_size, dtype=torch.long, device=cache.lengths.device), cache)
                if self.fallback_reason is not None:
                    return


class _DirectGraph:
    """One inductor graph called with its inputs put together here, not through dynamo's frame and guards.

    Dynamo checks every input of the step at each call (~170 tensors: weights, cache rings) before it runs the graph:
    measured at ~0.5 ms of a ~2.5 ms micro step. Here the inputs are sorted once, when the graph is built: the
    per-call ones (tokens, lengths, the cache tensors, matched by identity to the call being compiled), the
    fixed ones (the model's own weights and tables, which a served model does not change) and the symbolic batch
    size. A graph with any other input is not called this way (dynamo keeps calling it). The graph checks the
    sizes and strides of its inputs itself (an AssertionError: the caller goes back to dynamo)."""

    BATCH = -1

    def __init__(self, compiled: Callable, sources: list) -> None:
        self.compiled, self.sources = compiled, sources

    @classmethod
    def build(cls, compiled: Callable, graph: torch.fx.GraphModule, example_inputs: list, flat: list[torch.Tensor],
              constants: dict[int, torch.Tensor]) -> "_DirectGraph | None":
        outputs = graph.graph.output_node().args[0]
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 1:
            return None
        per_call = {id(t): i for i, t in enumerate(flat)}
        batch = int(flat[0].shape[0])
        sources: list = []
        for value in example_inputs:
            if isinstance(value, torch.Tensor) and id(value) in per_call:
                sources.append(per_call[id(value)])
            elif isinstance(value, torch.Tensor) and id(value) in constants:
                sources.append(value)
            elif isinstance(value, torch.SymInt) and batch > 1:  # the symbolic batch size (int() would specialise it)
                sources.append(cls.BATCH)
            elif type(value) is int and value == batch > 1:
                sources.append(cls.BATCH)
            else:
                return None
        return cls(compiled, sources)

    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor, cache: KVCache, batch: int) -> torch.Tensor:
        flat = [tokens, lengths, *_flat_tensors(cache_arguments(cache))]
        inputs = [source if isinstance(source, torch.Tensor) else (batch if source == self.BATCH else flat[source])
                  for source in self.sources]
        return self.compiled(*inputs)[0]


def _model_tensors(model: MultiScaleTransformer) -> list[torch.Tensor]:
    """Every tensor of the model a compiled step may read as fixed: parameters, buffers, decode layouts."""
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        tensors.extend(value for value in vars(module).values() if isinstance(value, torch.Tensor))
    return tensors


def _flat_tensors(arguments) -> list[torch.Tensor]:
    out = []
    for item in arguments:
        if isinstance(item, torch.Tensor):
            out.append(item)
        elif isinstance(item, dict):
            for value in item.values():
                out.extend(value if isinstance(value, list) else [value])
    return out


def _is_compile_error(exc: Exception) -> bool:
    """A failure of dynamo or inductor (as opposed to an error of the step itself, raised as in eager)."""
    module = type(exc).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "torch.fx")) or "Compil" in type(exc).__name__
