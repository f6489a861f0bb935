"""Helpers for tests that boot real processes: free ports, a redis-server, a service run as ``python -m``.

Fixtures wrapping these live in ``tests/conftest.py``; import the helpers directly when a fixture's scope does not
fit (``from tests.support import ServiceProcess, free_port``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _stop_process(proc: subprocess.Popen[bytes], grace_seconds: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


class RedisServer:
    """A throw-away ``redis-server`` on a free port, no persistence; ``url`` points at DB 0 (and carries
    ``password``, which the server then requires, when one is given).

    With ``acl_users`` (user -> password; ``acl_prefixes`` as for ``axl_mesh.redis_acl.acl_directives``) it runs
    the mesh's ACL instead: the default user off, the mesh's users with their key patterns; ``url_for(user)`` is a
    user's URL and ``url`` is then the jobs user's."""

    def __init__(self, log_path: Path, password: str | None = None, *, acl_users: dict[str, str] | None = None,
                 acl_prefixes: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.password = password
        self.acl_users = acl_users
        self.acl_prefixes = acl_prefixes or {}
        self.url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{self.port}/0"
        if acl_users:
            from axl_mesh.redis_acl import JOBS_USER

            self.url = self.url_for(JOBS_USER)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def url_for(self, user: str) -> str:
        """The URL logging in as ``user`` of ``acl_users``."""
        from axl_mesh.redis_acl import url_for_user

        assert self.acl_users is not None, "started without acl_users"
        return url_for_user(f"redis://127.0.0.1:{self.port}/0", user, self.acl_users[user])

    def start(self, timeout_seconds: float = 10.0) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH: install Redis, or set AXL_TEST_REDIS_URL")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        config = b""
        if self.acl_users:  # the ACL on stdin ("-": config read from stdin), as the launcher gives it
            from axl_mesh.redis_acl import acl_directives

            args.insert(1, "-")
            config = "".join(line + "\n" for line in acl_directives(self.acl_users, **self.acl_prefixes)).encode()
        elif self.password:
            args += ["--requirepass", self.password]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.PIPE if config else None, stdout=log,
                                         stderr=subprocess.STDOUT)
        if config:
            assert self.proc.stdin is not None
            self.proc.stdin.write(config)
            self.proc.stdin.close()
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{_tail(self.log_path)}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith((b"+PONG", b"-NOAUTH")):  # up (NOAUTH: up, with a password)
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING within {timeout_seconds}s:\n{_tail(self.log_path)}")

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc, grace_seconds=5)


class ServiceProcess:
    """One of our services run as ``python -m <module>`` on a free port of ``host`` (127.0.0.1; another loopback
    address such as 127.0.0.2 plays another machine), ready once ``health_path`` is 200.

    The environment is the test process's minus every ``AXL_*`` variable (so a developer's settings never leak in),
    plus ``AXL_HOST``/``AXL_PORT``, ``AXL_DATA_DIR`` (``data`` beside the log) and ``env``. Output goes to
    ``log_path``; a failed start raises with its tail.

        with ServiceProcess("services.mesh_registry", {"AXL_REDIS_URL": url}, log_path=tmp / "reg.log") as svc:
            httpx.get(svc.url + "/v1/models")
    """

    def __init__(
        self,
        module: str,
        env: dict[str, str] | None = None,
        *,
        log_path: Path,
        port: int | None = None,
        health_path: str = "/healthz",
        host: str = "127.0.0.1",
    ) -> None:
        self.module = module
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.health_path = health_path
        self.log_path = log_path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AXL_")}
        # Its own data folder beside its log: the settings' default ("data", relative to the repository it runs
        # in) holds the developer's models and uploads after `make up` and a fine-tune.
        self.env.update({"AXL_HOST": host, "AXL_PORT": str(self.port), "PYTHONUNBUFFERED": "1",
                         "AXL_DATA_DIR": str(log_path.parent / "data")})
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_seconds: float = 30.0) -> ServiceProcess:
        """Start the process and wait until its health endpoint answers 200."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.module} is already running (pid {self.proc.pid})")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module], cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.module} exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + self.health_path, timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.module} was not healthy within {timeout_seconds}s:\n{self.logs()}")

    def stop(self, grace_seconds: float = 10.0) -> None:
        """SIGTERM (graceful shutdown), then SIGKILL after ``grace_seconds``."""
        if self.proc is not None:
            _stop_process(self.proc, grace_seconds)

    def restart(self, timeout_seconds: float = 30.0) -> ServiceProcess:
        """Stop and start again on the same port with the same environment."""
        self.stop()
        return self.start(timeout_seconds)

    def logs(self, lines: int = 60) -> str:
        return _tail(self.log_path, lines)

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
