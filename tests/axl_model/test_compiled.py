"""The compiled static-shape decode step: the eager step's tokens, and no compilation after warm-up.

One tiny model with local windows (its fine and medium rings wrap) and a 64-byte window (BatchDecoder slides it
several times in 300 tokens) is compiled once for the module: three step kinds for batch 1, three for larger
batches (batch 2's graphs serve batch 3). Then 300 greedy tokens at batch 1 and in a ragged batch of 3 (rows at
every phase of a coarse group, so every step kind occurs with rows completing different groups) must equal eager
decoding token for token, with the compilation count unchanged; so must prompts restored from the prompt prefix
cache (the worker's AXL_COMPILE beside AXL_PREFIX_CACHE_MB). In the batch family the medium and coarse stacks run on
the rows completing their group only (sub-batches of 1 to all rows, consecutive or not), read from the profiler.
"""

import logging
import shutil

import pytest
import torch

from axl_model import BatchDecoder, ModelConfig, SamplingParams
from axl_model.compiled import STEP_KINDS, CompiledDecodeStep, compiler_available, completing_rows, step_kind
from axl_model.prefix_cache import PrefixCache
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


def attention_rows(step, tokens, cache) -> tuple[torch.Tensor, list[int]]:
    """A compiled step's logits, and the rows each of its attentions read (`axl::held_attention`'s queries), sorted."""
    with torch.profiler.profile(record_shapes=True) as profile:
        logits = step(tokens, cache)
    return logits, sorted(e.input_shapes[0][0] for e in profile.events() if e.name == "axl::held_attention")


def expected_attention_rows(lengths: list[int]) -> list[int]:
    """Each scale stepping attends once per layer and twice across scales, on its rows: fine on every row, medium and
    coarse on the rows completing their group."""
    kind = step_kind(lengths)
    rows = [len(lengths)] + [len(r) for r in completing_rows(lengths, kind)]
    return sorted(n for shape, n in zip(CONFIG.shapes(), rows, strict=False) for _ in range(shape.n_layers + 2))


@COMPILE_TIMEOUT
@pytest.mark.parametrize("starts, expected_kinds", [((4, 6, 8), {0, 2}), ((5, 9, 12), {1, 2})])
def test_compiled_logits_match_the_eager_step_at_every_kind(compiled, starts, expected_kinds):
    """Beyond the argmax: the logits agree (float32 rounding only) on rows completing different groups. Rows of one
    parity give fine-only steps and quads completed by some rows only (rows 0 and 2: not consecutive); rows of both
    parities, steps where some rows complete a pair and others nothing (a ragged batch never has all three kinds).
    The grouped stacks run on the completing rows only."""
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
            lengths = fast_cache.lengths.tolist()
            kinds.add(step_kind(lengths))
            expected, (got, rows) = model.decode_step(tokens, eager_cache), attention_rows(step, tokens, fast_cache)
            assert torch.allclose(got, expected, atol=1e-4), (t, (got - expected).abs().max())
            assert rows == expected_attention_rows(lengths), (t, lengths)
        assert torch.equal(eager_cache.lengths, fast_cache.lengths)
    assert kinds == expected_kinds
    assert step.compilations == before and step.fallback_reason is None


def shared_prefix_prompts() -> list[list[int]]:
    """A prompt, then prompts sharing its first bytes (cuts of every residue mod 4) with other endings, then itself."""
    generator = torch.Generator().manual_seed(11)
    base = [256] + torch.randint(32, 127, (40,), generator=generator).tolist()
    prompts = [base[:38]]
    for shared, tail in ((35, 6), (30, 9), (25, 3), (36, 2)):
        ending = torch.randint(32, 127, (tail,), generator=generator).tolist()
        ending[0] = base[shared] + 1 if base[shared] < 126 else 32  # share exactly `shared` tokens
        prompts.append(base[:shared] + ending)
    return [*prompts, base[:38]]


def decode_with_cache(model, prompts, decode_step, prefix_cache, chunk):
    """Greedy tokens of each prompt, added after another row joined (the batch at two lengths), 40 tokens each (the
    64-byte window slides); with `chunk`, prompts longer than it are read in chunks."""
    decoder = BatchDecoder(model, max_batch=2, prefill_chunk=chunk, decode_step=decode_step, prefix_cache=prefix_cache)
    params = SamplingParams(max_tokens=40, temperature=0.0, stop_at_eos=False)
    results = []
    for index, prompt in enumerate(prompts):
        decoder.add([256] + list(range(60, 66 + index)), params)
        sequence, _ = decoder.add(prompt, params)
        while decoder.active or decoder.prefilling:
            decoder.advance_prefill()
            decoder.step()
        results.append(sequence.generated)
    return results


@COMPILE_TIMEOUT
@pytest.mark.parametrize("chunk", [0, 8], ids=["one-go", "chunks-of-8"])
def test_compiled_step_after_prefix_cache_hits_gives_the_cold_tokens(compiled, chunk):
    """Rows restored from the prefix cache (their rings written by `restore`, the rest read by `extend`) then decoded
    by the compiled step give the tokens of a cold prefill decoded eagerly, and nothing recompiles."""
    model, step = compiled
    with torch.inference_mode():
        step.warm_up((1, 2), capacity=CONFIG.max_seq_len)  # no compilation if the tests above built both families
    prompts = shared_prefix_prompts()
    cache, reused = PrefixCache(1 << 30), []
    cache.observer = lambda prompt_tokens, reused_tokens: reused.append(reused_tokens)
    before = step.compilations
    warm = decode_with_cache(model, prompts, step, cache, chunk)
    assert step.compilations == before and step.fallback_reason is None
    assert all(n > 0 for n in reused[3::2])  # every prompt after the first restored a prefix (odd: the other rows)
    assert all(len(tokens) == 40 for tokens in warm)
    assert warm == decode_with_cache(model, prompts, None, None, chunk)


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
