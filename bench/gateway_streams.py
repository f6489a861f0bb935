"""Aggregate tokens/s of 1, 4 and 8 concurrent streams through the gateway (one `micro` worker, random init,
continuous batching up to 8): each stream asks for the same number of tokens with EOS ignored, and the total
tokens streamed back (counted from the SSE chunks) over the wall time gives the aggregate rate. The streams' prompts
have 8 different lengths (a ragged batch, as real traffic makes).

Two workers, one after the other: float32 eager (the default) and the best serving option, int8 weights through the
compiled decode step (AXL_DTYPE=int8, AXL_COMPILE=1; it compiles before /readyz: minutes cold, seconds from
inductor's cache). Beside the wall-clock rate, tokens per CPU-second of the worker process (what a loaded machine
bends least). Target (issue 10): 8 streams >= 4x one stream, with the best serving option."""
from __future__ import annotations

import asyncio
import json
import time

import httpx

from .common import defaults
from .gateway_latency import local_mesh, process_cpu_seconds

TOKENS_PER_STREAM = 96
CONCURRENCY = (1, 4, 8)
PROMPT = "def main():\n    "
RAGGED_EXTRA = (0, 5, 11, 18, 26, 35, 45, 56)  # bytes of comment before stream i's prompt: 8 lengths, each mod 4 twice
OPTIONS = {"float32": {}, "int8 compiled": {"AXL_DTYPE": "int8", "AXL_COMPILE": "1"}}
TARGET_RATIO = 4.0


async def _stream(client: httpx.AsyncClient, url: str, body: dict) -> int:
    pieces = 0
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    pieces += 1
                if chunk.get("usage"):
                    return int(chunk["usage"]["completion_tokens"])
    return pieces


def _prompt(stream: int) -> str:
    extra = RAGGED_EXTRA[stream % len(RAGGED_EXTRA)]
    return ("#" * extra + "\n" if extra else "") + PROMPT


async def _aggregate(url: str, model: str, streams: int, worker_pid: int) -> tuple[float, float]:
    """(tokens per wall-clock second, tokens per CPU-second of the worker) of `streams` concurrent streams."""
    body = {"model": model, "max_tokens": TOKENS_PER_STREAM, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(timeout=300) as client:
        await _stream(client, url, {**body, "prompt": PROMPT, "max_tokens": 4})  # warm-up
        started, cpu = time.perf_counter(), process_cpu_seconds(worker_pid)
        counts = await asyncio.gather(*(_stream(client, url, {**body, "prompt": _prompt(i)}) for i in range(streams)))
        wall, cpu = time.perf_counter() - started, process_cpu_seconds(worker_pid) - cpu
        return sum(counts) / wall, sum(counts) / cpu


def run(args) -> dict:
    figures: dict[str, float | str] = {}
    for option, worker_env in OPTIONS.items():
        key = option.replace(" ", "_")
        with local_mesh(getattr(args, "threads", None), max_batch=max(CONCURRENCY), worker_env=worker_env,
                        worker_start_seconds=3600 if worker_env else 120) as mesh:
            assert mesh.worker.proc is not None
            url = mesh.gateway.url + "/v1/completions"
            print(f"{option} worker ({', '.join(f'{k}={v}' for k, v in worker_env.items()) or 'the defaults'}):")
            for streams in CONCURRENCY:
                rate, per_cpu = asyncio.run(_aggregate(url, mesh.model_id, streams, mesh.worker.proc.pid))
                figures[f"{key}_tokens_per_s_{streams}_streams"] = rate
                figures[f"{key}_tokens_per_worker_cpu_s_{streams}_streams"] = per_cpu
                print(f"  {streams} stream(s): {rate:8.1f} tokens/s aggregate, {per_cpu:8.1f} per worker CPU-second")
        ratio = figures[f"{key}_tokens_per_s_8_streams"] / figures[f"{key}_tokens_per_s_1_streams"]
        cpu_ratio = (figures[f"{key}_tokens_per_worker_cpu_s_8_streams"]
                     / figures[f"{key}_tokens_per_worker_cpu_s_1_streams"])
        figures[f"{key}_speedup_8_vs_1"], figures[f"{key}_speedup_8_vs_1_worker_cpu"] = ratio, cpu_ratio
        print(f"  8 vs 1: {ratio:.2f}x wall clock, {cpu_ratio:.2f}x per worker CPU-second")
    ratio = figures["int8_compiled_speedup_8_vs_1"]
    figures["target_8_streams_4x"] = "met" if ratio >= TARGET_RATIO else "missed"
    print(f"int8 compiled, 8 vs 1 stream: {ratio:.2f}x (target {TARGET_RATIO:.0f}x: {figures['target_8_streams_4x']})")
    return figures


if __name__ == "__main__":
    run(defaults())
