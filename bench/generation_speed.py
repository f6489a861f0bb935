"""Generation speed of micro: batch 1 with the KV cache vs without (a full forward pass per token), and the
aggregate tokens/s of 8 sequences decoding together in a BatchDecoder, in float32 and in float16 (the model
worker's AXL_DTYPE). Greedy, EOS ignored, so every run produces exactly the tokens asked for; the weights are
random (speed does not depend on them).

The batch of 8 is ragged, as real batches are: 8 prompts of different lengths (every length mod 4 twice), so
rows complete their medium and coarse groups at different steps. Identical prompts (every row completing its
groups together, the mask-free path) are printed beside it for comparison, not as the figure."""
from __future__ import annotations

import time

import torch

from axl_model.config import ModelConfig
from axl_model.generate import BatchDecoder, SamplingParams
from axl_model.model import MultiScaleTransformer
from axl_model.tokenizer import ByteTokenizer

from .common import defaults

PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
RAGGED_EXTRA = (0, 5, 11, 18, 26, 35, 45, 56)  # bytes added to the prompt per row: 8 lengths, each mod 4 twice
CACHED_TOKENS, UNCACHED_TOKENS, BATCH = 256, 64, 8
ORIGINAL_RELEASE_TOK_S, TARGET_TOK_S = 66, 1000  # the original AXL release's micro figure; our batch-1 target


def params(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n + 1, temperature=0.0, stop_at_eos=False)


@torch.inference_mode()
def cached_tokens_per_s(model, prompts: list[list[int]], n: int, decode_step=None, clock=time.perf_counter) -> float:
    """decode_step: a `compiled.CompiledDecodeStep` of `model` (warmed up: no compilation inside the timing);
    clock=time.process_time: tokens per CPU-second of this process (what a loaded, shared machine distorts least)."""
    decoder = BatchDecoder(model, max_batch=len(prompts), decode_step=decode_step)
    for prompt in prompts:
        decoder.add(prompt, params(n))
    decoder.step()  # warm-up step
    started = clock()
    produced = 0
    for _ in range(n - 1):
        produced += len(decoder.step())
    return produced / (clock() - started)


@torch.inference_mode()
def uncached_tokens_per_s(model, prompt: list[int], n: int) -> float:
    ids = torch.tensor([prompt])
    model(ids)  # warm-up
    started = time.perf_counter()
    for _ in range(n):
        next_id = model(ids[:, -model.config.max_seq_len :])[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return n / (time.perf_counter() - started)


def run(args) -> dict:
    torch.manual_seed(0)
    model = MultiScaleTransformer(ModelConfig.from_name("micro")).eval()
    prompt = ByteTokenizer().encode(PROMPT)
    cached = cached_tokens_per_s(model, [prompt], CACHED_TOKENS)
    uncached = uncached_tokens_per_s(model, prompt, UNCACHED_TOKENS)
    ragged_prompts = [prompt + ByteTokenizer().encode("#" * extra)[1:] for extra in RAGGED_EXTRA]  # no 2nd BOS
    batched = cached_tokens_per_s(model, ragged_prompts, CACHED_TOKENS)
    uniform = cached_tokens_per_s(model, [prompt] * BATCH, CACHED_TOKENS)
    half = model.half()
    cached_half = cached_tokens_per_s(half, [prompt], CACHED_TOKENS)
    batched_half = cached_tokens_per_s(half, ragged_prompts, CACHED_TOKENS)
    print(f"micro, prompt {len(prompt)} bytes, greedy:")
    print(f"  batch 1, KV cache:        {cached:8,.0f} tokens/s ({CACHED_TOKENS} tokens)")
    print(f"  batch 1, no cache:        {uncached:8,.0f} tokens/s ({UNCACHED_TOKENS} tokens, full forward each)")
    print(f"  batch {BATCH} ragged, KV cache: {batched:8,.0f} tokens/s aggregate ({batched / BATCH:,.0f} per sequence; "
          f"prompts of {min(map(len, ragged_prompts))}-{max(map(len, ragged_prompts))} bytes)")
    print(f"  batch {BATCH} identical prompts: {uniform:6,.0f} tokens/s aggregate (ragged / identical: "
          f"{batched / uniform:.2f})")
    print(f"  float16, batch 1, KV cache: {cached_half:6,.0f} tokens/s")
    print(f"  float16, batch {BATCH} ragged, KV cache: {batched_half:6,.0f} tokens/s aggregate")
    print(f"  cache speed-up at batch 1: {cached / uncached:.1f}x; float16 vs float32 at batch 1: "
          f"{cached_half / cached:.2f}x")
    best = max(cached, cached_half)
    print(f"  best batch 1: {best / ORIGINAL_RELEASE_TOK_S:.1f}x the original release's {ORIGINAL_RELEASE_TOK_S} "
          f"tokens/s; target {TARGET_TOK_S:,}: {'met' if best >= TARGET_TOK_S else 'not met'}")
    return {"batch1_cached_tok_s": cached, "batch1_uncached_tok_s": uncached, f"batch{BATCH}_aggregate_tok_s": batched,
            f"batch{BATCH}_identical_prompts_aggregate_tok_s": uniform, "ragged_vs_identical": batched / uniform,
            "cache_speedup": cached / uncached, "float16_batch1_cached_tok_s": cached_half,
            f"float16_batch{BATCH}_aggregate_tok_s": batched_half, "float16_speedup": cached_half / cached}


if __name__ == "__main__":
    torch.set_num_threads(defaults().threads)
    run(defaults())
