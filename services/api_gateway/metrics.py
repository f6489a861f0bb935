"""The gateway's Prometheus metrics, named like vLLM's and llama.cpp's server metrics (``axl_gateway_`` prefix).

Per model (the resolved model id; ``unknown`` when the name did not resolve, so random names cannot grow the
label set): requests by endpoint and status, time to first token, inter-token latency, end-to-end latency,
prompt and generated tokens, requests running (tokens flowing) and waiting (no token yet). Per specialist: healthy
workers, refreshed from the registry on each scrape.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

UNKNOWN_MODEL = "unknown"

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


@dataclass
class GatewayMetrics:
    requests: Counter
    time_to_first_token: Histogram
    inter_token_latency: Histogram
    e2e_latency: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter
    running: Gauge
    waiting: Gauge
    routed: Counter
    failovers: Counter
    healthy_workers: Gauge
    on_demand_loads: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> GatewayMetrics:
        return cls(
            requests=Counter(
                "axl_gateway_requests_total",
                "Generation requests by endpoint, model and HTTP status",
                ["endpoint", "model", "status"],
                registry=registry,
            ),
            time_to_first_token=Histogram(
                "axl_gateway_time_to_first_token_seconds",
                "Time from request to the first streamed token",
                ["model"],
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            ),
            inter_token_latency=Histogram(
                "axl_gateway_inter_token_latency_seconds",
                "Time between streamed tokens",
                ["model"],
                buckets=_ITL_BUCKETS,
                registry=registry,
            ),
            e2e_latency=Histogram(
                "axl_gateway_e2e_request_latency_seconds",
                "Time from request to its last byte",
                ["model"],
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            ),
            prompt_tokens=Counter(
                "axl_gateway_prompt_tokens_total", "Prompt tokens processed", ["model"], registry=registry
            ),
            generation_tokens=Counter(
                "axl_gateway_generation_tokens_total", "Tokens generated", ["model"], registry=registry
            ),
            running=Gauge(
                "axl_gateway_num_requests_running",
                "Upstream requests streaming tokens now",
                ["model"],
                registry=registry,
            ),
            waiting=Gauge(
                "axl_gateway_num_requests_waiting",
                "Upstream requests sent and waiting for their first token",
                ["model"],
                registry=registry,
            ),
            routed=Counter(
                "axl_gateway_auto_routed_total",
                "Requests for model 'auto' by the specialist chosen",
                ["specialist", "model"],
                registry=registry,
            ),
            failovers=Counter(
                "axl_gateway_upstream_failovers_total",
                "Replicas skipped before the first byte, by reason",
                ["model", "reason"],
                registry=registry,
            ),
            healthy_workers=Gauge(
                "axl_gateway_healthy_workers",
                "Healthy worker instances per specialist and model (registry)",
                ["specialist", "model"],
                registry=registry,
            ),
            on_demand_loads=Counter(
                "axl_gateway_on_demand_loads_total",
                "Stored models a pool worker was asked to load, by outcome",
                ["outcome"],
                registry=registry,
            ),
        )


@dataclass
class AgentMetrics:
    solves: Counter
    rounds: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> AgentMetrics:
        return cls(
            solves=Counter(
                "axl_gateway_agent_solves_total", "Self-debug loops by outcome", ["status"], registry=registry
            ),
            rounds=Counter(
                "axl_gateway_agent_rounds_total",
                "Self-debug rounds by role and sandbox result",
                ["role", "result"],
                registry=registry,
            ),
        )
