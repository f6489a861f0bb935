"""Run untrusted (model-written or caller-written) Python behind real OS isolation, or refuse to run it.

Generated code never runs in the caller's process, and never without the fences below. Each call gets a fresh
directory and a new `python -I` process inside a **bubblewrap** (`bwrap`) sandbox:

- **namespaces**: no network at all (not even loopback), its own pid namespace (no view of other processes, and
  every process of the run dies with it), its own IPC and UTS namespaces;
- **file system**: an empty root with only the Python runtime and `/usr` mounted read-only, a fresh `/proc`, a
  minimal `/dev`, a private `/tmp`, and the run's own directory as `/sandbox` (its only writable place). The
  interpreter's `site-packages` are hidden: the program sees the standard library and nothing else of the host;
- **identity**: an unprivileged uid with no capabilities and `no_new_privs` (as root: a throw-away uid from an
  unused range via `setpriv`, so RLIMIT_NPROC holds; otherwise a user namespace, which needs no privilege);
- **an empty environment**: nothing of the caller's (API keys, the mesh secret) is visible, neither as variables
  nor through `/proc/<parent>/environ`, since the parent is outside the pid namespace;
- **limits**, set in the child before the program starts: address space, CPU seconds, file size, processes, no
  core files; and a wall-clock timeout that kills the whole run.

A program passes only when it **runs to its end** with exit status 0: the runner reports completion through a
private pipe after the program's last statement, so `exit()`, `sys.exit(0)` or `os._exit(0)` before the end is a
failure (as in OpenAI's HumanEval harness, where only a program that reaches its end passes).

**Fail closed.** When bubblewrap is missing or cannot set up its namespaces (e.g. a container whose seccomp
profile forbids user namespaces), :func:`run_untrusted` raises :class:`SandboxUnavailable` naming what is missing,
and the features built on it (`/v1/agent/solve`, `axl eval --humaneval`) refuse. An operator who accepts the risk
can set ``AXL_SANDBOX_UNSAFE_NO_ISOLATION=1``: code then runs as the caller's own user with only the limits and an
empty environment, and a warning is logged.

Typical use::

    result = run_untrusted("print(sum(range(10)))", timeout=5.0)
    assert result.status == "passed" and result.stdout == "45\\n"
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import logging
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

__all__ = [
    "SandboxStatus", "SandboxResult", "SandboxUnavailable", "run_untrusted", "sandbox_capabilities",
    "require_sandbox", "UNSAFE_ENV",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024
# The operator's explicit opt-out; its name says what it costs.
UNSAFE_ENV = "AXL_SANDBOX_UNSAFE_NO_ISOLATION"
# Throw-away uids (root mode) are drawn from this range; nothing else on the machine should own files or
# processes in it. Unprivileged mode maps the program to `nobody` inside its own user namespace.
_UID_RANGE = (61000, 64999)
_NOBODY = 65534
_SANDBOX_DIR = "/sandbox"


class SandboxStatus(str, enum.Enum):
    PASSED = "passed"  # ran to its end, exit code 0
    FAILED = "failed"  # an exception, a failed assert, a non-zero exit, or an exit before the end
    TIMEOUT = "timeout"  # wall-clock timeout or CPU-seconds limit
    MEMORY = "memory"  # MemoryError: the address-space limit was hit
    KILLED = "killed"  # ended by a signal other than the limits above
    ERROR = "error"  # the sandbox itself could not run the code


class SandboxUnavailable(RuntimeError):
    """OS isolation cannot be set up here; the message says what is missing and how to fix it."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    status: SandboxStatus
    returncode: int | None
    stdout: str
    stderr: str
    duration: float  # seconds, wall clock
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def passed(self) -> bool:
        return self.status is SandboxStatus.PASSED


