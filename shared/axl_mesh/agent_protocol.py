"""Wire schemas of ``POST /v1/agent/solve``, the self-debug loop (an AXL extension, not part of OpenAI's API).

The coder writes code for ``task``; the code runs against ``tests`` in a sandbox; a failure goes with its
traceback to the debugger, which returns fixed code; up to ``max_rounds`` rounds. The response carries every
round. With ``stream: true`` each event is one JSON object: ``agent.tests`` (when the testgen specialist wrote
the tests), ``agent.round`` per finished round, then the ``agent.solve`` summary, then ``[DONE]``.
"""

from __future__ import annotations

import ast
import re
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from axl_mesh.protocol import UsageInfo, random_id
from axl_mesh.worker_protocol import MaxTokens, Temperature, TopP

MAX_ROUNDS = 10
MAX_TIMEOUT_SECONDS = 60.0

AgentRole = Literal["coder", "debugger", "testgen"]
RoundRole = Literal["coder", "debugger"]
RunStatus = Literal["passed", "failed", "timeout", "memory", "killed", "error"]  # axl_model.sandbox.SandboxStatus
SolveStatus = Literal["solved", "unsolved", "error"]

_TEST_MARKERS = re.compile(r"\bassert\b|^\s*def (test_\w*|check)\s*\(", re.MULTILINE)


def tests_problem(tests: str) -> str | None:
    """Why ``tests`` cannot judge code (None when they can): not Python, or nothing in them can fail."""
    try:
        ast.parse(tests)
    except (SyntaxError, ValueError) as exc:
        return f"tests are not valid Python: {exc}"
    if not _TEST_MARKERS.search(tests):
        return "tests contain no assert, no test_* function and no check(candidate) function"
    return None


class _Strict(BaseModel):
    """Our own endpoint: unknown fields are a 400 (a typo such as ``max_round`` should not pass silently)."""

    model_config = ConfigDict(extra="forbid")


class AgentModels(_Strict):
    """Which model plays each role: a model id, a specialist's name (its best-served model) or ``auto``."""

    coder: str = Field(default="coder", min_length=1)
    debugger: str = Field(default="debugger", min_length=1)
    testgen: str = Field(default="testgen", min_length=1)


class AgentSampling(_Strict):
    """Sampling for every model call; unset fields take the specialist's defaults."""

    temperature: Temperature | None = None
    top_p: TopP | None = None
    # Per model call; the gateway clamps it to the model's ceiling as it does a completion's.
    max_tokens: Annotated[MaxTokens, Field(le=8192)] = 512
    seed: int | None = Field(default=None, ge=0, le=2**62, description="round n uses seed + n")


class AgentSolveRequest(_Strict):
    task: str = Field(min_length=1, description="what to write: a description and/or a signature with docstring")
    tests: str | None = Field(
        default=None,
        description=(
            "Python run after the code: asserts, test_* functions (each is called) or check(candidate) (called with "
            "the entry point); when null, the testgen model writes them"
        ),
    )
    entry_point: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="the function check(candidate) gets; default: the task's first def",
    )
    max_rounds: int = Field(default=3, ge=1, le=MAX_ROUNDS)
    models: AgentModels = Field(default_factory=AgentModels)
    sampling: AgentSampling = Field(default_factory=AgentSampling)
    stream: bool = False
    timeout_seconds: float = Field(default=10.0, gt=0.0, le=MAX_TIMEOUT_SECONDS, description="per sandbox run")

    @field_validator("tests")
    @classmethod
    def _tests_can_fail(cls, tests: str | None) -> str | None:
        problem = None if tests is None else tests_problem(tests)
        if problem:
            raise ValueError(problem)
        return tests


class SandboxRun(BaseModel):
    """How one sandbox run of code + tests ended (stdout and stderr truncated)."""

    status: RunStatus
    returncode: int | None
    stdout: str
    stderr: str
    duration: float


class AgentTests(BaseModel):
    object: Literal["agent.tests"] = "agent.tests"
    source: Literal["caller", "testgen"]
    model: str | None = None
    code: str


class AgentRound(BaseModel):
    object: Literal["agent.round"] = "agent.round"
    round: int
    role: RoundRole
    model: str
    output: str = Field(description="the model's raw text; `code` is the code taken from it")
    code: str
    result: SandboxRun


class AgentSolveResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("solve"))
    object: Literal["agent.solve"] = "agent.solve"
    created: int = Field(default_factory=lambda: int(time.time()))
    status: SolveStatus
    rounds: list[AgentRound]
    final_code: str | None
    tests: AgentTests | None
    usage: UsageInfo
    error: dict[str, Any] | None = Field(default=None, description="the OpenAI-shaped error that ended the loop")


AgentEvent = AgentTests | AgentRound | AgentSolveResponse
