"""Replica choice and model-name resolution (pure functions of the registry's answers)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from axl_mesh.errors import APIError, ModelNotFoundError, ServiceUnavailableError
from axl_mesh.registry_schemas import InstanceLoad, InstanceRecord, ModelSummary
from axl_mesh.routing import choose_specialist
from axl_mesh.worker_protocol import GenerateRequest, GenerateResponse, Usage
from services.api_gateway.upstream import ResolvedModel, Upstream, rank_instances, resolve_name


def instance(name: str, running: int = 0, waiting: int = 0, slots: int = 4) -> InstanceRecord:
    return InstanceRecord(instance_id=name, specialist="coder", model_id="axl-coder", url=f"http://{name}:1",
                          context_length=128, max_concurrency=slots, load=InstanceLoad(running=running,
                                                                                       waiting=waiting),
                          registered_at=0, last_heartbeat=0, expires_at=1)


def summary(model_id: str, specialist: str, instances: int = 1) -> ModelSummary:
    return ModelSummary(id=model_id, created=0, specialist=specialist, context_length=128,
                        capabilities=["completion"], instances=instances)


def test_least_busy_counts_reported_load_and_own_in_flight_per_slot() -> None:
    a, b = instance("a", running=2), instance("b", running=1, slots=1)
    assert [i.instance_id for i in rank_instances([a, b], Counter())] == ["a", "b"]  # 2/4 < 1/1
    assert [i.instance_id for i in rank_instances([a, b], Counter({"a": 3}))] == ["b", "a"]  # 5/4 > 1/1


def test_idle_replicas_take_turns_and_cooling_ones_go_last() -> None:
    replicas = [instance("a"), instance("b"), instance("c")]
    firsts = [rank_instances(replicas, Counter(), rotation=r)[0].instance_id for r in range(3)]
    assert sorted(firsts) == ["a", "b", "c"]
    ranked = rank_instances(replicas, Counter(), cooling={"a", "b"})
    assert [i.instance_id for i in ranked][0] == "c"


def test_resolve_by_id_alias_and_auto() -> None:
    models = [summary("axl-coder", "coder", 2), summary("axl-docs", "docs")]
    assert resolve_name("axl-coder", models).model_id == "axl-coder"
    assert resolve_name("docs", models).model_id == "axl-docs"

    def choose(served: list[ModelSummary]) -> tuple[str, str]:
        return choose_specialist("Write the docstring for f", {m.specialist for m in served})

    auto = resolve_name("auto", models, choose)
    assert auto.model_id == "axl-docs" and auto.routed_reason and "docs" in auto.routed_reason
    with pytest.raises(ModelNotFoundError):
        resolve_name("gpt-4", models)
    with pytest.raises(ServiceUnavailableError):  # served before, no replica now: retry later, not 404
        resolve_name("axl-fixer", models, known={"axl-fixer"})


class _OneReplica:
    """The registry lookup of one replica, for calls through Upstream."""

    async def instances(self, model_id: str) -> list[InstanceRecord]:
        return [instance("w1")]

    def invalidate(self, model_id: str) -> None:
        pass


class _AnsweringWorker:
    """A worker connection that records what was sent and answers ``body``."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.sent: list[dict[str, Any]] = []

    async def post_json(self, url: str, payload: Any) -> tuple[int, dict[str, str], bytes]:
        self.sent.append(payload)
        return 200, {}, self.body


MODEL = ResolvedModel(model_id="axl-coder", specialist="coder", context_length=128, capabilities=("completion",))


def test_generate_sends_the_typed_request_and_parses_the_typed_answer() -> None:
    answer = GenerateResponse(text="hi", finish_reason="stop", model="axl-coder", prompt_truncated=3,
                              usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3))
    worker = _AnsweringWorker(answer.model_dump_json().encode())
    upstream = Upstream(_OneReplica(), worker)  # type: ignore[arg-type]
    request = GenerateRequest(prompt="p", max_tokens=5, truncate=True)
    assert asyncio.run(upstream.generate(MODEL, request)) == answer
    named = request.model_copy(update={"model": "axl-coder"})  # the hop names the model (a pool serves several)
    assert worker.sent == [named.model_dump(mode="json")]
    assert GenerateRequest.model_validate(worker.sent[0]) == named  # what the worker reads


def test_a_worker_answer_outside_the_protocol_is_a_502() -> None:
    worker = _AnsweringWorker(b'{"text": 5, "usage": "lots"}')
    upstream = Upstream(_OneReplica(), worker)  # type: ignore[arg-type]
    with pytest.raises(APIError) as info:
        asyncio.run(upstream.generate(MODEL, GenerateRequest(prompt="p")))
    assert info.value.status == 502 and info.value.code == "upstream_error"
