"""Continuous batching, the bounded queue and client disconnects, against real worker processes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.services.model_worker.conftest import (
    GENERATE,
    MESH_AUTH,
    WORKER,
    info,
    metric_value,
    wait_ready,
    wait_until,
    worker_env,
)
from tests.support import ServiceProcess

StartService = Callable[..., ServiceProcess]


def _long(seed: int, max_tokens: int = 100_000, **extra: object) -> dict[str, object]:
    return {"prompt": f"# sample {seed}\n", "max_tokens": max_tokens, "seed": seed, "temperature": 0.9,
            "ignore_eos": True, **extra}


class _Watcher:
    """Polls /internal/v1/info in a thread and remembers the most requests it saw running at once."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.max_running = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.max_running = max(self.max_running, info(self.url)["running"])
            time.sleep(0.005)

    def __enter__(self) -> _Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_concurrent_requests_share_the_batch_and_match_sequential_results(worker: ServiceProcess) -> None:
    requests = [_long(seed, max_tokens=150) for seed in range(4)]

    def run(body: dict[str, object]) -> str:
        response = httpx.post(worker.url + GENERATE, headers=MESH_AUTH, json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["text"]

    sequential = [run(body) for body in requests]
    with _Watcher(worker.url) as watcher, ThreadPoolExecutor(len(requests)) as pool:
        concurrent = list(pool.map(run, requests))
    assert watcher.max_running >= 2, "concurrent requests were never decoded in one batch"
    assert concurrent == sequential
    assert len(set(sequential)) == len(sequential)


def test_a_full_queue_answers_503_with_retry_after(start_service: StartService, tiny_checkpoint: Path) -> None:
    service = start_service(WORKER, worker_env(tiny_checkpoint, AXL_MAX_BATCH="1", AXL_MAX_QUEUE="1"))
    wait_ready(service.url)
    with httpx.Client(base_url=service.url, headers=MESH_AUTH, timeout=30) as client:
        with client.stream("POST", GENERATE, json=_long(1, stream=True)) as running:
            assert running.status_code == 200
            assert wait_until(lambda: info(service.url)["running"] == 1)
            with client.stream("POST", GENERATE, json=_long(2, stream=True)) as waiting:
                assert waiting.status_code == 200
                assert wait_until(lambda: info(service.url)["waiting"] == 1)
                for body in (_long(3), _long(4, stream=True)):
                    refused = client.post(GENERATE, json=body)
                    assert refused.status_code == 503, refused.text
                    assert refused.headers["retry-after"] == "1"
                    error = refused.json()["error"]
                    assert (error["type"], error["code"]) == ("service_unavailable_error", "queue_full")
        # Both clients left: their rows free up and a new request is served again.
        assert wait_until(lambda: info(service.url)["running"] + info(service.url)["waiting"] == 0)
        served = client.post(GENERATE, json=_long(5, max_tokens=3))
        assert served.status_code == 200, served.text
    assert metric_value(service.url, "axl_worker_requests_total", 'status="rejected"') == 2


def test_a_stream_whose_client_disconnects_leaves_the_batch(worker: ServiceProcess) -> None:
    cancelled_before = metric_value(worker.url, "axl_worker_requests_total", 'status="cancelled"')
    with httpx.stream("POST", worker.url + GENERATE, headers=MESH_AUTH, json=_long(7, stream=True),
                      timeout=30) as response:
        lines = response.iter_lines()
        for _ in range(5):
            assert next(lines)
        assert info(worker.url)["running"] == 1
    # The connection is closed; the sequence must leave the batch at the next step, not after 100k tokens.
    assert wait_until(lambda: info(worker.url)["running"] == 0, timeout_seconds=3)
    assert wait_until(
        lambda: metric_value(worker.url, "axl_worker_requests_total", 'status="cancelled"') == cancelled_before + 1
    )


def test_a_non_streaming_request_whose_client_gives_up_leaves_the_batch(worker: ServiceProcess) -> None:
    try:
        httpx.post(worker.url + GENERATE, headers=MESH_AUTH, json=_long(8), timeout=httpx.Timeout(30, read=0.5))
    except httpx.ReadTimeout:
        pass
    else:
        raise AssertionError("a 100k-token request finished within half a second")
    assert wait_until(lambda: info(worker.url)["running"] == 0, timeout_seconds=3)


def test_metrics_follow_the_vllm_naming(worker: ServiceProcess) -> None:
    httpx.post(worker.url + GENERATE, headers=MESH_AUTH, json=_long(9, max_tokens=10), timeout=30).raise_for_status()
    text = httpx.get(worker.url + "/metrics").text
    for name in (
        "axl_worker_num_requests_running", "axl_worker_num_requests_waiting",
        "axl_worker_time_to_first_token_seconds_bucket", "axl_worker_inter_token_latency_seconds_bucket",
        "axl_worker_e2e_request_latency_seconds_bucket", "axl_worker_prompt_tokens_total",
        "axl_worker_generation_tokens_total", 'axl_worker_requests_total{status="finished"}',
        'axl_worker_request_success_total{finish_reason="length"}', "axl_worker_model_loaded 1.0",
    ):
        assert name in text, name
    assert metric_value(worker.url, "axl_worker_generation_tokens_total") >= 10
