"""The worker's Prometheus metrics, named in the style of vLLM (``vllm:time_to_first_token_seconds`` ->
``axl_worker_time_to_first_token_seconds``). Thread-safe: the scheduler thread observes, the scrape reads."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Per-token latencies on a CPU sit between a millisecond and a second; requests take up to minutes.
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
_FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 300.0)


@dataclass
class WorkerMetrics:
    requests: Counter  # by status: finished, cancelled, rejected (queue full / not ready), invalid, error
    finished: Counter  # by finish_reason
    running: Gauge
    waiting: Gauge
    time_to_first_token: Histogram
    inter_token_latency: Histogram
    e2e_latency: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter
    model_loaded: Gauge
    prefix_cache_lookups: Counter  # by result: hit, miss
    prefix_cache_reused_tokens: Counter
    prefix_cache_bytes: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> WorkerMetrics:
        return cls(
            requests=Counter(
                "axl_worker_requests_total", "Generate requests by outcome", ["status"], registry=registry
            ),
            finished=Counter(
                "axl_worker_request_success_total",
                "Requests that finished, by finish reason",
                ["finish_reason"],
                registry=registry,
            ),
            running=Gauge("axl_worker_num_requests_running", "Sequences in the decode batch", registry=registry),
            waiting=Gauge("axl_worker_num_requests_waiting", "Requests waiting for a batch row", registry=registry),
            time_to_first_token=Histogram(
                "axl_worker_time_to_first_token_seconds",
                "From queueing to the first generated token",
                buckets=_FIRST_TOKEN_BUCKETS,
                registry=registry,
            ),
            inter_token_latency=Histogram(
                "axl_worker_inter_token_latency_seconds",
                "Between two generated tokens of one request",
                buckets=_TOKEN_BUCKETS,
                registry=registry,
            ),
            e2e_latency=Histogram(
                "axl_worker_e2e_request_latency_seconds",
                "From queueing to the last token",
                buckets=_REQUEST_BUCKETS,
                registry=registry,
            ),
            prompt_tokens=Counter("axl_worker_prompt_tokens_total", "Prefilled prompt tokens", registry=registry),
            generation_tokens=Counter("axl_worker_generation_tokens_total", "Generated tokens", registry=registry),
            model_loaded=Gauge("axl_worker_model_loaded", "1 once the checkpoint is loaded", registry=registry),
            prefix_cache_lookups=Counter(
                "axl_worker_prefix_cache_lookups_total",
                "Prompts looked up in the prefix cache, by result (hit: some prefix restored)",
                ["result"],
                registry=registry,
            ),
            prefix_cache_reused_tokens=Counter(
                "axl_worker_prefix_cache_reused_tokens_total",
                "Prompt tokens restored from the prefix cache instead of prefilled",
                registry=registry,
            ),
            prefix_cache_bytes=Gauge(
                "axl_worker_prefix_cache_bytes", "Memory the prefix cache holds", registry=registry
            ),
        )
