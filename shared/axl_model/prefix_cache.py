"""Prompt prefix cache: keep the model state a prompt's prefill left, and start a later prompt that shares its
beginning from there (what llama.cpp's and Ollama's prompt caches do). Editors resend nearly the same prompt on
every keystroke: the file above the cursor is the same, only the end changes.

What is kept. A row's state is its KV caches (every scale's self-attention, every cross-scale attention), the
newest medium/coarse states (`fused_*`) and the last coarse group's byte embeddings. The key/value of a token
depends only on the bytes up to its own end byte (the stacks are causal; the cross caches hold keys of the
stacks' outputs), so the caches of a prompt, cut after P bytes, are exactly those of its first P bytes.
`fused_*` and the embeddings are kept only for the newest token, so they are not restored: the rest of the prompt
is read with `MultiScaleTransformer.extend`, whose first chunk (at least 4 bytes, after P a multiple of 4: no
group straddles the cut) completes a medium and a coarse token and so rewrites both, and all 4 embeddings. The
result is the one-shot prefill's (`extend`'s own guarantee), with only the bytes after P computed.

Rings. A scale with a local window keeps only its last W tokens in its cache (a ring). A record keeps every token
it saw, unwrapped, oldest first (read out of the ring after each prefill chunk, before a later chunk overwrites it;
a chunk longer than a ring loses the older tokens, and the record then starts later), so a cut at P is restorable
whenever the record holds the tokens [P - W, P) of every cache: with every chunk within the rings, always.

Memory. Records share what they restored from (a request that reused an entry's first P bytes keeps views of the
entry's tensors for them, and adds only the state of its own new bytes), so the bytes held are counted over the
distinct storages; the least recently used entries go first when that exceeds the budget.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .config import SCALE_NAMES, SCALES
from .model import KVCache

logger = logging.getLogger(__name__)

SCALE_FACTOR = dict(zip(SCALE_NAMES, SCALES))
MAX_ENTRIES = 8
# Bytes a restored prompt must still read: one coarse group at least, so that its first chunk rewrites the newest
# medium/coarse states and the recent embeddings (which a cut record cannot restore).
MIN_REST = SCALES[-1]


def _buffers(cache: KVCache) -> list[tuple[torch.Tensor, int, int]]:
    """Every ring buffer of a cache as (tensor (B, H, base + ring, D), base slots, bytes per token of its tokens)."""
    out = []
    for scale in SCALE_NAMES:
        for tensor in cache.self_k[scale] + cache.self_v[scale]:
            out.append((tensor, 0, SCALE_FACTOR[scale]))
    for name in cache.cross_k:
        factor = SCALE_FACTOR[name.split("_from_")[1]]
        out.append((cache.cross_k[name], 1, factor))
        out.append((cache.cross_v[name], 1, factor))
    return out


def held(n_bytes: int, factor: int) -> int:
    """Tokens a scale of `factor` bytes per token holds after n bytes (a grouped scale's start token included)."""
    if factor == 1:
        return n_bytes
    return 1 + n_bytes // factor if n_bytes else 0


def _write(target: torch.Tensor, base: int, ring: int, first: int, values: torch.Tensor) -> None:
    """Write tokens [first, first + n) (values (H, n, D), n <= ring) into a row's buffer target (H, base + ring, D)."""
    stop = first + values.shape[1]
    if first // ring == (stop - 1) // ring:  # one stretch of the ring: a slice
        target[:, base + first % ring : base + (stop - 1) % ring + 1] = values
    else:
        target.index_copy_(1, base + torch.arange(first, stop, device=target.device) % ring, values)


@dataclass(eq=False)
class _Runs:
    """The tokens of one buffer a record holds: base slots, then contiguous runs [(first token, (H, n, D))]."""

    base: torch.Tensor | None
    runs: list[tuple[int, torch.Tensor]]

    @property
    def lo(self) -> int:
        return self.runs[0][0] if self.runs else 0

    @property
    def hi(self) -> int:
        return self.runs[-1][0] + self.runs[-1][1].shape[1] if self.runs else 0


class StateRecord:
    """The state of one row's prompt as it is read (`after` each prefill call, or `from_states` of a full pass)."""

    def __init__(self, buffers: list[_Runs], length: int = 0) -> None:
        self.buffers = buffers
        self.length = length  # bytes recorded

    @classmethod
    def empty(cls, cache: KVCache) -> StateRecord:
        return cls([_Runs(None, []) for _ in _buffers(cache)])

    @classmethod
    def from_states(cls, self_kvs: dict, cross_kvs: dict, length: int) -> StateRecord:
        """From `MultiScaleTransformer._forward_with_states` of one row: every token, none lost to a ring."""
        tensors: list[tuple[torch.Tensor, int]] = []
        for scale in SCALE_NAMES:
            tensors += [(k, 0) for k, _ in self_kvs[scale]] + [(v, 0) for _, v in self_kvs[scale]]
        for k, v in cross_kvs.values():
            tensors += [(k, 1), (v, 1)]
        buffers = []
        for tensor, base in tensors:
            row = tensor[0]  # (H, base + S, D); clone: the pass's tensors are views of larger ones
            buffers.append(_Runs(row[:, :base].clone(), [(0, row[:, base:].clone())]))
        return cls(buffers, length)

    def after(self, cache: KVCache, row: int, start: int, end: int) -> None:
        """Record what a prefill call that took `row` from `start` to `end` bytes wrote (still in the rings)."""
        if start != self.length:
            raise ValueError(f"the record holds {self.length} bytes, the call started at {start}")
        for record, (tensor, base, factor) in zip(self.buffers, _buffers(cache)):
            ring = tensor.shape[2] - base
            old, new = held(start, factor), held(end, factor)
            first = max(old, new - ring)
            if record.base is None:
                record.base = tensor[row, :, :base].clone()
            if first > old or record.hi != old:  # tokens the ring no longer holds: the record restarts
                record.runs = []
            if first < new:
                slots = base + torch.arange(first, new, device=tensor.device) % ring
                record.runs.append((first, tensor[row].index_select(1, slots)))
        self.length = end

    def usable(self, cut: int, cache: KVCache) -> bool:
        """Whether the state after `cut` bytes (a multiple of 4, at most `length`) can be restored into `cache`."""
        if not 0 < cut <= self.length or cut % SCALES[-1]:
            return False
        for record, (tensor, base, factor) in zip(self.buffers, _buffers(cache)):
            tokens, ring = held(cut, factor), tensor.shape[2] - base
            if record.base is None or record.lo > max(0, tokens - ring) or record.hi < tokens:
                return False
        return True

    def restore(self, cut: int, cache: KVCache, row: int, resident: int = 0) -> StateRecord:
        """Write the state after `cut` bytes into `row` (its lengths set to cut; `usable` must hold). Returns the
        record of the row from there, sharing this one's tensors.

        `resident`: the row already holds the state of this prompt's first `resident` bytes (it read a prompt that
        begins with them: an editor's previous request). Their tokens that its rings still keep (among the last of
        the `cache.lengths[row]` bytes it holds now) are not written again: a hit then writes only what changed."""
        row_bytes = int(cache.lengths[row])
        buffers = []
        for record, (tensor, base, factor) in zip(self.buffers, _buffers(cache)):
            tokens, ring = held(cut, factor), tensor.shape[2] - base
            needed = max(0, tokens - ring)
            # The tokens [there, there_end) the row holds already; the others of [needed, tokens) are written.
            there, there_end = max(needed, held(row_bytes, factor) - ring), held(min(resident, cut), factor)
            if there_end <= there:
                there = there_end = needed
            target = tensor[row]  # (H, S, D), a view
            assert record.base is not None
            target[:, :base] = record.base
            kept = []
            for first, values in record.runs:
                stop = min(first + values.shape[1], tokens)
                if stop <= first:
                    break
                kept.append((first, values[:, : stop - first]))
                for lo, hi in ((max(first, needed), min(stop, there)), (max(first, there_end), stop)):
                    if lo < hi:
                        _write(target, base, ring, lo, values[:, lo - first : hi - first])
            buffers.append(_Runs(record.base, kept))
        cache.lengths[row] = cut
        return StateRecord(buffers, cut)

    def tensors(self) -> list[torch.Tensor]:
        out = [values for record in self.buffers for _, values in record.runs]
        return out + [record.base for record in self.buffers if record.base is not None]

    def storages(self) -> dict[int, int]:
        """The memory this record refers to: storage address -> bytes (shared storages appear in several records)."""
        found = {}
        for tensor in self.tensors():
            storage = tensor.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
        return found

    def covers(self, other: StateRecord) -> bool:
        """Whether every token `other` holds, this one holds too (for the same prompt's first bytes)."""
        return self.length >= other.length and all(
            mine.lo <= theirs.lo for mine, theirs in zip(self.buffers, other.buffers) if theirs.runs
        )


@dataclass(eq=False)
class PrefixEntry:
    tokens: torch.Tensor  # (L,) long: the prompt
    record: StateRecord
    storages: dict[int, int]  # record.storages(), worked out once (a kept record does not change)


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.shape[0], b.shape[0])
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0, 0]) if differ.numel() else n


