"""The self-debug loop behind ``POST /v1/agent/solve``: coder -> sandbox -> debugger -> sandbox ... (torch-free).

:func:`solve_events` is the loop; it calls models through a plain ``generate(role, messages, round)`` callable
(the route binds it to the workers; tests pass their own) and runs code through ``run_code(program, timeout)``
(by default :func:`run_in_sandbox`: ``axl_model.sandbox.run_untrusted`` in a thread, so generated code never
runs in this process and the event loop never blocks). It yields what happened as it happens: the tests (when a
model wrote them), each round, then the summary.
"""

from __future__ import annotations

import ast
import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from axl_mesh.agent_protocol import (
    AgentEvent,
    AgentRole,
    AgentRound,
    AgentSolveRequest,
    AgentSolveResponse,
    AgentTests,
    RoundRole,
    SandboxRun,
    tests_problem,
)
from axl_mesh.errors import APIError
from axl_mesh.protocol import UsageInfo, random_id
from axl_model.sandbox import run_untrusted

MAX_OUTPUT_CHARS = 4000  # stdout/stderr kept per round in the response
MAX_ERROR_CHARS = 800  # traceback tail shown to the debugger (its context window is small)

Messages = list[dict[str, str]]


@dataclass
class Generation:
    """One model call's answer."""

    model: str
    text: str
    usage: UsageInfo = field(default_factory=UsageInfo)


Generate = Callable[[AgentRole, Messages, int], Awaitable[Generation]]
RunCode = Callable[[str, float], Awaitable[SandboxRun]]


# --- prompts ----------------------------------------------------------------------------------------------------
# The worker renders messages with its specialist's template (axl_model.specialists); the inputs look like
# the training pairs of each recipe: a task for the coder and testgen, code for the debugger.


def coder_messages(task: str) -> Messages:
    return [{"role": "user", "content": task}]


def testgen_messages(task: str) -> Messages:
    return [{"role": "user", "content": task}]


def debugger_messages(code: str, error: str) -> Messages:
    """The failing code with its error below it as comments, so the input still reads as code."""
    commented = "\n".join(f"# {line}" if line else "#" for line in error.splitlines())
    return [{"role": "user", "content": f"{code.rstrip()}\n\n# It fails with:\n{commented}\n"}]


# --- code in, program out -----------------------------------------------------------------------------------


