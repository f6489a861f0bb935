"""Data preparation: filter, split by file, memory-mapped tokens, reproducible windows."""
from __future__ import annotations

import hashlib
import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from axl_model.data import (FilterConfig, TokenDataset, WindowSampler, eval_window_spans, eval_windows, file_kind,
                             jaccard, near_duplicate_clusters, line_set, prepare_data, resolve_inputs, split_of)
from axl_model.tokenizer import BOS_ID, EOS_ID

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SAMPLE_MODULES = ("textwrap.py", "bisect.py", "heapq.py", "string.py", "shlex.py", "fnmatch.py", "colorsys.py",
                  "keyword.py", "numbers.py", "queue.py", "sched.py", "stat.py", "this.py", "glob.py")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "pkg").mkdir(parents=True)
    for name in SAMPLE_MODULES:
        shutil.copy(STDLIB / name, root / "pkg" / name)
    shutil.copy(STDLIB / "textwrap.py", root / "duplicate_of_textwrap.py")
    (root / "broken.py").write_text("def f(:\n    pass\n\n\n")
    (root / "short.py").write_text("x = 1\n")
    (root / "notes.txt").write_text("line one\nline two\nline three\nline four\n")
    (root / "ignored.md").write_text("# not a data file\n\n\n\n")
    return root


def test_filter_split_and_format(corpus: Path, tmp_path: Path) -> None:
    prepared = prepare_data([corpus], tmp_path / "cache", val_fraction=0.2, progress=False)
    stats = prepared.stats
    assert stats.files == len(SAMPLE_MODULES) + 4  # the .md file is not a data file
    assert stats.rejected["syntax"] == 1
    assert stats.rejected["too_short"] == 1
    assert stats.rejected["duplicate"] == 1
    assert stats.documents["train"] + stats.documents["val"] == len(SAMPLE_MODULES) + 1
    assert stats.documents["val"] >= 1 and stats.documents["train"] >= 1

    # The split follows a stable hash of each file's relative path: recompute it independently.
    inputs = resolve_inputs([corpus])
    assert "pkg/bisect.py" in {rel for _, rel in inputs}  # keys are relative to the data root itself
    kept = [rel for _, rel in inputs if rel.split("/")[-1] not in ("broken.py", "short.py", "duplicate_of_textwrap.py")]
    expected_val = sorted(rel for rel in kept if split_of(rel, 0.2) == "val")
    val_bytes = sum((corpus / rel).stat().st_size + 2 for rel in expected_val)
    if expected_val:
        assert stats.tokens["val"] == val_bytes
        assert sorted(entry["path"] for entry in prepared.split["val_files"]) == expected_val

    # On disk: uint16 tokens, memory-mapped; documents are BOS + bytes + EOS and round-trip.
    train = prepared.train
    assert isinstance(train.tokens, np.memmap) and train.tokens.dtype == np.uint16
    offsets = train.document_offsets + [len(train)]
    first = np.asarray(train.tokens[offsets[0] : offsets[1]])
    assert first[0] == BOS_ID and first[-1] == EOS_ID
    text = bytes(first[1:-1].astype(np.uint8)).decode()
    assert any(file.read_text() == text for file, _ in resolve_inputs([corpus]))
    assert train.n_predicted == len(train) - len(train.document_offsets)  # every token but BOS is a target

    # A second call with the same inputs reuses the cache folder; a changed file makes a new one.
    again = prepare_data([corpus], tmp_path / "cache", val_fraction=0.2, progress=False)
    assert again.folder == prepared.folder
    (corpus / "pkg" / "this.py").write_text((corpus / "pkg" / "this.py").read_text() + "\n# changed\n")
    changed = prepare_data([corpus], tmp_path / "cache", val_fraction=0.2, progress=False)
    assert changed.folder != prepared.folder


def test_filter_limits_are_configurable(corpus: Path, tmp_path: Path) -> None:
    prepared = prepare_data([corpus], tmp_path / "c", filters=FilterConfig(min_lines=1, max_lines=200, check_syntax=False),
                            progress=False)
    assert prepared.stats.rejected["too_short"] == 0 and prepared.stats.rejected["syntax"] == 0
    assert prepared.stats.rejected["too_long"] >= 5  # textwrap, string, shlex... are longer than 200 lines


