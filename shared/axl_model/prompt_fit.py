"""Fitting a prompt into the model's window, as Ollama and llama-server do, instead of refusing it.

Data only; no torch. Sizes are tokens, which for the byte tokenizer are bytes plus the special tokens (BOS, and
the three FIM tokens for fill-in-the-middle). Cuts fall on UTF-8 character boundaries.

- Plain prompts keep their end (what the model continues from).
- Fill-in-the-middle keeps the end of the prefix and the start of the suffix, prefix-weighted
  (:data:`FIM_PREFIX_SHARE` of the room; a side that needs less gives the rest to the other).
- Both drop their head in whole blocks (:func:`cut_block`: an eighth of the room), counted from the start of the
  text, so the kept start stays where it was while an editor's file grows or changes near its end: successive
  requests then share their beginning and the worker's prompt prefix cache restores it (a cut that moved by a byte
  each request would share nothing). The price is up to one block of the room left unused (a FIM prompt gives it
  to the suffix when the suffix has more).
- Chat keeps the latest message whole (its end, if it alone is too long), then the end of the system prompt in up
  to half of the room left, then earlier turns newest first (user/assistant exchanges whole, dropped from the
  oldest), and finally gives the system prompt whatever room the turns left. Tool definitions are never part of
  the prompt (the byte models cannot call tools); tool results are turns like any other.

Every fit is measured by rendering the candidate prompt with the specialist's own chat template, so what fits
here fits in the worker, whatever the template looks like.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from axl_model.specialists import Specialist
from axl_model.tokenizer import ByteTokenizer

__all__ = ["FIM_PREFIX_SHARE", "FittedPrompt", "cut_block", "fit_chat", "fit_fim", "fit_text", "generation_reserve"]

# Of the room a fill-in-the-middle prompt has, the share the prefix gets when both sides are long: the code before
# the cursor says more about what comes next than the code after it.
FIM_PREFIX_SHARE = 0.75
# The most of the window kept free for generation: the quarter the decoder drops when a full window slides
# (axl_model.generate: newest three quarters kept), so a fitted prompt is never cut again by the first slide.
RESERVE_WINDOW_FRACTION = 4
# A fitted prompt's head is dropped in blocks of this fraction of the room (see the module's doc): larger blocks
# keep a growing file's start for more requests, and leave more of the room unused.
CUT_BLOCK_FRACTION = 8
SYSTEM_ROLES = ("system", "developer")


def generation_reserve(max_tokens: int, window: int) -> int:
    """Tokens of the window left free for the answer: ``min(max_tokens, window // 4)``."""
    return max(0, min(max_tokens, window // RESERVE_WINDOW_FRACTION))


@dataclass(frozen=True)
class FittedPrompt:
    """The prompt as the model gets it: its ids, its text, and how many tokens of the whole one were left out."""

    ids: list[int]
    text: str
    dropped: int = 0


def cut_block(room: int) -> int:
    """The bytes a fitted prompt's head is dropped in, for ``room`` bytes of text: an eighth of it (at least 1)."""
    return max(1, room // CUT_BLOCK_FRACTION)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogatepass")  # as ByteTokenizer.encode does


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogatepass")


def _tail(text: str, nbytes: int) -> str:
    """The end of ``text``: at most ``nbytes`` bytes, starting on a character boundary."""
    data = _utf8(text)
    if nbytes >= len(data):
        return text
    start = len(data) - max(0, nbytes)
    while start < len(data) and data[start] & 0xC0 == 0x80:  # a continuation byte: skip to the next character
        start += 1
    return _text(data[start:])


def _stable_tail(text: str, nbytes: int, block: int) -> str:
    """The end of ``text`` in at most ``nbytes`` bytes, its head dropped in whole ``block``s from the text's start
    (then to the next character boundary), so the kept start only moves when the text outgrows another block."""
    data = _utf8(text)
    excess = len(data) - max(0, nbytes)
    if excess <= 0:
        return text
    start = -(-excess // block) * block  # rounded up to a whole block
    while start < len(data) and data[start] & 0xC0 == 0x80:  # a continuation byte: skip to the next character
        start += 1
    return _text(data[start:])


def _head(text: str, nbytes: int) -> str:
    """The start of ``text``: at most ``nbytes`` bytes, ending on a character boundary."""
    data = _utf8(text)
    if nbytes >= len(data):
        return text
    end = max(0, nbytes)
    while end > 0 and data[end] & 0xC0 == 0x80:
        end -= 1
    return _text(data[:end])


def _largest(n: int, fits: Callable[[int], bool]) -> int | None:
    """The largest ``k`` in ``0..n`` with ``fits(k)``, for a ``fits`` that holds up to some k and not after."""
    if not fits(0):
        return None
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit_text(tokenizer: ByteTokenizer, text: str, budget: int | None) -> FittedPrompt:
    """A plain prompt in ``budget`` tokens (None: as it is): its end, cut at a whole block (:func:`cut_block`)."""
    ids = tokenizer.encode(text)
    if budget is None or len(ids) <= budget:
        return FittedPrompt(ids, text)
    room = budget - len(tokenizer.encode(""))
    kept = _stable_tail(text, room, cut_block(room))
    kept_ids = tokenizer.encode(kept)
    return FittedPrompt(kept_ids, kept, len(ids) - len(kept_ids))


def fit_fim(tokenizer: ByteTokenizer, prefix: str, suffix: str, budget: int | None) -> FittedPrompt:
    """A fill-in-the-middle prompt in ``budget`` tokens: the prefix's end and the suffix's start, prefix-weighted;
    the prefix cut at a whole block (:func:`cut_block`), the room that leaves going to the suffix.

    ``text`` is the prefix kept (what ``echo`` gives back)."""
    ids = tokenizer.encode_fim(prefix, suffix)
    if budget is None or len(ids) <= budget:
        return FittedPrompt(ids, prefix)
    room = max(0, budget - len(tokenizer.encode_fim("", "")))
    prefix_bytes, suffix_bytes = len(_utf8(prefix)), len(_utf8(suffix))
    prefix_room = int(room * FIM_PREFIX_SHARE)
    if suffix_bytes < room - prefix_room:
        prefix_room = room - suffix_bytes
    elif prefix_bytes < prefix_room:
        prefix_room = prefix_bytes
    kept_prefix = _stable_tail(prefix, prefix_room, cut_block(room))
    kept_suffix = _head(suffix, room - len(_utf8(kept_prefix)))
    kept_ids = tokenizer.encode_fim(kept_prefix, kept_suffix)
    return FittedPrompt(kept_ids, kept_prefix, len(ids) - len(kept_ids))


def fit_chat(specialist: Specialist, tokenizer: ByteTokenizer, messages: Sequence[Mapping[str, str]],
             budget: int | None) -> FittedPrompt:
    """OpenAI-style messages rendered with ``specialist``'s template in ``budget`` tokens (see the module's doc).

    Raises ValueError for messages the template refuses (as ``Specialist.render_chat`` does)."""
    whole = specialist.render_chat(messages)
    ids = tokenizer.encode(whole)
    if budget is None or len(ids) <= budget:
        return FittedPrompt(ids, whole)
    room = budget - len(tokenizer.encode(""))
    system = " ".join((m.get("content") or "").strip() for m in messages if m.get("role") in SYSTEM_ROLES).strip()
    turns = [dict(m) for m in messages if m.get("role") not in SYSTEM_ROLES]
    latest, earlier = turns[-1], _units_newest_first(turns[:-1])

    def render(system_bytes: int, kept: Sequence[Mapping[str, str]]) -> str:
        head = [{"role": "system", "content": _tail(system, system_bytes)}] if system_bytes > 0 else []
        return specialist.render_chat([*head, *kept])

    def size(system_bytes: int, kept: Sequence[Mapping[str, str]]) -> int:
        return len(_utf8(render(system_bytes, kept)))

    # 1. The latest message, whole or its end, under the shortest instruction line: one character of the system
    # prompt (without one the template writes the specialist's instruction, which may be longer).
    system_bytes = len(_utf8(system))
    shortest = min(system_bytes, 1)
    content = latest.get("content") or ""
    content_bytes = len(_utf8(content))
    kept_content = _largest(content_bytes,
                            lambda n: size(shortest, [{**latest, "content": _tail(content, n)}]) <= room)
    if kept_content is None:  # the window cannot even hold the template around an empty message: its end
        return _dropped_from(ids, fit_text(tokenizer, render(shortest, [latest]), budget))
    kept: list[Mapping[str, str]] = [{**latest, "content": _tail(content, kept_content)}]
    # 2. The system prompt's end, in up to half of the room the latest message left.
    first_share = size(shortest, kept) + (room - size(shortest, kept)) // 2
    kept_system = max(shortest, _largest_system(system_bytes, lambda n: size(n, kept) <= first_share))
    # 3. Earlier turns, newest first, while they fit; the first that does not ends the history kept.
    for unit in earlier:
        if size(kept_system, [*unit, *kept]) > room:
            break
        kept = [*unit, *kept]
    # 4. The system prompt takes the room the turns left.
    kept_system = max(kept_system, _largest_system(system_bytes, lambda n: size(n, kept) <= room))
    text = render(kept_system, kept)
    return _dropped_from(ids, FittedPrompt(tokenizer.encode(text), text))


def _dropped_from(whole_ids: Sequence[int], fitted: FittedPrompt) -> FittedPrompt:
    """``fitted`` counting what it left out of the whole prompt ``whole_ids``."""
    return FittedPrompt(fitted.ids, fitted.text, max(0, len(whole_ids) - len(fitted.ids)))


def _largest_system(system_bytes: int, fits: Callable[[int], bool]) -> int:
    """Bytes of the system prompt's end that fit; 0 when none do.

    Searched from 1 up: with no system text the template writes the specialist's instruction instead, which can be
    longer than a short tail, so 0 does not bound the search."""
    if system_bytes == 0 or not fits(1):
        return 0
    return 1 + (_largest(system_bytes - 1, lambda n: fits(1 + n)) or 0)


def _units_newest_first(turns: Sequence[Mapping[str, str]]) -> list[list[Mapping[str, str]]]:
    """Earlier turns in the pieces they are dropped in, newest first: the user or tool messages after the last
    assistant message one by one, before that each exchange (its user messages and the assistant's answer) whole,
    so an answer never stays without its question."""
    units: list[list[Mapping[str, str]]] = []
    exchange: list[Mapping[str, str]] = []
    for message in turns:
        exchange.append(message)
        if message.get("role") == "assistant":
            units.append(exchange)
            exchange = []
    trailing = [[m] for m in exchange]  # after the last answer: each stands alone
    return [*reversed(trailing), *reversed(units)]
