"""Inter-token latency of 7 running streams while an 8th request arrives with a full-window prompt, with the prompt
read in one go (AXL_PREFILL_CHUNK_TOKENS=0, before) and in chunks of 256 tokens between decode steps (after).

Drives the model worker's scheduler in-process (its model thread, its batching, a random-init `micro` or
`micro-long`, one torch thread as the worker defaults to) and times each stream's tokens where its reader receives
them. The figures cover the stretch from half a second before the 8th request's arrival to half a second after its
first token: p50 (a steady step), p99 and the longest gap of the 7 streams there, and the 8th's time to first token
(what chunking costs it)."""
from __future__ import annotations

import asyncio
import statistics
import time

import torch

from axl_model.config import ModelConfig
from axl_model.generate import SamplingParams
from axl_model.model import MultiScaleTransformer
from services.model_worker.scheduler import GenerationFailed, GenerationRequest, Scheduler

from .common import defaults

STREAMS, CHUNK, PRESETS = 7, 256, ("micro", "micro-long")
WARMUP_TOKENS = 40  # every stream is decoding (for over a MARGIN_SECONDS) before the long prompt arrives
MARGIN_SECONDS = 0.5  # steady decoding measured before the arrival and after the first token


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def _measure(scheduler: Scheduler, window: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    endless = SamplingParams(max_tokens=10**6, temperature=0.0, stop_at_eos=False)
    streams = [GenerationRequest([256, 40 + i, 50 + i * 3] * (i + 1), endless, loop=loop) for i in range(STREAMS)]
    arrivals: list[list[float]] = [[] for _ in streams]
    long_prompt = [256, *(range(32, 127))] * (window // 96 + 1)
    long_request = GenerationRequest(long_prompt[: window - 64], SamplingParams(max_tokens=16, temperature=0.0,
                                                                              stop_at_eos=False), loop=loop)
    done = asyncio.Event()

    async def read(i: int, request: GenerationRequest) -> None:
        while not done.is_set():
            event = await request.events.get()
            if isinstance(event, GenerationFailed):
                raise RuntimeError(str(event))
            arrivals[i].append(time.perf_counter())

    for request in streams:
        scheduler.submit(request)
    readers = [asyncio.ensure_future(read(i, r)) for i, r in enumerate(streams)]
    while min(len(a) for a in arrivals) < WARMUP_TOKENS:
        await asyncio.sleep(0.005)
    submitted = time.perf_counter()
    scheduler.submit(long_request)
    first = await long_request.events.get()
    first_token_at = time.perf_counter()
    assert not isinstance(first, GenerationFailed), first
    await asyncio.sleep(MARGIN_SECONDS)  # steady decoding after it, as before it
    done.set()
    for request in [*streams, long_request]:
        scheduler.cancel(request)
    for reader in readers:
        reader.cancel()
    gaps = []  # between consecutive tokens of a stream, the later one within the measured stretch
    for times in arrivals:
        gaps += [(b - a) * 1000 for a, b in zip(times, times[1:])
                 if submitted - MARGIN_SECONDS <= b <= first_token_at + MARGIN_SECONDS]
    return {"itl_p50_ms": statistics.median(gaps), "itl_p99_ms": _percentile(gaps, 0.99), "itl_max_ms": max(gaps),
            "long_prompt_ttft_ms": (first_token_at - submitted) * 1000, "long_prompt_tokens": len(long_request.prompt_ids)}


def _run_one(preset: str, chunk: int) -> dict[str, float]:
    def load() -> MultiScaleTransformer:
        torch.manual_seed(0)
        return MultiScaleTransformer(ModelConfig.from_name(preset)).eval()

    scheduler = Scheduler(load, max_batch=STREAMS + 1, max_queue=0, num_threads=1, stalled_reader_seconds=600,
                          prefill_chunk=chunk)
    scheduler.start()
    assert scheduler.loaded.wait(120) and scheduler.load_error is None, scheduler.load_error
    try:
        return asyncio.run(_measure(scheduler, ModelConfig.from_name(preset).max_seq_len))
    finally:
        scheduler.stop()


def run(args) -> dict:
    figures: dict[str, float] = {}
    for preset in getattr(args, "presets", None) or PRESETS:
        for label, chunk in (("one_shot", 0), (f"chunk{CHUNK}", CHUNK)):
            result = _run_one(preset, chunk)
            print(f"{preset:>10} {label:>9}: {STREAMS} streams' inter-token ms p50 {result['itl_p50_ms']:6.1f}  "
                  f"p99 {result['itl_p99_ms']:7.1f}  max {result['itl_max_ms']:7.1f}; the {result['long_prompt_tokens']}"
                  f"-token prompt's first token after {result['long_prompt_ttft_ms']:7.1f} ms")
            for key, value in result.items():
                if key != "long_prompt_tokens":
                    figures[f"{preset}.{label}.{key}"] = value
        figures[f"{preset}.p99_ratio_one_shot_vs_chunked"] = (figures[f"{preset}.one_shot.itl_p99_ms"]
                                                              / figures[f"{preset}.chunk{CHUNK}.itl_p99_ms"])
    return figures


if __name__ == "__main__":
    run(defaults())