def test_jsonl_pairs_mask_the_prompt(tmp_path: Path) -> None:
    lines = [{"source_code": f"def f{i}(): pass\n", "target_code": f"def f{i}():\n    return {i}\n", "file": f"m{i}.py"}
             for i in range(40)]
    lines.append({"prompt": "Q: 2+2?\n", "completion": "A: 4", "file": "qa"})
    lines.append({"text": "a raw\ndocument\nhere\n"})
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    prepared = prepare_data([data], tmp_path / "cache", val_fraction=0.25, progress=False)
    assert prepared.stats.documents["train"] + prepared.stats.documents["val"] == 42
    assert prepared.stats.documents["val"] > 0  # records split by their source file, not the .jsonl as a whole
    ds = prepared.train
    offsets = ds.document_offsets + [len(ds)]
    for a, b in zip(offsets[:-1], offsets[1:]):
        tokens, mask = np.asarray(ds.tokens[a:b]), np.asarray(ds.mask[a:b])
        text = bytes(tokens[1:-1].astype(np.uint8)).decode()
        assert tokens[-1] == EOS_ID and mask[-1] == 1 and mask[0] == 0
        if text.startswith("def f"):  # the loss covers exactly the target bytes and EOS
            target = text[text.index("\n") + 1 :]
            assert mask.sum() == len(target.encode()) + 1
            assert bytes(tokens[mask == 1][:-1].astype(np.uint8)).decode() == target


def test_specialist_records_use_the_prompt_layout(tmp_path: Path) -> None:
    from axl_model.specialists import get_specialist

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"source_code": "def add(a, b):\n    return a + b\n", "target_code": "Add two numbers.",
                                "specialist": "docs"}) + "\n")
    prepared = prepare_data([data], tmp_path / "cache", val_fraction=0.0, progress=False)
    prompt, target = get_specialist("docs").render_pair("def add(a, b):\n    return a + b\n", "Add two numbers.")
    tokens = np.asarray(prepared.train.tokens)
    assert bytes(tokens[1:-1].astype(np.uint8)).decode() == prompt + target


