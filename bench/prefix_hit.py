"""The worker's model thread alone on a prompt prefix cache hit: micro (random init), 1 thread, in-process.

Each prompt goes through a BatchDecoder as the worker reads it (prefill in chunks of 256, max_tokens 1, the prompt
prefix cache on), and the CPU time of the whole request is taken (`time.process_time`: what a loaded machine bends
least). Two editor patterns, each against a cold prefill of the same prompts (the cache off) in the same run:
- the 1,000-byte prompt whose last 20 bytes change on every request (bench.first_token's edited prompts);
- a 3,000-byte file typed at its end, 5 bytes per request, fitted into the 1,024-byte window the way the worker fits
  it (axl_model.prompt_fit.fit_text: its head dropped in whole blocks, so the kept start holds between blocks).
What a hit costs is the restore (the kept state written into the row) and `extend` over the few new bytes.
"""
from __future__ import annotations

import statistics
import time

import torch

from axl_model import BatchDecoder, ModelConfig, SamplingParams
from axl_model.model import MultiScaleTransformer
from axl_model.prefix_cache import PrefixCache
from axl_model.prompt_fit import fit_text, generation_reserve
from axl_model.tokenizer import ByteTokenizer

from .first_token import edited_prompts, typed_file_prompts

PROMPTS, WARMUP = 40, 5
PARAMS = SamplingParams(max_tokens=1, temperature=0.0)


def cpu_ms_per_request(model: MultiScaleTransformer, prompts: list[list[int]], cache_mb: float) -> tuple[list, int]:
    """CPU-ms of each prompt after the warm-up ones, and the prefix cache's hits among them."""
    cache = PrefixCache(int(cache_mb * (1 << 20))) if cache_mb else None
    decoder = BatchDecoder(model, max_batch=8, prefill_chunk=256, prefix_cache=cache)
    times = []
    for index, prompt in enumerate(prompts):
        hits_before = cache.hits if cache else 0
        started = time.process_time()
        decoder.add(prompt, PARAMS)
        while decoder.prefilling or decoder.active:
            decoder.advance_prefill()
            decoder.step()
        if index >= WARMUP:
            times.append(((time.process_time() - started) * 1000, (cache.hits if cache else 0) > hits_before))
    return [t for t, _ in times], sum(hit for _, hit in times)


def run(args) -> dict:
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker's default
    torch.manual_seed(0)
    config = ModelConfig.from_name("micro")
    model = MultiScaleTransformer(config).eval()
    tokenizer = ByteTokenizer()
    budget = config.max_seq_len - generation_reserve(PARAMS.max_tokens, config.max_seq_len)
    patterns = {
        "edited": [tokenizer.encode(text) for text in edited_prompts(PROMPTS)],
        "typed": [fit_text(tokenizer, text, budget).ids for text in typed_file_prompts(PROMPTS)],
    }
    figures: dict = {}
    print(f"micro (random init), 1 thread, in-process; CPU-ms per request, p50 of {PROMPTS - WARMUP} after {WARMUP}:")
    for name, prompts in patterns.items():
        hit, hits = cpu_ms_per_request(model, prompts, 256.0)
        cold, _ = cpu_ms_per_request(model, prompts, 0.0)
        hit_p50, cold_p50 = statistics.median(hit), statistics.median(cold)
        print(f"  {name:6s} ({len(prompts[-1]):,} tokens): prefix cache {hit_p50:6.1f} CPU-ms ({hits} hits of "
              f"{len(hit)}), cold prefill {cold_p50:6.1f}: {cold_p50 / hit_p50:.1f}x")
        figures.update({f"{name}.hit_cpu_ms_p50": hit_p50, f"{name}.cold_cpu_ms_p50": cold_p50,
                        f"{name}.hits": hits, f"{name}.ratio": cold_p50 / hit_p50})
    torch.set_num_threads(threads_before)
    return figures


if __name__ == "__main__":
    from .common import defaults

    run(defaults())
