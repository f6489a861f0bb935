"""The launcher's first-run bootstrap: a missing default checkpoint is trained (resumably) before the mesh starts."""

from __future__ import annotations

import io
import shutil
import sysconfig
from pathlib import Path

import pytest

from deploy.launcher import Console, Mesh, MeshConfig


def _config(tmp_path: Path, **bootstrap: object) -> MeshConfig:
    data = tmp_path / "corpus"
    data.mkdir(exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("bisect.py", "colorsys.py", "keyword.py", "fnmatch.py", "glob.py", "shlex.py", "textwrap.py"):
        shutil.copy(stdlib / name, data / name)
    spec = {"checkpoint": "checkpoints/boot", "preset": "tiny", "max_time_seconds": 3, "batch_size": 4,
            "seq_len": 64, "data": [str(data)], **bootstrap}
    return MeshConfig.from_dict({"bootstrap": spec, "workers": [{"specialist": "coder", "port": 9001}]},
                                root=tmp_path)


def test_a_missing_checkpoint_is_trained_and_an_interrupted_one_resumes(tmp_path: Path) -> None:
    from axl_model.checkpoint import load_metadata, load_training_state

    config = _config(tmp_path)
    target = tmp_path / "checkpoints" / "boot"
    out = io.StringIO()

    paused = Mesh(config, Console(out))
    paused.stop_event.set()  # Ctrl-C at the first step
    paused.ensure_bootstrap_checkpoint()
    assert not target.exists()  # a paused bootstrap is never served
    partial = tmp_path / "checkpoints" / "boot.partial"
    assert (partial / "config.json").is_file()
    assert "run again to continue it" in out.getvalue()
    paused_step = load_training_state(partial)

    Mesh(config, Console(out)).ensure_bootstrap_checkpoint()
    assert (target / "config.json").is_file() and not partial.exists()
    assert "bootstrap checkpoint ready" in out.getvalue()
    assert paused_step is not None
    assert load_metadata(target) is not None

    before = (target / "config.json").stat().st_mtime_ns
    Mesh(config, Console(out)).ensure_bootstrap_checkpoint()  # present now: nothing to do
    assert (target / "config.json").stat().st_mtime_ns == before


def test_no_training_when_no_worker_needs_the_checkpoint(tmp_path: Path) -> None:
    own = tmp_path / "checkpoints" / "axl-coder"
    own.mkdir(parents=True)
    Mesh(_config(tmp_path), Console(io.StringIO())).ensure_bootstrap_checkpoint()
    assert not (tmp_path / "checkpoints" / "boot").exists()
    assert not (tmp_path / "checkpoints" / "boot.partial").exists()


def test_no_bootstrap_flag_refuses_to_train(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="does not exist and --no-bootstrap"):
        Mesh(_config(tmp_path), Console(io.StringIO()), bootstrap=False).ensure_bootstrap_checkpoint()


def test_a_training_problem_is_reported_not_raised_raw(tmp_path: Path) -> None:
    config = _config(tmp_path, seq_len=4096)  # longer than the tiny preset's window
    with pytest.raises(RuntimeError, match="bootstrap training failed"):
        Mesh(config, Console(io.StringIO())).ensure_bootstrap_checkpoint()
