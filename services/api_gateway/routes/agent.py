"""``POST /v1/agent/solve`` (AXL extension): the self-debug loop of :mod:`services.api_gateway.agent`, streamed
as SSE events or answered as one JSON object.

Every role's model is resolved before anything runs, so an unknown model is a 404, a model without a replica a
503, and missing tests with no testgen model a 400. Model calls go through the same path as completions
(``generation.generate_all``: least-busy replica, failover, request metrics under ``endpoint="agent"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from axl_mesh.agent_protocol import AgentEvent, AgentRole, AgentRound, AgentSolveRequest, AgentSolveResponse
from axl_mesh.errors import APIError, InvalidRequestError, ModelNotFoundError, NotFoundError
from axl_mesh.protocol import ChatCompletionRequest, random_id
from axl_model.sandbox import SandboxUnavailable, require_sandbox, sandbox_capabilities
from services.api_gateway.agent import Generate, Generation, Messages, solve_events
from services.api_gateway.deps import MetricsDep, SettingsDep, UpstreamDep
from services.api_gateway.generation import RequestMetrics, Sample, clamped_max_tokens, generate_all, until_disconnect
from services.api_gateway.metrics import AgentMetrics, GatewayMetrics
from services.api_gateway.sse import DONE, KEEPALIVE, EventStreamResponse, sse_data
from services.api_gateway.upstream import ResolvedModel, Upstream

router = APIRouter(prefix="/v1/agent", tags=["agent"])
logger = logging.getLogger(__name__)


def log_sandbox_status() -> None:
    """Say at start whether the agent can run code, so an operator sees it before a user does."""
    caps = sandbox_capabilities()
    if caps["isolated"]:
        logger.info("code sandbox: bubblewrap isolation (%s mode)", caps["mode"])
    elif caps["unsafe_opt_in"]:
        logger.warning(
            "code sandbox: NO isolation (%s); the operator opted in to running untrusted code unisolated",
            caps["reason"],
        )
    else:
        logger.warning("code sandbox unavailable (%s): /v1/agent/solve answers 503 sandbox_unavailable", caps["reason"])


async def sandbox_ready() -> None:
    """503 ``sandbox_unavailable`` unless generated code can run behind OS isolation (fail closed)."""
    try:
        await asyncio.to_thread(require_sandbox)
    except SandboxUnavailable as exc:
        raise APIError(503, f"The agent cannot run code here: {exc}.", code="sandbox_unavailable") from exc


def agent_metrics(app: FastAPI) -> AgentMetrics:
    """The app's agent counters (created on the app's metrics registry by main.create_app)."""
    if getattr(app.state, "agent_metrics", None) is None:  # an app built without main.create_app
        app.state.agent_metrics = AgentMetrics.create(CollectorRegistry())
    return app.state.agent_metrics


async def resolve_roles(upstream: Upstream, body: AgentSolveRequest) -> dict[AgentRole, ResolvedModel]:
    """The model of each role the loop will call (the debugger only with more than one round)."""
    roles: list[AgentRole] = ["coder", "debugger"] if body.max_rounds > 1 else ["coder"]
    if body.tests is None:
        roles.append("testgen")
    resolved: dict[AgentRole, ResolvedModel] = {}
    for role in roles:
        name = getattr(body.models, role)
        try:
            resolved[role] = await upstream.resolve(name, lambda: body.task)
        except ModelNotFoundError:
            if role == "testgen":
                raise InvalidRequestError(
                    f"`tests` is missing and no testgen model ('{name}') is served: give `tests` (asserts, test_* "
                    "functions or check(candidate)) or start a testgen worker.",
                    param="tests",
                    code="tests_required",
                ) from None
            raise NotFoundError(
                f"The {role} model '{name}' does not exist or has no healthy instance.",
                param=f"models.{role}",
                code="model_not_found",
            ) from None
    return resolved


def worker_generate(
    upstream: Upstream,
    metrics: GatewayMetrics,
    models: dict[AgentRole, ResolvedModel],
    body: AgentSolveRequest,
    solve_id: str,
    *,
    truncate: bool,
    max_tokens_ceiling: int | None = None,
) -> Generate:
    """``generate(role, messages, round)`` on the role's model, through the completions path."""

    async def generate(role: AgentRole, messages: Messages, round_number: int) -> Generation:
        model = models[role]
        sampling = body.sampling
        chat = ChatCompletionRequest(
            model=model.model_id,
            messages=messages,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
        )
        request = chat.to_generate_request(
            request_id=f"{solve_id}-{round_number}-{role}",
            max_tokens=clamped_max_tokens(sampling.max_tokens, model, max_tokens_ceiling),
            truncate=truncate,
            seed_offset=round_number,
        )
        tracker = RequestMetrics(metrics, "agent", model.model_id)
        try:
            [result] = await generate_all(upstream, model, [Sample(index=0, request=request)], tracker)
        except APIError as exc:
            tracker.finished(exc.status)
            raise
        tracker.finished(200)
        return Generation(model=model.model_id, text=result.text, usage=result.usage)

    return generate


async def counted(events: AsyncIterator[AgentEvent], metrics: AgentMetrics) -> AsyncIterator[AgentEvent]:
    async for event in events:
        if isinstance(event, AgentRound):
            metrics.rounds.labels(role=event.role, result=event.result.status).inc()
        elif isinstance(event, AgentSolveResponse):
            metrics.solves.labels(status=event.status).inc()
        yield event


async def final_event(events: AsyncIterator[AgentEvent]) -> AgentSolveResponse:
    last = None
    async for event in events:
        last = event
    assert isinstance(last, AgentSolveResponse), "solve_events always ends with the summary"
    return last


async def sse_events(events: AsyncIterator[AgentEvent], keepalive_seconds: float) -> AsyncIterator[str]:
    """One ``data:`` event per loop event, keep-alive comments while a round runs, then ``[DONE]``."""
    pending: asyncio.Future[AgentEvent] | None = None
    try:
        while True:
            pending = asyncio.ensure_future(anext(events))
            while not (await asyncio.wait({pending}, timeout=keepalive_seconds))[0]:
                yield KEEPALIVE
            try:
                event = pending.result()
            except StopAsyncIteration:
                break
            yield sse_data(event)
        yield DONE
    finally:  # the client went away mid-round: stop the loop (a running sandbox ends at its own timeout)
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]


@router.post("/solve", response_model=AgentSolveResponse)
async def solve(
    body: AgentSolveRequest, request: Request, upstream: UpstreamDep, settings: SettingsDep, metrics: MetricsDep
) -> Any:
    """Writes code for a task, runs it against tests in a sandbox and has the debugger fix failures, round by round."""
    await sandbox_ready()
    models = await resolve_roles(upstream, body)
    solve_id = random_id("solve")
    generate = worker_generate(
        upstream,
        metrics,
        models,
        body,
        solve_id,
        truncate=settings.truncate_prompts,
        max_tokens_ceiling=settings.max_tokens_ceiling,
    )
    events = counted(solve_events(body, generate, solve_id=solve_id), agent_metrics(request.app))
    if body.stream:
        return EventStreamResponse(
            sse_events(events, settings.keepalive_seconds), send_timeout_seconds=settings.stalled_client_seconds
        )
    summary = await until_disconnect(request, final_event(events))
    return JSONResponse(summary.model_dump(mode="json"))
