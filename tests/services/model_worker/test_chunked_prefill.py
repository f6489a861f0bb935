"""Chunked prefill in the scheduler: a long prompt is read a chunk per decode step while the running rows keep
streaming, and every request gets the tokens a one-shot prefill gives."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from axl_model import Generator, ModelConfig, MultiScaleTransformer
from axl_model.generate import SamplingParams
from services.model_worker.scheduler import GenerationFailed, GenerationRequest, Scheduler

CHUNK = 8


def _model() -> MultiScaleTransformer:
    torch.manual_seed(0)
    return MultiScaleTransformer(ModelConfig.from_name("tiny")).eval()  # a 128-byte window


def _scheduler(load=_model) -> Scheduler:
    scheduler = Scheduler(load, max_batch=3, max_queue=0, num_threads=1, stalled_reader_seconds=30,
                          prefill_chunk=CHUNK)
    scheduler.start()
    assert scheduler.loaded.wait(30) and scheduler.load_error is None
    return scheduler


async def _read(name: str, request: GenerationRequest, log: list[tuple[str, object]]) -> list:
    outputs = []
    while not outputs or (not isinstance(outputs[-1], GenerationFailed) and outputs[-1].finish_reason is None):
        outputs.append(await request.events.get())
        log.append((name, outputs[-1]))
    return outputs


def test_running_streams_keep_streaming_while_a_long_prompt_is_read_in_chunks() -> None:
    greedy = SamplingParams(max_tokens=60, temperature=0.0, stop_at_eos=False)
    short_prompts, long_prompt = [[256, 65, 66], [256, 100, 101, 102]], [256, *range(40, 159)]  # 120 tokens

    async def scenario() -> dict[str, list]:
        scheduler = _scheduler()
        loop = asyncio.get_running_loop()
        log: list[tuple[str, object]] = []
        try:
            shorts = [GenerationRequest(p, greedy, loop=loop) for p in short_prompts]
            readers = []
            for i, request in enumerate(shorts):
                scheduler.submit(request)
                readers.append(asyncio.ensure_future(_read(f"short{i}", request, log)))
            while len({name for name, _ in log}) < 2:  # both rows decode
                await asyncio.sleep(0.01)
            long_request = GenerationRequest(long_prompt, SamplingParams(max_tokens=5, temperature=0.0,
                                                                        stop_at_eos=False), loop=loop)
            scheduler.submit(long_request)
            submitted_at = len(log)
            readers.append(asyncio.ensure_future(_read("long", long_request, log)))
            results = await asyncio.wait_for(asyncio.gather(*readers), 120)
        finally:
            scheduler.stop()
        first_long = next(i for i, (name, _) in enumerate(log) if name == "long")
        between = [name for name, _ in log[submitted_at:first_long]]
        # One chunk per decode step: each short row got a token for (nearly) every chunk but the last.
        chunks = math.ceil(len(long_prompt) / CHUNK)
        assert between.count("short0") >= chunks - 2 and between.count("short1") >= chunks - 2, between
        return {"short0": results[0], "short1": results[1], "long": results[2]}

    results = asyncio.run(scenario())
    reference = Generator(_model())
    for name, prompt, params in (("short0", short_prompts[0], greedy), ("short1", short_prompts[1], greedy),
                                 ("long", long_prompt, SamplingParams(max_tokens=5, temperature=0.0, stop_at_eos=False))):
        assert not any(isinstance(o, GenerationFailed) for o in results[name])
        tokens = [o.token_id for o in results[name] if o.token_id is not None]
        assert tokens == reference.generate(prompt, params).token_ids, name


def test_a_chunk_that_fails_fails_only_its_request(monkeypatch: pytest.MonkeyPatch) -> None:
    def load() -> MultiScaleTransformer:
        model = _model()
        original = model.extend

        def extend(ids, cache, row):
            if int(cache.lengths[row]) >= 2 * CHUNK:
                raise RuntimeError("boom")
            return original(ids, cache, row)

        model.extend = extend
        return model

    async def scenario() -> None:
        scheduler = _scheduler(load)
        loop = asyncio.get_running_loop()
        try:
            params = SamplingParams(max_tokens=30, temperature=0.0, stop_at_eos=False)
            short, long = GenerationRequest([256, 65], params, loop=loop), GenerationRequest([256] * 60, params, loop=loop)
            scheduler.submit(short)
            scheduler.submit(long)
            log: list = []
            short_out, long_out = await asyncio.wait_for(
                asyncio.gather(_read("short", short, log), _read("long", long, log)), 60)
            assert isinstance(long_out[-1], GenerationFailed) and "boom" in str(long_out[-1])
            assert short_out[-1].finish_reason == "length" and len(short_out) == 30
            assert scheduler.running == 0
        finally:
            scheduler.stop()

    asyncio.run(scenario())