def test_bad_inputs_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        prepare_data([tmp_path / "missing"], tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="matches no files"):
        prepare_data([str(tmp_path / "*.py")], tmp_path / "c", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .py, .txt or .jsonl files"):
        prepare_data([tmp_path / "empty"], tmp_path / "c", progress=False)
    (tmp_path / "tiny.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="no training data left"):
        prepare_data([tmp_path / "tiny.py"], tmp_path / "c", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        prepare_data([tmp_path / "bad.jsonl"], tmp_path / "c", progress=False)


def test_globs_and_explicit_validation_data(corpus: Path, tmp_path: Path) -> None:
    prepared = prepare_data([str(corpus / "pkg" / "*.py")], tmp_path / "c", val_data=[corpus / "notes.txt"],
                            progress=False)
    assert prepared.stats.documents == {"train": len(SAMPLE_MODULES), "val": 1}
    assert bytes(np.asarray(prepared.val.tokens[1:-1]).astype(np.uint8)).decode() == (corpus / "notes.txt").read_text()


def test_windows_are_reproducible_and_resumable(corpus: Path, tmp_path: Path) -> None:
    prepared = prepare_data([corpus], tmp_path / "cache", progress=False)
    a = WindowSampler(prepared.train, seq_len=64, batch_size=4, seed=3)
    first = [a.next_batch() for _ in range(5)]
    x, y, mask = first[0]
    assert x.shape == y.shape == mask.shape == (4, 64)
    assert (x[:, 1:] == y[:, :-1]).all()  # targets are the inputs shifted by one
    b = WindowSampler(prepared.train, seq_len=64, batch_size=4, seed=3)
    b.load_state_dict(json.loads(json.dumps({"seed": 3, "position": 3})))
    assert all((t1 == t2).all() for t1, t2 in zip(b.next_batch(), first[3]))
    other = WindowSampler(prepared.train, seq_len=64, batch_size=4, seed=4).next_batch()
    assert not (other[0] == x).all()


def test_eval_windows_cover_the_split_once(corpus: Path, tmp_path: Path) -> None:
    prepared = prepare_data([corpus], tmp_path / "cache", progress=False)
    ds: TokenDataset = prepared.train
    windows = list(eval_windows(ds, seq_len=100))
    assert sum(len(tokens) - 1 for tokens, _ in windows) == len(ds) - 1  # every target exactly once
    rebuilt = np.concatenate([windows[0][0]] + [tokens[1:] for tokens, _ in windows[1:]])
    assert (rebuilt == np.asarray(ds.tokens)).all()


def test_fim_windows_are_prefix_suffix_middle_with_markers_never_targets():
    from axl_model.data import fim_rearrange
    from axl_model.tokenizer import FIM_MIDDLE_ID, FIM_PREFIX_ID, FIM_SUFFIX_ID

    rng = np.random.default_rng(0)
    tokens = np.arange(10, 60, dtype=np.int64)
    weights = np.ones(50, dtype=np.float32)
    for _ in range(20):
        fim, fim_weights = fim_rearrange(tokens, weights, rng)
        assert len(fim) == len(tokens) and fim[0] == FIM_PREFIX_ID
        suffix_at, middle_at = int(np.flatnonzero(fim == FIM_SUFFIX_ID)[0]), int(np.flatnonzero(fim == FIM_MIDDLE_ID)[0])
        prefix, suffix, middle = fim[1:suffix_at], fim[suffix_at + 1:middle_at], fim[middle_at + 1:]
        # prefix + middle + suffix is the original text minus the 3 tokens the markers replaced
        assert np.array_equal(np.concatenate([prefix, middle, suffix]), tokens[:-3])
        assert fim_weights[[0, suffix_at, middle_at]].sum() == 0 and fim_weights.sum() == len(tokens) - 3


# ---------------------------------------------------------------------------------------------- honest splits
def test_split_keys_do_not_depend_on_the_python_version_folder(tmp_path: Path) -> None:
    """The same library under python3.11/ and python3.12/ splits the same way: keys are relative to the root."""
    splits = []
    for version in ("python3.11", "python3.12"):
        root = tmp_path / version
        (root / "json").mkdir(parents=True)
        for i in range(30):
            (root / "json" / f"mod{i}.py").write_text(f"def f{i}(x):\n    y = x * {i}\n    return y + {i} - {i * i}\n")
        assert {rel for _, rel in resolve_inputs([root])} == {f"json/mod{i}.py" for i in range(30)}
        prepared = prepare_data([root], tmp_path / "cache", val_fraction=0.3, progress=False)
        splits.append(prepared.split)
    assert splits[0]["val_files"] == splits[1]["val_files"] and splits[0]["val_files"]
    assert splits[0]["val_files_sha256"] == splits[1]["val_files_sha256"]


def _codec_table(variant: int) -> str:
    """A charmap-like table; variants differ in 2 of 60 lines (Jaccard ~0.94), like the stdlib's codec tables."""
    lines = [f"    {hex(i)!r}: 'CHAR {i}',  # code point {i}" for i in range(60)]
    lines[variant % 60] = f"    'variant {variant}': 'X',"
    lines[(variant * 7 + 3) % 60] = f"    'other {variant}': 'Y',"
    return "table = {\n" + "\n".join(lines) + "\n}\n"


def test_near_duplicates_never_straddle_the_split(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    (root / "encodings").mkdir(parents=True)
    for variant in range(40):
        (root / "encodings" / f"cp{variant}.py").write_text(_codec_table(variant))
    for i in range(40):  # unrelated files
        (root / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {i * 100 + j}\n\n" for j in range(6)))
    prepared = prepare_data([root], tmp_path / "cache", val_fraction=0.5, progress=False)
    stats, split = prepared.stats, prepared.split
    assert stats.near_duplicate_clusters == 1 and stats.near_duplicate_files == 40
    val_tables = [e for e in split["val_files"] if e["path"].startswith("encodings/")]
    if val_tables:  # the cluster is held out: one representative, the rest dropped (never trained on)
        assert len(val_tables) == 1 and stats.rejected["near_duplicate"] == 39
    else:  # the cluster trains: every table
        assert stats.rejected["near_duplicate"] == 0
    assert stats.documents["train"] + stats.documents["val"] + stats.rejected["near_duplicate"] == 80
    # no held-out file is a near-duplicate of a training file (training files: by their recorded content hash)
    trained = [file for file, _ in resolve_inputs([root])
               if hashlib.sha1(file.read_bytes()).hexdigest()[:16] in set(split["train_sha1"])]
    assert len(trained) == stats.documents["train"]
    held_out = [line_set((root / e["path"]).read_bytes()) for e in split["val_files"]]
    assert all(jaccard(line_set(file.read_bytes()), lines) < 0.8 for file in trained for lines in held_out)


def test_near_duplicate_search_finds_pairs_and_is_fast() -> None:
    import time

    tables = [line_set(_codec_table(v).encode()) for v in range(5)]
    distinct = [line_set("".join(f"value_{k}_{j} = {k * j}\n" for j in range(40)).encode()) for k in range(5)]
    assert near_duplicate_clusters(tables + distinct + [None], 0.8) == [0] * 5 + [5, 6, 7, 8, 9, 10]
    rng = np.random.default_rng(0)  # ~ the standard library: 1,800 files, 750K lines
    many = [np.unique(rng.integers(0, 2**32, size=400, dtype=np.uint64)) for _ in range(1800)]
    started = time.monotonic()
    assert near_duplicate_clusters(many, 0.8) == list(range(1800))
    assert time.monotonic() - started < 30  # ~2 s on two cores


def test_validation_data_close_to_training_data_is_dropped(tmp_path: Path) -> None:
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    train_dir.mkdir(), val_dir.mkdir()
    (train_dir / "table.py").write_text(_codec_table(1))
    (train_dir / "other.py").write_text("".join(f"x{j} = {j}\n" for j in range(20)))
    (val_dir / "table_copy.py").write_text(_codec_table(2))  # 94% the same lines as a training file
    (val_dir / "fresh.py").write_text("".join(f"def g{j}():\n    return {j}\n" for j in range(10)))
    prepared = prepare_data([train_dir], tmp_path / "cache", val_data=[val_dir], progress=False)
    assert [e["path"] for e in prepared.split["val_files"]] == ["fresh.py"]
    assert prepared.stats.rejected["near_duplicate"] == 1


def test_test_files_are_grouped_after_library_files(tmp_path: Path) -> None:
    assert [file_kind(k) for k in ("json/decoder.py", "test/test_json/test_decode.py", "pkg/tests/helpers.py",
                                   "test_thing.py", "pkg/thing_test.py", "idlelib/idle_test/htest.py",
                                   "data.jsonl::tests/x.py", "contest.py")] == \
        ["library", "test", "test", "test", "test", "test", "test", "library"]
    root = tmp_path / "lib"
    (root / "tests").mkdir(parents=True)
    for i in range(20):
        (root / f"lib{i}.py").write_text(f"def lib{i}():\n    return {i}\n\n")
        (root / "tests" / f"test_lib{i}.py").write_text(f"def test_lib{i}():\n    assert lib{i}() == {i}\n\n")
    prepared = prepare_data([root], tmp_path / "cache", val_fraction=0.5, progress=False)
    val = prepared.val
    groups = val.groups
    assert set(groups) == {"library", "test"} and groups["library"][0] == 0
    assert groups["library"][1] == groups["test"][0] and groups["test"][1] == len(val)
    kinds = [e["kind"] for e in prepared.split["val_files"]]
    assert kinds == sorted(kinds)  # library files first
    assert prepared.train.groups == {"all": (0, len(prepared.train))}


def test_validation_sample_is_spread_fixed_and_whole_when_small() -> None:
    spans = eval_window_spans(100_000, 64, max_tokens=6400)
    assert len(spans) == 100 and all(length == 65 for _, length in spans)
    starts = [s for s, _ in spans]
    assert starts == sorted(starts) and starts[0] < 1000 and starts[-1] > 98_000  # the whole split, not its head
    assert all(b - a < 2 * 1000 for a, b in zip(starts, starts[1:]))  # one window per 1/100 of the split
    assert spans == eval_window_spans(100_000, 64, max_tokens=6400)  # the same at every evaluation
    # a split no larger than the budget is scored whole, every target once
    whole = eval_window_spans(1000, 64, max_tokens=4096)
    assert sum(length - 1 for _, length in whole) == 999 and whole == eval_window_spans(1000, 64)