# ---------------------------------------------------------------------------------------------------------
# The runner: executed in the sandbox before the untrusted code. It applies the limits (inside the namespaces,
# so RLIMIT_NPROC counts only this run's processes), takes the run's token and deletes it, runs main.py as
# __main__, and reports completion on the private pipe only if the program reached its end.
_RUNNER_SOURCE = r'''
import json, os, resource, sys

for _name, _value in json.loads(sys.argv[1]).items():
    resource.setrlimit(getattr(resource, _name), (_value, _value))
with open(".axl-token") as _f:
    _token = _f.read()
os.unlink(".axl-token")
with open("main.py", encoding="utf-8") as _f:
    _code = compile(_f.read(), "main.py", "exec")
del _f, _name, _value
_done_fd = int(sys.argv[2])
sys.argv = ["main.py"]
exec(_code, {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__})
sys.stdout.flush()
os.write(_done_fd, _token.encode())
'''


# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Isolation:
    available: bool
    mode: str  # "root" (setpriv to a throw-away uid), "userns" (unprivileged), or "" when unavailable
    reason: str = ""


@functools.lru_cache(maxsize=1)
def _isolation() -> _Isolation:
    """Probe once per process whether bubblewrap can isolate a Python run here."""
    bwrap = shutil.which("bwrap")
    if not bwrap:
        return _Isolation(False, "", "bubblewrap (`bwrap`) is not installed; install the `bubblewrap` package")
    mode = "root" if os.geteuid() == 0 else "userns"
    if mode == "root" and not shutil.which("setpriv"):
        return _Isolation(False, "", "`setpriv` (util-linux) is not installed")
    with tempfile.TemporaryDirectory(prefix="axl-sandbox-probe-") as probe_dir:
        uid = _UID_RANGE[1]
        if mode == "root":
            os.chown(probe_dir, uid, uid)
        argv = [*_bwrap_argv(mode, probe_dir, uid), _python(), "-I", "-B", "-c", "import os; os.getpid()"]
        try:
            done = subprocess.run(argv, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            return _Isolation(False, "", f"bubblewrap could not start: {exc}")
    if done.returncode != 0:
        detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
        return _Isolation(False, "", "bubblewrap could not set up its namespaces"
                          + (f" ({detail[-1]})" if detail else "")
                          + "; user namespaces may be disabled (sysctl kernel.unprivileged_userns_clone, or a "
                            "container seccomp profile that forbids them)")
    return _Isolation(True, mode)


def sandbox_capabilities() -> dict[str, bool | str]:
    """What the sandbox can do on this machine (probed once per process)."""
    iso = _isolation()
    return {"isolated": iso.available, "mode": iso.mode, "reason": iso.reason, "unsafe_opt_in": _unsafe_opt_in()}


def _unsafe_opt_in() -> bool:
    return os.environ.get(UNSAFE_ENV, "").strip().lower() in {"1", "true", "yes"}


def require_sandbox() -> None:
    """Raise :class:`SandboxUnavailable` unless untrusted code can run isolated (or the operator opted out)."""
    iso = _isolation()
    if iso.available:
        return
    if _unsafe_opt_in():
        _warn_unsafe(iso.reason)
        return
    raise SandboxUnavailable(
        f"the code sandbox is unavailable: {iso.reason}. Untrusted code is not run without isolation; set "
        f"{UNSAFE_ENV}=1 only if you accept running it as this service's own user"
    )


@functools.lru_cache(maxsize=1)
def _warn_unsafe(reason: str) -> None:
    logger.warning("%s is set: untrusted code runs WITHOUT isolation (network, files and processes of this "
                   "user are reachable) because %s", UNSAFE_ENV, reason)


def _python() -> str:
    """The base interpreter (a venv's python is a link to it): the sandbox sees the runtime, not the venv."""
    return os.path.realpath(sys.executable)


def _runtime_dirs() -> list[str]:
    """Directories of the Python runtime outside /usr that must be visible (read-only) in the sandbox."""
    dirs = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(_python()))}
    return sorted(d for d in dirs if not (d == "/usr" or d.startswith("/usr/")))


