"""``POST /v1/agent/solve`` through the real mesh: registry, a coder and a debugger worker (tiny random checkpoint
with a 2048-byte window, so debugger prompts with a traceback fit), the gateway; the code runs in the sandbox.

A random model does not solve anything: these tests check the trace (rounds, roles, sandbox results), streaming,
errors and metrics, not success. The loop's logic with a solvable case is in tests/services/api_gateway.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
from prometheus_client.parser import text_string_to_metric_families
import pytest

from tests.checkpoints import make_tiny_checkpoint
from tests.e2e.conftest import API_KEY, Mesh, _mesh

pytestmark = pytest.mark.timeout(180)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
TASK = 'def add(a, b):\n    """Return the sum of a and b."""\n'
TESTS = "def test_add():\n    assert add(2, 3) == 5\n"
BODY = {"task": TASK, "tests": TESTS, "max_rounds": 3, "sampling": {"max_tokens": 48, "temperature": 0.8, "seed": 5}}
SANDBOX_STATUSES = {"passed", "failed", "timeout", "memory", "killed", "error"}


@pytest.fixture(scope="module")
def agent_mesh(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp("agent") / "tiny-2k", seed=2, max_seq_len=2048)
    mesh = _mesh(redis_server, tmp_path_factory.mktemp("agent-mesh"))
    try:
        mesh.start_worker(checkpoint, "coder")
        mesh.start_worker(checkpoint, "debugger")
        mesh.start_gateway()
        yield mesh
    finally:
        mesh.stop()


def solve(mesh: Mesh, body: dict) -> httpx.Response:
    assert mesh.gateway is not None
    return httpx.post(mesh.gateway.url + "/v1/agent/solve", json=body, headers=AUTH, timeout=120)


def without_durations(rounds: list[dict]) -> list[dict]:
    return [{**r, "result": {k: v for k, v in r["result"].items() if k != "duration"}} for r in rounds]


def test_the_trace_has_every_round_and_streaming_yields_the_same(agent_mesh: Mesh) -> None:
    response = solve(agent_mesh, BODY)
    assert response.status_code == 200, response.text
    summary = response.json()
    assert summary["object"] == "agent.solve" and summary["id"].startswith("solve-")
    assert summary["status"] == "unsolved" and summary["error"] is None
    rounds = summary["rounds"]
    assert [(r["round"], r["role"], r["model"]) for r in rounds] == [
        (1, "coder", "axl-coder"), (2, "debugger", "axl-debugger"), (3, "debugger", "axl-debugger")]
    for r in rounds:
        assert r["object"] == "agent.round" and isinstance(r["code"], str) and isinstance(r["output"], str)
        result = r["result"]
        assert result["status"] in SANDBOX_STATUSES - {"passed", "error"} and result["duration"] > 0
        assert result["returncode"] != 0 and result["stderr"]  # the failure the debugger was shown
    assert summary["final_code"] == rounds[-1]["code"]
    assert summary["tests"] == {"object": "agent.tests", "source": "caller", "model": None, "code": TESTS}
    usage = summary["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 3 * 48
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    assert agent_mesh.gateway is not None
    with httpx.stream("POST", agent_mesh.gateway.url + "/v1/agent/solve", json={**BODY, "stream": True},
                      headers=AUTH, timeout=120) as streamed:
        assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert [e["object"] for e in events] == ["agent.round"] * 3 + ["agent.solve"]
    # Same seed, same prompts: the same rounds as the non-streamed answer, and the summary repeats them.
    assert without_durations(events[:3]) == without_durations(rounds)
    assert events[-1]["rounds"] == events[:3] and events[-1]["status"] == "unsolved"

    metrics = httpx.get(agent_mesh.gateway.url + "/metrics", timeout=10).text
    assert 'axl_gateway_requests_total{endpoint="agent",model="axl-debugger",status="200"} 4.0' in metrics
    assert 'axl_gateway_agent_solves_total{status="unsolved"} 2.0' in metrics
    rounds_by_role = {"coder": 0.0, "debugger": 0.0}
    for family in text_string_to_metric_families(metrics):
        if family.name == "axl_gateway_agent_rounds":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    rounds_by_role[sample.labels["role"]] += sample.value
    assert rounds_by_role == {"coder": 2.0, "debugger": 4.0}  # two solves of three rounds each


def test_tests_written_by_a_testgen_model(agent_mesh: Mesh) -> None:
    """The coder's model plays testgen here; random text is no test, so the loop stops before round 1."""
    body = {"task": TASK, "max_rounds": 1, "models": {"testgen": "axl-coder"}, "sampling": {"max_tokens": 32}}
    summary = solve(agent_mesh, body).json()
    assert summary["tests"]["source"] == "testgen" and summary["tests"]["model"] == "axl-coder"
    assert summary["status"] == "error" and summary["error"]["code"] == "bad_generated_tests"
    assert summary["rounds"] == [] and summary["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("body, status, param, code", [
    ({**BODY, "max_rounds": 0}, 400, "max_rounds", None),
    ({**BODY, "tests": "x = 1"}, 400, "tests", None),
    ({**BODY, "timeout_seconds": 600}, 400, "timeout_seconds", None),
    ({"task": TASK}, 400, "tests", "tests_required"),  # no tests and no testgen model served
    ({**BODY, "models": {"debugger": "no-such-model"}}, 404, "models.debugger", "model_not_found"),
    ({**BODY, "models": {"coder": "no-such-model"}}, 404, "models.coder", "model_not_found"),
])
def test_errors_are_openai_shaped(agent_mesh: Mesh, body: dict, status: int, param: str, code: str | None) -> None:
    response = solve(agent_mesh, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]
    if code is not None:
        assert error["code"] == code
    if param == "tests" and code:
        assert "testgen" in error["message"]


def test_one_round_needs_no_debugger(agent_mesh: Mesh) -> None:
    body = {**BODY, "max_rounds": 1, "models": {"debugger": "no-such-model"}}
    summary = solve(agent_mesh, body).json()
    assert [r["role"] for r in summary["rounds"]] == ["coder"] and summary["status"] == "unsolved"


def test_requests_without_the_api_key_are_refused(agent_mesh: Mesh) -> None:
    assert agent_mesh.gateway is not None
    response = httpx.post(agent_mesh.gateway.url + "/v1/agent/solve", json=BODY, timeout=10)
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"

