"""A compiled decode step with static shapes (the gpt-fast recipe, on CPU with inductor's C++ backend).

`MultiScaleTransformer.decode_step` is exact and flexible, but its shapes change every step: attention reads the
cache slots [0, span) as the rows grow, and ragged rows run the medium/coarse stacks on a row range. A compiler
would see a new graph every step. `static_decode_step` computes the same thing with one shape per step kind:

* the KV caches keep their fixed capacity (the ring of each scale and cross attention, `new_cache`); a new token's
  key and value are written by index (`index_put_` at slot `position % ring`), and attention is one opaque
  operator (`axl::held_attention`) taking the whole ring, which reads only the slots the rows hold at run time
  (the graph's shapes stay the ring's; the work follows the context, as in the eager step);
* the fine stack runs on every row; the medium (coarse) stack runs on the rows whose group completes this step
  only: their indices come in as a tensor whose size is a symbol of its own in the graph (unbacked, so a sub-batch
  of 1 row is not specialised), the rows' inputs are gathered and their cache slots and fused states written by
  index (in a ragged batch of 8: 8 + 4 + 2 rows through the three stacks, not 8 + 8 + 8);
* what depends on the rows' lengths (slots, RoPE rows, held slots) is computed from the lengths tensor inside the
  graph, never from Python integers, so the graph does not change as the rows grow.

The step kinds are fine only (no row completes a pair), fine + medium (some row completes a pair, none a quad) and
fine + medium + coarse (some row completes a quad): three graphs. Batch 1 gets its own three (a size of 1 is
always specialised); larger batches share three with a symbolic batch size (and symbolic sub-batch sizes), so rows
joining and leaving a running batch, and any number of them completing a group, do not recompile. Window slides
re-prefill a row eagerly and only change the lengths: no recompile either.

`CompiledDecodeStep` compiles each kind on first use (or in `warm_up`) with inductor and counts its compilations.
The weights enter the graphs in the layouts the eager decode path caches (`model.Linear`'s (in, out) copy, the int8
kernel's bfloat16 scales), made once when the step is built: the compiled step serves fixed weights. Where
compilation is unavailable (no C++ compiler, an inductor failure) it says so once in the log and runs
`decode_step` eagerly from then on, the exact reference path. Batches above `Linear.FAST_ROWS` rows decode eagerly
too (their matmuls leave the matrix-vector regime, where the step's overhead mattered). Once built, a graph is
called directly (`_DirectGraph`), without dynamo's per-call guard checks of every input.

Against the grouped stacks on every row, as this step first ran them (issue 10; the README's "Ragged batches and
streams with the best serving option"): micro, a ragged batch of 8, 1.17-1.34x the tokens per CPU-second in int8,
1.16-1.38x in float32.
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


def completing_rows(lengths: list[int], kind: int) -> list[list[int]]:
    """The rows whose medium (then coarse) group completes in a step of `kind` over rows holding `lengths` bytes."""
    return [[row for row, n in enumerate(lengths) if (n + 1) % k == 0] for k in SCALES[1 : kind + 1]]


class _StaticSlots:
    """Where each row writes its new token in one cache of fixed size (the `model.Slots` interface, static).

    Token j of a row lives at slot base + j % ring; `rows` (b,) are the cache rows written (every row's token
    exists: a grouped scale steps on the rows completing a group only)."""

    def __init__(self, rows: torch.Tensor, index: torch.Tensor, ring: int, base: int) -> None:
        self.rows, self.slots = rows, base + index % ring

    def write(self, cache: torch.Tensor, value: torch.Tensor) -> None:
        """cache: (B, H, S, D); value: (b, H, 1, D), one per row of `rows`."""
        cache[self.rows, :, self.slots] = value[:, :, 0]


# Attention over the slots a row holds, as one opaque operator in the graph. The graph's shapes are the rings' whole
# capacity; a compiled SDPA over the whole ring reads every slot each step (micro's 1,024-byte window: ~11 MB of
# keys and values per token whatever the context, measured at ~half of a fine step). This operator reads only
# slots [0, the most any row holds) at run time, as the eager step does, with no new graph as the rows grow.
_LIBRARY = torch.library.Library("axl", "DEF")
_LIBRARY.define("held_attention(Tensor q, Tensor k, Tensor v, Tensor held, Tensor? rows=None) -> Tensor")


def held_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, held: torch.Tensor,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA of q (b, H, 1, D) over the slots [0, held[i]) of cache row rows[i] of k, v (B, H, S, D) (rows None: row
    i, b == B): the eager decode step's call (`decode_step`'s slice of the cache, with no mask when every row holds
    as many slots; consecutive rows, as a batch in phase order gives, are a view of the cache, others a copy)."""
    spans = held.tolist()
    span = max(spans)
    if rows is not None:
        picked = rows.tolist()
        first, stop = picked[0], picked[-1] + 1
        if stop - first == len(picked):  # ascending, so consecutive
            k, v = k[first:stop], v[first:stop]
        else:
            k, v = k[rows, :, :span], v[rows, :, :span]
    mask = None
    if min(spans) != span:  # ragged rows: each reads its own slots
        mask = (torch.arange(span, device=held.device)[None, :] < held[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(q, k[:, :, :span], v[:, :, :span], attn_mask=mask)


_LIBRARY.impl("held_attention", held_attention, "CompositeExplicitAutograd")


@torch.library.register_fake("axl::held_attention")
def _held_attention_shape(q, k, v, held, rows=None):
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, held: torch.Tensor,
            rows: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.axl.held_attention(q, k, v, held, rows)


def _stack_step(stack, x: torch.Tensor, cos, sin, cache_ks, cache_vs, slot: _StaticSlots, held: torch.Tensor,
                rows: torch.Tensor | None):
    """`ScaleStack.step` with attention over the held slots (`held_attention`) instead of an SDPA over a span; x
    holds the cache rows `rows` (None: every row)."""
    for block, cache_k, cache_v in zip(stack.blocks, cache_ks, cache_vs):
        attn = block.attn
        q, k, v = attn.project(block.attn_norm(x), cos, sin)  # (B, H, 1, D)
        slot.write(cache_k, k)
        slot.write(cache_v, v)
        y = _attend(q, cache_k, cache_v, held, rows)
        x = x + attn.out(y.transpose(1, 2).reshape(x.shape))
        x = x + block.mlp(block.mlp_norm(x))
    return stack.norm(x)


def _cross_attend(module, x: torch.Tensor, cache_k, cache_v, held: torch.Tensor,
                  rows: torch.Tensor | None) -> torch.Tensor:
    """`CrossScaleAttention.attend` over the held slots (the null slot and the key tokens held) of cache rows `rows`."""
    B, T, C = x.shape
    q = module.q(module.query_norm(x)).view(B, T, module.n_heads, module.head_dim).transpose(1, 2)
    y = _attend(q, cache_k, cache_v, held, rows)
    return module.out(y.transpose(1, 2).reshape(B, T, C))


def static_decode_step(model: MultiScaleTransformer, kind: int, tokens: torch.Tensor, lengths: torch.Tensor,
                       group_rows: tuple[torch.Tensor, ...] | None,
                       self_k: dict[str, list[torch.Tensor]], self_v: dict[str, list[torch.Tensor]],
                       cross_k: dict[str, torch.Tensor], cross_v: dict[str, torch.Tensor],
                       recent_embeddings: torch.Tensor, fused_medium: torch.Tensor,
                       fused_coarse: torch.Tensor) -> torch.Tensor:
    """`decode_step` with shapes that depend only on the batch size, the sub-batch sizes and `kind` (`step_kind`).

    Args:
        tokens: (B,) the new token of each row; lengths: (B,) bytes each row holds before it (not advanced here).
        group_rows: for each grouped scale the kind steps (medium, then coarse), the rows (b,) whose group completes
            this step, ascending (`completing_rows`); None: every row's does (always so at batch 1).
        The cache tensors as in `KVCache`, updated in place.
    Returns:
        next-token logits (B, V).
    """
    B = tokens.shape[0]
    every = torch.arange(B, device=tokens.device)
    x = model.embed(tokens)  # (B, C)
    recent_embeddings.index_put_((every, lengths % SCALES[-1]), x)

    # 1. Self-attention stacks: fine on every row, each grouped scale this kind runs on the rows completing its group.
    # steps[scale]: (the rows' indices for an attention read, None for every row; the rows; their lengths).
    outputs, steps = {}, {}
    for i, scale in enumerate(SCALE_NAMES[: kind + 1]):
        k = SCALE_FACTOR[scale]
        start = 0 if k == 1 else 1  # grouped scales start with their start token
        picked = None if k == 1 or group_rows is None else group_rows[i - 1]
        if picked is None:
            rows, row_lengths = every, lengths
        else:
            count = picked.shape[0]  # a symbol of its own: 1 to FAST_ROWS rows complete the group
            torch._check(count >= 1)
            torch._check(count <= Linear.FAST_ROWS)
            rows, row_lengths = picked, lengths[picked]
        steps[scale] = (picked, rows, row_lengths)
        if k == 1:
            token = x[:, None]  # (B, 1, C)
        else:
            offsets = torch.arange(k - 1, -1, -1, device=tokens.device)  # oldest byte first
            group = recent_embeddings[rows[:, None], (row_lengths[:, None] - offsets) % SCALES[-1]]  # (b, k, C)
            token = model.downsample[scale](group.reshape(group.shape[0], 1, -1))  # (b, 1, C_scale)
        index = start + row_lengths // k  # (b,) the new token's position (its RoPE row)
        ring = self_k[scale][0].shape[2]
        slot = _StaticSlots(rows, index, ring, 0)
        cos, sin = (table[index][:, None, None, :] for table in model.rope(scale))  # (b, 1, 1, D)
        held = torch.clamp(start + (row_lengths + 1) // k, max=ring)  # the tokens a row holds, a new one included
        outputs[scale] = _stack_step(model.stacks[scale], token, cos, sin, self_k[scale], self_v[scale], slot, held,
                                     picked)

    # 2. Key/value projections of the new tokens for the cross attentions that read them.
    for query, key in CROSS_PAIRS:
        if key in outputs:
            (_, rows, row_lengths), name, k = steps[key], cross_name(query, key), SCALE_FACTOR[key]
            start = 0 if k == 1 else 1
            slot = _StaticSlots(rows, start + row_lengths // k, cross_k[name].shape[2] - 1, 1)
            keys, values = model.cross[name].keys_values(outputs[key])  # (b, H, 1, D)
            slot.write(cross_k[name], keys)
            slot.write(cross_v[name], values)

    # 3. Cross-scale updates of the new tokens, then fusion at the fine position.
    def cross_update(query: str, key: str, x_query: torch.Tensor) -> torch.Tensor:
        (picked, _, row_lengths), name, k = steps[query], cross_name(query, key), SCALE_FACTOR[key]
        ring = cross_k[name].shape[2] - 1
        held = 1 + torch.clamp((0 if k == 1 else 1) + (row_lengths + 1) // k, max=ring)  # null + key tokens held
        return _cross_attend(model.cross[name], x_query, cross_k[name], cross_v[name], held, picked)

    for scale, target in (("medium", fused_medium), ("coarse", fused_coarse)):
        if scale in outputs:
            others = [s for s in SCALE_NAMES if s != scale]
            updated = outputs[scale] + sum(cross_update(scale, other, outputs[scale]) for other in others)
            fresh = model.fusion.to_fine_width(scale, updated)[:, 0]  # (b, C)
            target.index_put_((steps[scale][1],), fresh)
    fine = outputs["fine"]
    fine = fine + cross_update("fine", "medium", fine) + cross_update("fine", "coarse", fine)
    fused = model.fusion(fine, fused_medium[:, None], fused_coarse[:, None])
    return model.lm_head(model.final_norm(fused))[:, 0]  # (B, V)


def cache_arguments(cache: KVCache) -> tuple:
    """The cache tensors in `static_decode_step`'s argument order (after tokens, lengths and group rows)."""
    return (cache.self_k, cache.self_v, cache.cross_k, cache.cross_v, cache.recent_embeddings,
            cache.fused_medium, cache.fused_coarse)


def call_tensors(tokens: torch.Tensor, lengths: torch.Tensor, group_rows: tuple[torch.Tensor, ...] | None,
                 cache: KVCache) -> list[torch.Tensor]:
    """The per-call tensors of a step, in argument order."""
    return [tokens, lengths, *(group_rows or ()), *_flat_tensors(cache_arguments(cache))]


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

    def _step(self, kind, tokens, lengths, group_rows, *cache):
        return static_decode_step(self.model, kind, tokens, lengths, group_rows, *cache)

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
        kind = step_kind(lengths_list)
        key = (kind, batch > 1, cache.capacity)
        # Batch 1: its one row completes every group its step kind runs. Larger batches: the rows that do, per scale.
        groups = completing_rows(lengths_list, kind) if batch > 1 else None
        device = tokens.device
        lengths = torch.tensor(lengths_list, device=device)
        direct = self._graphs.get(key)
        if direct is not None:  # the graph inductor built for this key, without dynamo's per-call guards
            group_rows = None if groups is None else tuple(torch.tensor(rows, device=device) for rows in groups)
            try:
                logits = direct(call_tensors(tokens, lengths, group_rows, cache))
            except AssertionError:  # an input of another layout than the graph's (its size/stride checks)
                del self._graphs[key]
            else:
                cache.lengths += 1
                return logits
        # Dynamo guards on whether a tensor was made under inference mode: the decoder's lengths and tokens are,
        # its cache is not. Fresh plain copies of the small ones keep every call on the same graphs.
        with torch.inference_mode(False):
            tokens, lengths = tokens.clone(), torch.tensor(lengths_list, device=device)
            group_rows = None if groups is None else tuple(torch.tensor(rows, device=device) for rows in groups)
        arguments = (tokens, lengths, group_rows, *cache_arguments(cache))
        if batch > 1:  # one graph per kind for every batch size from 2 to FAST_ROWS
            for tensor in _flat_tensors((tokens, lengths, *arguments[3:])):
                torch._dynamo.mark_dynamic(tensor, 0, min=2, max=Linear.FAST_ROWS)
            for rows in group_rows or ():  # and every number of rows completing a group, 1 included (unbacked)
                torch._dynamo.decorators.mark_unbacked(rows, 0)
        self._pending = (key, call_tensors(tokens, lengths, group_rows, cache))
        try:
            logits = self._compiled(kind, *arguments)
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
    per-call ones (tokens, lengths, group rows, the cache tensors, matched by identity to the call being compiled),
    the fixed ones (the model's own weights and tables, which a served model does not change) and the symbolic sizes
    (the batch size, the sub-batch sizes: each read from a per-call tensor's size where the graph has that symbol). A
    graph with any other input is not called this way (dynamo keeps calling it). The graph checks the sizes and
    strides of its inputs itself (an AssertionError: the caller goes back to dynamo)."""

    def __init__(self, compiled: Callable, sources: list) -> None:
        self.compiled, self.sources = compiled, sources

    @classmethod
    def build(cls, compiled: Callable, graph: torch.fx.GraphModule, example_inputs: list, flat: list[torch.Tensor],
              constants: dict[int, torch.Tensor]) -> "_DirectGraph | None":
        outputs = graph.graph.output_node().args[0]
        placeholders = [node for node in graph.graph.nodes if node.op == "placeholder"]
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 1 or len(placeholders) != len(example_inputs):
            return None
        per_call = {id(t): i for i, t in enumerate(flat)}
        sizes: dict = {}  # symbol -> (per-call tensor, dim) whose size it is
        for value, node in zip(example_inputs, placeholders, strict=True):
            fake = node.meta.get("example_value")
            if isinstance(value, torch.Tensor) and id(value) in per_call and isinstance(fake, torch.Tensor):
                for dim, size in enumerate(fake.shape):
                    if isinstance(size, torch.SymInt):
                        sizes.setdefault(size.node.expr, (per_call[id(value)], dim))
        sources: list = []
        for value, node in zip(example_inputs, placeholders, strict=True):
            fake = node.meta.get("example_value")
            if isinstance(value, torch.Tensor) and id(value) in per_call:
                sources.append(per_call[id(value)])
            elif isinstance(value, torch.Tensor) and id(value) in constants:
                sources.append(value)
            elif isinstance(fake, torch.SymInt) and fake.node.expr in sizes:  # read from a tensor's size per call
                sources.append(sizes[fake.node.expr])
            else:
                return None
        return cls(compiled, sources)

    def __call__(self, flat: list[torch.Tensor]) -> torch.Tensor:
        """flat: `call_tensors` of this call."""
        inputs = [source if isinstance(source, torch.Tensor)
                  else flat[source] if isinstance(source, int) else flat[source[0]].shape[source[1]]
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