def _site_packages(prefix: str) -> list[str]:
    lib = os.path.join(prefix, "lib")
    found = []
    if os.path.isdir(lib):
        for entry in os.listdir(lib):
            site = os.path.join(lib, entry, "site-packages")
            if entry.startswith("python") and os.path.isdir(site):
                found.append(site)
    return found


def _bwrap_argv(mode: str, workdir: str, uid: int) -> list[str]:
    """The bubblewrap command line up to (not including) the interpreter."""
    argv = [shutil.which("bwrap") or "bwrap", "--die-with-parent", "--new-session", "--clearenv"]
    if mode == "root":  # bwrap runs privileged; setpriv below drops to the throw-away uid
        argv += ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    else:
        argv += ["--unshare-all", "--uid", str(_NOBODY), "--gid", str(_NOBODY), "--cap-drop", "ALL"]
    argv += ["--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    made: set[str] = set()
    for runtime in _runtime_dirs():
        # bwrap copies a missing parent's mode (e.g. /root's 0700); make each parent traversable.
        parent = os.path.dirname(runtime)
        chain = []
        while parent not in ("/", "") and parent not in made:
            chain.append(parent)
            parent = os.path.dirname(parent)
        for directory in reversed(chain):
            argv += ["--perms", "0755", "--dir", directory]
            made.add(directory)
        argv += ["--ro-bind", runtime, runtime]
        for site in _site_packages(runtime):
            argv += ["--tmpfs", site]
    argv += [
        "--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp",
        "--bind", workdir, _SANDBOX_DIR, "--chdir", _SANDBOX_DIR,
        "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", _SANDBOX_DIR, "--setenv", "TMPDIR", "/tmp",
        "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONHASHSEED", "0",
    ]
    if mode == "root":
        argv += [shutil.which("setpriv") or "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                 "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all"]
    return argv


_uids_in_use: set[int] = set()  # by this process's concurrent runs (e.g. HumanEval's parallel checks)
_uids_lock = threading.Lock()


def _pick_uid() -> int:
    """An unused uid from the throw-away range (no live process owns it, no run of ours holds it)."""
    with _uids_lock:
        uid = _free_uid(_uids_in_use)
        _uids_in_use.add(uid)
        return uid


def _release_uid(uid: int) -> None:
    with _uids_lock:
        _uids_in_use.discard(uid)


def _free_uid(reserved: set[int]) -> int:
    busy = set(reserved)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                busy.add(os.stat(f"/proc/{entry}").st_uid)
            except OSError:
                pass
    candidates = [uid for uid in range(*_UID_RANGE) if uid not in busy]
    if not candidates:
        raise RuntimeError(f"no free uid left in the sandbox range {_UID_RANGE}")
    return random.SystemRandom().choice(candidates)


class _CappedReader(threading.Thread):
    """Drains a pipe so the child never blocks on it, keeping only the first `limit` bytes."""

    def __init__(self, stream, limit: int):
        super().__init__(daemon=True)
        self.stream, self.limit = stream, limit
        self.chunks: list[bytes] = []
        self.kept = 0
        self.truncated = False

    def run(self) -> None:
        while chunk := self.stream.read(65536):
            room = self.limit - self.kept
            if room > 0:
                self.chunks.append(chunk[:room])
                self.kept += min(room, len(chunk))
            if len(chunk) > room:
                self.truncated = True
        self.stream.close()

    def data(self) -> bytes:
        return b"".join(self.chunks)

    def text(self) -> str:
        return self.data().decode("utf-8", errors="replace")


def run_untrusted(
    code: str,
    *,
    timeout: float = 5.0,
    memory_mb: int = 512,
    cpu_seconds: int | None = None,
    max_file_bytes: int = 1024 * 1024,
    max_processes: int = 8,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    stdin: str | None = None,
) -> SandboxResult:
    """Run `code` as a Python program in a fresh sandbox and report how it ended.

    Args:
        code: the program's source; it runs as `__main__` from `main.py` in an empty directory.
        timeout: wall-clock seconds before the whole run is killed.
        memory_mb: address-space limit (RLIMIT_AS) in MiB.
        cpu_seconds: CPU-time limit; defaults to ceil(timeout) + 2.
        max_file_bytes: largest file the program may write (RLIMIT_FSIZE).
        max_processes: RLIMIT_NPROC for the run's own processes.
        max_output_bytes: stdout and stderr are each truncated to this many bytes.
        stdin: text fed to the program's standard input (empty when None).

    Raises:
        SandboxUnavailable: isolation cannot be set up here and the operator has not opted out.
    """
    if timeout <= 0 or memory_mb <= 0 or max_file_bytes < 0 or max_processes < 1:
        raise ValueError(
            f"invalid sandbox limits: timeout={timeout}, memory_mb={memory_mb}, "
            f"max_file_bytes={max_file_bytes}, max_processes={max_processes}"
        )
    require_sandbox()
    iso = _isolation()
    if cpu_seconds is None:
        cpu_seconds = int(timeout) + 2
    limits = {"RLIMIT_AS": memory_mb << 20, "RLIMIT_CPU": cpu_seconds, "RLIMIT_FSIZE": max_file_bytes,
              "RLIMIT_NPROC": max_processes, "RLIMIT_CORE": 0}
    token = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="axl-sandbox-")
    uid = _pick_uid() if iso.mode == "root" else None
    started = time.monotonic()
    done_read, done_write = os.pipe()
    try:
        for name, text in (("main.py", code), ("_axl_runner.py", _RUNNER_SOURCE), (".axl-token", token)):
            with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
                f.write(text)
        runner = ["-I", "-B", "_axl_runner.py", json.dumps(limits), str(done_write)]
        if iso.available:
            if uid is not None:
                for name in os.listdir(workdir):
                    os.chown(os.path.join(workdir, name), uid, uid)
                os.chown(workdir, uid, uid)
            os.chmod(workdir, 0o700)
            argv = [*_bwrap_argv(iso.mode, workdir, uid or _NOBODY), _python(), *runner]
            env = {}
        else:  # the operator's explicit, logged opt-out (require_sandbox() checked it)
            argv = [_python(), *runner]
            env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
                   "PYTHONHASHSEED": "0"}
        try:
            proc = subprocess.Popen(
                argv, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True, close_fds=True, pass_fds=(done_write,),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return SandboxResult(SandboxStatus.ERROR, None, "", f"sandbox failed to start: {exc}",
                                 time.monotonic() - started)
        os.close(done_write)
        done_write = -1
        readers = [_CappedReader(proc.stdout, max_output_bytes), _CappedReader(proc.stderr, max_output_bytes),
                   _CappedReader(os.fdopen(done_read, "rb"), 64)]
        done_read = -1
        for reader in readers:
            reader.start()
        try:
            if stdin:
                proc.stdin.write(stdin.encode("utf-8"))
        except BrokenPipeError:
            pass
        finally:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc.pid)  # bwrap dies; its pid namespace, and every process of the run, dies with it
        proc.wait()
        for reader in readers:
            reader.join(timeout=5)
        duration = time.monotonic() - started
        stdout, stderr = readers[0].text(), readers[1].text()
        completed = readers[2].data() == token.encode()
        rc = proc.returncode
        last_line = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        if timed_out or rc == -signal.SIGXCPU:
            status = SandboxStatus.TIMEOUT
        elif rc == 0 and completed:
            status = SandboxStatus.PASSED
        elif rc == 0:
            status = SandboxStatus.FAILED
            stderr += "\nAXL sandbox: the program exited with status 0 before reaching its end (exit() or os._exit)\n"
        elif rc is not None and rc < 0:
            status = SandboxStatus.KILLED
        elif last_line.startswith("MemoryError"):
            status = SandboxStatus.MEMORY
        else:
            status = SandboxStatus.FAILED
        return SandboxResult(status, rc, stdout, stderr, duration, readers[0].truncated, readers[1].truncated)
    finally:
        if uid is not None:
            _release_uid(uid)
        for fd in (done_read, done_write):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
