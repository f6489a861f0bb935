"""The sandbox runs generated code in a separate, fenced-off process; each fence is tested by breaking it."""

import logging
import os
import socket
import time
from pathlib import Path

import pytest

from axl_model import sandbox
from axl_model.sandbox import SandboxStatus, SandboxUnavailable, run_untrusted, sandbox_capabilities

pytestmark = pytest.mark.skipif(
    not sandbox_capabilities()["isolated"] and not os.environ.get("CI"),
    reason=f"no OS isolation here: {sandbox_capabilities()['reason']} (CI installs bubblewrap and runs these)",
)


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


def _assert_no_runner_left() -> None:
    deadline = time.monotonic() + 5  # a pid namespace dies with its first process, a moment after the kill
    while _live_runner_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _live_runner_processes() == []


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


def test_runs_in_its_own_directory_with_an_empty_environment(monkeypatch):
    monkeypatch.setenv("AXL_REGISTRY_SECRET", "do-not-leak")
    code = "import os\nprint(sorted(os.listdir('.')))\nprint(dict(os.environ).get('AXL_REGISTRY_SECRET'))\nprint(os.getcwd())"
    result = run_untrusted(code)
    assert result.passed, result.stderr
    listing, leaked, cwd = result.stdout.splitlines()
    assert listing == "['_axl_runner.py', 'main.py']", "the run's token is deleted before the program starts"
    assert leaked == "None"
    assert cwd == "/sandbox"


def test_infinite_loop_is_stopped_by_the_timeout():
    started = time.monotonic()
    result = run_untrusted("while True:\n    pass", timeout=1.0)
    assert result.status is SandboxStatus.TIMEOUT
    assert time.monotonic() - started < 10
    _assert_no_runner_left()


def test_sleeping_program_is_stopped_by_the_wall_clock():
    result = run_untrusted("import time\ntime.sleep(60)", timeout=1.0)
    assert result.status is SandboxStatus.TIMEOUT
    assert result.duration < 10


def test_memory_bomb_is_stopped():
    result = run_untrusted("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))", memory_mb=256)
    assert result.status is SandboxStatus.MEMORY, result.stderr


def test_fork_bomb_hits_the_process_limit_and_leaves_no_process():
    code = (
        "import os, time\n"
        "children = 0\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60)\n"
        "        children += 1\n"
        "    except OSError as exc:\n"
        "        print('fork refused after', children, exc)\n"
        "        break\n"
    )
    result = run_untrusted(code, timeout=3.0, max_processes=8)
    assert "fork refused after" in result.stdout, result.stderr
    refused_after = int(result.stdout.split("fork refused after")[1].split()[0])
    assert refused_after < 8
    _assert_no_runner_left()


# ---- the escapes found in review (issue 8): each one must fail --------------------------------------------
def test_the_parents_environment_is_out_of_reach(monkeypatch):
    monkeypatch.setenv("AXL_API_KEYS", "sk-do-not-leak-0123")
    code = (
        "import os\n"
        "found = []\n"
        "for pid in [os.getppid()] + [p for p in os.listdir('/proc') if p.isdigit()]:\n"
        "    try:\n"
        "        found.append(open('/proc/%s/environ' % pid, 'rb').read())\n"
        "    except OSError:\n"
        "        pass\n"
        "print(b''.join(found))\n"
    )
    result = run_untrusted(code)
    assert "sk-do-not-leak" not in result.stdout + result.stderr


