"""The quality bench's comparison on a tiny config and a budget of seconds: the FLOP-matched baseline, the same
batches per seed, mean ± spread over seeds, compressors on the same held-out bytes."""
from __future__ import annotations

from pathlib import Path

import pytest

from axl_model.config import ModelConfig
from axl_model.data import WindowSampler, prepare_data
from bench.common import training_flops_per_byte
from bench.quality_per_cpu_minute import compare, flop_matched_baseline, held_out_files, single_scale_flops


def test_the_baseline_is_the_closest_in_training_flops_per_byte() -> None:
    micro = ModelConfig.from_name("micro")
    baseline = flop_matched_baseline(micro, 256)
    target = training_flops_per_byte(micro, 256)
    assert baseline.uniform and baseline.d_model == micro.d_model and baseline.d_ff == micro.d_ff
    gap = abs(single_scale_flops(baseline, 256) - target)
    for n_layers in (baseline.n_layers - 1, baseline.n_layers + 1):  # one layer more or less is further away
        other = ModelConfig.from_name("micro", n_layers=n_layers)
        assert abs(single_scale_flops(other, 256) - target) > gap
    assert gap < 0.1 * target


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: a shared, busy machine makes two spinning threads wait on each other (seconds per step)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("quality")
    corpus = root / "src"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    y = x * {i + j}\n    return y - {j}\n\n"
                                                 for j in range(12)))
    return prepare_data([str(corpus)], root / "data", val_fraction=0.2, progress=False)


def test_compare_two_seeds_in_seconds(prepared) -> None:
    files = held_out_files(prepared.val, 2_000)
    assert files and sum(map(len, files)) >= 2_000 - max(map(len, files))  # whole files up to the cap
    assert held_out_files(prepared.val, 2_000) == files  # a fixed order
    lines: list[str] = []
    summary = compare(ModelConfig.from_name("tiny"), prepared, {"split": files}, budget=0.5, seeds=2,
                      seq_len=64, batch=2, log=lines.append)
    assert summary["baseline_layers"] == flop_matched_baseline(ModelConfig.from_name("tiny"), 64).n_layers
    for arm in ("multiscale", "single_scale"):
        runs = summary["runs"][arm]
        assert [r["seed"] for r in runs] == [0, 1] and all(r["steps"] >= 1 for r in runs)
        stats = summary["bpb"]["split"][arm]
        assert stats["n"] == 2 and stats["min"] <= stats["mean"] <= stats["max"] and 0 < stats["mean"] < 12
    diff = summary["bpb"]["split"]["multiscale_minus_single"]
    assert diff["mean"] == pytest.approx(summary["bpb"]["split"]["multiscale"]["mean"]
                                         - summary["bpb"]["split"]["single_scale"]["mean"])
    compressors = summary["compressors"]["split"]
    assert compressors["bytes"] == sum(map(len, files)) and compressors["zlib-9"]["per_file_bpb"] > 0
    assert any("compressors on the same bytes" in line for line in lines)
    with pytest.raises(ValueError, match="clock"):
        compare(ModelConfig.from_name("tiny"), prepared, {"split": files}, budget=0.5, clock="sundial")


def test_both_models_draw_the_same_batches(prepared) -> None:
    """What 'same batches' rests on: batch n of a seed does not depend on who draws it or what came before."""
    a, b = WindowSampler(prepared.train, 64, 2, seed=1), WindowSampler(prepared.train, 64, 2, seed=1)
    first = [a.next_batch()[0] for _ in range(3)]
    assert all((x == b.batch(n)[0]).all() for n, x in enumerate(first))
    assert not (WindowSampler(prepared.train, 64, 2, seed=2).batch(0)[0] == first[0]).all()


def test_cli_flags(tmp_path: Path) -> None:
    from bench.__main__ import main

    with pytest.raises(SystemExit):
        main(["quality_per_cpu_minute", "--clock", "sundial"])
