"""Run untrusted (model-generated) Python in a separate, fenced-off process.

Generated code never runs in the caller's process. Each call gets a fresh temporary directory as its
working directory and a new `python -I` process (isolated mode: no PYTHON* variables, no user site,
no script directory on sys.path) in its own session / process group, with a scrubbed environment.
The fences, outermost first; each one that is available is used, and `sandbox_capabilities()` says which:

1. **Network namespace** (`unshare -n`, needs root): the child has no network at all, not even loopback.
2. **Throw-away user id** (`setpriv`, needs root): the child runs as an unused uid, so RLIMIT_NPROC
   is enforced (the kernel ignores it for uid 0, and counts every process of the uid), it cannot write
   anywhere the uid does not own, and after the run every process of that uid is killed (`kill -1`),
   which also reaps children that escaped the process group. It keeps only CAP_DAC_READ_SEARCH so it
   can read the interpreter and the standard library when they live under a private directory such as
   /root (read-only: the capability grants no writes); `--no-new-privs` stops setuid binaries.
3. **Resource limits** (`resource.setrlimit` in the child before exec): address space, CPU seconds,
   file size, number of processes, no core files.
4. **Guard module** executed in the child before the untrusted code: disables fork/exec/spawn/system,
   subprocess, socket creation, ctypes, `os.chdir` outside the sandbox directory, and opening,
   creating, removing or renaming files outside it. A determined attacker can get around an in-process
   guard, which is why the layers above exist; for ordinary buggy code it turns a fork bomb or a stray
   write into a clear exception.
5. **Wall-clock timeout**: the whole process group is SIGKILLed when it runs out.

Typical use::

    result = run_untrusted("print(sum(range(10)))", timeout=5.0)
    assert result.status == "passed" and result.stdout == "45\\n"
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

__all__ = ["SandboxStatus", "SandboxResult", "run_untrusted", "sandbox_capabilities"]

DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024
# Throw-away uids are drawn from this range; nothing else on the machine should own files or processes in it.
_UID_RANGE = (61000, 64999)
_KEPT_CAPABILITY = "dac_read_search"


class SandboxStatus(str, enum.Enum):
    PASSED = "passed"  # exit code 0
    FAILED = "failed"  # non-zero exit code (an exception, a failed assert, sys.exit(1))
    TIMEOUT = "timeout"  # wall-clock timeout or CPU-seconds limit
    MEMORY = "memory"  # MemoryError: the address-space limit was hit
    KILLED = "killed"  # ended by a signal other than the limits above
    ERROR = "error"  # the sandbox itself could not run the code


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
# The guard: source executed in the child before the untrusted code. It reads the code from main.py in the
# sandbox directory and runs it as __main__, so tracebacks name "main.py".
_RUNNER_SOURCE = r'''
import builtins, io, os, posix, sys

_ROOT = os.path.realpath(os.getcwd())
_ALLOWED_DEVICES = {"/dev/null", "/dev/stdout", "/dev/stderr"}


def _refuse(*_args, **_kwargs):
    raise PermissionError("not allowed in the AXL sandbox")


def _inside(path):
    try:
        path = os.fsdecode(path)
    except TypeError:
        return True  # a file descriptor: already opened, nothing new is reached
    real = os.path.realpath(path)
    return real == _ROOT or real.startswith(_ROOT + os.sep) or real in _ALLOWED_DEVICES


def _writes(mode):
    return any(ch in str(mode) for ch in "wax+")


_open = builtins.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if _writes(mode) and not isinstance(file, int) and not _inside(file):
        raise PermissionError(f"writing outside the sandbox directory is not allowed: {file!r}")
    return _open(file, mode, *args, **kwargs)
builtins.open = io.open = _guarded_open

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_os_open = posix.open
def _guarded_os_open(path, flags, *args, **kwargs):
    if flags & _WRITE_FLAGS and not _inside(path):
        raise PermissionError(f"writing outside the sandbox directory is not allowed: {path!r}")
    return _os_open(path, flags, *args, **kwargs)

def _path_guard(func, n_paths=1):
    def guarded(*args, **kwargs):
        for path in args[:n_paths]:
            if not _inside(path):
                raise PermissionError(f"{func.__name__} outside the sandbox directory is not allowed: {path!r}")
        return func(*args, **kwargs)
    return guarded

for _module in (os, posix):
    _module.open = _guarded_os_open
    for _name, _n in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("mkdir", 1), ("chdir", 1),
                      ("rename", 2), ("replace", 2), ("link", 2), ("symlink", 2), ("truncate", 1),
                      ("chmod", 1), ("chown", 1), ("lchown", 1), ("utime", 1), ("mkfifo", 1), ("mknod", 1)):
        if hasattr(posix, _name):
            setattr(_module, _name, _path_guard(getattr(posix, _name), _n))
    for _name in ("fork", "forkpty", "vfork", "system", "popen", "kill", "killpg", "setsid",
                  "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                  "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe",
                  "posix_spawn", "posix_spawnp", "fchdir", "chroot", "setuid", "setgid"):
        if hasattr(_module, _name):
            setattr(_module, _name, _refuse)

import _posixsubprocess
_posixsubprocess.fork_exec = _refuse
import subprocess
subprocess.Popen = _refuse
subprocess._fork_exec = _refuse

import _socket, socket
class _NoSocket(_socket.socket):
    def __init__(self, *args, **kwargs):
        raise PermissionError("network access is not allowed in the AXL sandbox")
_socket.socket = _socket.SocketType = socket.socket = socket.SocketType = _NoSocket
socket.socketpair = socket.create_connection = socket.create_server = socket.fromfd = _refuse

# ctypes would reach libc directly and step around everything above.
sys.modules["ctypes"] = None
sys.modules["_ctypes"] = None

with _open(os.path.join(_ROOT, "main.py"), encoding="utf-8") as _f:
    _source = _f.read()
_code = compile(_source, "main.py", "exec")
del _f, _source, _module, _name, _n
sys.argv = ["main.py"]
exec(_code, {"__name__": "__main__", "__file__": "main.py", "__builtins__": builtins})
'''


# ---------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def sandbox_capabilities() -> dict[str, bool]:
    """Which OS-level fences work on this machine (probed once per process)."""
    is_root = os.geteuid() == 0
    unshare = shutil.which("unshare")
    setpriv = shutil.which("setpriv")
    net_namespace = bool(is_root and unshare and _probe([unshare, "-n", sys.executable, "-I", "-c", "pass"]))
    throwaway_uid = False
    if is_root and setpriv:
        uid = _UID_RANGE[1]
        with tempfile.TemporaryDirectory(prefix="axl-sandbox-probe-") as probe_dir:
            os.chown(probe_dir, uid, uid)
            throwaway_uid = _probe([*_setpriv_prefix(setpriv, uid), sys.executable, "-I", "-c", "import os"], cwd=probe_dir)
    return {"net_namespace": net_namespace, "throwaway_uid": throwaway_uid, "rlimits": True, "guard": True}


def _probe(argv: list[str], cwd: str | None = None) -> bool:
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _setpriv_prefix(setpriv: str, uid: int) -> list[str]:
    return [
        setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
        f"--inh-caps=-all,+{_KEPT_CAPABILITY}", f"--ambient-caps=-all,+{_KEPT_CAPABILITY}",
        f"--bounding-set=-all,+{_KEPT_CAPABILITY}",
    ]


def _pick_uid() -> int:
    """An unused uid from the throw-away range (no live process owns it)."""
    busy = set()
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


def _kill_uid(uid: int) -> None:
    """SIGKILL every process that runs as `uid` (kill(-1) as that uid spares only the caller itself)."""
    setpriv = shutil.which("setpriv")
    kill = shutil.which("kill")
    if setpriv and kill:
        subprocess.run([setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", kill, "-9", "-1"],
                       capture_output=True, timeout=30)


def _limits(memory_mb: int, cpu_seconds: int, max_file_bytes: int, max_processes: int):
    def apply() -> None:  # runs in the child between fork and exec
        memory = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
        resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


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

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", errors="replace")


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
    """Run `code` as a Python program in a fresh sandboxed process and report how it ended.

    Args:
        code: the program's source; it runs as `__main__` from `main.py` in an empty temporary directory.
        timeout: wall-clock seconds before the whole process group is killed.
        memory_mb: address-space limit (RLIMIT_AS) in MiB.
        cpu_seconds: CPU-time limit; defaults to ceil(timeout) + 1.
        max_file_bytes: largest file the program may write (RLIMIT_FSIZE).
        max_processes: RLIMIT_NPROC (enforced when the throw-away uid is available).
        max_output_bytes: stdout and stderr are each truncated to this many bytes.
        stdin: text fed to the program's standard input (empty when None).
    """
    if timeout <= 0 or memory_mb <= 0 or max_file_bytes < 0 or max_processes < 1:
        raise ValueError(
            f"invalid sandbox limits: timeout={timeout}, memory_mb={memory_mb}, "
            f"max_file_bytes={max_file_bytes}, max_processes={max_processes}"
        )
    if cpu_seconds is None:
        cpu_seconds = int(timeout) + 2
    caps = sandbox_capabilities()
    workdir = tempfile.mkdtemp(prefix="axl-sandbox-")
    uid = _pick_uid() if caps["throwaway_uid"] else None
    started = time.monotonic()
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        with open(os.path.join(workdir, "_axl_runner.py"), "w", encoding="utf-8") as f:
            f.write(_RUNNER_SOURCE)
        argv = [sys.executable, "-I", "-B", "_axl_runner.py"]
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chmod(workdir, 0o700)
            argv = [*_setpriv_prefix(shutil.which("setpriv"), uid), *argv]
        if caps["net_namespace"]:
            argv = [shutil.which("unshare"), "-n", *argv]
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0"}
        try:
            proc = subprocess.Popen(
                argv, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                preexec_fn=_limits(memory_mb, cpu_seconds, max_file_bytes, max_processes),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return SandboxResult(SandboxStatus.ERROR, None, "", f"sandbox failed to start: {exc}",
                                 time.monotonic() - started)
        readers = [_CappedReader(proc.stdout, max_output_bytes), _CappedReader(proc.stderr, max_output_bytes)]
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
        _kill_group(proc.pid)
        if uid is not None:
            _kill_uid(uid)
        proc.wait()
        for reader in readers:
            reader.join(timeout=5)
        duration = time.monotonic() - started
        stdout, stderr = readers[0].text(), readers[1].text()
        rc = proc.returncode
        last_line = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        if timed_out or rc == -signal.SIGXCPU:
            status = SandboxStatus.TIMEOUT
        elif rc == 0:
            status = SandboxStatus.PASSED
        elif rc is not None and rc < 0:
            status = SandboxStatus.KILLED
        elif last_line.startswith("MemoryError"):
            status = SandboxStatus.MEMORY
        else:
            status = SandboxStatus.FAILED
        return SandboxResult(status, rc, stdout, stderr, duration, readers[0].truncated, readers[1].truncated)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
