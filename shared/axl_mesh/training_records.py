"""The training-record format: one line of a ``.jsonl`` fine-tuning file, and the one parser of it.

The gateway checks every line of an upload with :func:`parse_training_record` (``POST /v1/files``) and the trainer
reads the same file with the same function (``axl_model.data``), so a line is refused at upload exactly when
training would refuse it, with the same words. Imports no torch.

A line is one JSON object, one of:

- :class:`CodePair`: ``source_code`` + ``target_code`` (what the recipes write; ``specialist`` names a known
  specialist whose prompt layout renders the pair);
- :class:`CompletionPair`: ``prompt`` + ``completion`` (OpenAI's legacy fine-tuning format);
- :class:`TextRecord`: ``text``, a raw document.

Naming either key of a pair makes the line that pair (both keys must then be strings); other keys are ignored.
``file`` (any kind) names the source file a record came from: the train/validation split goes by it when present.
Lines end at ``\n`` (an ``\r`` before it is dropped), as JSON Lines defines them (:func:`jsonl_lines`): U+2028,
U+0085 and the other characters ``str.splitlines`` also breaks at belong to their line, since
``json.dumps(ensure_ascii=False)`` writes them unescaped inside strings. Blank lines are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError


class TrainingRecordError(ValueError):
    """A line that is not a training record; the message says why, without where (callers add the line)."""


class _Record(BaseModel):
    # Strings stay strings (no number or bytes coerced into text); keys we do not read are ignored.
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    file: Any = None  # the source file it came from: decides its side of the train/validation split


class CodePair(_Record):
    """A code pair; the loss covers ``target_code``."""

    keys: ClassVar[tuple[str, str]] = ("source_code", "target_code")

    source_code: str
    target_code: str
    specialist: str | None = None


class CompletionPair(_Record):
    """A prompt and its completion; the loss covers ``completion``."""

    keys: ClassVar[tuple[str, str]] = ("prompt", "completion")

    prompt: str
    completion: str


class TextRecord(_Record):
    """A raw document; the loss covers all of it."""

    text: str


TrainingRecord = CodePair | CompletionPair | TextRecord
_PAIRS: tuple[type[CodePair] | type[CompletionPair], ...] = (CodePair, CompletionPair)


def jsonl_line(raw: str) -> str:
    """A line as read up to and including its ``\n`` (if any), without its line end."""
    return raw.removesuffix("\n").removesuffix("\r")


def jsonl_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number from 1, line) of a whole ``.jsonl`` file's text, blank lines included."""
    for number, raw in enumerate(text.split("\n"), 1):
        yield number, raw.removesuffix("\r")


def parse_training_record(line: str) -> TrainingRecord:
    """One non-blank line of a ``.jsonl`` training file as its record; raises :class:`TrainingRecordError`."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TrainingRecordError(f"not valid JSON ({exc.msg} at column {exc.colno}).") from None
    except RecursionError:
        raise TrainingRecordError("JSON nested too deeply.") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise TrainingRecordError(f"not valid JSON ({exc}).") from None
    if not isinstance(value, dict):
        raise TrainingRecordError("each line must be a JSON object.")
    for pair in _PAIRS:
        first, second = pair.keys
        if first in value or second in value:
            if not (isinstance(value.get(first), str) and isinstance(value.get(second), str)):
                raise TrainingRecordError(f"'{first}' and '{second}' must both be strings.")
            return _validated(pair, value)
    if isinstance(value.get("text"), str):
        return _validated(TextRecord, value)
    raise TrainingRecordError(
        f"needs 'source_code'/'target_code', 'prompt'/'completion' or 'text'; got keys {sorted(value)[:6]}."
    )


def _validated(model: type[TrainingRecord], value: dict[str, Any]) -> TrainingRecord:
    try:
        return model.model_validate(value)
    except ValidationError as exc:  # an optional field of the wrong kind, e.g. "specialist": 3
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise TrainingRecordError(f"'{where}': {error['msg'].lower()}.") from None
