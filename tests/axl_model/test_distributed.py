"""`axl train` under torchrun: ranks split each global batch row by row, 2 ranks x batch 4 train exactly as 1 process
x batch 8 (Lion and AdamW), rank 0 alone writes, and after a rank is SIGKILLed the elastic agent's restart
resumes the group from its last checkpoint to the same weights as a run that was never interrupted."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from axl_model import cli
from axl_model.data import WindowSampler, prepare_data
from axl_model.distributed import TrainingGroup, all_reduce_bytes_per_step
from axl_model.logger import read_metrics
from tests.axl_model.test_train import MODULES, REPO, STDLIB, assert_same_weights, weights

HARNESS = Path(__file__).with_name("distributed_harness.py")
STEPS = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for name in MODULES:
        (root / name).write_bytes((STDLIB / name).read_bytes())
    return root


def train_args(corpus: Path, out: Path, optimizer: str, batch_size: int) -> list[str]:
    return ["train", "--preset", "tiny", "--data", str(corpus), "--val-fraction", "0.2", "--seq-len", "64",
            "--batch-size", str(batch_size), "--max-steps", str(STEPS), "--eval-interval", "6",
            "--checkpoint-interval", "2", "--optimizer", optimizer, "--threads", "1", "--no-progress", "--out", str(out)]


def torchrun(args: list[str], *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """2 ranks of the float64 harness (one launch can hold several `train` runs, separated by ---)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *extra,
               str(HARNESS), *args]
    environment = {**os.environ, "PYTHONPATH": f"{REPO / 'shared'}:{REPO}", **(env or {})}
    return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def two_ranks(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """optimizer -> (checkpoint, output) of 2 ranks x batch 4, both runs in one torchrun launch."""
    root = tmp_path_factory.mktemp("two-ranks")
    runs = {name: root / name for name in ("lion", "adamw")}
    proc = torchrun([*train_args(corpus, runs["lion"], "lion", 4), "---", *train_args(corpus, runs["adamw"], "adamw", 4)])
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output
    return {name: (out, output) for name, out in runs.items()}


def one_process(corpus: Path, out: Path, optimizer: str) -> Path:
    """The same run in this process: 1 process x batch 8, float64."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert cli.main(train_args(corpus, out, optimizer, 8)) == 0
    finally:
        torch.set_default_dtype(default)
    return out


# ---------------------------------------------------------------------------------------------- sharding
def test_ranks_take_rows_of_the_global_batch(corpus: Path, tmp_path: Path) -> None:
    train = prepare_data([corpus], tmp_path / "data", val_fraction=0.2, progress=False).train
    for fim_rate in (0.0, 0.5):  # FIM draws from the batch's rng per row: each rank must replay every row's draws
        whole = WindowSampler(train, 48, 8, seed=3, fim_rate=fim_rate)
        ranks = [WindowSampler(train, 48, 4, seed=3, fim_rate=fim_rate, rank=r, world_size=2) for r in range(2)]
        for n in range(4):
            x, y, mask, targets = whole.shard(n)
            assert targets == mask.sum()
            for r, sampler in enumerate(ranks):
                shard = sampler.next_shard()
                assert torch.equal(shard.x, x[r::2]) and torch.equal(shard.y, y[r::2])
                assert torch.equal(shard.mask, mask[r::2])
                assert shard.targets_per_rank == targets / 2  # the global batch's count, shared out
        assert [s.state_dict() for s in ranks] == [{"seed": 3, "position": 4}] * 2  # positions count global batches
    with pytest.raises(ValueError, match="rank"):
        WindowSampler(train, 48, 4, rank=2, world_size=2)


def test_the_group_comes_from_torchruns_environment() -> None:
    assert TrainingGroup.from_env({}) == TrainingGroup() and not TrainingGroup().active
    group = TrainingGroup.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                                   "TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_RUN_ID": "abc"})
    assert (group.rank, group.world_size, group.local_rank, group.local_world_size) == (3, 4, 1, 2)
    assert group.active and not group.is_main and group.restart_count == 1 and group.run_id == "abc"
    assert list(group.shard(range(10))) == [3, 7]
    # micro's gradients in a ring all-reduce over 2 ranks: 9.16M params x 4 bytes x 2 (2 - 1) / 2 = 36.6 MB a step
    assert all_reduce_bytes_per_step(9_161_475, 2) == 9_161_475 * 4
    assert all_reduce_bytes_per_step(9_161_475, 1) == 0


# ---------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("optimizer", ["lion", "adamw"])
def test_two_ranks_of_batch_4_train_as_one_process_of_batch_8(optimizer: str, corpus: Path, tmp_path: Path,
                                                              two_ranks: dict[str, tuple[Path, str]]) -> None:
    distributed, output = two_ranks[optimizer]
    single = one_process(corpus, tmp_path / "single", optimizer)
    a, b = weights(distributed), weights(single)
    assert a.keys() == b.keys()
    for name in a:  # float64: rounding only (a Lion sign flip would be off by 2 x lr = 6e-4)
        assert torch.allclose(a[name], b[name], rtol=1e-9, atol=1e-12), name
    # The logged loss is the global batch's, and validation (each rank scores half the windows) agrees.
    losses = [[r["loss"] for r in read_metrics(f"{run}.run") if r["kind"] == "train"] for run in (distributed, single)]
    assert len(losses[0]) == STEPS and losses[0] == pytest.approx(losses[1], rel=1e-9)
    meta = [json.loads((run / "metadata.json").read_text()) for run in (distributed, single)]
    assert meta[0]["val_bpb"] == pytest.approx(meta[1]["val_bpb"], rel=1e-9)
    assert meta[0]["world_size"] == 2 and meta[0]["tokens_seen"] == meta[1]["tokens_seen"] == STEPS * 8 * 64
    # Rank 0 speaks for the group: one summary line per run, no second metrics log.
    assert output.count(f"completed: {STEPS} steps") == 2, output


# ---------------------------------------------------------------------------------------------- elastic restart
def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker with RANK=rank among the launcher's children, if it is running."""
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(child)
    return None


def test_a_killed_rank_restarts_the_group_from_its_checkpoint(corpus: Path, tmp_path: Path,
                                                              two_ranks: dict[str, tuple[Path, str]]) -> None:
    out = tmp_path / "killed"
    proc = torchrun(train_args(corpus, out, "lion", 4), "--max-restarts", "1", env={"AXL_TEST_STEP_SECONDS": "0.25"})
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # a checkpoint at step >= 4 exists: kill rank 1 mid-run
            meta = out / "metadata.json"
            if meta.is_file() and json.loads(meta.read_text())["step"] >= 4:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint appeared within 90 s")
        victim = rank_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    resumed = re.search(rf"completed: {STEPS} steps \(resumed from step (\d+)\)", output)
    assert resumed and 4 <= int(resumed.group(1)) < STEPS, output
    events = [r for r in read_metrics(f"{out}.run") if r["kind"] == "event" and r["event"] != "checkpoint"]
    assert [e["event"] for e in events] == ["start", "resume", "completed"]
    assert events[1]["restart_count"] == 1 and events[1]["step"] == int(resumed.group(1))
    steps = [r["step"] for r in read_metrics(f"{out}.run") if r["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))  # each step once: what the killed group logged past it is dropped
    # Same weights as the 2-rank run that was never interrupted: the group's data order resumed too.
    assert_same_weights(weights(two_ranks["lion"][0]), weights(out))


def test_a_restarted_rank_resumes_its_own_launchs_checkpoint(corpus: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    """What the CLI does when torchrun's agent restarts it (one rank here: the decision, not the group)."""
    out = tmp_path / "run"
    args = train_args(corpus, out, "adamw", 4)
    args[args.index("--max-steps") + 1] = "2"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert cli.main(args) == 0
    assert json.loads((out / "metadata.json").read_text())["elastic_run_id"] == "launch-1"
    args[args.index("--max-steps") + 1] = "3"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    capsys.readouterr()
    assert cli.main(args) == 0  # a restart needs no --resume: it continues the group's checkpoint
    assert "completed: 3 steps (resumed from step 2)" in capsys.readouterr().out
    args[args.index("--max-steps") + 1] = "4"
    assert cli.main([*args, "--overwrite"]) == 0  # --overwrite launched this run: the checkpoint is still its own
    assert "completed: 4 steps (resumed from step 3)" in capsys.readouterr().out
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-2")  # another launch with --overwrite: not its checkpoint
    assert cli.main([*args, "--overwrite"]) == 0
    output = capsys.readouterr().out
    assert "completed: 4 steps" in output and "resumed" not in output
