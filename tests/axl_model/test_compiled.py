"""The compiled static-shape decode step: the eager step's tokens, and no compilation after warm-up.

One tiny model with local windows (its fine and medium rings wrap) and a 64-byte window (BatchDecoder slides it
several times in 300 tokens) is compiled once for the module: three step kinds for batch 1, three for larger
batches (batch 2's graphs serve batch 3). Then 300 greedy tokens at batch 1 and in a ragged batch of 3 (rows at
every phase of a coarse group, so every step kind occurs with rows completing different groups) must equal eager
decoding token for token, with the compilation count unchanged.
"""

import logging
import shutil

import pytest
import torch

from axl_model import BatchDecoder, ModelConfig, SamplingParams
from axl_model.compiled import STEP_KINDS, CompiledDecodeStep, compiler_available, step_kind
from tests.checkpoints import perturbed_model

STEPS = 300
CONFIG = ModelConfig.from_name(
    "tiny", max_seq_len=64, scales={"fine": {"local_window": 8}, "medium": {"local_window": 16}}
)
HAS_CXX = any(shutil.which(c) for c in ("g++", "c++", "clang++"))


# Compiling takes ~70 CPU-seconds per batch family here (three graphs); on the shared 2-core VM under a load of 10
# that is several minutes of wall clock, so these tests get more than the suite's 10 minutes each.
COMPILE_TIMEOUT = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def compiled():
    """One compiled step, its graphs built per batch family on first use (`warm_up` inside the tests)."""
    if not HAS_CXX:  # fail closed: only a machine without any C++ compiler may skip
        pytest.skip("no C++ compiler on this machine: inductor cannot compile")
    assert compiler_available() is None, compiler_available()
    model = perturbed_model(CONFIG)
    return model, CompiledDecodeStep(model)


def decode(model, prompts, decode_step=None):
    """Greedy tokens of each prompt, decoded together in one BatchDecoder (windows slide at 64 bytes)."""
    decoder = BatchDecoder(model, max_batch=len(prompts), decode_step=decode_step)
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, stop_at_eos=False)
    sequences = [decoder.add(prompt, params)[0] for prompt in prompts]
    while decoder.active:
        decoder.step()
    return [s.generated for s in sequences]


@COMPILE_TIMEOUT
@pytest.mark.parametrize("lengths", [(15,), (13, 22, 7)], ids=["batch1", "ragged3"])
def test_compiled_step_gives_the_eager_tokens_and_never_recompiles(compiled, lengths):
    model, step = compiled
    before = step.compilations
    with torch.inference_mode():
        step.warm_up((min(len(lengths), 2),), capacity=CONFIG.max_seq_len)  # batch 3 runs on batch 2's graphs
    assert step.fallback_reason is None, step.fallback_reason
    assert step.compilations - before in (0, len(STEP_KINDS))  # 0: the family was compiled by an earlier test
    generator = torch.Generator().manual_seed(len(lengths))
    prompts = [[256] + torch.randint(32, 127, (n - 1,), generator=generator).tolist() for n in lengths]
    assert {n % 4 for n in lengths} == ({3} if len(lengths) == 1 else {1, 2, 3})  # ragged: 3 phases at once
    before, graphs = step.compilations, torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eager, fast = decode(model, prompts), decode(model, prompts, step)
    assert step.compilations == before, "a decode step recompiled after warm-up"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert step.fallback_reason is None
    assert all(len(tokens) == STEPS for tokens in fast)
    assert fast == eager


@COMPILE_TIMEOUT
@pytest.mark.parametrize("starts, expected_kinds", [((4, 6, 8), {0, 2}), ((5, 9, 12), {1, 2})])
def test_compiled_logits_match_the_eager_step_at_every_kind(compiled, starts, expected_kinds):
    """Beyond the argmax: the logits agree (float32 rounding only) on rows completing different groups. Rows of one
    parity give fine-only steps and quads completed by some rows only; rows of both parities, steps where some rows
    complete a pair and others nothing (a ragged batch never has all three kinds)."""
    model, step = compiled
    with torch.inference_mode():
        step.warm_up((2,), capacity=CONFIG.max_seq_len)
    before = step.compilations
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(7))
    eager_cache, fast_cache = model.new_cache(3), model.new_cache(3)
    with torch.inference_mode():
        for row, start in enumerate(starts):
            model.prefill(ids[row, :start], eager_cache, row)
            model.prefill(ids[row, :start], fast_cache, row)
        kinds = set()
        for t in range(12):
            tokens = torch.stack([ids[row, start + t] for row, start in enumerate(starts)])
            kinds.add(step_kind(fast_cache.lengths.tolist()))
            expected, got = model.decode_step(tokens, eager_cache), step(tokens, fast_cache)
            assert torch.allclose(got, expected, atol=1e-4), (t, (got - expected).abs().max())
        assert torch.equal(eager_cache.lengths, fast_cache.lengths)
    assert kinds == expected_kinds
    assert step.compilations == before and step.fallback_reason is None


def test_without_a_compiler_the_step_is_eager_and_says_so_once(caplog):
    """A missing C++ compiler (inductor's configured one) falls back to the eager step: same tokens, one log line."""
    from torch._inductor import config as inductor_config

    model = perturbed_model(CONFIG)
    with inductor_config.patch({"cpp.cxx": ("axl-no-such-compiler",)}), caplog.at_level(logging.WARNING):
        step = CompiledDecodeStep(model)
        tokens = decode(model, [[256, 100, 101]], step)
    assert step.fallback_reason and "axl-no-such-compiler" in step.fallback_reason
    assert step.compilations == 0
    assert tokens == decode(model, [[256, 100, 101]])
    warnings = [r for r in caplog.records if "compiled decode step unavailable" in r.getMessage()]
    assert len(warnings) == 1
