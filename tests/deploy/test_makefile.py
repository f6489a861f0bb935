"""The Makefile: on a fresh clone every everyday target works as the first command (it installs what is missing),
and an installed tree does not install again (``make -n``: what make would run, nothing run)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")

EVERYDAY = {"test": "-m pytest", "test-fast": "-m pytest", "up": "-m deploy.launcher", "bench": "-m bench",
            "eval": "/bin/axl eval", "data": "/bin/axl data build"}


def _dry_run(target: str, venv: Path) -> list[str]:
    result = subprocess.run(["make", "-n", "-C", str(REPO_ROOT), "--no-print-directory", target, f"VENV={venv}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def _index(lines: list[str], fragment: str) -> int:
    matches = [i for i, line in enumerate(lines) if fragment in line]
    assert matches, f"{fragment!r} not in {lines}"
    return matches[0]


@pytest.mark.parametrize("target", sorted(EVERYDAY))
def test_a_fresh_clone_installs_before_running(target: str, tmp_path: Path) -> None:
    lines = _dry_run(target, tmp_path / "venv")  # no venv there yet
    create, install = _index(lines, "-m venv"), _index(lines, "pip install -e")
    stamp, command = _index(lines, "touch"), _index(lines, EVERYDAY[target])
    assert create < install < stamp < command, lines
    assert lines[stamp].endswith(str(tmp_path / "venv" / ".installed"))


def _installed_venv(root: Path) -> Path:
    venv = root / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / ".installed").touch()
    return venv


@pytest.mark.parametrize("target", sorted(EVERYDAY))
def test_an_installed_tree_runs_at_once(target: str, tmp_path: Path) -> None:
    lines = _dry_run(target, _installed_venv(tmp_path))
    assert not any("pip install" in line or "-m venv" in line for line in lines), lines
    assert any(EVERYDAY[target] in line for line in lines)


def test_a_changed_pyproject_installs_again(tmp_path: Path) -> None:
    venv = _installed_venv(tmp_path)
    older = (REPO_ROOT / "pyproject.toml").stat().st_mtime - 60
    os.utime(venv / ".installed", (older, older))
    lines = _dry_run("test", venv)
    assert _index(lines, "pip install -e") < _index(lines, "-m pytest")
    assert not any("-m venv" in line for line in lines)  # the venv itself is kept


def _fake_pip(venv: Path, status: int) -> Path:
    """A pip that records its arguments and exits with ``status``."""
    pip, calls = venv / "bin" / "pip", venv / "pip-calls"
    pip.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit {status}\n')
    pip.chmod(0o755)
    return calls


def _make(target: str, venv: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-C", str(REPO_ROOT), "--no-print-directory", f"VENV={venv}", target],
                          capture_output=True, text=True, timeout=60)


def test_install_installs_even_when_done(tmp_path: Path) -> None:
    """`make install` (what .ci/run calls before `make test`) always installs, and leaves the stamp for `make test`."""
    venv = _installed_venv(tmp_path)
    calls = _fake_pip(venv, 0)
    result = _make("install", venv)
    assert result.returncode == 0, result.stderr
    # No wheel cache: it ignores CMAKE_ARGS, and llama.cpp must be built for AVX2, not for this host (see Makefile).
    assert calls.read_text().split() == ["install", "-e", ".[dev,eval,llama]", "--no-cache-dir"]
    assert "CMAKE_ARGS=\"-DGGML_NATIVE=OFF" in result.stdout
    assert (venv / ".installed").exists()
    assert not any("pip install" in line for line in _dry_run("test", venv))
    ci = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci.index("make install") < ci.index("make test")


def test_up_stops_the_mesh_when_make_dies(tmp_path: Path) -> None:
    lines = _dry_run("up", _installed_venv(tmp_path))
    launcher = lines[_index(lines, "-m deploy.launcher")]
    assert launcher.startswith("exec ") and "--exit-with-parent" in launcher  # make's own child, no shell between


def test_the_stamp_is_not_written_when_pip_fails(tmp_path: Path) -> None:
    """An install that fails leaves no stamp: the next target tries it again."""
    venv = _installed_venv(tmp_path)
    (venv / ".installed").unlink()
    _fake_pip(venv, 1)
    assert _make(str(venv / ".installed"), venv).returncode != 0
    assert not (venv / ".installed").exists()


def test_make_test_lints_before_the_suite(tmp_path: Path) -> None:
    """`make test` (the README's test command, which CI runs) runs every `make lint` step before pytest."""
    lines = _dry_run("test", _installed_venv(tmp_path))
    suite = _index(lines, "-m pytest")
    for step in ("ruff check", "ruff format --check", "mypy"):
        assert _index(lines, step) < suite, lines


# One finding per lint step, each clean for the other two: `make lint` must fail on each (no step's failure ignored).
LINT_FINDINGS = {
    "ruff check": "import os\n",  # F401: imported but unused
    "ruff format --check": "x = {'a':1}\n",  # quotes and spacing the formatter rewrites
    "mypy": 'x: int = "a"\n',  # a str assigned to an int
}


@pytest.mark.parametrize("step", sorted(LINT_FINDINGS))
def test_make_lint_fails_on_a_finding(step: str, tmp_path: Path) -> None:
    venv = REPO_ROOT / ".venv"
    if not all((venv / "bin" / tool).exists() for tool in ("ruff", "mypy")):
        pytest.skip("the project's venv has no ruff or mypy (the dev extra)")
    # The project's config (the file lies outside the tree): ruff reads the nearest pyproject.toml.
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "finding.py").write_text(LINT_FINDINGS[step])
    # -o: the venv counts as installed even if pyproject.toml is newer than its stamp (no pip run from a test).
    result = subprocess.run(
        [
            "make",
            "-C",
            str(REPO_ROOT),
            "--no-print-directory",
            "-o",
            str(venv / ".installed"),
            f"VENV={venv}",
            f"LINT_PATHS={tmp_path / 'finding.py'}",
            "lint",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0, result.stdout
    ran = [line for line in result.stdout.splitlines() if "/bin/ruff" in line or "/bin/mypy" in line]
    assert step in ran[-1], ran  # make stopped at the step that found it
