"""Tests never read or write the developer's state: `make up` and a fine-tune fill ``data/`` and ``checkpoints/`` in
the repository, and the shell may hold AXL_* settings; the suite must pass regardless (see tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from axl_mesh.jobs import JobsSettings
from tests.support import REPO_ROOT, ServiceProcess


def _outside_the_repository(path: Path) -> bool:
    return not path.resolve().is_relative_to(REPO_ROOT)


def test_settings_in_the_test_process_use_a_temporary_data_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    settings = JobsSettings()
    for folder in (settings.data_dir, settings.resolved_files_dir, settings.resolved_jobs_dir,
                   settings.resolved_model_store_dir):
        assert _outside_the_repository(folder), folder
        assert folder.resolve().is_relative_to(tmp_path_factory.getbasetemp().resolve()), folder


def test_each_test_has_its_own_data_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    mine = os.environ["AXL_DATA_DIR"]
    assert mine != os.environ.get("_AXL_ISOLATION_PREVIOUS", "")
    os.environ["_AXL_ISOLATION_PREVIOUS"] = mine  # the next test must see another folder


def test_each_test_has_its_own_data_folder_again() -> None:
    assert os.environ["AXL_DATA_DIR"] != os.environ.pop("_AXL_ISOLATION_PREVIOUS", "")


def test_a_service_process_gets_a_data_folder_beside_its_log(tmp_path: Path) -> None:
    service = ServiceProcess("services.api_gateway", log_path=tmp_path / "gateway.log")
    assert service.env["AXL_DATA_DIR"] == str(tmp_path / "data")
    explicit = ServiceProcess("services.api_gateway", {"AXL_DATA_DIR": str(tmp_path / "shared")},
                              log_path=tmp_path / "gateway.log")
    assert explicit.env["AXL_DATA_DIR"] == str(tmp_path / "shared")


def test_settings_of_the_shell_do_not_reach_the_tests(tmp_path: Path) -> None:
    """Run this file's first test under a shell that points every data setting at the repository."""
    if os.environ.get("_AXL_ISOLATION_INNER"):
        pytest.skip("already the inner run")
    env = {**os.environ, "_AXL_ISOLATION_INNER": "1", "AXL_DATA_DIR": str(REPO_ROOT / "data"),
           "AXL_MODEL_STORE_DIR": str(REPO_ROOT / "data" / "models"), "AXL_API_KEYS": "sk-from-the-shell"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "inner"),
         f"{__file__}::test_settings_in_the_test_process_use_a_temporary_data_folder",
         f"{__file__}::test_the_shell_api_keys_are_dropped"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout, result.stdout


def test_the_shell_api_keys_are_dropped() -> None:
    assert "AXL_API_KEYS" not in os.environ and "AXL_MODEL_STORE_DIR" not in os.environ
