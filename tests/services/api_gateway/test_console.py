"""The web console (/ui) over plain HTTP with the test client: login, logout, sessions, CSRF, every page rendering,
user strings escaped, the curves endpoint, cancel, and the open gateway's console (Host check included).

The registry and the workers are fakes here (tests/e2e/test_console_browser.py drives real ones in Chromium);
job records live in the session's private Redis, written with the job store as the trainer writes them."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from axl_mesh.jobs import JobKind, JobsSettings, open_store
from axl_mesh.model_store import MANIFEST
from axl_mesh.registry_client import RegistryError
from axl_mesh.registry_schemas import InstanceRecord, ModelSummary
from axl_mesh.worker_protocol import GenerateRequest, StreamEnd, StreamPiece, Usage
from services.api_gateway.console.evaluations import NOT_MEASURED
from services.api_gateway.console.mesh_view import TokenRates, parse_counter
from services.api_gateway.console.routes import curves
from services.api_gateway.console.session import CSRF_COOKIE, SESSION_COOKIE, ConsoleAuth
from services.api_gateway.main import create_app
from services.api_gateway.settings import Settings
from services.api_gateway.upstream import ResolvedModel

KEY = "sk-console-test"
SECRET = "console-test-secret"
EVIL = '<script>alert("x")</script>'
MODEL = ResolvedModel("axl-coder", "coder", 128, ("completion", "chat"))


class FakeRegistry:
    def __init__(self) -> None:
        self.instances: list[InstanceRecord] = []
        self.down = False

    async def lookup(self, model: str | None = None, specialist: str | None = None) -> list[InstanceRecord]:
        if self.down:
            raise RegistryError("registry unreachable: GET /v1/instances")
        return self.instances


class FakeLookup:
    def __init__(self) -> None:
        self.client = FakeRegistry()


class FakeStream:
    prompt_truncated = 0

    async def events(self) -> Any:
        for piece in ("def", " f", "(x)"):
            yield StreamPiece(text=piece)
        yield StreamEnd(finish_reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=3, total_tokens=6),
                        model="axl-coder")

    async def aclose(self) -> None:
        pass


class FakeUpstream:
    def __init__(self) -> None:
        self.lookup = FakeLookup()
        self.payloads: list[dict[str, Any]] = []

    async def models(self) -> list[ModelSummary]:
        return [ModelSummary(id="axl-coder", created=0, specialist="coder", context_length=128,
                             capabilities=["completion", "chat"], instances=1)]

    async def resolve(self, name: str, routing_text: Any) -> ResolvedModel:
        return MODEL

    async def open_stream(self, model: ResolvedModel, request: GenerateRequest) -> FakeStream:
        self.payloads.append(request.model_dump(mode="json"))  # what crosses the hop
        return FakeStream()


Console = tuple[TestClient, FakeUpstream]


@pytest.fixture
def make_console(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_url: str) -> Iterator[Callable[..., Console]]:
    monkeypatch.setenv("AXL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("AXL_REDIS_URL", redis_url)
    results = tmp_path / "results.md"
    results.write_text("# results\n<!-- axl-eval-data\n" + json.dumps([{
        "model": "axl-coder", "checkpoint": "checkpoints/axl-coder", "held_out": {"bpb": 2.5, "bytes": 10},
        "humaneval": {"pass@1": 0.0125, "problems": 164}, "date": "2026-11-27"}]) + "\naxl-eval-data -->\n")
    clients: list[TestClient] = []

    def make(**overrides: Any) -> Console:
        settings = Settings(**{"api_keys": KEY, "registry_secret": SECRET, "registry_url": "http://127.0.0.1:9",
                               "console_results_file": str(results), **overrides})
        app = create_app(settings)
        client = TestClient(app, base_url="http://localhost:8880")
        client.__enter__()
        clients.append(client)
        upstream = FakeUpstream()
        app.state.upstream = upstream
        return client, upstream

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def console(make_console: Callable[..., Console]) -> Console:
    return make_console()


def csrf_of(client: TestClient, path: str = "/ui/login") -> str:
    page = client.get(path)
    match = re.search(r'name="csrf-token" content="([0-9a-f]+)"', page.text)
    assert match, page.text[:500]
    return match.group(1)


def log_in(client: TestClient) -> None:
    token = csrf_of(client)
    response = client.post("/ui/login", data={"api_key": KEY, "csrf_token": token, "next": "/ui/jobs"},
                           follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/ui/jobs", response.text


def job_store() -> Any:
    return open_store(JobsSettings())


def add_job(job_id: str = "ftjob-0123456789abcdef01234567", status: str = "running", **fields: Any) -> dict[str, Any]:
    record = {"id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()), "error": None,
              "fine_tuned_model": None, "finished_at": None, "hyperparameters": {"max_steps": 100, "batch_size": 2},
              "model": "tiny", "status": status, "trained_tokens": None, "training_file": "file-abc", "seed": 1,
              "validation_file": None, "suffix": EVIL, "quantize": [], "quantization_jobs": [],
              "progress": {"step": 30, "loss": 2.0, "val_bpb": 3.1}, **fields}
    store = job_store()
    store.create(JobKind.FINE_TUNE, record)
    for step, loss in ((10, 4.0), (20, 3.0)):
        store.add_event(job_id, f"Step {step}: training loss={loss}", type="metrics",
                        data={"step": step, "train_loss": loss})
    store.add_event(job_id, "Step 20: validation bits per byte=3.1", type="metrics", data={"step": 20, "val_bpb": 3.1})
    store.add_event(job_id, f"an event naming {EVIL}")
    return record


# --- login, sessions, logout --------------------------------------------------------------------------------------


def test_pages_need_a_login_and_the_key_never_rides_in_a_url(console: Console) -> None:
    client, _ = console
    for path in ("/ui/mesh", "/ui/jobs", "/ui/models", "/ui/playground"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"].startswith("/ui/login"), path
    denied = client.post("/ui/api/completions", json={"model": "axl-coder", "prompt": "x"})
    assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
    assert client.get("/ui/api/jobs/ftjob-x/curves").status_code == 401
    login = client.get("/ui/login")
    assert login.status_code == 200 and 'method="post"' in login.text and 'type="password"' in login.text
    assert "default-src 'self'" in login.headers["content-security-policy"]
    assert client.get("/ui/static/console.js").status_code == 200  # the login page's assets are public


def test_login_sets_a_strict_httponly_opaque_session_and_logout_clears_it(console: Console) -> None:
    client, _ = console
    token = csrf_of(client)
    wrong = client.post("/ui/login", data={"api_key": "sk-wrong", "csrf_token": token}, follow_redirects=False)
    assert wrong.status_code == 401 and "not valid" in wrong.text and SESSION_COOKIE not in wrong.cookies
    response = client.post("/ui/login", data={"api_key": KEY, "csrf_token": token}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/ui/mesh"
    set_cookie = response.headers["set-cookie"]
    assert SESSION_COOKIE in set_cookie and "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie
    assert "Path=/ui" in set_cookie and KEY not in set_cookie  # opaque: an HMAC, not the key
    assert client.get("/ui/mesh").status_code == 200
    # Logging out needs the token too; then the pages ask for the key again.
    assert client.post("/ui/logout", data={}, follow_redirects=False).status_code == 403
    out = client.post("/ui/logout", data={"csrf_token": csrf_of(client, "/ui/mesh")}, follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/ui/login"
    assert client.get("/ui/mesh", follow_redirects=False).status_code == 303


def test_session_values_expire_and_die_with_their_key() -> None:
    auth = ConsoleAuth(b"s" * 32, [b"k1", b"k2"], session_seconds=60)
    value = auth.session_value(b"k2", now=1000)
    assert auth.session_valid(value, now=1001) and not auth.session_valid(value, now=1061)
    assert not ConsoleAuth(b"s" * 32, [b"k1"], 60).session_valid(value, now=1001)  # k2 was removed
    assert not ConsoleAuth(b"t" * 32, [b"k2"], 60).session_valid(value, now=1001)  # another secret
    expires, _, mac = value.partition(".")
    assert not auth.session_valid(f"{int(expires) + 999}.{mac}", now=1001)  # expiry is signed
    assert not auth.session_valid("garbage", now=1001) and not auth.session_valid(None, now=1001)


def test_next_never_leaves_the_console(console: Console) -> None:
    client, _ = console
    token = csrf_of(client)
    for target in ("https://evil.example/", "//evil.example/ui/", "/ui/\\evil", "/v1/models"):
        response = client.post("/ui/login", data={"api_key": KEY, "csrf_token": token, "next": target},
                               follow_redirects=False)
        assert response.headers["location"] == "/ui/mesh", target


# --- CSRF ----------------------------------------------------------------------------------------------------------


def test_posts_without_the_token_of_their_own_cookie_or_from_another_origin_are_refused(console: Console) -> None:
    client, _ = console
    log_in(client)
    add_job()
    job = "/ui/jobs/ftjob-0123456789abcdef01234567/cancel"
    token = csrf_of(client, "/ui/jobs")
    assert client.post(job, data={}).status_code == 403
    assert client.post(job, data={"csrf_token": "0" * 64}).status_code == 403
    refused = client.post(job, data={"csrf_token": token}, headers={"Origin": "http://evil.example"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf_failed"
    # The token belongs to its nonce cookie: another browser's token does not fit this one.
    cookie = next(c for c in client.cookies.jar if c.name == CSRF_COOKIE)
    nonce, cookie.value = cookie.value, "f" * 32
    assert client.post(job, data={"csrf_token": token}).status_code == 403
    cookie.value = nonce
    assert job_store().get(JobKind.FINE_TUNE, "ftjob-0123456789abcdef01234567")["status"] == "running"
    ok = client.post(job, data={"csrf_token": token}, headers={"Origin": "http://localhost:8880"}, follow_redirects=False)
    assert ok.status_code == 303
    assert job_store().cancel_requested_at("ftjob-0123456789abcdef01234567") is not None
    # The playground's fetch carries the token in a header.
    body = {"model": "axl-coder", "prompt": "x", "stream": True}
    assert client.post("/ui/api/completions", json=body).status_code == 403
    login_again = client.post("/ui/login", data={"api_key": KEY}, follow_redirects=False)
    assert login_again.status_code == 403  # the login form is covered too


# --- pages ---------------------------------------------------------------------------------------------------------


def test_jobs_pages_escape_user_strings_and_show_status_progress_and_events(console: Console) -> None:
    client, _ = console
    log_in(client)
    add_job()
    store = job_store()
    store.create(JobKind.QUANTIZE, {"id": "qjob-0123456789abcdef01234567", "object": "quantization.job",
                                    "created_at": int(time.time()), "finished_at": None, "model": "ft:tiny:x:1",
                                    "types": ["q8_0"], "status": "succeeded", "error": None,
                                    "outputs": [{"type": "q8_0", "filename": "model-q8_0.gguf", "bytes": 2 ** 20, "url":
                                                 "/v1/quantization/jobs/qjob-0123456789abcdef01234567/files/model-q8_0.gguf"}],
                                    "fine_tuning_job_id": None})
    listing = client.get("/ui/jobs")
    assert listing.status_code == 200
    assert EVIL not in listing.text and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in listing.text
    assert "ftjob-0123456789abcdef01234567" in listing.text and "running" in listing.text
    assert "/ui/quantization/qjob-0123456789abcdef01234567/files/model-q8_0.gguf" in listing.text
    assert 'hx-get="/ui/jobs/tables"' in listing.text
    detail = client.get("/ui/jobs/ftjob-0123456789abcdef01234567")
    assert detail.status_code == 200 and EVIL not in detail.text
    assert "an event naming &lt;script&gt;" in detail.text and 'id="cancel-job"' in detail.text
    assert 'data-url="/ui/api/jobs/ftjob-0123456789abcdef01234567/curves"' in detail.text
    assert client.get("/ui/jobs/ftjob-0123456789abcdef01234567/live").status_code == 200
    events = client.get("/ui/jobs/ftjob-0123456789abcdef01234567/events")
    assert events.status_code == 200 and "an event naming &lt;script&gt;" in events.text
    missing = client.get("/ui/jobs/ftjob-ffffffffffffffffffffffff")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "fine_tuning_job_id"
    # A finished job cannot be cancelled: the page says why, with the API's status.
    add_job("ftjob-aaaaaaaaaaaaaaaaaaaaaaaa", status="succeeded")
    token = csrf_of(client, "/ui/jobs")
    done = client.post("/ui/jobs/ftjob-aaaaaaaaaaaaaaaaaaaaaaaa/cancel", data={"csrf_token": token})
    assert done.status_code == 400 and "cannot be cancelled" in done.text and 'id="cancel-job"' not in done.text
    # GGUF downloads only for names the job recorded, through the quantization route's own checks.
    assert client.get("/ui/quantization/qjob-0123456789abcdef01234567/files/..%2F..%2Fetc%2Fpasswd").status_code == 404
    gguf = JobsSettings().resolved_jobs_dir / "qjob-0123456789abcdef01234567" / "model-q8_0.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF-bytes")
    download = client.get("/ui/quantization/qjob-0123456789abcdef01234567/files/model-q8_0.gguf")
    assert download.status_code == 200 and download.content == b"GGUF-bytes"


def test_curves_are_loss_and_held_out_bpb_by_step_with_the_live_progress(console: Console) -> None:
    client, _ = console
    log_in(client)
    add_job()
    data = client.get("/ui/api/jobs/ftjob-0123456789abcdef01234567/curves").json()
    assert data["loss"] == {"steps": [10, 20, 30], "values": [4.0, 3.0, 2.0]}
    assert data["val_bpb"] == {"steps": [20], "values": [3.1]} and data["done"] is False
    # A resumed attempt redoes steps: one value per step (the latest), in step order.
    events = [{"type": "metrics", "data": {"step": s, "train_loss": v}} for s, v in ((5, 9.0), (10, 8.0), (5, 7.0))]
    assert curves({"id": "j", "status": "succeeded"}, events)["loss"] == {"steps": [5, 10], "values": [7.0, 8.0]}


def test_mesh_page_lists_registry_instances_and_survives_an_unreachable_worker_and_registry(console: Console) -> None:
    client, upstream = console
    log_in(client)
    assert "No healthy worker" in client.get("/ui/mesh").text
    now = time.time()
    upstream.lookup.client.instances = [InstanceRecord(
        instance_id="w-1", specialist="coder", model_id="axl-coder", url="http://127.0.0.1:9", context_length=128,
        capabilities=["completion"], max_concurrency=4, registered_at=now, last_heartbeat=now, expires_at=now + 5)]
    page = client.get("/ui/mesh")
    assert page.status_code == 200 and 'data-instance="w-1"' in page.text and "unreachable" in page.text
    assert "train: 0 waiting" in page.text
    upstream.lookup.client.down = True
    partial = client.get("/ui/mesh/workers")
    assert partial.status_code == 200 and "registry did not answer" in partial.text


def test_token_rates_come_from_the_generated_tokens_counter() -> None:
    text = "# HELP x\naxl_worker_generation_tokens_total 1234.0\naxl_worker_prompt_tokens_total 5.0\n"
    assert parse_counter(text, "axl_worker_generation_tokens_total") == 1234.0
    assert parse_counter(text, "missing") is None
    rates = TokenRates()
    assert rates.update("w", 100.0, now=10.0) is None  # first look
    assert rates.update("w", 150.0, now=11.0) is None  # too soon to say
    assert rates.update("w", 300.0, now=20.0) == pytest.approx(20.0)
    assert rates.update("w", 10.0, now=30.0) is None  # restarted worker: counter reset


def test_models_page_shows_evaluation_rows_or_not_measured_and_escapes_names(console: Console) -> None:
    client, _ = console
    log_in(client)
    store_dir = JobsSettings().resolved_model_store_dir
    store_dir.mkdir(parents=True)
    odd = 'ft:tiny:"><img src=x>:1'  # a hand-edited manifest: names are shown, escaped, whatever they hold
    (store_dir / MANIFEST).write_text(json.dumps({"format_version": 1, "models": {
        odd: {"folder": "m-0123456789abcdef", "created": 1, "specialist": "coder", "base": "tiny"},
        "ft:tiny:evaluated:2": {"folder": "m-0123456789abcdee", "created": 2, "base": "tiny",
                                "evaluation": {"held_out": {"bpb": 1.875}, "humaneval": {"pass@1": 0.5, "problems": 4},
                                               "nextline": {"held_out": {"exact": 0.25, "similarity": 0.5}}}}}}))
    page = client.get("/ui/models")
    assert page.status_code == 200
    assert "<img src=x>" not in page.text and "&lt;img src=x&gt;" in page.text
    rows = {m: page.text.split(f'data-model="{m}"', 1)[1].split("</tr>", 1)[0]
            for m in ("axl-coder", "ft:tiny:evaluated:2")}
    assert "2.500" in rows["axl-coder"] and "pass@1 1.2%" in rows["axl-coder"]  # from the results file
    assert NOT_MEASURED in rows["axl-coder"]  # its next-line completion
    assert "1.875" in rows["ft:tiny:evaluated:2"] and "exact 25.0%" in rows["ft:tiny:evaluated:2"]
    odd_row = page.text.split("&lt;img src=x&gt;", 1)[1].split("</tr>", 1)[0]
    assert odd_row.count(NOT_MEASURED) == 3


def test_playground_streams_completions_with_the_session_and_a_csrf_header(console: Console) -> None:
    client, upstream = console
    log_in(client)
    page = client.get("/ui/playground")
    assert page.status_code == 200 and '<option value="axl-coder">' in page.text
    token = csrf_of(client, "/ui/playground")
    body = {"model": "axl-coder", "prompt": "x", "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": 8}
    with client.stream("POST", "/ui/api/completions", json=body, headers={"X-CSRF-Token": token}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    assert '"text":"def"' in text and "[DONE]" in text and '"completion_tokens":3' in text
    assert upstream.payloads[0]["max_tokens"] == 8
    bad = client.post("/ui/api/completions", json={"model": "axl-coder", "prompt": "x", "top_p": 0},
                      headers={"X-CSRF-Token": token})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_p"


# --- an open gateway's console -------------------------------------------------------------------------------------


def test_open_gateway_console_needs_no_login_but_keeps_the_host_check_and_csrf(
        make_console: Callable[..., Console]) -> None:
    client, _ = make_console(api_keys=None, host="127.0.0.1")
    assert client.get("/ui/login", follow_redirects=False).headers["location"] == "/ui/mesh"
    page = client.get("/ui/jobs")
    assert page.status_code == 200 and 'id="logout"' not in page.text and "open gateway" in page.text
    rebound = client.get("/ui/jobs", headers={"Host": "attacker.example"})
    assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed"
    add_job()
    assert client.post("/ui/jobs/ftjob-0123456789abcdef01234567/cancel", data={}).status_code == 403
