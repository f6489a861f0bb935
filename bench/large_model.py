"""code-1b (259.5M parameters), batch 1: decode tokens/s with float32 and int8 weights, beside llama.cpp running the
fine-scale llama GGUF export of the same weights (a 76M-parameter slice of it: the fine stack and the head).

Random-init weights (decode speed does not depend on them), greedy, EOS ignored, 64 tokens after a 66-byte prompt,
2 rounds alternating the contenders; wall clock and tokens per CPU-second of this process (what a loaded machine
bends least). Built once in float32 (about 1 GiB, plus the (in, out) copies float32 decoding keeps); int8 is the same
model quantized in place afterwards (`axl_model.quantize`, what AXL_DTYPE=int8 serves), so no second float32 copy is
ever held. The original release decoded code-1b at 6.1 tokens/s; the target is 20 (issue 10).
"""
from __future__ import annotations

import gc
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from axl_model.config import ModelConfig
from axl_model.generate import BatchDecoder
from axl_model.model import MultiScaleTransformer
from axl_model.quantize import quantize_int8
from axl_model.tokenizer import ByteTokenizer

from .decode_options import _llama_exports, _llama_rates
from .generation_speed import PROMPT, params

PRESET, TOKENS, ROUNDS = "code-1b", 64, 2
ORIGINAL_RELEASE_TOK_S, TARGET_TOK_S = 6.1, 20


def _span(values: list[float]) -> str:
    return f"{min(values):6.1f}-{max(values):<6.1f}"


@torch.inference_mode()
def tokens_per_s(model: MultiScaleTransformer, prompt: list[int], n: int) -> tuple[float, float]:
    """(tokens per wall-clock second, tokens per CPU-second of this process) of batch-1 greedy decoding, after the
    prompt and one warm-up step."""
    decoder = BatchDecoder(model, max_batch=1)
    decoder.add(prompt, params(n))
    decoder.step()
    wall, cpu, produced = time.perf_counter(), time.process_time(), 0
    for _ in range(n - 1):
        produced += len(decoder.step())
    return produced / (time.perf_counter() - wall), produced / (time.process_time() - cpu)


def run(args) -> dict:
    started = time.perf_counter()
    torch.manual_seed(0)
    model = MultiScaleTransformer(ModelConfig.from_name(PRESET)).eval()
    print(f"{PRESET}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, random init, built in "
          f"{time.perf_counter() - started:.0f} s; batch 1, {torch.get_num_threads()} thread(s), {TOKENS} greedy "
          f"tokens, {ROUNDS} rounds (min-max)")
    prompt = ByteTokenizer().encode(PROMPT)
    wall: dict[str, list[float]] = {"float32": [], "int8": []}
    cpu: dict[str, list[float]] = {"float32": [], "int8": []}
    with tempfile.TemporaryDirectory(prefix="axl-bench-1b-") as tmp:
        exports = _llama_exports(model, Path(tmp))  # before quantizing: the float32 weights
        context = 256  # the prompt and the tokens fit; llama.cpp's KV cache sized to what is used
        for name in exports:
            wall[name], cpu[name] = [], []
        for _ in range(ROUNDS):
            w, c = tokens_per_s(model, prompt, TOKENS)
            wall["float32"].append(w)
            cpu["float32"].append(c)
            for name, path in exports.items():
                w, c = _llama_rates(path, prompt, TOKENS, context)
                wall[name].append(w)
                cpu[name].append(c)
        model = quantize_int8(model)  # in place: the float32 matrices (and their decode copies) are released
        gc.collect()
        for _ in range(ROUNDS):
            w, c = tokens_per_s(model, prompt, TOKENS)
            wall["int8"].append(w)
            cpu["int8"].append(c)
    load = os.getloadavg()[0]
    figures: dict = {}
    for name, values in wall.items():
        note = "   (the fine-scale path only)" if name.startswith("llama.cpp") else ""
        print(f"  {name:15s} {_span(values)} tokens/s   {_span(cpu[name])} tokens/CPU-s{note}")
        key = name.replace("llama.cpp ", "llama_cpp_").replace(" ", "_").lower()
        figures[f"{key}_tok_s"] = sum(values) / len(values)
        figures[f"{key}_tok_per_cpu_s"] = sum(cpu[name]) / len(cpu[name])
    print(f"  int8 vs float32: {sum(wall['int8']) / sum(wall['float32']):.2f}x wall clock, "
          f"{sum(cpu['int8']) / sum(cpu['float32']):.2f}x per CPU-second (means); load average {load:.1f}")
    print(f"  int8 target {TARGET_TOK_S} tokens/s (original release {ORIGINAL_RELEASE_TOK_S}): "
          f"{'met' if max(wall['int8']) >= TARGET_TOK_S else 'not met'} in wall clock (best {max(wall['int8']):.1f}), "
          f"{'met' if max(cpu['int8']) >= TARGET_TOK_S else 'not met'} per CPU-second (best {max(cpu['int8']):.1f})")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"  peak resident memory of this process: {peak:.2f} GiB")
    figures.update(load_average_1min=load, peak_rss_gib=peak)
    return figures


if __name__ == "__main__":
    from .common import defaults

    torch.set_num_threads(defaults().threads)
    run(defaults())
