"""The sandbox runs generated code in a separate, fenced-off process; each fence is tested by breaking it."""

import os
import socket
import time

import pytest

from axl_model.sandbox import SandboxStatus, run_untrusted, sandbox_capabilities


def _live_runner_processes() -> list[int]:
    """Pids of sandbox processes still alive (zombies waiting for init to reap them do not count)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"_axl_runner.py" in cmdline and state != "Z":
            pids.append(int(entry))
    return pids


def test_normal_program_passes_with_output_and_stdin():
    result = run_untrusted("import sys\nprint(sum(range(10)))\nprint(sys.stdin.read().upper(), file=sys.stderr)",
                           stdin="hello")
    assert result.status is SandboxStatus.PASSED and result.passed
    assert result.returncode == 0
    assert result.stdout == "45\n"
    assert result.stderr == "HELLO\n"


def test_exception_fails_with_traceback():
    result = run_untrusted("def f():\n    assert 1 == 2, 'nope'\nf()")
    assert result.status is SandboxStatus.FAILED
    assert result.returncode == 1
    assert "AssertionError: nope" in result.stderr


def test_runs_in_its_own_empty_directory_with_scrubbed_environment(monkeypatch):
    monkeypatch.setenv("AXL_REGISTRY_SECRET", "do-not-leak")
    code = "import os\nprint(sorted(os.listdir('.')))\nprint('AXL_REGISTRY_SECRET' in os.environ)\nprint(os.getcwd())"
    result = run_untrusted(code)
    assert result.passed, result.stderr
    listing, leaked, cwd = result.stdout.splitlines()
    assert listing == "['_axl_runner.py', 'main.py']"
    assert leaked == "False"
    assert cwd != os.getcwd() and "axl-sandbox-" in cwd
    assert not os.path.exists(cwd), "the sandbox directory is removed afterwards"


def test_infinite_loop_is_stopped_by_the_timeout():
    started = time.monotonic()
    result = run_untrusted("while True:\n    pass", timeout=1.0)
    assert result.status is SandboxStatus.TIMEOUT
    assert time.monotonic() - started < 10
    assert _live_runner_processes() == []


def test_sleeping_program_is_stopped_by_the_wall_clock():
    result = run_untrusted("import time\ntime.sleep(60)", timeout=1.0)
    assert result.status is SandboxStatus.TIMEOUT
    assert result.duration < 10


def test_memory_bomb_is_stopped():
    result = run_untrusted("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))", memory_mb=256)
    assert result.status is SandboxStatus.MEMORY, result.stderr


def test_fork_bomb_is_stopped_and_leaves_no_process():
    result = run_untrusted("import os\nwhile True:\n    os.fork()", timeout=3.0)
    assert not result.passed
    assert "PermissionError" in result.stderr
    assert _live_runner_processes() == []


@pytest.mark.skipif(not sandbox_capabilities()["throwaway_uid"], reason="needs root and setpriv for the uid fence")
def test_fork_bomb_that_gets_around_the_guard_hits_the_process_limit_and_is_cleaned_up():
    # Re-importing the builtin posix module restores the real fork: only the OS-level fences remain.
    code = (
        "import sys, time\n"
        "del sys.modules['posix']\n"
        "import posix\n"
        "children = 0\n"
        "while True:\n"
        "    try:\n"
        "        if posix.fork() == 0:\n"
        "            time.sleep(60)\n"
        "        children += 1\n"
        "    except OSError as exc:\n"
        "        print('fork refused after', children, exc)\n"
        "        break\n"
    )
    result = run_untrusted(code, timeout=3.0, max_processes=8)
    assert "fork refused after" in result.stdout
    refused_after = int(result.stdout.split("fork refused after")[1].split()[0])
    assert refused_after < 8
    assert _live_runner_processes() == [], "sleeping children must be killed with the run"


def test_writing_outside_the_sandbox_is_refused(tmp_path):
    target = tmp_path / "outside.txt"
    code = (
        f"open({str(target)!r}, 'w').write('escaped')\n"
    )
    result = run_untrusted(code)
    assert result.status is SandboxStatus.FAILED
    assert "PermissionError" in result.stderr
    assert not target.exists()

    result = run_untrusted(f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)")
    assert "PermissionError" in result.stderr
    assert not target.exists()


def test_writing_inside_the_sandbox_works_up_to_the_file_size_limit():
    ok = run_untrusted("open('out.txt', 'w').write('x' * 1000)\nprint(len(open('out.txt').read()))")
    assert ok.passed and ok.stdout == "1000\n"
    too_big = run_untrusted("open('out.txt', 'w').write('x' * 200_000)", max_file_bytes=100_000)
    assert not too_big.passed


def test_network_access_is_refused():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n"
        result = run_untrusted(code)
        assert result.status is SandboxStatus.FAILED
        listener.settimeout(0.2)
        with pytest.raises(socket.timeout):
            listener.accept()


@pytest.mark.skipif(not sandbox_capabilities()["net_namespace"], reason="needs root and unshare for the network fence")
def test_network_is_absent_even_when_the_guard_is_bypassed():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        code = (
            "import sys\n"
            "for name in ('socket', '_socket'):\n"
            "    del sys.modules[name]\n"
            "import _socket\n"
            "s = _socket.socket()\n"
            f"s.connect(('127.0.0.1', {port}))\n"
        )
        result = run_untrusted(code)
        assert result.status is SandboxStatus.FAILED
        assert "OSError" in result.stderr or "unreachable" in result.stderr
        listener.settimeout(0.2)
        with pytest.raises(socket.timeout):
            listener.accept()


def test_output_is_truncated():
    result = run_untrusted("print('y' * 100_000)", max_output_bytes=1000)
    assert result.passed
    assert len(result.stdout) == 1000 and result.stdout_truncated


def test_invalid_limits_raise():
    with pytest.raises(ValueError, match="timeout"):
        run_untrusted("pass", timeout=0)