class PrefixCache:
    """A few prompts' states, least recently used first out, within `max_bytes` (counted over distinct storages).

    `observer(prompt_tokens, reused_tokens)` is called on every lookup (the worker's metrics)."""

    def __init__(self, max_bytes: int, max_entries: int = MAX_ENTRIES,
                 observer: Callable[[int, int], None] | None = None) -> None:
        self.max_bytes, self.max_entries, self.observer = max_bytes, max_entries, observer
        self.entries: list[PrefixEntry] = []  # oldest use first
        self.hits = self.misses = self.reused_tokens = 0
        self.bytes_held = 0  # nbytes after the last insert

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        storages: dict[int, int] = {}
        for entry in self.entries:
            storages.update(entry.storages)
        return sum(storages.values())

    def lookup(self, prompt: Sequence[int], cache: KVCache) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the longest restorable prefix with `prompt`, and that prefix's length in bytes (a
        multiple of 4 that leaves at least 4 bytes to read); (None, 0) when none does."""
        ids = torch.tensor(list(prompt), dtype=torch.long)
        best: tuple[PrefixEntry | None, int] = (None, 0)
        limit = len(ids) - MIN_REST
        for entry in self.entries:
            cut = min(common_prefix(ids, entry.tokens), limit) // SCALES[-1] * SCALES[-1]
            if cut > best[1] and entry.record.usable(cut, cache):
                best = (entry, cut)
        entry, cut = best
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
            self.reused_tokens += cut
            self.entries.remove(entry)
            self.entries.append(entry)
        logger.debug("prefix cache %s: %d of %d prompt tokens reused (%d entries, %d bytes)",
                     "hit" if entry else "miss", cut, len(ids), len(self.entries), self.bytes_held)
        if self.observer is not None:
            self.observer(len(ids), cut)
        return best

    def insert(self, prompt: Sequence[int], record: StateRecord) -> None:
        """Keep a prompt's state (`record` must hold all of it), then evict down to the budget."""
        if record.length != len(prompt):
            return
        entry = PrefixEntry(torch.tensor(list(prompt), dtype=torch.long), record, record.storages())
        # An entry this one extends (its prompt a prefix of this one, its tokens all held here) is redundant.
        self.entries = [old for old in self.entries
                        if not (common_prefix(entry.tokens, old.tokens) == len(old.tokens) and record.covers(old.record))]
        self.entries.append(entry)
        self.bytes_held = self.nbytes
        while self.entries and (len(self.entries) > self.max_entries or self.bytes_held > self.max_bytes):
            self.entries.pop(0)
            self.bytes_held = self.nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.bytes_held = 0