def test_no_other_process_is_visible():
    result = run_untrusted("import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    assert result.passed, result.stderr
    assert max(eval(result.stdout)) < 10, "its own pid namespace: only the run's processes"
    assert str(os.getpid()) not in result.stdout.strip("[]\n").split(", ")


def _listener():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    return listener


def test_network_to_loopback_is_absent():
    with _listener() as listener:
        port = listener.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n"
        result = run_untrusted(code)
        assert result.status is SandboxStatus.FAILED
        with pytest.raises(socket.timeout):
            listener.accept()


def test_the_socket_base_class_reaches_no_network_either():
    with _listener() as listener:
        port = listener.getsockname()[1]
        code = f"import socket\ns = socket.socket.__bases__[0](2, 1)\ns.connect(('127.0.0.1', {port}))\nprint('connected')"
        result = run_untrusted(code)
        assert "connected" not in result.stdout
        assert result.status is SandboxStatus.FAILED
        with pytest.raises(socket.timeout):
            listener.accept()


def test_raw_file_io_cannot_write_outside_its_directory(tmp_path):
    os.chmod(tmp_path, 0o777)  # even a world-writable folder of the host is out of reach
    target = tmp_path / "escaped.txt"
    result = run_untrusted(f"import _io\n_io.FileIO({str(target)!r}, 'w').write(b'escaped')")
    assert result.status is SandboxStatus.FAILED
    assert not target.exists()
    # /tmp is the run's own: a write there succeeds and never reaches the host's /tmp
    host_tmp = Path("/tmp") / f"axl-escape-{os.getpid()}.txt"
    result = run_untrusted(f"import _io\n_io.FileIO({str(host_tmp)!r}, 'w').write(b'escaped')")
    assert not host_tmp.exists()


def test_files_outside_its_directory_cannot_be_read(tmp_path):
    secret = tmp_path / "mesh.yaml"
    secret.write_text("registry_secret: do-not-leak\n")
    os.chmod(tmp_path, 0o755)
    os.chmod(secret, 0o644)  # even a world-readable file of the host is not there
    for path in (secret, Path(__file__), Path("/etc/shadow"), Path("/etc/passwd")):
        result = run_untrusted(f"print(open({str(path)!r}).read())")
        assert result.status is SandboxStatus.FAILED, path
        assert "do-not-leak" not in result.stdout


def test_the_python_runtime_is_read_only_and_has_no_site_packages():
    code = (
        "import os, sys\n"
        "try:\n"
        "    open(os.path.join(os.path.dirname(os.__file__), 'pwned.py'), 'w')\n"
        "    print('wrote')\n"
        "except OSError as exc:\n"
        "    print('refused')\n"
        "try:\n"
        "    import torch\n"
        "    print('torch')\n"
        "except ImportError:\n"
        "    print('no torch')\n"
    )
    result = run_untrusted(code)
    assert result.passed, result.stderr
    assert result.stdout.split() == ["refused", "no", "torch"]


@pytest.mark.parametrize("ending", ["import os\nos._exit(0)", "exit()", "import sys\nsys.exit(0)", "quit(0)"])
def test_exiting_before_the_end_is_a_failure(ending):
    result = run_untrusted(f"{ending}\nassert False, 'the checks below never ran'\n")
    assert result.status is SandboxStatus.FAILED, result
    assert "before reaching its end" in result.stderr


def test_writing_inside_the_sandbox_works_up_to_the_file_size_limit():
    ok = run_untrusted("open('out.txt', 'w').write('x' * 1000)\nprint(len(open('out.txt').read()))")
    assert ok.passed and ok.stdout == "1000\n"
    scratch = run_untrusted("import tempfile\nwith tempfile.TemporaryFile() as f:\n    f.write(b'x')\nprint('ok')")
    assert scratch.passed, scratch.stderr
    too_big = run_untrusted("open('out.txt', 'w').write('x' * 200_000)", max_file_bytes=100_000)
    assert not too_big.passed


# ---- fail closed -----------------------------------------------------------------------------------------
@pytest.fixture
def no_bwrap(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no bwrap, no setpriv
    sandbox._isolation.cache_clear()
    yield
    sandbox._isolation.cache_clear()


def test_without_isolation_it_refuses_and_says_what_is_missing(no_bwrap, monkeypatch):
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    assert sandbox_capabilities()["isolated"] is False
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        run_untrusted("print('ran')")


def test_the_unsafe_opt_in_runs_without_isolation_and_logs_it(no_bwrap, monkeypatch, caplog):
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
    sandbox._warn_unsafe.cache_clear()
    with caplog.at_level(logging.WARNING, logger="axl_model.sandbox"):
        result = run_untrusted("print('ran')")
    assert result.passed and result.stdout == "ran\n"
    assert "WITHOUT isolation" in caplog.text


def test_output_is_truncated():
    result = run_untrusted("print('y' * 100_000)", max_output_bytes=1000)
    assert result.passed
    assert len(result.stdout) == 1000 and result.stdout_truncated


def test_invalid_limits_raise():
    with pytest.raises(ValueError, match="timeout"):
        run_untrusted("pass", timeout=0)
