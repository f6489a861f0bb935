"""The held-out PyPI corpus: fetched by the real `pip download` path from a local wheel folder (offline), checked
against its pinned sha256, unpacked with a manifest, refused as training data, and a clear error without a source."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from axl_model import corpora
from axl_model.cli import main
from axl_model.corpora import (HELD_OUT_MARKER, CorpusError, PinnedPackage, corpus_files, fetch_pypi_corpus,
                               refuse_held_out_training)
from axl_model.data import default_corpus
from axl_model.train import TrainConfig, train

MODULE = "def double(x):\n    return 2 * x\n\n\ndef triple(x):\n    return 3 * x\n"


def make_wheel(folder: Path, name: str = "tiny_pkg", version: str = "1.0") -> PinnedPackage:
    """A minimal valid py3-none-any wheel with two modules, a license and a file that must not be unpacked."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    dist_info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{name}/__init__.py", "from .core import double\n")
        archive.writestr(f"{name}/core.py", MODULE)
        archive.writestr(f"{name}/data.json", "{}")
        archive.writestr(f"{dist_info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                                  "License-Expression: MIT\n")
        archive.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                               "Tag: py3-none-any\n")
        archive.writestr(f"{dist_info}/licenses/LICENSE", "MIT License\n")
        archive.writestr(f"{dist_info}/RECORD", "")
    return PinnedPackage(name.replace("_", "-"), version, hashlib.sha256(wheel.read_bytes()).hexdigest(), "MIT")


@pytest.fixture()
def wheels(tmp_path: Path) -> tuple[Path, PinnedPackage]:
    return tmp_path / "wheels", make_wheel(tmp_path / "wheels")


def test_fetch_from_a_local_folder_unpacks_py_files_with_a_manifest(wheels, tmp_path: Path) -> None:
    folder, package = wheels
    out = tmp_path / "corpora" / "pypi"
    manifest = fetch_pypi_corpus(out, packages=[package], source=str(folder))
    assert manifest["packages"][0] == {
        "name": "tiny-pkg", "version": "1.0", "wheel": "tiny_pkg-1.0-py3-none-any.whl", "sha256": package.sha256,
        "license": "MIT", "declared_license": "MIT", "files": 2, "bytes": len(MODULE) + 25, "folder": "tiny-pkg-1.0"}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert (out / HELD_OUT_MARKER).is_file()
    assert (out / "tiny-pkg-1.0" / "tiny_pkg" / "core.py").read_text() == MODULE
    assert (out / "tiny-pkg-1.0" / "licenses" / "LICENSE.license").is_file()
    assert not (out / "tiny-pkg-1.0" / "tiny_pkg" / "data.json").exists()  # only code is unpacked
    assert [p.name for p in corpus_files("pypi", out.parent)] == ["__init__.py", "core.py"]


def test_a_complete_corpus_is_kept_and_a_file_url_works(wheels, tmp_path: Path, monkeypatch) -> None:
    folder, package = wheels
    out = tmp_path / "pypi"
    fetch_pypi_corpus(out, packages=[package], source=folder.as_uri())  # file:// URL
    monkeypatch.setattr(corpora, "_pip_download", lambda *a: pytest.fail("a complete corpus is not fetched again"))
    assert fetch_pypi_corpus(out, packages=[package], source=str(folder))["files"] == 2


def test_a_wheel_that_does_not_match_its_pin_is_refused(wheels, tmp_path: Path) -> None:
    folder, package = wheels
    wrong = PinnedPackage(package.name, package.version, "0" * 64, "MIT")
    with pytest.raises(CorpusError, match="could not download"):
        fetch_pypi_corpus(tmp_path / "pypi", packages=[wrong], source=str(folder))
    assert not (tmp_path / "pypi").exists() and corpus_files("pypi", tmp_path) == []


def test_no_network_gives_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens: as if offline
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(CorpusError, match=r"from PyPI \(no network"):
        fetch_pypi_corpus(tmp_path / "pypi", packages=corpora.PYPI_PACKAGES[:1])


def test_cli_fetches_and_reports_errors_in_one_line(wheels, tmp_path: Path, monkeypatch, capsys) -> None:
    folder, package = wheels
    monkeypatch.setattr(corpora, "PYPI_PACKAGES", (package,))
    out = tmp_path / "pypi"
    assert main(["data", "corpus", "pypi", "--source", str(folder), "--out", str(out)]) == 0
    assert "1 packages, 2 files" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "corpus", "pypi", "--source", str(empty), "--out", str(tmp_path / "x"), "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("axl: error: could not download the pinned wheels") and err.count("\n") == 1


def test_pinned_packages_are_not_project_dependencies() -> None:
    """The corpus is code the project never ships or installs: no pin is a dependency in pyproject.toml."""
    import re
    import tomllib

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    names = {re.split(r"[<>=\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}
    pinned = {p.name.lower() for p in corpora.PYPI_PACKAGES}
    assert not pinned & names
    assert 15 <= len(pinned) <= 30 and all(len(p.sha256) == 64 for p in corpora.PYPI_PACKAGES)


def test_training_refuses_a_held_out_corpus(wheels, tmp_path: Path) -> None:
    folder, package = wheels
    out = tmp_path / "data" / "corpora" / "pypi"
    fetch_pypi_corpus(out, packages=[package], source=str(folder))
    for path in (tmp_path / "data", out, out / "tiny-pkg-1.0" / "tiny_pkg" / "core.py", f"{out}/**/*.py"):
        with pytest.raises(ValueError, match="held-out corpus"):
            refuse_held_out_training([path])
    with pytest.raises(ValueError, match="held-out corpus"):
        train(TrainConfig(out_dir=str(tmp_path / "ck"), data=[str(tmp_path / "data")], check_ram=False))
    refuse_held_out_training(default_corpus())  # the default training data is not a held-out corpus
    refuse_held_out_training(None)
