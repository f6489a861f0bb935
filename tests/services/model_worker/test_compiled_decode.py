"""AXL_COMPILE=1: the worker decodes with the compiled static-shape step (axl_model.compiled). Compiling is
tested in tests/axl_model/test_compiled.py; here, the setting reaches the scheduler, and where the machine cannot
compile, the worker still serves the eager tokens and says why once in its log (never silently slower)."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch
from torch._inductor import config as inductor_config

from axl_model import Generator, ModelConfig, MultiScaleTransformer
from axl_model.generate import SamplingParams
from services.model_worker.scheduler import GenerationFailed, GenerationRequest, Scheduler
from services.model_worker.settings import Settings


def _model() -> MultiScaleTransformer:
    torch.manual_seed(0)
    return MultiScaleTransformer(ModelConfig.from_name("tiny")).eval()


def test_axl_compile_is_a_worker_setting(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("AXL_COMPILE", "1")
    assert Settings(registry_secret="a-test-secret", checkpoint=tmp_path).compile is True
    monkeypatch.delenv("AXL_COMPILE")
    assert Settings(registry_secret="a-test-secret", checkpoint=tmp_path).compile is False


def test_a_worker_that_cannot_compile_serves_eagerly_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    params = SamplingParams(max_tokens=40, temperature=0.0, stop_at_eos=False)
    prompts = [[256, 65, 66], [256, 100, 101, 102, 103]]

    def load_without_a_compiler() -> MultiScaleTransformer:
        # A real missing compiler: inductor's configured one names a program that does not exist. Inductor's settings
        # are per thread, and this runs in the scheduler's thread, the one that would compile.
        inductor_config.cpp.cxx = ("axl-no-such-compiler",)
        return _model()

    async def scenario() -> list[list]:
        scheduler = Scheduler(load_without_a_compiler, max_batch=2, max_queue=0, num_threads=1, stalled_reader_seconds=30,
                              compile=True)
        scheduler.start()
        assert scheduler.loaded.wait(300) and scheduler.load_error is None  # a busy 2-core VM
        loop = asyncio.get_running_loop()
        try:
            requests = [GenerationRequest(p, params, loop=loop) for p in prompts]
            for request in requests:
                scheduler.submit(request)

            async def read(request: GenerationRequest) -> list:
                outputs = [await request.events.get()]
                while not isinstance(outputs[-1], GenerationFailed) and outputs[-1].finish_reason is None:
                    outputs.append(await request.events.get())
                return outputs

            return await asyncio.wait_for(asyncio.gather(*(read(r) for r in requests)), 120)
        finally:
            scheduler.stop()

    with caplog.at_level(logging.WARNING):
        results = asyncio.run(scenario())
    reference = Generator(_model())
    for prompt, outputs in zip(prompts, results, strict=True):
        assert not any(isinstance(o, GenerationFailed) for o in outputs)
        assert [o.token_id for o in outputs if o.token_id is not None] == reference.generate(prompt, params).token_ids
    said = [r for r in caplog.records if "compiled decode step unavailable" in r.getMessage()]
    assert len(said) == 1 and "axl-no-such-compiler" in said[0].getMessage()
