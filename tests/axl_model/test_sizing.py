"""Compute-optimal sizing (axl_model.sizing): the rule on given throughputs, the measured and cached throughput,
and `axl presets --max-time` / `axl train --max-time` without a preset."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from axl_model import sizing as S
from axl_model.checkpoint import load_config
from axl_model.cli import main
from axl_model.config import ModelConfig

# (preset, parameters, bytes/s): three shapes, each larger one slower
LADDER = [("small", 1_000_000, 50_000.0), ("medium", 4_000_000, 20_000.0), ("large", 16_000_000, 8_000.0)]


def test_the_largest_preset_that_sees_k_bytes_per_parameter() -> None:
    # 1 hour: small sees 180M (180/param), medium 72M (18/param), large 28.8M (1.8/param)
    plan = S.choose_preset(LADDER, 3600)
    assert plan.choice == "small" and "small" in plan.reason and "Chinchilla" in plan.reason
    assert [r["meets"] for r in plan.rows] == [True, False, False]
    assert plan.rows[1]["bytes_per_param"] == pytest.approx(18.0)
    # 4 hours: medium sees 72 per parameter, large 7.2
    assert S.choose_preset(LADDER, 4 * 3600).choice == "medium"
    # a laxer rule picks larger: k = 1 at 1 hour lets large (1.8 per parameter) in
    assert S.choose_preset(LADDER, 3600, tokens_per_param=1).choice == "large"
    # exactly k bytes per parameter meets the rule
    assert S.choose_preset([("a", 100, 2.0)], 1000, tokens_per_param=20).rows[0]["meets"]
    # the order given does not matter
    assert S.choose_preset(list(reversed(LADDER)), 4 * 3600).choice == "medium"


def test_no_preset_meets_the_rule_the_smallest_is_picked() -> None:
    plan = S.choose_preset(LADDER, 60)  # small sees 3M bytes: 3 per parameter
    assert plan.choice == "small" and plan.reason.startswith("no preset sees 20 bytes per parameter")
    assert "reaches the rule in 7 min" in plan.reason  # 20 x 1M / 50,000 = 400 s
    unmeasured = S.choose_preset([("small", 1_000_000, 50_000.0), ("large", 16_000_000, None)], 60)
    assert unmeasured.choice == "small" and unmeasured.rows[1]["bytes_per_s"] is None
    with pytest.raises(ValueError, match="> 0 seconds"):
        S.choose_preset(LADDER, 0)
    with pytest.raises(ValueError, match="no preset's throughput"):
        S.choose_preset([("a", 10, None)], 60)


def test_measured_once_then_cached_and_the_search_stops_at_the_first_miss(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AXL_CACHE_DIR", str(tmp_path))
    seen: list[tuple[str, bool]] = []
    plan = S.plan_for_budget(1.0, batch_size=2, seq_len=32, threads=1, candidates=("comment", "tiny"),
                             on_measured=lambda preset, rate, entry: seen.append((preset, entry["cached"])))
    # tiny (the smaller) cannot see 20 bytes per parameter in one second, so comment is not measured at all
    assert seen == [("tiny", False)] and plan.choice == "tiny"
    assert [r["preset"] for r in plan.rows] == ["tiny", "comment"] and plan.rows[1]["bytes_per_s"] is None
    cache = json.loads(S.cache_path().read_text())
    (key, entry), = cache.items()
    assert key.startswith("tiny|") and "|b2|s32|lion|t1|" in key and entry["bytes_per_s"] == plan.rows[0]["bytes_per_s"]
    again: list[tuple[str, bool]] = []
    S.plan_for_budget(1.0, batch_size=2, seq_len=32, threads=1, candidates=("tiny",),
                      on_measured=lambda preset, rate, entry: again.append((preset, entry["cached"])))
    assert again == [("tiny", True)]
    rate = S.measure_throughput(ModelConfig.from_name("tiny"), batch_size=2, seq_len=32, threads=1, steps=1)
    assert rate > 0


def test_axl_presets_and_train_size_for_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("AXL_CACHE_DIR", str(tmp_path / "cache"))
    # one second: no candidate sees 20 bytes per parameter, the smallest (comment) is picked, nothing larger measured
    assert main(["presets", "--max-time", "1", "--batch-size", "2", "--seq-len", "32", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "<- pick" in out and "pick: comment. no preset sees 20 bytes per parameter in 1 s" in out
    comment_line = next(line for line in out.splitlines() if line.startswith("comment "))
    assert comment_line.rstrip().endswith("<- pick") and " no " in comment_line
    assert "not measured" in next(line for line in out.splitlines() if line.startswith("code-1b "))
    assert main(["presets", "--max-time", "0"]) == 2

    corpus = tmp_path / "src"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    y = x * {i}\n    return y + {i}\n")
    out_dir = tmp_path / "ck"
    assert main(["train", "--max-time", "1", "--max-steps", "1", "--batch-size", "2", "--seq-len", "32",
                 "--threads", "1", "--data", str(corpus), "--val-fraction", "0.3", "--out", str(out_dir),
                 "--eval-interval", "0", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "sizing: --max-time 1 s and no --preset: comment." in err and "(cached, measured" in err
    assert load_config(out_dir).name == "comment"
