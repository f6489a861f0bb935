"""Time to first token of a 1 KB prompt on one idle `micro` worker: a real model worker process (random-init micro,
1 torch thread as the worker defaults to) over HTTP, streamed, max_tokens 1, one request at a time.

Each request's prompt is 1,000 bytes of Python source (a different stretch of the standard library's `inspect.py`
each time, ASCII, so 1,000 tokens plus BOS), sent straight to the worker (`/internal/v1/generate`, its NDJSON
stream) and through the gateway (`/v1/completions`, server-sent events), alternately; the time is from sending the
request to receiving the first streamed line, which comes after the first token. p50 and p90 over the requests,
for the worker's default chunked prefill (AXL_PREFILL_CHUNK_TOKENS=256) and for the prompt read in one go (0), and
the worker's CPU time per request (what a loaded machine bends least). The target is under 50 ms (issue 10).

Then as an editor sends it (Continue's autocomplete resends the file above the cursor on every keystroke): one
1,000-byte prompt whose last EDITED_BYTES bytes change on every request, with the worker's prompt prefix cache
(AXL_PREFIX_CACHE_MB, default 256: the kept prefix is restored, only the changed end is prefilled) and without it (0),
the same figures, and the prefix cache's hits and reused tokens from the worker's /metrics.

Last, an editor on a file longer than the window (micro's 1,024 bytes): a 3,000-byte stretch of `inspect.py` that
grows by TYPED_BYTES bytes typed at its end before every request, sent with `truncate` (the worker fits it into the
window: its end, the head dropped in whole blocks, axl_model.prompt_fit), prefix cache on vs off. While the file
grows within a block the fitted prompt keeps its start, so the kept prefix is restored.
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
EDITED_BYTES = 20
LONG_FILE_BYTES, TYPED_BYTES = 3000, 5
TARGET_MS = 50.0


def prompts(n: int) -> list[str]:
    """n prompts of exactly PROMPT_BYTES ASCII bytes: stretches of inspect.py at n offsets."""
    source = bytes(b for b in inspect.getsource(inspect).encode() if b < 128)
    step = (len(source) - PROMPT_BYTES) // n
    return [source[i * step:i * step + PROMPT_BYTES].decode("ascii") for i in range(n)]


def edited_prompts(n: int) -> list[str]:
    """n prompts of PROMPT_BYTES bytes: one stretch of inspect.py whose last EDITED_BYTES bytes differ each time."""
    text = prompts(1)[0][: PROMPT_BYTES - EDITED_BYTES]
    return [text + f"value_{i:03d} = call({i})".ljust(EDITED_BYTES)[:EDITED_BYTES] for i in range(n)]


def typed_file_prompts(n: int) -> list[str]:
    """n prompts: a LONG_FILE_BYTES-byte stretch of inspect.py, TYPED_BYTES more of it typed before each request."""
    source = bytes(b for b in inspect.getsource(inspect).encode() if b < 128).decode("ascii")
    return [source[: LONG_FILE_BYTES + TYPED_BYTES * i] for i in range(n)]


def metric_samples(client: httpx.Client, url: str, *samples: str) -> list[float]:
    """The values of samples (name plus labels as /metrics writes them) in a worker's /metrics; 0 when absent."""
    values = dict(line.rsplit(" ", 1) for line in client.get(url + "/metrics").text.splitlines()
                  if line and not line.startswith("#"))
    return [float(values.get(sample, 0.0)) for sample in samples]


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


