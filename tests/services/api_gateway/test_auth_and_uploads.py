"""Auth before any body is read, and uploads checked line by line as they stream to disk."""

from __future__ import annotations

import io
import json
import socket
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from axl_mesh.errors import APIError, InvalidRequestError
from services.api_gateway.routes.files import copy_checked
from tests.support import ServiceProcess

KEY = "sk-auth-test"


@pytest.fixture
def gateway(start_service: Callable[..., ServiceProcess], redis_url: str, tmp_path: Path) -> ServiceProcess:
    return start_service("services.api_gateway", {
        "AXL_REGISTRY_URL": "http://127.0.0.1:9", "AXL_REGISTRY_SECRET": "auth-test-secret", "AXL_API_KEYS": KEY,
        "AXL_REDIS_URL": redis_url, "AXL_DATA_DIR": str(tmp_path / "data"), "AXL_JOBS_KEY_PREFIX": "axl:auth-test",
        "AXL_LOG_LEVEL": "warning",
    })


def _raw_request(url: str, head: str, body_start: bytes = b"", timeout: float = 5.0) -> bytes:
    """Send the head and a little of a body that is never finished; return what the server answers."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body_start)
        answer = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            if time.monotonic() > deadline:
                break
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            answer += chunk
        return answer


@pytest.mark.parametrize("authorization", ["", f"Authorization: Bearer wrong-{KEY}\r\n"])
def test_a_request_without_a_valid_key_gets_its_401_before_its_body_is_sent(gateway, authorization) -> None:
    # 60 MB announced (under the upload limit, so only auth can refuse it early), a few bytes sent, the rest never.
    head = (f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n{authorization}"
            "Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 60000000").replace("\r\n\r\n", "\r\n")
    started = time.monotonic()
    answer = _raw_request(gateway.url, head, b"--xyz\r\n")
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert time.monotonic() - started < 3
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["type"] == "authentication_error" and body["error"]["code"] == "invalid_api_key"
    assert b"www-authenticate: Bearer" in answer.lower().replace(b"bearer", b"Bearer")


def test_open_paths_stay_open_and_every_v1_path_needs_the_key(gateway) -> None:
    assert httpx.get(gateway.url + "/healthz").status_code == 200
    assert httpx.get(gateway.url + "/metrics").status_code == 200
    for path in ("/v1/models", "/v1/completions", "/v1/nope", "/v1"):
        assert httpx.post(gateway.url + path, json={}).status_code == 401, path
    assert httpx.get(gateway.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code != 401


def test_a_deeply_nested_jsonl_line_is_a_400_naming_the_line(gateway) -> None:
    data = b'{"text": "fine"}\n' + b"[" * 100_000 + b"\n"
    answer = httpx.post(gateway.url + "/v1/files", headers={"Authorization": f"Bearer {KEY}"},
                        files={"file": ("deep.jsonl", data)}, data={"purpose": "fine-tune"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_jsonl" and "line 2" in error["message"] and "nested" in error["message"]
    ok = httpx.post(gateway.url + "/v1/files", headers={"Authorization": f"Bearer {KEY}"},
                    files={"file": ("pairs.jsonl", b'{"prompt": "a", "completion": "b"}\n')},
                    data={"purpose": "fine-tune"})
    assert ok.status_code == 200 and ok.json()["lines"] == 1 and ok.json()["bytes"] == 35


def _check(data: bytes, name: str = "f.jsonl", limit: int = 1 << 20) -> tuple[str, int, int, bytes]:
    target = io.BytesIO()
    fmt, lines, size = copy_checked(io.BytesIO(data), target, name, limit)
    return fmt, lines, size, target.getvalue()


def _error(data: bytes, name: str = "f.jsonl", limit: int = 1 << 20) -> APIError:
    with pytest.raises(APIError) as info:
        _check(data, name, limit)
    return info.value


def test_copy_checked_copies_exactly_and_counts_lines_as_the_trainer_does() -> None:
    data = b'{"text": "a"}\r\n\n{"prompt": "p", "completion": "c"}\n'
    assert _check(data) == ("jsonl", 2, len(data), data)
    text = b"x = 1\r\ny = 2\n\nz\rw"
    assert _check(text, "code.py") == ("text", len(text.decode().splitlines()), len(text), text)


@pytest.mark.parametrize("data, line, words", [
    (b'{"text": "a"}\n' + b"[" * 100_000, 2, "nested too deeply"),
    (b'{"text": "a"}\n\n' + b'{"n": ' + b"1" * 5000 + b"}", 3, "not valid JSON"),  # past int's digit limit
    (b'{"text": "a"}\n{"text": 1}\n', 2, "needs"),
    (b'{"prompt": "a"}\n', 1, "must both be strings"),
    (b"[1]\n", 1, "JSON object"),
])
def test_every_malformed_line_is_a_400_naming_it(data: bytes, line: int, words: str) -> None:
    error = _error(data)
    assert isinstance(error, InvalidRequestError) and error.code == "invalid_jsonl", error
    assert f"line {line}:" in error.message and words in error.message


def test_encoding_size_and_empty_errors() -> None:
    bad = _error(b"print('ok')\n\xff\xfe\n", "code.py")
    assert bad.code == "invalid_encoding" and "line 2" in bad.message and "byte offset 12" in bad.message
    big = _error(b"x = 1\n" * 50, "code.py", limit=100)
    assert big.status == 413 and "100 bytes" in big.message
    one_line = _error(b"x" * 1000, "code.py", limit=100)  # one line past the limit is never read whole
    assert one_line.status == 413
    assert _error(b"  \n\n", "empty.txt").code == "empty_file"


class _Sink:
    """A target file that keeps nothing (so only the copy's own memory is measured)."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)


def test_an_upload_is_never_held_whole_in_memory() -> None:
    record = json.dumps({"prompt": "def f():\n", "completion": "    return 1\n"}).encode() + b"\n"
    data = record * (4_000_000 // len(record))
    source, target = io.BytesIO(data), _Sink()
    tracemalloc.start()
    try:
        copied = copy_checked(source, target, "big.jsonl", 1 << 30)[2]  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert copied == len(data) == target.size
    # The old route held bytes, text and a list of lines at once: several times the file (4 MB); now one line.
    assert peak < 256_000, peak
