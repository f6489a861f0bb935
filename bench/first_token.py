"""Time to first token of a 1 KB prompt on one idle `micro` worker: a real model worker process (random-init micro,
1 torch thread as the worker defaults to) over HTTP, streamed, max_tokens 1, one request at a time.

Each request's prompt is 1,000 bytes of Python source (a different stretch of the standard library's `inspect.py`
each time, ASCII, so 1,000 tokens plus BOS), sent straight to the worker (`/internal/v1/generate`, its NDJSON
stream) and through the gateway (`/v1/completions`, server-sent events), alternately; the time is from sending the
request to receiving the first streamed line, which comes after the first token. p50 and p90 over the requests,
for the worker's default chunked prefill (AXL_PREFILL_CHUNK_TOKENS=256) and for the prompt read in one go (0), and
the worker's CPU time per request (what a loaded machine bends least). The target is under 50 ms (issue 10).
"""
from __future__ import annotations

import inspect
import os
import statistics
import time

import httpx

from .common import defaults, matmul_peak_flops, training_flops_per_byte
from .gateway_latency import SECRET, _percentile, local_mesh, process_cpu_seconds

PROMPT_BYTES, REQUESTS, WARMUP = 1000, 30, 3
TARGET_MS = 50.0


def prompts(n: int) -> list[str]:
    """n prompts of exactly PROMPT_BYTES ASCII bytes: stretches of inspect.py at n offsets."""
    source = bytes(b for b in inspect.getsource(inspect).encode() if b < 128)
    step = (len(source) - PROMPT_BYTES) // n
    return [source[i * step:i * step + PROMPT_BYTES].decode("ascii") for i in range(n)]


def first_line_ms(client: httpx.Client, url: str, body: dict, headers: dict | None, prefix: str) -> float:
    """Milliseconds from sending the request to the first streamed line that starts with `prefix`."""
    started = time.perf_counter()
    with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        lines = response.iter_lines()
        for line in lines:
            if line.startswith(prefix):
                elapsed = (time.perf_counter() - started) * 1000
                break
        else:
            raise RuntimeError(f"{url} streamed no line starting with {prefix!r}")
        for _ in lines:  # read the rest: the next request starts on an idle worker
            pass
    return elapsed


def measure(chunk: int, threads: int | None) -> dict[str, float]:
    texts = prompts(WARMUP + REQUESTS)
    settings = {"AXL_PREFILL_CHUNK_TOKENS": str(chunk)}
    with local_mesh(threads or 1, max_batch=8, preset="micro", worker_env=settings) as mesh:
        direct_url = mesh.worker.url + "/internal/v1/generate"
        gateway_url = mesh.gateway.url + "/v1/completions"
        auth = {"Authorization": f"Bearer {SECRET}"}
        assert mesh.worker.proc is not None
        worker_pid = mesh.worker.proc.pid
        direct, through = [], []
        with httpx.Client(timeout=60) as client:
            for i, text in enumerate(texts):
                if i == WARMUP:
                    cpu_before = process_cpu_seconds(worker_pid)
                body = {"prompt": text, "max_tokens": 1, "temperature": 0.0, "stream": True}
                d = first_line_ms(client, direct_url, body, auth, "{")
                g = first_line_ms(client, gateway_url, {"model": mesh.model_id, **body}, None, "data:")
                if i >= WARMUP:
                    direct.append(d)
                    through.append(g)
            worker_cpu_ms = (process_cpu_seconds(worker_pid) - cpu_before) * 1000 / (2 * REQUESTS)
    return {"direct_p50_ms": statistics.median(direct), "direct_p90_ms": _percentile(direct, 0.9),
            "gateway_p50_ms": statistics.median(through), "gateway_p90_ms": _percentile(through, 0.9),
            "worker_cpu_ms_per_request": worker_cpu_ms}


def run(args) -> dict:
    threads = 1  # the worker's default; the bench's --threads is this process's, which only sends requests
    figures: dict = {}
    print(f"micro worker (random init, {threads} thread), {PROMPT_BYTES:,}-byte prompt, max_tokens 1, streamed, "
          f"{REQUESTS} requests each way one at a time (after {WARMUP} warm-up):")
    for label, chunk in (("chunk256", 256), ("one_go", 0)):
        result = measure(chunk, threads)
        print(f"  prefill {'in chunks of 256' if chunk else 'in one go':17s} worker p50 {result['direct_p50_ms']:6.1f} "
              f"p90 {result['direct_p90_ms']:6.1f} ms; through the gateway p50 {result['gateway_p50_ms']:6.1f} "
              f"p90 {result['gateway_p90_ms']:6.1f} ms; worker CPU {result['worker_cpu_ms_per_request']:.1f} "
              "ms/request")
        for key, value in result.items():
            figures[f"{label}.{key}"] = value
    best = min(figures["chunk256.direct_p50_ms"], figures["one_go.direct_p50_ms"])
    load = os.getloadavg()[0]
    # The floor set by arithmetic alone: the prompt's forward FLOPs at a large matmul's rate on the worker's thread.
    import torch

    from axl_model.config import ModelConfig

    flops = training_flops_per_byte(ModelConfig.from_name("micro"), PROMPT_BYTES + 1) / 3 * (PROMPT_BYTES + 1)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    peak = matmul_peak_flops(clock=time.process_time)  # per CPU-second, as the worker's CPU time below
    torch.set_num_threads(threads_before)
    floor_ms = flops / peak * 1000
    cpu_ms = min(figures["chunk256.worker_cpu_ms_per_request"], figures["one_go.worker_cpu_ms_per_request"])
    print(f"  the prompt's forward pass is {flops / 1e9:.1f} GFLOP: {floor_ms:.0f} CPU-ms at a 2048^3 matmul's "
          f"{peak / 1e9:.0f} GFLOP per CPU-second on {threads} thread here; the worker's {cpu_ms:.0f} CPU-ms per "
          f"request is {cpu_ms / floor_ms:.2f}x that floor")
    figures.update(prompt_gflop=flops / 1e9, matmul_gflop_s=peak / 1e9, flop_floor_ms=floor_ms)
    print(f"  target p50 under {TARGET_MS:.0f} ms: {'met' if best < TARGET_MS else 'not met'} (best p50 {best:.1f} ms; "
          f"load average {load:.1f})")
    figures["load_average_1min"] = load
    return figures


if __name__ == "__main__":
    run(defaults())