_FENCE = re.compile(r"```[ \t]*[\w+-]*[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The code in a model's answer: a fenced block, else what follows "Fixed code:" (the debugger's format),
    else the text from its first line that starts a parseable program (an explanation line may come first)."""
    blocks = [b for b in _FENCE.findall(text) if b.strip()]
    if blocks:
        return blocks[0].strip("\n") + "\n"
    _, marker, after = text.partition("Fixed code:")
    if marker:
        text = after
    lines = text.strip("\n").splitlines()
    for start in range(len(lines)):
        candidate = "\n".join(lines[start:])
        if candidate.strip() and _parses(candidate):
            return candidate + "\n"
    return text.strip("\n") + "\n" if text.strip() else ""


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def infer_entry_point(task: str, code: str) -> str | None:
    """The function ``check(candidate)`` receives: the first ``def`` of the task, else of the code."""
    for text in (task, code):
        match = re.search(r"^\s*(?:async\s+)?def\s+([A-Za-z_]\w*)\s*\(", text, re.MULTILINE)
        if match:
            return match.group(1)
    return None


def build_program(code: str, tests: str, entry_point: str | None) -> str:
    """Code, then tests, then a runner calling every ``test_*`` function and ``check(entry_point)`` if defined."""
    runner = [
        "",
        "# --- AXL agent: run the tests ---",
        "for _axl_name, _axl_test in list(globals().items()):",
        "    if _axl_name.startswith('test_') and callable(_axl_test):",
        "        _axl_test()",
    ]
    if entry_point:
        runner += ["if callable(globals().get('check')):", f"    check({entry_point})"]
    return f"{code.rstrip()}\n\n\n{tests.rstrip()}\n\n" + "\n".join(runner) + "\n"


_RUNNER_FRAME = re.compile(r'  File "[^"]*_axl_runner\.py".*\n(?:    .*\n)*')


def failure_text(run: SandboxRun) -> str:
    """What the debugger is told: the traceback's tail, or why the run ended."""
    stderr = run.stderr.strip()
    if run.status == "timeout":
        stderr = (stderr + "\n" if stderr else "") + "TimeoutError: the code did not finish in time (infinite loop?)"
    elif run.status == "memory":
        stderr = (stderr + "\n" if stderr else "") + "MemoryError: the code used too much memory"
    elif not stderr:
        stderr = f"the program exited with status {run.returncode}"
    return stderr[-MAX_ERROR_CHARS:]


async def run_in_sandbox(program: str, timeout: float) -> SandboxRun:
    """Run ``program`` with ``run_untrusted`` in a worker thread: a separate, fenced-off process.
    The sandbox's own frame (with its temporary path) is cut from tracebacks: they start at the program."""
    result = await asyncio.to_thread(run_untrusted, program, timeout=timeout, max_output_bytes=4 * MAX_OUTPUT_CHARS)
    return SandboxRun(
        status=result.status.value,
        returncode=result.returncode,
        duration=round(result.duration, 4),
        stdout=_head(result.stdout, MAX_OUTPUT_CHARS),
        stderr=_tail(_RUNNER_FRAME.sub("", result.stderr), MAX_OUTPUT_CHARS),
    )


def _head(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "\n[truncated]"


def _tail(text: str, limit: int) -> str:  # a traceback's end says the most
    return text if len(text) <= limit else "[truncated]\n" + text[-limit:]


# --- the loop -------------------------------------------------------------------------------------------------


async def solve_events(
    request: AgentSolveRequest, generate: Generate, run_code: RunCode = run_in_sandbox, *, solve_id: str | None = None
) -> AsyncIterator[AgentEvent]:
    """Yield the tests (when testgen wrote them), each round as it finishes, then the :class:`AgentSolveResponse`.

    A model call that fails (an ``APIError``: worker busy, prompt too long) or a sandbox that cannot run ends the
    loop with status ``error`` and the trace so far.
    """
    summary = AgentSolveResponse(
        id=solve_id or random_id("solve"), status="unsolved", rounds=[], final_code=None, tests=None, usage=UsageInfo()
    )
    try:
        if request.tests is not None:
            summary.tests = AgentTests(source="caller", code=request.tests)
        else:
            written = await generate("testgen", testgen_messages(request.task), 0)
            summary.usage.add(written.usage)
            summary.tests = AgentTests(source="testgen", model=written.model, code=extract_code(written.text))
            yield summary.tests
            problem = tests_problem(summary.tests.code)
            if problem:
                yield _ended(summary, APIError(502, f"The testgen model's {problem}.", code="bad_generated_tests"))
                return
        code, error = "", ""
        role: RoundRole
        for number in range(1, request.max_rounds + 1):
            if number == 1:
                role, messages = "coder", coder_messages(request.task)
            else:
                role, messages = "debugger", debugger_messages(code, error)
            answer = await generate(role, messages, number)
            summary.usage.add(answer.usage)
            code = extract_code(answer.text)
            entry_point = request.entry_point or infer_entry_point(request.task, code)
            result = await run_code(build_program(code, summary.tests.code, entry_point), request.timeout_seconds)
            done = AgentRound(round=number, role=role, model=answer.model, output=answer.text, code=code, result=result)
            summary.rounds.append(done)
            summary.final_code = code
            yield done
            if result.status == "passed":
                summary.status = "solved"
                break
            if result.status == "error":  # the sandbox itself failed: another round cannot help
                yield _ended(
                    summary,
                    APIError(500, f"The sandbox could not run the code: {result.stderr[:200]}", code="sandbox_error"),
                )
                return
            error = failure_text(result)
    except APIError as exc:
        yield _ended(summary, exc)
        return
    yield summary


def _ended(summary: AgentSolveResponse, error: APIError) -> AgentSolveResponse:
    summary.status = "error"
    summary.error = error.body()["error"]
    return summary
