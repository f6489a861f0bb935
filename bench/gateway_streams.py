"""Aggregate tokens/s of 1, 4 and 8 concurrent streams through the gateway (one `micro` worker, random init,
continuous batching up to 8): each stream asks for the same number of tokens with EOS ignored, and the total
tokens streamed back (counted from the SSE chunks) over the wall time gives the aggregate rate.
Target: 8 streams >= 3x one stream."""
from __future__ import annotations

import asyncio
import json
import time

import httpx

from .common import defaults
from .gateway_latency import local_mesh

TOKENS_PER_STREAM = 96
CONCURRENCY = (1, 4, 8)


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


async def _aggregate(url: str, model: str, streams: int) -> float:
    body = {"model": model, "prompt": "def main():\n    ", "max_tokens": TOKENS_PER_STREAM, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(timeout=300) as client:
        await _stream(client, url, {**body, "max_tokens": 4})  # warm-up
        started = time.perf_counter()
        counts = await asyncio.gather(*(_stream(client, url, body) for _ in range(streams)))
        return sum(counts) / (time.perf_counter() - started)


def run(args) -> dict:
    figures: dict[str, float | str] = {}
    with local_mesh(getattr(args, "threads", None), max_batch=max(CONCURRENCY)) as mesh:
        url = mesh.gateway.url + "/v1/completions"
        for streams in CONCURRENCY:
            rate = asyncio.run(_aggregate(url, mesh.model_id, streams))
            figures[f"tokens_per_s_{streams}_streams"] = rate
            print(f"{streams} stream(s): {rate:8.1f} tokens/s aggregate")
    figures["speedup_8_vs_1"] = figures["tokens_per_s_8_streams"] / figures["tokens_per_s_1_streams"]
    figures["target_8_streams_3x"] = "met" if figures["speedup_8_vs_1"] >= 3.0 else "missed"
    print(f"8 vs 1: {figures['speedup_8_vs_1']:.2f}x ({figures['target_8_streams_3x']})")
    return figures


if __name__ == "__main__":
    run(defaults())
