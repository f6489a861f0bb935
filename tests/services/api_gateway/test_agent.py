"""The self-debug loop's logic with scripted model answers (a plain callable) and the real sandbox."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from axl_mesh.agent_protocol import AgentEvent, AgentRound, AgentSolveRequest, AgentSolveResponse, AgentTests
from axl_mesh.errors import ServiceUnavailableError
from axl_mesh.protocol import UsageInfo
from services.api_gateway.agent import Generation, Messages, build_program, extract_code, run_in_sandbox, solve_events
from services.api_gateway.metrics import AgentMetrics
from services.api_gateway.routes.agent import counted

TASK = 'def add(a, b):\n    """Return the sum of a and b."""\n'
TESTS = "def test_add():\n    assert add(2, 3) == 5\n    assert add(-1, 1) == 0\n"
WRONG = "def add(a, b):\n    return a - b\n"
RIGHT = "def add(a, b):\n    return a + b\n"


class ScriptedModels:
    """Answers each call with the next scripted text and records what it was asked."""

    def __init__(self, answers: list[str | Exception]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, Messages, int]] = []

    async def __call__(self, role: str, messages: Messages, round_number: int) -> Generation:
        self.calls.append((role, messages, round_number))
        answer = self.answers[len(self.calls) - 1]
        if isinstance(answer, Exception):
            raise answer
        return Generation(model=f"axl-{role}", text=answer, usage=UsageInfo(prompt_tokens=10, completion_tokens=5))


def run(request: AgentSolveRequest, models: ScriptedModels) -> list[AgentEvent]:
    async def collect() -> list[AgentEvent]:
        return [event async for event in solve_events(request, models)]

    return asyncio.run(collect())


def test_debugger_fixes_the_coders_code_in_round_two() -> None:
    models = ScriptedModels([
        f"```python\n{WRONG}```",
        f"Bug: the operator `-` should be `+`.\nFixed code:\n{RIGHT}",
    ])
    events = run(AgentSolveRequest(task=TASK, tests=TESTS, max_rounds=3), models)
    *rounds, summary = events
    assert isinstance(summary, AgentSolveResponse) and summary.status == "solved" and summary.error is None
    assert [r.role for r in rounds] == ["coder", "debugger"] and summary.rounds == rounds
    first, second = rounds
    assert first.code == WRONG and first.result.status == "failed" and "AssertionError" in first.result.stderr
    assert second.code == RIGHT and second.result.status == "passed" and second.result.returncode == 0
    assert summary.final_code == RIGHT and summary.tests == AgentTests(source="caller", code=TESTS)
    assert summary.usage == UsageInfo(prompt_tokens=20, completion_tokens=10, total_tokens=30)
    # The debugger saw the failing code and the failing line of the traceback, not the sandbox's own frame.
    (_, debugger_messages, round_number) = models.calls[1]
    prompt = debugger_messages[-1]["content"]
    assert round_number == 2 and prompt.startswith(WRONG.rstrip()) and "# AssertionError" in prompt
    assert "assert add(2, 3) == 5" in prompt and "_axl_runner" not in prompt


def test_unsolved_after_max_rounds_keeps_every_round() -> None:
    models = ScriptedModels([WRONG, "The bug is here.\n" + WRONG, "def add(a, b):\n    return a * b\n"])
    *rounds, summary = run(AgentSolveRequest(task=TASK, tests=TESTS, max_rounds=3), models)
    assert isinstance(summary, AgentSolveResponse) and summary.status == "unsolved"
    assert [(r.round, r.role) for r in rounds] == [(1, "coder"), (2, "debugger"), (3, "debugger")]
    assert all(isinstance(r, AgentRound) and r.result.status == "failed" for r in rounds)
    assert rounds[1].code == WRONG  # the explanation line was dropped
    assert summary.final_code == rounds[-1].code


def test_testgen_writes_a_check_function_and_the_entry_point_comes_from_the_task() -> None:
    check = "def check(candidate):\n    assert candidate(1, 2) == 3\n"
    models = ScriptedModels([check, RIGHT])
    tests, only_round, summary = run(AgentSolveRequest(task=TASK, max_rounds=2), models)
    assert tests == AgentTests(source="testgen", model="axl-testgen", code=check)
    assert [c[0] for c in models.calls] == ["testgen", "coder"]
    assert isinstance(only_round, AgentRound) and only_round.result.status == "passed"
    assert isinstance(summary, AgentSolveResponse) and summary.status == "solved" and summary.tests == tests


def test_an_infinite_loop_times_out_and_the_debugger_is_told() -> None:
    models = ScriptedModels(["def add(a, b):\n    while True:\n        pass\n", RIGHT])
    *rounds, summary = run(AgentSolveRequest(task=TASK, tests=TESTS, timeout_seconds=1), models)
    assert rounds[0].result.status == "timeout" and "TimeoutError" in models.calls[1][1][-1]["content"]
    assert isinstance(summary, AgentSolveResponse) and summary.status == "solved" and len(rounds) == 2


def test_a_failed_model_call_ends_the_loop_with_the_trace_so_far() -> None:
    models = ScriptedModels([WRONG, ServiceUnavailableError("no debugger replica", code="no_healthy_replica")])
    *rounds, summary = run(AgentSolveRequest(task=TASK, tests=TESTS), models)
    assert isinstance(summary, AgentSolveResponse) and summary.status == "error" and len(rounds) == 1
    assert summary.error is not None and summary.error["code"] == "no_healthy_replica"
    assert summary.final_code == WRONG


def test_generated_tests_that_cannot_fail_are_an_error_not_a_pass() -> None:
    models = ScriptedModels(["# nothing to see here\n"])
    tests, summary = run(AgentSolveRequest(task=TASK), models)
    assert isinstance(summary, AgentSolveResponse) and summary.status == "error" and summary.rounds == []
    assert summary.error is not None and summary.error["code"] == "bad_generated_tests"


def test_extract_code() -> None:
    assert extract_code("Here:\n```python\nx = 1\n```\nDone.") == "x = 1\n"
    assert extract_code("```\ny = 2\n") == "y = 2\n"  # a fence the model never closed
    assert extract_code("Bug: wrong op.\nFixed code:\nz = 3\n") == "z = 3\n"
    assert extract_code("This returns one.\ndef f():\n    return 1") == "def f():\n    return 1\n"
    assert extract_code("def broken(:\n") == "def broken(:\n"  # kept: the sandbox reports the SyntaxError
    assert extract_code("") == ""


def test_program_calls_test_functions_and_check() -> None:
    program = build_program(RIGHT, "def check(candidate):\n    assert candidate(1, 1) == 3\n", "add")
    result = asyncio.run(run_in_sandbox(program, 5.0))
    assert result.status == "failed" and "AssertionError" in result.stderr  # check(add) ran and failed


@pytest.mark.parametrize("body, param", [
    ({"task": TASK, "tests": "print('hi')"}, "tests"),  # nothing in it can fail
    ({"task": TASK, "tests": "assert (("}, "tests"),
    ({"task": TASK, "tests": TESTS, "max_rounds": 11}, "max_rounds"),
    ({"task": "", "tests": TESTS}, "task"),
    ({"task": TASK, "tests": TESTS, "max_round": 2}, "max_round"),
    ({"task": TASK, "tests": TESTS, "entry_point": "os.system"}, "entry_point"),
])
def test_request_validation(body: dict, param: str) -> None:
    with pytest.raises(ValidationError) as info:
        AgentSolveRequest.model_validate(body)
    assert info.value.errors()[0]["loc"][0] == param


def test_metrics_count_rounds_and_outcomes() -> None:
    registry = CollectorRegistry()
    metrics = AgentMetrics.create(registry)
    models = ScriptedModels([WRONG, RIGHT])

    async def drain() -> None:
        async for _ in counted(solve_events(AgentSolveRequest(task=TASK, tests=TESTS), models), metrics):
            pass

    asyncio.run(drain())
    value = registry.get_sample_value
    assert value("axl_gateway_agent_rounds_total", {"role": "coder", "result": "failed"}) == 1
    assert value("axl_gateway_agent_rounds_total", {"role": "debugger", "result": "passed"}) == 1
    assert value("axl_gateway_agent_solves_total", {"status": "solved"}) == 1


def test_the_agent_refuses_with_503_when_the_sandbox_cannot_isolate(monkeypatch, tmp_path) -> None:
    from axl_mesh.errors import APIError
    from axl_model import sandbox
    from services.api_gateway.routes.agent import sandbox_ready

    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on the PATH
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    sandbox._isolation.cache_clear()
    try:
        with pytest.raises(APIError) as caught:
            asyncio.run(sandbox_ready())
        assert caught.value.status == 503 and caught.value.code == "sandbox_unavailable"
        assert "bubblewrap" in caught.value.message and sandbox.UNSAFE_ENV in caught.value.message
    finally:
        sandbox._isolation.cache_clear()
