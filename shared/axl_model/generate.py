"""Text generation: sampling, stop sequences, UTF-8-safe streaming and batched decoding.

`BatchDecoder` is the engine: a KV cache with a fixed number of rows, sequences that join (prefill) and leave
at any step, and one `decode_step` for all of them. `Generator` wraps it for the common calls (one prompt,
a stream, several prompts at once); the model worker drives the same engine for continuous batching.
"""
from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from .config import SCALES
from .model import KVCache, MultiScaleTransformer
from .prefix_cache import PrefixCache, PrefixEntry, StateRecord, common_prefix
from .tokenizer import BOS_ID, EOS_ID, ByteTokenizer, StreamDecoder

FinishReason = Literal["stop", "length"]
# Row order by length mod 4 (at step 0): the rows completing a coarse group, or a medium pair, are then consecutive.
PHASE_ORDER = (1, 3, 0, 2)
GREEDY_BELOW = 1e-5  # temperatures under this decode greedily (Continue sends 0.01 for autocomplete)


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages bytes already in the context (CTRL-style)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # return the chosen token's logprob and this many alternatives
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        problems = []
        if self.max_tokens < 0:
            problems.append(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            problems.append("stop sequences must be non-empty strings")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: dict[str, float]


@dataclass
class StepOutput:
    """What one sequence produced in one step: text safe to show now, and whether it finished."""

    text: str
    token_id: int | None
    finish_reason: FinishReason | None = None
    logprob: TokenLogprob | None = None


class Sampler:
    """Turns next-token logits into a token for one sequence, reproducibly under a seed."""

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        self.params = params
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
        self.generator = torch.Generator().manual_seed(seed)
        # Only bytes and EOS are ever sampled: BOS and fill-in-the-middle markers are inputs.
        self.banned = torch.tensor([BOS_ID, *range(EOS_ID + 1, vocab_size)])
        if not params.stop_at_eos:
            self.banned = torch.cat([self.banned, torch.tensor([EOS_ID])])
        self.banned_mask = torch.zeros(vocab_size, dtype=torch.bool)
        self.banned_mask[self.banned] = True
        # Greedy with no penalty and no logprobs depends on the logits alone: a BatchDecoder picks such rows' tokens
        # with one argmax over the batch (`greedy_tokens`), the token __call__ would pick.
        self.plain_greedy = (params.temperature < GREEDY_BELOW and params.repetition_penalty == 1.0
                             and params.logprobs is None)

    def __call__(self, logits: torch.Tensor, context: Sequence[int]) -> tuple[int, TokenLogprob | None]:
        """logits: (V,) float; context: ids already in the window (for the repetition penalty)."""
        p = self.params
        logits = logits.float().clone()
        logits[self.banned] = float("-inf")
        if p.repetition_penalty != 1.0 and context:
            seen = torch.tensor(sorted(set(context)))
            values = logits[seen]
            # A tiny penalty (5e-324 is > 0) is 0 in float32 (-inf x 0 is NaN) and overflows a division to inf
            # (softmax of inf is NaN): the smallest normal float at least, and finite results.
            finfo = torch.finfo(logits.dtype)
            penalty = max(p.repetition_penalty, finfo.tiny)
            penalized = torch.where(values > 0, values / penalty, values * penalty)
            logits[seen] = penalized.clamp(max=finfo.max)
        if p.temperature < GREEDY_BELOW:
            token = int(logits.argmax())
        else:
            scaled = (logits / p.temperature).clamp(max=torch.finfo(logits.dtype).max)  # finite, as above
            if p.top_k:
                kth = torch.topk(scaled, min(p.top_k, scaled.numel())).values[-1]
                scaled = scaled.masked_fill(scaled < kth, float("-inf"))
            if p.top_p < 1.0:
                ordered, order = scaled.sort(descending=True)
                cumulative = ordered.softmax(-1).cumsum(-1)
                drop = cumulative - ordered.softmax(-1) >= p.top_p  # keep the smallest prefix reaching top_p
                drop[0] = False  # rounding can make the first term > a tiny top_p: never drop every token
                scaled[order[drop]] = float("-inf")
            token = int(torch.multinomial(scaled.softmax(-1), 1, generator=self.generator))
        return token, (self._logprob(logits, token) if p.logprobs is not None else None)

    def _logprob(self, logits: torch.Tensor, token: int) -> TokenLogprob:
        logprobs = logits.log_softmax(-1)
        top = torch.topk(logprobs, max(1, self.params.logprobs or 1))
        return TokenLogprob(token=_token_text(token), logprob=float(logprobs[token]),
                            top={_token_text(int(i)): float(v) for v, i in zip(top.values, top.indices)})


def greedy_tokens(logits: torch.Tensor, samplers: Sequence[Sampler]) -> list[int | None]:
    """logits (B, V) -> the token of each row whose sampler is `plain_greedy`, from one masked argmax over the
    batch (a sampler call per row cost ~35 us, ~0.28 ms of a ragged micro step at batch 8); None for the other rows.
    The same token as `Sampler.__call__`: the same float32 values and banned ids, argmax's first maximum."""
    plain = [sampler.plain_greedy for sampler in samplers]
    if not any(plain):
        return [None] * len(samplers)
    banned = torch.stack([sampler.banned_mask for sampler in samplers])  # (B, V)
    tokens = logits.float().masked_fill(banned, float("-inf")).argmax(-1).tolist()
    return [token if is_plain else None for token, is_plain in zip(tokens, plain, strict=True)]


def _token_text(token: int) -> str:
    if token < 256:
        return bytes([token]).decode("latin-1") if token >= 0x80 else chr(token)
    return "<eos>" if token == EOS_ID else f"<{token}>"


class StopMatcher:
    """Holds back text that might be the start of a stop sequence; cuts the output at a full match."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        if not self.stops:
            return text, False
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = max((n for s in self.stops for n in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:n])), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class GenerationSequence:
    """One request inside a BatchDecoder."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, vocab_size: int, request_id: str | None) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.sampler = Sampler(params, vocab_size)
        self.decoder = StreamDecoder()
        self.stopper = StopMatcher(params.stop)
        self.window: list[int] = list(prompt_ids)  # ids currently in the model's context
        self.generated: list[int] = []
        self.next_token: int | None = None
        self.finish_reason: FinishReason | None = None
        self.row = -1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def accept(self, logits: torch.Tensor, chosen: int | None = None) -> StepOutput:
        """Sample from logits, record the token and return what to emit. chosen: the token already picked from
        these logits for a plain greedy sampler (`greedy_tokens`); None: the sampler picks it."""
        if len(self.generated) >= self.params.max_tokens:
            return self._finish("length", None)
        if chosen is None:
            token, logprob = self.sampler(logits, self.window[-256:])
        else:
            token, logprob = chosen, None
        self.generated.append(token)
        if token == EOS_ID:
            return self._finish("stop", token, logprob)
        self.next_token = token
        text, stopped = self.stopper.push(self.decoder.push(token))
        if stopped:
            self.finish_reason = "stop"
            return StepOutput(text, token, "stop", logprob)
        if len(self.generated) >= self.params.max_tokens:
            return self._finish("length", token, logprob, text)
        return StepOutput(text, token, None, logprob)

    def _finish(self, reason: FinishReason, token, logprob=None, text: str = "") -> StepOutput:
        tail, stopped = self.stopper.push(self.decoder.flush())
        text += tail if stopped else tail + self.stopper.flush()
        self.finish_reason = reason
        return StepOutput(text, token, reason, logprob)


class BatchDecoder:
    """Continuous batching over a fixed number of cache rows.

    Active sequences occupy rows 0..n-1; a finished sequence's row is refilled by the last active one, so
    each decode step runs on exactly the live rows. When a row's window fills up, its context slides: the
    oldest quarter is dropped and the rest is re-prefilled (the policy `window_after_slide` describes).

    Chunked prefill (`prefill_chunk` > 0, a multiple of 4): a prompt longer than one chunk does not run in
    one go inside `add`; it queues (holding a row) and `advance_prefill` reads one chunk of it per call into a
    staging row beyond the live ones, so the caller can interleave chunks with decode steps and the running
    rows keep streaming. When its last chunk is in, the row moves into the batch and samples its first token.
    A window slide then goes the same way (the row pauses while its context is re-read). The result equals
    the one-shot prefill (`MultiScaleTransformer.extend`).

    `decode_step` replaces `model.decode_step` for the decode steps: a `compiled.CompiledDecodeStep` (the
    compiled static-shape step), shared by every decoder of the model so that it compiles once.

    `prefix_cache` (`prefix_cache.PrefixCache`): each prompt's state is kept after its prefill, and a prompt that
    shares a kept prompt's beginning restores that state and reads only the rest (same result).
    """

    def __init__(self, model: MultiScaleTransformer, max_batch: int = 8, capacity: int | None = None,
                 prefill_chunk: int = 0, decode_step: Callable[[torch.Tensor, KVCache], torch.Tensor] | None = None,
                 prefix_cache: PrefixCache | None = None) -> None:
        if prefill_chunk < 0 or prefill_chunk % SCALES[-1]:
            raise ValueError(f"prefill_chunk must be 0 (off) or a positive multiple of {SCALES[-1]}, got {prefill_chunk}")
        self.model = model
        self.decode_step = decode_step  # None: model.decode_step, looked up at each step
        self.capacity = capacity or model.config.max_seq_len
        self.prefill_chunk = prefill_chunk
        self.staging_row = max_batch  # one extra cache row, only when chunking
        self.cache: KVCache = model.new_cache(max_batch + (1 if prefill_chunk else 0), self.capacity)
        self.max_batch = max_batch
        self.active: list[GenerationSequence] = []
        self.prefilling: deque[GenerationSequence] = deque()  # waiting to be read in chunks, the first one staged
        self._resuming: set[int] = set()  # id() of prefilling sequences re-reading a slid window (no new sample)
        self._steps = 0  # decode steps so far: the reference of the rows' phases (`_phase`)
        self.prefix_cache = prefix_cache
        self._found: dict[int, tuple[PrefixEntry | None, int]] = {}  # id() of a prefilling sequence -> its lookup
        self._staged_record: StateRecord | None = None  # the staged prompt's state so far (with a prefix cache)
        # With a prefix cache: row -> the prompt whose state the row holds from its start (its decoded tokens may
        # follow), so that a restore into the row writes only what the prompt it restores does not share with it.
        self._row_prompts: dict[int, torch.Tensor] = {}

    @property
    def free_rows(self) -> int:
        return self.max_batch - len(self.active) - len(self.prefilling)

    def add(self, prompt_ids: list[int], params: SamplingParams,
            request_id: str | None = None) -> tuple[GenerationSequence, StepOutput | None]:
        """Prefill a new sequence and sample its first token. Raises ValueError if the prompt does not fit.

        With chunked prefill, a prompt longer than a chunk only queues: the output is None, and its first
        token comes from the `advance_prefill` call that reads its last chunk."""
        if not self.free_rows:
            raise RuntimeError("no free rows in this batch")
        if not prompt_ids:
            raise ValueError("the prompt must contain at least one token (the tokenizer adds BOS)")
        if len(prompt_ids) > self.capacity:
            raise ValueError(f"the prompt is {len(prompt_ids)} tokens; this model's context window is {self.capacity}")
        sequence = GenerationSequence(list(prompt_ids), params, self.model.config.vocab_size, request_id)
        if params.max_tokens == 0:
            return sequence, sequence._finish("length", None)
        found = (None, 0) if self.prefix_cache is None else self.prefix_cache.lookup(sequence.window, self.cache)
        if self.prefill_chunk and len(sequence.window) - found[1] > self.prefill_chunk:
            self.prefilling.append(sequence)
            self._found[id(sequence)] = found
            return sequence, None
        self._join(sequence, len(sequence.window))
        try:
            with torch.inference_mode():
                logits = self._prefill(sequence.window, sequence.row, found)
            output = sequence.accept(logits)
        except BaseException:
            self.remove(sequence)  # a failed prefill must not keep its row (the batch would fill up for good)
            raise
        if sequence.finished:
            self.remove(sequence)
        return sequence, output

    def advance_prefill(self) -> list[tuple[GenerationSequence, StepOutput]]:
        """Read the next chunk of the first prefilling sequence; when that was its last, the sequence joins the
        batch (and returns its first token, unless it was resuming after a slide). A failure drops the sequence
        from the queue and raises."""
        if not self.prefilling:
            return []
        sequence, row = self.prefilling[0], self.staging_row
        done = int(self.cache.lengths[row])  # 0 when this sequence starts (set when the previous one left)
        resuming = id(sequence) in self._resuming
        try:
            with torch.inference_mode():
                if done == 0 and self.prefix_cache is not None and not resuming:
                    done, self._staged_record = self._restore(self._found.pop(id(sequence), (None, 0)), row)
                end = min(len(sequence.window), done + self.prefill_chunk)
                logits = self.model.extend(torch.tensor(sequence.window[done:end]), self.cache, row)
                if self._staged_record is not None:
                    self._staged_record.after(self.cache, row, done, end)
        except BaseException:
            self._unstage()
            raise
        if end < len(sequence.window):
            return []
        if self._staged_record is not None and self.prefix_cache is not None:
            self.prefix_cache.insert(sequence.window, self._staged_record)
            self._staged_record = None
        self._join(sequence, len(sequence.window))
        self.cache.move_row(row, sequence.row)
        if self.prefix_cache is not None:
            self._row_prompts[sequence.row] = torch.tensor(sequence.window)
        self._unstage()
        if resuming:
            return []
        try:
            output = sequence.accept(logits)
        except BaseException:
            self.remove(sequence)
            raise
        if sequence.finished:
            self.remove(sequence)
        return [(sequence, output)]

    def _unstage(self) -> None:
        """The first prefilling sequence leaves the queue; the staging row starts empty for the next."""
        first = self.prefilling.popleft()
        self._resuming.discard(id(first))
        self._found.pop(id(first), None)
        self.cache.lengths[self.staging_row] = 0
        self._staged_record = None

    def _restore(self, found: tuple[PrefixEntry | None, int], row: int) -> tuple[int, StateRecord]:
        """With a prefix cache: put the prefix a lookup found (entry, bytes) into an empty `row`. Returns the bytes
        restored (0: none, the prompt is read from its start) and the record of the row's state from there."""
        entry, cut = found
        there = self._row_prompts.pop(row, None)  # the row's state is rewritten from here
        if entry is None:
            return 0, StateRecord.empty(self.cache)
        resident = 0 if there is None else common_prefix(entry.tokens, there)
        return cut, entry.record.restore(cut, self.cache, row, resident)

    def _prefill(self, prompt: list[int], row: int, found: tuple[PrefixEntry | None, int]) -> torch.Tensor:
        """Read a whole prompt into `row`: the one-shot prefill, or with a prefix cache the prefix its lookup
        `found` restored and the rest read by `extend` (a miss: the one-shot prefill, its states kept). Returns the
        logits after the prompt."""
        if self.prefix_cache is None:
            return self.model.prefill(torch.tensor(prompt), self.cache, row)
        start, record = self._restore(found, row)
        if start:
            logits = self.model.extend(torch.tensor(prompt[start:]), self.cache, row)
            record.after(self.cache, row, start, len(prompt))
        else:
            logits, (_, self_kvs, cross_kvs, _) = self.model.prefill_with_states(torch.tensor(prompt), self.cache, row)
            record = StateRecord.from_states(self_kvs, cross_kvs, len(prompt))
        self._row_prompts[row] = torch.tensor(prompt)
        self.prefix_cache.insert(prompt, record)
        return logits

    def step(self) -> list[tuple[GenerationSequence, StepOutput]]:
        """One token for every active sequence (a sequence whose window slides in chunks sits this one out)."""
        if not self.active:
            return []
        with torch.inference_mode():
            for sequence in list(self.active):
                if len(sequence.window) >= self.capacity:
                    self._slide(sequence)
            if not self.active:
                return []
            live = self.cache.narrow(len(self.active))
            tokens = torch.tensor([s.next_token for s in self.active])
            logits = (self.decode_step or self.model.decode_step)(tokens, live)
            self.cache.lengths[: len(self.active)] = live.lengths
            self._steps += 1
        results = []
        chosen = greedy_tokens(logits, [sequence.sampler for sequence in self.active])
        for sequence, row_logits, token in zip(list(self.active), logits, chosen, strict=True):
            sequence.window.append(sequence.next_token)
            output = sequence.accept(row_logits, token)
            results.append((sequence, output))
        for sequence, output in results:
            if output.finish_reason is not None:
                self.remove(sequence)
        return results

    def remove(self, sequence: GenerationSequence) -> None:
        """Drop a sequence (finished, or its client went away) and compact the rows."""
        if any(s is sequence for s in self.prefilling):
            if self.prefilling[0] is sequence:
                self._unstage()
            else:
                self.prefilling.remove(sequence)
                self._resuming.discard(id(sequence))
                self._found.pop(id(sequence), None)
            return
        if sequence not in self.active:
            return
        hole = sequence.row
        if self._in_phase_order():  # close the hole phase by phase: each later phase's last row moves up
            phases = self._phases()
            for phase in range(phases[hole], len(PHASE_ORDER)):
                last = max((row for row, p in enumerate(phases) if p == phase), default=-1)
                if last > hole:
                    self._move(last, hole)
                    hole = last
        if hole != len(self.active) - 1:  # not in phase order: the last row fills the hole
            self._move(len(self.active) - 1, hole)
        self.active.pop()
        sequence.row = -1

    # Rows in phase order: a sequence's phase is its length mod 4 (measured against the step count, so it stays
    # put as every row grows), and the rows go in the phase order below. Then the rows that complete a coarse
    # group in a step are consecutive, and so are those completing a medium pair (phases 1 and 3 together, then 0
    # and 2), and decode_step runs those stacks on them alone. Joining or leaving costs at most 4 row copies.
    def _phase(self, length: int) -> int:
        return PHASE_ORDER.index((length - self._steps) % SCALES[-1])

    def _phases(self) -> list[int]:
        return [self._phase(n) for n in self.cache.lengths[: len(self.active)].tolist()]

    def _in_phase_order(self) -> bool:
        phases = self._phases()
        return all(a <= b for a, b in zip(phases, phases[1:]))

    def _move(self, source: int, target: int) -> None:
        self.cache.move_row(source, target)
        if source in self._row_prompts:
            self._row_prompts[target] = self._row_prompts[source]
        else:
            self._row_prompts.pop(target, None)
        moved = self.active[source]
        moved.row, self.active[target] = target, moved

    def _join(self, sequence: GenerationSequence, length: int) -> None:
        """Give a joining sequence of `length` bytes its row: the end of its phase's rows (each later phase's first
        row moves to that phase's end), or the next row when the batch is not in phase order."""
        ordered, phases = self._in_phase_order(), self._phases()
        self.active.append(sequence)
        hole = len(self.active) - 1
        if ordered:
            mine = self._phase(length)
            for phase in range(len(PHASE_ORDER) - 1, mine, -1):
                first = min((row for row, p in enumerate(phases) if p == phase), default=hole)
                if first < hole:
                    self._move(first, hole)
                    hole = first
        sequence.row, self.active[hole] = hole, sequence

    def window_after_slide(self, window: list[int]) -> list[int]:
        """The context kept when a full window must take one more token: its newest three quarters."""
        return window[len(window) - self.capacity * 3 // 4:]

    def _slide(self, sequence: GenerationSequence) -> None:
        sequence.window = self.window_after_slide(sequence.window)
        if self.prefill_chunk and len(sequence.window) > self.prefill_chunk:
            # Re-read in chunks like a long prompt; it keeps its place (after a sequence already staged).
            self.remove(sequence)
            self.prefilling.insert(1 if self.prefilling and self.cache.lengths[self.staging_row] else 0, sequence)
            self._resuming.add(id(sequence))
            return
        self._row_prompts.pop(sequence.row, None)
        self.model.prefill(torch.tensor(sequence.window), self.cache, sequence.row)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Generator:
    """High-level generation for a loaded model; `compile=True` decodes with the compiled static-shape step
    (`compiled.CompiledDecodeStep`, eager where compilation is unavailable), built once for every call."""

    def __init__(self, model: MultiScaleTransformer, tokenizer: ByteTokenizer | None = None,
                 compile: bool = False) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer or ByteTokenizer(fim=model.config.fim)
        self.decode_step = None
        if compile:
            from .compiled import CompiledDecodeStep

            self.decode_step = CompiledDecodeStep(self.model)

    def encode(self, prompt: str | list[int]) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt)

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[StepOutput]:
        """Yield text pieces as they are decoded; the last one carries the finish reason."""
        decoder = BatchDecoder(self.model, max_batch=1, decode_step=self.decode_step)
        sequence, output = decoder.add(self.encode(prompt), params or SamplingParams())
        yield output
        while not sequence.finished:
            for _, output in decoder.step():
                yield output

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None) -> Completion:
        return self.generate_batch([prompt], params)[0]

    def generate_batch(self, prompts: Sequence[str | list[int]], params: SamplingParams | Sequence[SamplingParams] | None = None,
                       max_batch: int = 8) -> list[Completion]:
        """Several prompts decoded together (each with its own length and sampling parameters)."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        encoded = [self.encode(p) for p in prompts]
        texts = [[] for _ in prompts]
        logprobs: list[list[TokenLogprob]] = [[] for _ in prompts]
        sequences: list[GenerationSequence | None] = [None] * len(prompts)
        decoder = BatchDecoder(self.model, max_batch=min(max_batch, len(prompts)) or 1,
                               decode_step=self.decode_step)
        pending = list(range(len(prompts)))

        def record(index: int, output: StepOutput) -> None:
            texts[index].append(output.text)
            if output.logprob is not None:
                logprobs[index].append(output.logprob)

        index_of: dict[int, int] = {}
        while pending or decoder.active:
            while pending and decoder.free_rows:
                i = pending.pop(0)
                sequence, output = decoder.add(encoded[i], params[i])
                sequences[i], index_of[id(sequence)] = sequence, i
                record(i, output)
            for sequence, output in decoder.step():
                record(index_of[id(sequence)], output)
        return [
            Completion("".join(texts[i]), [t for t in s.generated if t != EOS_ID], s.finish_reason or "length",
                       len(encoded[i]), logprobs[i])
            for i, s in enumerate(sequences)
        ]
