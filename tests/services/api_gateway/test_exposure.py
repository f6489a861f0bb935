"""A gateway without API keys: refused on a non-loopback address unless --allow-open; on loopback, only local
Host names are answered (DNS rebinding)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from services.api_gateway.exposure import host_name, is_loopback_bind
from tests.support import REPO_ROOT, ServiceProcess, free_port

GATEWAY = "services.api_gateway"
# No registry runs: these tests look at who gets in, not at what is served.
BASE_ENV = {"AXL_REGISTRY_URL": f"http://127.0.0.1:{free_port()}", "AXL_REGISTRY_SECRET": "gateway-test-secret",
            "AXL_LOG_LEVEL": "info"}
StartService = Callable[..., ServiceProcess]


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("192.168.1.5", False), ("my-box.lan", False),
])
def test_loopback_binds(host: str, loopback: bool) -> None:
    assert is_loopback_bind(host) is loopback


@pytest.mark.parametrize(("header", "name"), [
    ("localhost:8880", "localhost"), ("LocalHost", "localhost"), ("127.0.0.1:1", "127.0.0.1"),
    ("[::1]:8880", "[::1]"), ("[::1]", "[::1]"), ("evil.example:8880", "evil.example"), ("", ""),
])
def test_host_names(header: str, name: str) -> None:
    assert host_name(header) == name


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AXL_")}
    return {**env, **BASE_ENV, "AXL_PORT": str(free_port()), **extra}


def test_an_open_gateway_on_a_public_address_refuses_to_start() -> None:
    done = subprocess.run([sys.executable, "-m", GATEWAY], cwd=REPO_ROOT, env=_env(AXL_HOST="0.0.0.0"),
                          capture_output=True, timeout=60)
    assert done.returncode == 2
    message = done.stderr.decode()
    assert "refusing to start" in message and "'0.0.0.0'" in message
    for hint in ("AXL_API_KEYS", "--allow-open", "AXL_ALLOW_OPEN", "127.0.0.1"):
        assert hint in message, hint


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            # Our own process's start line too: a port taken meanwhile by another process must not pass.
            if "Uvicorn running on" in log.read_text() and httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the gateway did not start:\n{log.read_text()}")


@pytest.fixture
def run_gateway(tmp_path: Path) -> Iterator[Callable[..., tuple[str, Path]]]:
    """Start ``python -m services.api_gateway [args]`` with extra env; returns (loopback URL, log path)."""
    procs: list[subprocess.Popen[bytes]] = []

    def run(*args: str, **env: str) -> tuple[str, Path]:
        full_env = _env(**env)
        log = tmp_path / f"gateway-{len(procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", GATEWAY, *args], cwd=REPO_ROOT, env=full_env,
                                    stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        url = f"http://127.0.0.1:{full_env['AXL_PORT']}"
        _wait_healthy(proc, url, log)
        return url, log

    yield run
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_allow_open_starts_it_and_says_so_loudly(run_gateway: Callable[..., tuple[str, Path]], how: str) -> None:
    if how == "flag":
        url, log = run_gateway("--allow-open", AXL_HOST="0.0.0.0")
    else:
        url, log = run_gateway(AXL_HOST="0.0.0.0", AXL_ALLOW_OPEN="true")
    assert "OPEN GATEWAY" in log.read_text()
    # Explicitly open to the network: any Host (the machine's name, its address) is served.
    assert httpx.get(url + "/healthz", headers={"Host": "my-box.lan:8880"}).status_code == 200


def test_an_open_loopback_gateway_answers_only_local_host_names(start_service: StartService) -> None:
    gateway = start_service(GATEWAY, {**BASE_ENV, "AXL_ALLOWED_HOSTS": "axl.internal"})
    port = gateway.port
    assert "answers every local process" in gateway.logs()
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST", f"axl.internal:{port}"):
        assert httpx.get(gateway.url + "/healthz", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example", "127.0.0.1.nip.io"):
        for response in (httpx.get(gateway.url + "/v1/models", headers={"Host": host}),
                         httpx.post(gateway.url + "/v1/completions", headers={"Host": host},
                                    json={"model": "axl-coder", "prompt": "x"})):
            assert response.status_code == 403, (host, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert (error["type"], error["code"]) == ("permission_error", "host_not_allowed")


def test_a_gateway_with_keys_does_not_check_the_host(start_service: StartService) -> None:
    gateway = start_service(GATEWAY, {**BASE_ENV, "AXL_API_KEYS": "sk-test"})
    response = httpx.get(gateway.url + "/v1/models", headers={"Host": "evil.example"})
    assert response.status_code == 401  # the key is what protects it, whatever the Host
