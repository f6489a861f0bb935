"""The `axl` command line: a tiny model end to end (train, resume, generate, eval, plot), presets, data build,
and one-line errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from axl_model.checkpoint import load_metadata
from axl_model.cli import main

STDLIB = Path(sysconfig.get_paths()["stdlib"])
REPO = Path(__file__).resolve().parents[2]
MODULES = ("textwrap.py", "bisect.py", "heapq.py", "string.py", "shlex.py", "fnmatch.py", "queue.py", "sched.py",
           "stat.py", "glob.py", "numbers.py", "keyword.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src")
    for name in MODULES:
        shutil.copy(STDLIB / name, root / name)
    return root


def axl(*args: str) -> int:
    return main([str(a) for a in args])


TRAIN = ("--preset", "tiny", "--seq-len", "64", "--batch-size", "4", "--threads", "1", "--no-progress",
         "--eval-interval", "5", "--checkpoint-interval", "5", "--val-fraction", "0.2")


def test_train_resume_generate_eval_plot(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ck"
    assert axl("train", *TRAIN, "--data", corpus, "--max-steps", "10", "--out", out) == 0
    line = capsys.readouterr().out
    assert line.startswith("completed: 10 steps") and "bits/byte" in line
    assert load_metadata(out)["step"] == 10

    # Same --out again without --resume: refused in one line; with --resume and a larger budget: continues.
    assert axl("train", *TRAIN, "--data", corpus, "--max-steps", "10", "--out", out) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert axl("train", *TRAIN, "--data", corpus, "--max-steps", "15", "--out", out, "--resume") == 0
    assert "resumed from step 10" in capsys.readouterr().out
    assert load_metadata(out)["step"] == 15

    # Same seed, same text; the prompt is echoed first.
    assert axl("generate", out, "def fibonacci(n):", "--max-tokens", "40", "--seed", "7", "--threads", "1") == 0
    first = capsys.readouterr().out
    assert axl("generate", out, "def fibonacci(n):", "--max-tokens", "40", "--seed", "7", "--stream") == 0
    streamed = capsys.readouterr().out
    assert first.startswith("def fibonacci(n):") and first == streamed and len(first) > len("def fibonacci(n):\n")

    assert axl("eval", out, "--data", corpus, "--seq-len", "64", "--val-fraction", "0.2", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == "val" and 0 < report["val_bpb"] < 9 and report["tokens"] > 0
    assert report["val_bpb"] == pytest.approx(load_metadata(out)["val_bpb"], rel=0.05)

    assert axl("plot", out) == 0
    png = Path(capsys.readouterr().out.strip())
    assert png == Path(f"{out}.run") / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_presets_table_and_ram_suggestions(capsys: pytest.CaptureFixture) -> None:
    assert axl("presets") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:7] == ["preset", "d_model", "heads", "d_ff", "layers/scale", "window", "params"]
    micro = next(line.split() for line in table if line.startswith("micro "))
    assert micro[1:6] == ["256", "4", "688", "3", "1024"] and micro[-1] == "no"
    long = next(line for line in table if line.startswith("micro-long"))  # per-scale shapes: fine/medium/coarse
    assert long.split()[1:6] == ["256/256/384", "4/4/6", "688/688/1024", "2/3/4", "4096"] and "fine 512" in long
    assert next(line for line in table if line.startswith("micro-q")).split()[-1] == "yes"
    assert axl("presets", "--ram", "3") == 0
    suggested = [line.split()[0] for line in capsys.readouterr().out.splitlines()[3:]]
    assert "micro" in suggested and "code-1b" not in suggested and "reasoning" not in suggested
    assert axl("presets", "--ram", "0.1") == 2
    assert capsys.readouterr().err.startswith("axl: error: no preset trains in 0.1 GiB")


def test_data_build_for_a_specialist(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("axl_model.recipes")
    out = tmp_path / "docs-data"
    assert axl("data", "build", "--specialist", "docs", "--source", corpus, "--out", out) == 0
    assert "docs:" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert rows and {"source_code", "target_code"} <= rows[0].keys()
    assert axl("data", "build", "--specialist", "nope", "--source", corpus, "--out", out) == 2
    assert "unknown specialist" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (("train", "--preset", "huge"), "unknown preset 'huge'"),
    (("train", "--preset", "tiny", "--data", "/nonexistent/dir", "--out", "{tmp}/x"), "does not exist"),
    (("train", "--specialist", "wizard"), "unknown specialist 'wizard'"),
    (("train", "--out", "{tmp}/none", "--resume"), "nothing to resume"),
    (("train", "--preset", "tiny", "--val-fraction", "0", "--out", "{tmp}/x"), "val_fraction 0 holds out no file"),
    (("generate", "{tmp}/missing", "x"), "does not exist"),
    (("plot", "{tmp}"), "no metrics.jsonl"),
])
def test_user_errors_are_one_line(args, message, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert axl(*[a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("axl: error: ") and message in err and err.count("\n") == 1


def test_console_command_prints_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'shared'}:{REPO}"}
    proc = subprocess.run([sys.executable, "-m", "axl_model.cli", "train", "--preset", "tiny", "--data",
                           str(tmp_path / "nope.py"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("axl: error:")
    help_text = subprocess.run([sys.executable, "-m", "axl_model.cli", "--help"], capture_output=True, text=True,
                               env=env, timeout=60).stdout
    assert "axl train --preset micro" in help_text and "axl generate" in help_text


def test_train_a_specialist_uses_its_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data" / "docs"  # what `axl data build --specialist docs` writes
    folder.mkdir(parents=True)
    pairs = [{"source_code": f"def f{i}(x):\n    return x * {i}\n", "target_code": f"Multiply x by {i}.",
              "specialist": "docs"} for i in range(60)]
    (folder / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[:50]))
    (folder / "val.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[50:]))
    assert axl("train", "--specialist", "docs", *TRAIN, "--max-steps", "3") == 0
    meta = load_metadata(tmp_path / "checkpoints" / "axl-docs")
    assert meta["preset"] == "tiny"  # --preset wins over the specialist's preset
    assert meta["train_config"]["data"] == ["data/docs/train.jsonl"]
    assert meta["train_config"]["val_data"] == ["data/docs/val.jsonl"]
    assert meta["data"]["documents"] == {"train": 50, "val": 10}
