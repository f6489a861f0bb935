"""One training-record parser: the gateway's upload check and the trainer's data reader agree line for line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from axl_mesh.errors import InvalidRequestError
from axl_mesh.training_records import (
    CodePair,
    CompletionPair,
    TextRecord,
    TrainingRecordError,
    parse_training_record,
)
from axl_model.data import prepare_data
from services.api_gateway.routes.files import copy_checked

GOOD = '{"text": "x = 1\\n"}'
# Lines the old upload check and the old trainer judged differently, and plain bad ones.
BAD_LINES = [
    '{"source_code": "def f(): pass\\n"}',  # half a pair (the trainer used to fall through to "needs ...")
    '{"prompt": "p", "completion": "c", "source_code": 1}',  # names a pair it does not complete
    '{"source_code": "a", "target_code": 2}',  # a pair of a string and a number (the trainer crashed on encode)
    '{"prompt": "a", "completion": "b", "text": 3, "source_code": null}',
    '{"source_code": "a", "target_code": "b", "specialist": 3}',
    '{"text": 1}',
    '{"foo": "bar"}',
    "[1, 2]",
    '"just a string"',
    '{"text": "a"',
    "[" * 5000,
    '{"n": ' + "1" * 5000 + "}",
]


def _upload_error(data: bytes) -> str | None:
    """The upload route's verdict on a .jsonl file: None (accepted) or its 400 message."""
    try:
        copy_checked(io.BytesIO(data), io.BytesIO(), "train.jsonl", 1 << 20)
    except InvalidRequestError as exc:
        assert exc.code == "invalid_jsonl"
        return exc.message
    return None


def _training_error(data: bytes, tmp_path: Path) -> str | None:
    """The trainer's verdict on the same file: None (read) or its ValueError."""
    path = tmp_path / "train.jsonl"
    path.write_bytes(data)
    try:
        prepare_data([path], tmp_path / "cache", val_fraction=0.0, progress=False)
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("bad", BAD_LINES)
def test_a_line_refused_at_upload_is_the_line_training_refuses_with_the_same_words(bad: str, tmp_path: Path) -> None:
    data = f"{GOOD}\n\n{bad}\n{GOOD}\n".encode()
    upload, training = _upload_error(data), _training_error(data, tmp_path)
    assert upload is not None and training is not None, (upload, training)
    reason = str(_reason(bad))
    assert upload == f"Invalid JSONL on line 3: {reason}"
    assert training == f"{tmp_path / 'train.jsonl'}:3: {reason}"


def _reason(line: str) -> TrainingRecordError:
    with pytest.raises(TrainingRecordError) as info:
        parse_training_record(line)
    return info.value


def test_what_the_upload_accepts_the_trainer_reads_as_the_same_records(tmp_path: Path) -> None:
    records = [
        {"source_code": "def f():\n", "target_code": "    return 1\n", "file": "m.py", "rule": "any other key"},
        {"source_code": "def add(a, b):\n    return a + b\n", "target_code": "Add.", "specialist": "docs"},
        {"prompt": "Q: 2+2?\n", "completion": "A: 4", "file": 7},
        # json.dumps(ensure_ascii=False) (the recipes' writer) leaves U+2028 and U+0085 raw: still one line
        {"text": "a raw\r\ndocument\u2028with a line separator\x85here\n", "specialist": None},
    ]
    data = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in records).encode() + b"\n\n"
    assert _upload_error(data) is None
    assert copy_checked(io.BytesIO(data), io.BytesIO(), "train.jsonl", 1 << 20)[1] == len(records)
    path = tmp_path / "ok.jsonl"
    path.write_bytes(data)
    prepared = prepare_data([path], tmp_path / "cache", val_fraction=0.0, progress=False)
    assert prepared.stats.documents["train"] == len(records)

    parsed = [parse_training_record(json.dumps(r)) for r in records]
    assert [type(r) for r in parsed] == [CodePair, CodePair, CompletionPair, TextRecord]
    assert parsed[0].file == "m.py" and parsed[2].file == 7 and parsed[1].specialist == "docs"
    tokens = np.asarray(prepared.train.tokens)
    text = bytes(t for t in tokens.tolist() if t < 256).decode()
    for record in parsed:  # every record's bytes reached the token file
        part = (
            record.text
            if isinstance(record, TextRecord)
            else (record.completion if isinstance(record, CompletionPair) else record.target_code)
        )
        assert part in text


def test_records_are_typed_and_strict() -> None:
    assert parse_training_record('{"prompt": "a", "completion": "b"}') == CompletionPair(prompt="a", completion="b")
    with pytest.raises(TrainingRecordError, match="'specialist'"):
        parse_training_record('{"source_code": "a", "target_code": "b", "specialist": ["docs"]}')
    with pytest.raises(TrainingRecordError, match="must both be strings"):
        parse_training_record('{"prompt": "a", "completion": 5}')  # no number turned into text
