"""Training: it learns, it resumes exactly (also after SIGKILL), it distills, it refuses bad configs clearly."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from axl_model.checkpoint import load_checkpoint, load_metadata, load_training_state
from axl_model.config import ModelConfig
from axl_model.logger import read_metrics
from axl_model.optim import build_optimizer, lr_at, parameter_groups
from axl_model.model import MultiScaleTransformer
from axl_model.config import memory_bytes
from axl_model.train import TrainCallbacks, TrainConfig, evaluate_bpb, evaluate_checkpoint, train

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ("textwrap.py", "bisect.py", "heapq.py", "string.py", "shlex.py", "fnmatch.py", "colorsys.py", "queue.py",
           "sched.py", "stat.py", "glob.py", "numbers.py", "keyword.py", "this.py", "tabnanny.py", "token.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for name in MODULES:
        shutil.copy(STDLIB / name, root / name)
    return root


def small_config(out: Path, corpus: Path, **overrides) -> TrainConfig:
    values = dict(out_dir=str(out), preset="tiny", data=[str(corpus)], seq_len=64, batch_size=4, max_steps=8,
                  eval_interval=4, eval_tokens=4096, checkpoint_interval=0, num_threads=1, progress=False,
                  data_cache_dir=str(out.parent / "data-cache"), val_fraction=0.2)
    values.update(overrides)
    return TrainConfig(**values)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_training_lowers_validation_bits_per_byte(corpus: Path, tmp_path: Path) -> None:
    steps, evals, checkpoints = [], [], []
    config = small_config(tmp_path / "run", corpus, max_steps=40, eval_interval=20, checkpoint_interval=20,
                          optimizer="adamw", lr=3e-3)
    result = train(config, TrainCallbacks(on_step=steps.append, on_eval=evals.append,
                                           on_checkpoint=lambda path, step: checkpoints.append(step)))
    assert result.status == "completed" and result.steps == 40
    assert [s["step"] for s in steps] == list(range(1, 41))
    assert [e["step"] for e in evals] == [20, 40] and checkpoints == [20, 40]
    assert result.bytes_per_s > 0
    model = MultiScaleTransformer(ModelConfig.from_name("tiny"))  # untrained baseline on the same held-out bytes
    from axl_model.data import prepare_data

    prepared = prepare_data([corpus], tmp_path / "data-cache", val_fraction=0.2, progress=False)
    untrained = evaluate_bpb(model, prepared.val, 64, 4, 4096)
    assert untrained > 7.5  # ~log2(258) for a fresh model
    assert result.val_bpb < untrained - 1.5
    assert math.isclose(result.val_bpb, evaluate_bpb(load_checkpoint(tmp_path / "run"), prepared.val, 64, 4, 4096),
                        rel_tol=1e-5)
    # The run folder holds the metrics log (CSV + JSONL); the checkpoint holds metadata and the training state.
    metrics = read_metrics(tmp_path / "run.run")
    assert [r["step"] for r in metrics if r["kind"] == "train"] == list(range(1, 41))
    assert (tmp_path / "run.run" / "metrics.csv").read_text().count("\n") == 1 + 40 + 2
    assert load_metadata(tmp_path / "run")["step"] == 40
    assert load_training_state(tmp_path / "run")["step"] == 40


def test_stop_and_resume_gives_the_same_weights(corpus: Path, tmp_path: Path) -> None:
    straight = train(small_config(tmp_path / "straight", corpus, checkpoint_interval=3))
    stopped = train(small_config(tmp_path / "resumed", corpus, checkpoint_interval=3),
                    TrainCallbacks(should_stop=lambda: stopped_at_step[0] >= 5,
                                   on_step=lambda r: stopped_at_step.__setitem__(0, r["step"])))
    assert stopped.status == "stopped" and stopped.steps == 5
    resumed = train(small_config(tmp_path / "resumed", corpus, checkpoint_interval=3))
    assert resumed.status == "completed" and resumed.resumed_from_step == 5 and resumed.steps == 8
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))
    assert resumed.val_bpb == pytest.approx(straight.val_bpb, abs=1e-6)
    # resume=False starts over and overwrites
    fresh = train(small_config(tmp_path / "resumed", corpus, max_steps=2, resume=False))
    assert fresh.resumed_from_step is None and fresh.steps == 2


stopped_at_step = [0]


KILL_SCRIPT = """
import sys, time
from axl_model.train import TrainCallbacks, TrainConfig, train
config = TrainConfig(**__import__("json").loads(sys.argv[1]))
train(config, TrainCallbacks(on_step=lambda record: time.sleep(0.15)))
"""


def test_sigkill_mid_run_then_resume_matches_uninterrupted(corpus: Path, tmp_path: Path) -> None:
    config = small_config(tmp_path / "killed", corpus, max_steps=12, checkpoint_interval=2, eval_interval=0)
    reference = small_config(tmp_path / "reference", corpus, max_steps=12, checkpoint_interval=2, eval_interval=0)
    train(reference)
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'shared'}:{REPO}"}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, json.dumps(config.to_dict())], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until a checkpoint at step >= 4 exists, then kill mid-run
            meta = tmp_path / "killed" / "metadata.json"
            if meta.is_file() and json.loads(meta.read_text())["step"] >= 4:
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint appeared within 60 s")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = load_training_state(tmp_path / "killed")["step"]
    assert 4 <= killed_at < 12
    result = train(config)
    assert result.resumed_from_step == killed_at and result.steps == 12
    assert_same_weights(weights(tmp_path / "reference"), weights(tmp_path / "killed"))
    # The metrics log has each step once, even though the killed process logged past its last checkpoint.
    steps = [r["step"] for r in read_metrics(tmp_path / "killed.run") if r["kind"] == "train"]
    assert steps == list(range(1, 13))


def test_distillation_from_a_larger_checkpoint(corpus: Path, tmp_path: Path) -> None:
    teacher = train(small_config(tmp_path / "teacher", corpus, max_steps=20, optimizer="adamw", lr=3e-3,
                                 model_overrides={"d_model": 96, "n_heads": 2, "d_ff": 192}))
    student = train(small_config(tmp_path / "student", corpus, max_steps=20, optimizer="adamw", lr=3e-3,
                                 distill_from=str(tmp_path / "teacher"), distill_alpha=0.7))
    assert load_checkpoint(tmp_path / "student").config.d_model == 64
    assert student.val_bpb < 7.0 and teacher.val_bpb < 7.0
    with pytest.raises(ValueError, match="shorter than seq_len"):
        train(small_config(tmp_path / "s2", corpus, distill_from=str(tmp_path / "teacher"), seq_len=512,
                           model_overrides={"max_seq_len": 512}))


def test_fine_tune_from_a_checkpoint_with_gradient_accumulation(corpus: Path, tmp_path: Path) -> None:
    train(small_config(tmp_path / "base", corpus, max_steps=4))
    result = train(small_config(tmp_path / "tuned", corpus, init_from=str(tmp_path / "base"), grad_accum=2,
                                optimizer="sgd", max_steps=3))
    assert result.steps == 3 and result.resumed_from_step is None
    # 3 steps x 2 micro-batches x 4 rows x 64 tokens
    assert load_training_state(tmp_path / "tuned")["tokens_seen"] == 3 * 2 * 4 * 64


def test_a_continued_model_records_the_training_it_started_from(corpus: Path, tmp_path: Path) -> None:
    """--init-from twice, then a resume: the metadata adds up every run, even once the sources are gone."""
    from axl_model.checkpoint import training_history
    from axl_model.evaluate import checkpoint_info

    train(small_config(tmp_path / "first", corpus, max_steps=4))
    train(small_config(tmp_path / "second", corpus, init_from=str(tmp_path / "first"), max_steps=3))
    train(small_config(tmp_path / "third", corpus, init_from=str(tmp_path / "second"), max_steps=2))
    shutil.rmtree(tmp_path / "first")
    shutil.rmtree(tmp_path / "second")
    train(small_config(tmp_path / "third", corpus, init_from=str(tmp_path / "second"), max_steps=5, resume=True))

    metadata = load_metadata(tmp_path / "third")
    assert metadata["initialised_from"]["checkpoint"] == str(tmp_path / "second")
    assert metadata["initialised_from"]["steps"] == 4 + 3 and metadata["initialised_from"]["runs"] == 2
    history = training_history(metadata)
    assert history["steps"] == 4 + 3 + 5 and history["runs"] == 3
    assert history["tokens_seen"] == (4 + 3 + 5) * 4 * 64
    info = checkpoint_info(tmp_path / "third")
    assert info["steps"] == 12 and info["training_runs"] == 3 and info["train_seconds"] >= metadata["elapsed_s"]


def test_a_fim_model_learns_fill_in_the_middle_windows(corpus: Path, tmp_path: Path) -> None:
    """Same data and steps: the model that trained on prefix-suffix-middle windows scores them better."""
    import numpy as np

    from axl_model.data import fim_rearrange
    from axl_model.train import masked_cross_entropy

    runs = {rate: train(small_config(tmp_path / f"fim-{rate}", corpus, model_overrides={"fim": True}, fim_rate=rate,
                                     max_steps=200, eval_interval=0, lr=3e-3))
            for rate in (0.0, 1.0)}
    fim_model, plain_model = (load_checkpoint(runs[rate].checkpoint_dir) for rate in (1.0, 0.0))
    assert fim_model.config.fim and fim_model.config.vocab_size == 261
    text = (STDLIB / "bisect.py").read_bytes()[:2000]  # a held-out-style text, rearranged like training windows
    rng = np.random.default_rng(7)
    windows = [fim_rearrange(np.frombuffer(text[i : i + 65], dtype=np.uint8).astype(np.int64),
                             np.ones(65, dtype=np.float32), rng) for i in range(0, 1900, 65)]
    tokens = torch.from_numpy(np.stack([w[0] for w in windows]))
    mask = torch.from_numpy(np.stack([w[1][1:] for w in windows]))

    def loss(model) -> float:
        with torch.no_grad():
            return float(masked_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:], mask))

    assert loss(fim_model) < loss(plain_model) - 0.02  # measured: 3.04 vs 3.12 nats


def test_time_budget_stops_the_run(corpus: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    result = train(small_config(tmp_path / "timed", corpus, max_steps=None, max_time=1.5, eval_interval=0))
    assert result.status == "completed" and result.steps > 3
    assert time.monotonic() - started < 15


def test_eval_checkpoint_on_held_out_data(corpus: Path, tmp_path: Path) -> None:
    train(small_config(tmp_path / "ev", corpus, max_steps=4))
    report = evaluate_checkpoint(tmp_path / "ev", [str(corpus)], seq_len=64, max_tokens=2048, val_fraction=0.2)
    assert report["split"] == "val" and 0 < report["val_bpb"] < 12 and report["tokens"] > 0


def test_the_checkpoint_records_its_split(corpus: Path, tmp_path: Path) -> None:
    """What it trained on and what it held out travel with the checkpoint (metadata.json "data_split")."""
    import hashlib

    from axl_model.data import prepare_data

    train(small_config(tmp_path / "rec", corpus, max_steps=2, eval_interval=0))
    recorded = load_metadata(tmp_path / "rec")["data_split"]
    prepared = prepare_data([corpus], tmp_path / "data-cache", val_fraction=0.2, progress=False)
    assert recorded == prepared.split
    assert recorded["data"] == [str(corpus)] and recorded["val_fraction"] == 0.2 and recorded["val_data"] is None
    assert recorded["filters"]["near_duplicate_jaccard"] == 0.8 and recorded["filters"]["min_lines"] == 3
    val_paths = {e["path"] for e in recorded["val_files"]}
    assert val_paths and val_paths < set(MODULES) and len(recorded["val_files_sha256"]) == 64
    sha = {name: hashlib.sha1((corpus / name).read_bytes()).hexdigest()[:16] for name in MODULES}
    assert set(recorded["train_sha1"]) == {sha[name] for name in MODULES if name not in val_paths}


def test_in_training_validation_is_a_spread_sample_of_the_held_out_split(corpus: Path, tmp_path: Path) -> None:
    from axl_model.data import eval_window_spans, prepare_data

    result = train(small_config(tmp_path / "spread", corpus, max_steps=2, eval_interval=0, eval_tokens=512))
    val = prepare_data([corpus], tmp_path / "data-cache", val_fraction=0.2, progress=False).val
    spans = eval_window_spans(len(val), 64, 512)
    assert len(val) > 4 * 512 and spans[-1][0] > len(val) // 2  # not the head of the split
    model = load_checkpoint(tmp_path / "spread")
    assert result.val_bpb == pytest.approx(evaluate_bpb(model, val, 64, 4, 512), rel=1e-5)


def test_user_errors_are_value_errors(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        TrainConfig(out_dir=str(tmp_path / "x"), preset="huge")
    with pytest.raises(ValueError, match="unknown optimizer"):
        TrainConfig(out_dir=str(tmp_path / "x"), optimizer="adam")
    with pytest.raises(ValueError, match="val_fraction 0 holds out no file"):  # never a score on training data
        TrainConfig(out_dir=str(tmp_path / "x"), val_fraction=0.0)
    TrainConfig(out_dir=str(tmp_path / "x"), val_fraction=0.0, val_data=[str(corpus / "bisect.py")])  # fine
    with pytest.raises(ValueError, match="does not exist"):
        train(small_config(tmp_path / "x", tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="exceeds the model's window"):
        train(small_config(tmp_path / "x", corpus, seq_len=1024))
    have = memory_bytes("MemAvailable")
    if have is None:
        pytest.skip("no /proc/meminfo")
    with pytest.raises(ValueError, match="GiB of RAM but only"):
        train(small_config(tmp_path / "x", corpus, preset="code-1b", batch_size=4096, seq_len=1024))


def test_optimizer_groups_and_schedule() -> None:
    model = MultiScaleTransformer(ModelConfig.from_name("tiny"))
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" not in names[id(p)] and "embed" not in names[id(p)] for p in decay["params"])
    assert any("embed" in names[id(p)] for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_parameters()
    assert type(build_optimizer(model)).__name__ == "Lion"
    assert lr_at(0.0, 0, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(0.5, 50, 1.0, warmup_steps=10) == pytest.approx(0.55)
    assert lr_at(1.0, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)
