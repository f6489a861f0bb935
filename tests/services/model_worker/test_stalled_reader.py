"""A request whose reader stops reading is cancelled and frees its row; its buffered outputs stay bounded."""

from __future__ import annotations

import asyncio
import time

import torch

from axl_model import ModelConfig, MultiScaleTransformer
from axl_model.generate import SamplingParams
from services.model_worker.scheduler import GenerationFailed, GenerationRequest, OutputBuffer, Scheduler


def _scheduler(stalled_reader_seconds: float) -> Scheduler:
    def load() -> MultiScaleTransformer:
        torch.manual_seed(0)
        return MultiScaleTransformer(ModelConfig.from_name("tiny")).eval()

    scheduler = Scheduler(load, max_batch=2, max_queue=0, num_threads=1, stalled_reader_seconds=stalled_reader_seconds)
    scheduler.start()
    assert scheduler.loaded.wait(30) and scheduler.load_error is None
    return scheduler


def test_a_reader_that_stops_reading_is_cancelled_and_its_row_freed() -> None:
    async def scenario() -> None:
        scheduler = _scheduler(stalled_reader_seconds=0.3)
        try:
            # A sliding window and no end of text: this request would decode forever for nobody.
            endless = SamplingParams(max_tokens=10**9, temperature=1.0, seed=1, stop_at_eos=False)
            request = GenerationRequest([65, 66, 67], endless, loop=asyncio.get_running_loop())
            scheduler.submit(request)
            assert not isinstance(await request.events.get(), GenerationFailed)  # it runs; then nobody reads it
            deadline = time.monotonic() + 10
            while scheduler.running and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert scheduler.running == 0 and request.cancelled
            buffered = request.events.qsize()
            events = [await request.events.get() for _ in range(buffered)]
            assert isinstance(events[-1], GenerationFailed) and "stopped reading" in str(events[-1])
            # A reader that keeps up is never cut off.
            steady = GenerationRequest([65], SamplingParams(max_tokens=200, seed=2, stop_at_eos=False),
                                       loop=asyncio.get_running_loop())
            scheduler.submit(steady)
            outputs = []
            while not outputs or outputs[-1].finish_reason is None:
                outputs.append(await steady.events.get())
                assert not isinstance(outputs[-1], GenerationFailed)
            assert outputs[-1].finish_reason == "length"
        finally:
            scheduler.stop()

    asyncio.run(scenario())


def test_output_buffer_reports_the_wait_of_its_oldest_output() -> None:
    async def scenario() -> None:
        buffer = OutputBuffer()
        assert buffer.oldest_wait(time.monotonic()) == 0.0
        getter = asyncio.ensure_future(buffer.get())
        await asyncio.sleep(0)
        failed = GenerationFailed("x")
        buffer.put_nowait(failed)
        assert await getter is failed
        buffer.put_nowait(failed)
        assert buffer.qsize() == 1 and buffer.oldest_wait(time.monotonic() + 5) >= 5

    asyncio.run(scenario())
