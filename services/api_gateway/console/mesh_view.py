"""The Mesh page's data: the registry's instances, each worker's own view (``/internal/v1/info``) and tokens/s.

Tokens/s comes from the worker's ``axl_worker_generation_tokens_total`` counter (its ``/metrics``): the rate
between two looks at least :data:`RATE_MIN_INTERVAL_SECONDS` apart (the page refreshes itself, so the figure
appears on the second look). Every call is bounded; a worker that does not answer is shown as unreachable.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from axl_mesh.mesh_auth import bearer_header
from axl_mesh.registry_client import RegistryError
from axl_mesh.registry_schemas import InstanceRecord

GENERATED_TOKENS_METRIC = "axl_worker_generation_tokens_total"
WORKER_TIMEOUT_SECONDS = 2.0
RATE_MIN_INTERVAL_SECONDS = 2.0


@dataclass
class _Sample:
    at: float
    tokens: float
    rate: float | None = None


@dataclass
class TokenRates:
    """Per instance, the last counter reading and the rate it gave (shared by every viewer of the page)."""

    samples: dict[str, _Sample] = field(default_factory=dict)

    def update(self, instance_id: str, tokens: float | None, now: float) -> float | None:
        if tokens is None:
            return None
        last = self.samples.get(instance_id)
        if last is None or tokens < last.tokens:  # first look, or the worker restarted (counter reset)
            self.samples[instance_id] = _Sample(now, tokens)
            return None
        if now - last.at < RATE_MIN_INTERVAL_SECONDS:
            return last.rate
        rate = (tokens - last.tokens) / (now - last.at)
        self.samples[instance_id] = _Sample(now, tokens, rate)
        return rate


@dataclass
class WorkerRow:
    instance: InstanceRecord
    health: str  # ready | loading | draining | unreachable
    info: dict[str, Any] | None
    generated_tokens: float | None
    tokens_per_s: float | None
    heartbeat_age_s: float


def parse_counter(metrics_text: str, name: str) -> float | None:
    """The value of an unlabelled counter in Prometheus text."""
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            try:
                return float(line.split()[1])
            except (IndexError, ValueError):
                return None
    return None


async def _look_at(http: httpx.AsyncClient, instance: InstanceRecord) -> tuple[dict[str, Any] | None, float | None]:
    async def info() -> dict[str, Any] | None:
        response = await http.get(instance.url + "/internal/v1/info")
        return response.json() if response.status_code == 200 else None

    async def tokens() -> float | None:
        response = await http.get(instance.url + "/metrics")
        return parse_counter(response.text, GENERATED_TOKENS_METRIC) if response.status_code == 200 else None

    results = await asyncio.gather(info(), tokens(), return_exceptions=True)
    return tuple(None if isinstance(r, BaseException) else r for r in results)  # type: ignore[return-value]


def _health(info: dict[str, Any] | None) -> str:
    if info is None:
        return "unreachable"
    if info.get("draining"):
        return "draining"
    return "ready" if info.get("ready") else "loading"


async def worker_rows(registry: Any, mesh_secret: str, rates: TokenRates) -> tuple[list[WorkerRow], str | None]:
    """Every healthy instance the registry lists, with what its worker says; (rows, error shown instead)."""
    try:
        instances = await registry.lookup()
    except RegistryError as exc:
        return [], f"The registry did not answer: {exc}"
    async with httpx.AsyncClient(timeout=WORKER_TIMEOUT_SECONDS, headers=bearer_header(mesh_secret)) as http:
        looks = await asyncio.gather(*(_look_at(http, instance) for instance in instances))
    now, wall = time.monotonic(), time.time()
    rows = [
        WorkerRow(
            instance=instance,
            health=_health(info),
            info=info,
            generated_tokens=tokens,
            tokens_per_s=rates.update(instance.instance_id, tokens, now),
            heartbeat_age_s=max(0.0, wall - instance.last_heartbeat),
        )
        for instance, (info, tokens) in zip(instances, looks, strict=True)
    ]
    rows.sort(key=lambda r: (r.instance.specialist, r.instance.model_id, r.instance.instance_id))
    return rows, None
