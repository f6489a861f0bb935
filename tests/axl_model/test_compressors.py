"""Compressor baselines (axl_model.compressors): the arithmetic against the compressors themselves, what
compresses and what does not, and `axl eval` putting them beside the model on the same held-out files."""
from __future__ import annotations

import lzma
import os
import sysconfig
import zlib
from pathlib import Path

import pytest

from axl_model import evaluate as E
from axl_model.compressors import COMPRESSORS, compressor_baselines
from tests.axl_model.test_evaluate import _checkpoint_with_split, _library_and_tests

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def test_bits_per_byte_are_compressed_sizes_over_input_bytes() -> None:
    files = [(STDLIB / name).read_bytes() for name in ("bisect.py", "heapq.py", "keyword.py")] + [b""]
    report = compressor_baselines(files)
    real = [f for f in files if f]
    total = sum(map(len, real))
    assert report["bytes"] == total and report["files"] == 3  # the empty file carries no byte
    zlib_sizes = sum(len(zlib.compress(f, 9)) for f in real)
    assert report["zlib-9"]["per_file_bpb"] == zlib_sizes * 8 / total
    whole_xz = len(lzma.compress(b"".join(real), preset=9 | lzma.PRESET_EXTREME))
    assert report["xz-9e"]["concatenated_bpb"] == whole_xz * 8 / total
    for name in COMPRESSORS:
        if name in report["unavailable"]:
            continue
        assert 0.5 < report[name]["per_file_bpb"] < 4  # Python source: far below 8, far above nothing


def test_repeats_and_noise() -> None:
    text = (STDLIB / "heapq.py").read_bytes()
    repeated = compressor_baselines([text, text])
    for name in ("zlib-9", "xz-9e"):  # the second copy costs almost nothing once the stream has seen the first
        assert repeated[name]["concatenated_bpb"] < 0.6 * repeated[name]["per_file_bpb"]
    noise = compressor_baselines([os.urandom(20_000)])
    assert all(noise[name]["per_file_bpb"] >= 8.0 for name in ("zlib-9", "xz-9e"))  # nothing to find in noise
    assert compressor_baselines([])["bytes"] == 0
    with pytest.raises(ValueError, match="unknown compressor"):
        compressor_baselines([text], names=["gzip-1"])


def test_zstd_when_installed() -> None:
    zstandard = pytest.importorskip("zstandard")
    text = (STDLIB / "bisect.py").read_bytes()
    report = compressor_baselines([text], names=["zstd-19"])
    assert set(report) >= {"zstd-19"} and "xz-9e" not in report
    assert report["zstd-19"]["per_file_bytes"] == len(zstandard.ZstdCompressor(level=19).compress(text))


def test_eval_compresses_exactly_the_held_out_files(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    corpus = _library_and_tests(tmp_path / "src")
    ck = _checkpoint_with_split(tmp_path, corpus, val_fraction=0.3)
    held = E.held_out_bpb(ck, seq_len=64, compressors=True)
    val_files = [corpus / entry["path"] for entry in E.recorded_split(ck)["val_files"]]
    contents = [f.read_bytes() for f in val_files]
    baselines = held["compressors"]
    assert baselines["files"] == len(contents) and baselines["bytes"] == sum(map(len, contents))
    assert held["bytes"] == baselines["bytes"] + baselines["files"]  # the model also predicts each end-of-file
    zlib_bits = sum(len(zlib.compress(c, 9)) for c in contents) * 8
    assert baselines["zlib-9"]["per_file_bpb"] == zlib_bits / baselines["bytes"]
    assert "compressors" not in E.held_out_bpb(ck, seq_len=64)  # only when asked

    from axl_model.cli import main

    table = tmp_path / "results.md"
    assert main(["eval", str(ck), "--seq-len", "64", "--out", str(table), "--no-progress", "--threads", "1"]) == 0
    assert "compressors on the same" in capsys.readouterr().out
    text = table.read_text()
    assert "## Compressors on the same held-out bytes" in text
    row = next(line for line in text.splitlines() if line.startswith("| held-out split, as scored for `ck` |"))
    assert f"| {baselines['bytes']:,} |" in row and f"{baselines['xz-9e']['per_file_bpb']:.3f} / " in row
    assert main(["eval", str(ck), "--seq-len", "64", "--out", str(table), "--no-progress", "--no-compressors"]) == 0
    assert "## Compressors" not in table.read_text()  # the row was replaced by one without them