def measure(chunk: int, threads: int | None, texts: list[str] | None = None,
            prefix_cache_mb: float | None = None, truncate: bool = False) -> dict[str, float]:
    """texts: the prompts of the requests, alternately straight to the worker and through the gateway (default:
    other stretches); truncate: fit prompts longer than the window into it (else they are refused)."""
    texts = texts or prompts(2 * (WARMUP + REQUESTS))
    settings = {"AXL_PREFILL_CHUNK_TOKENS": str(chunk)}
    if prefix_cache_mb is not None:
        settings["AXL_PREFIX_CACHE_MB"] = str(prefix_cache_mb)
    with local_mesh(threads or 1, max_batch=8, preset="micro", worker_env=settings) as mesh:
        direct_url = mesh.worker.url + "/internal/v1/generate"
        gateway_url = mesh.gateway.url + "/v1/completions"
        auth = {"Authorization": f"Bearer {SECRET}"}
        assert mesh.worker.proc is not None
        worker_pid = mesh.worker.proc.pid
        direct, through = [], []
        with httpx.Client(timeout=60) as client:
            for i, (text, other) in enumerate(zip(texts[0::2], texts[1::2], strict=True)):
                if i == WARMUP:
                    cpu_before = process_cpu_seconds(worker_pid)
                body = {"max_tokens": 1, "temperature": 0.0, "stream": True, "truncate": truncate}
                d = first_line_ms(client, direct_url, {"prompt": text, **body}, auth, "{")
                g = first_line_ms(client, gateway_url, {"model": mesh.model_id, "prompt": other, **body}, None, "data:")
                if i >= WARMUP:
                    direct.append(d)
                    through.append(g)
            worker_cpu_ms = (process_cpu_seconds(worker_pid) - cpu_before) * 1000 / (2 * REQUESTS)
            hits, misses, reused = metric_samples(  # warm-up requests included
                client, mesh.worker.url, 'axl_worker_prefix_cache_lookups_total{result="hit"}',
                'axl_worker_prefix_cache_lookups_total{result="miss"}', "axl_worker_prefix_cache_reused_tokens_total")
    return {"prefix_hits": hits, "prefix_misses": misses, "prefix_reused_tokens": reused,
            "direct_p50_ms": statistics.median(direct), "direct_p90_ms": _percentile(direct, 0.9),
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
    print(f"  as an editor sends it: one {PROMPT_BYTES:,}-byte prompt, its last {EDITED_BYTES} bytes changed on every "
          "request (chunks of 256):")
    edited = edited_prompts(2 * (WARMUP + REQUESTS))  # each request's prompt differs from the one before
    figures.update(prefix_cache_on_off("edited", edited, threads))
    figures.update(typed_long_file(threads))
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
    edited_p50 = figures["edited_cached.direct_p50_ms"]
    print(f"  as an editor sends it, with the prefix cache: {'met' if edited_p50 < TARGET_MS else 'not met'} "
          f"(p50 {edited_p50:.1f} ms)")
    typed_p50 = figures["typed_cached.direct_p50_ms"]
    print(f"  a file longer than the window typed at its end, with the prefix cache: "
          f"{'met' if typed_p50 < TARGET_MS else 'not met'} (p50 {typed_p50:.1f} ms)")
    figures["load_average_1min"] = load
    return figures


def typed_long_file(threads: int) -> dict[str, float]:
    """The editor on a file longer than the window (see the module's doc), prefix cache on vs off."""
    print(f"  a {LONG_FILE_BYTES:,}-byte file (longer than the 1,024-byte window), {TYPED_BYTES} bytes typed at its "
          "end before every request, fitted into the window (truncate; chunks of 256):")
    typed = typed_file_prompts(2 * (WARMUP + REQUESTS))
    figures = prefix_cache_on_off("typed", typed, threads, truncate=True)
    ratio = figures["typed_uncached.worker_cpu_ms_per_request"] / figures["typed_cached.worker_cpu_ms_per_request"]
    print(f"  worker CPU per request without the cache / with it: {ratio:.1f}x")
    figures["typed.cpu_ratio"] = ratio
    return figures


def prefix_cache_on_off(label: str, prompts, threads: int, truncate: bool = False) -> dict[str, float]:
    """The same prompt sequence against a worker with the prefix cache on (256 MB) and off (chunks of 256):
    figures keyed `<label>_cached.*` and `<label>_uncached.*`."""
    figures = {}
    for suffix, cache_mb in (("cached", 256.0), ("uncached", 0.0)):
        result = measure(256, threads, prompts, cache_mb, truncate=truncate)
        print(f"  prefix cache {'on (256 MB)' if cache_mb else 'off':11s} worker p50 {result['direct_p50_ms']:6.1f} "
              f"p90 {result['direct_p90_ms']:6.1f} ms; through the gateway p50 {result['gateway_p50_ms']:6.1f} "
              f"p90 {result['gateway_p90_ms']:6.1f} ms; worker CPU {result['worker_cpu_ms_per_request']:.1f} "
              f"ms/request; {result['prefix_hits']:.0f} hits, {result['prefix_misses']:.0f} misses, "
              f"{result['prefix_reused_tokens']:.0f} tokens reused")
        for key, value in result.items():
            figures[f"{label}_{suffix}.{key}"] = value
    return figures


if __name__ == "__main__":
    run(defaults())
