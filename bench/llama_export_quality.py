"""What the llama-architecture GGUF export costs in quality: held-out bits/byte of the fine-scale path alone, run by
real llama.cpp, beside the full multi-scale model, on exactly the same held-out bytes.

    python -m bench llama_export_quality --threads 1 [--checkpoint weights/axl-coder] [--held-out-bytes 131072]

The checkpoint (default: the shipped weights/axl-coder) is scored on the held-out split it recorded, as `axl eval`
scores it (`evaluate.held_out_bpb`: a fixed sample of whole windows of the model's length spread over the split's
library and unit-test files). On the same windows (`evaluate.llama_export_scorers`):
- the full model;
- the fine-scale path in PyTorch (`forward_fine_only`), the fine stack attending to its own local window;
- the same in pieces of the llama export's context (the fine stack's local window; llama.cpp's llama architecture
  has no sliding window), each piece read afresh;
- the llama GGUF (`axl export gguf --kind llama`) at F32 and Q8_0 (quantized by llama.cpp) run by llama.cpp
  (llama-cpp-python, logits of every position) on those pieces.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "weights" / "axl-coder"
HELD_OUT_BYTES = 131_072


def run(args) -> dict:
    from axl_model.checkpoint import load_checkpoint
    from axl_model.evaluate import held_out_bpb, llama_export_scorers

    checkpoint = Path(getattr(args, "checkpoint", None) or DEFAULT_CHECKPOINT)
    max_bytes = getattr(args, "held_out_bytes", None) or HELD_OUT_BYTES
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp figures (pip install -e .[llama])")
        return {}
    model = load_checkpoint(checkpoint)
    seq_len = model.config.max_seq_len
    started, cpu_started = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="axl-bench-llama-") as tmp:
        scorers = llama_export_scorers(model, tmp, types=("f32", "q8_0"), threads=torch.get_num_threads())
        result = held_out_bpb(checkpoint, seq_len=seq_len, max_bytes=max_bytes, model=model, scorers=scorers)
    full = result["bpb"]
    print(f"{checkpoint} ({model.config.name}, {seq_len:,}-byte window): held-out bits/byte on {result['bytes']:,} "
          f"bytes of {result['split_source']} ({result['files']} files; windows of {seq_len:,} bytes), "
          f"{time.perf_counter() - started:.0f} s, {time.process_time() - cpu_started:.0f} CPU-s, "
          f"load average {os.getloadavg()[0]:.1f}:")
    print(f"  {'full multi-scale model':42s} {full:.4f}")
    figures: dict = {"full_bpb": full, "bytes": result["bytes"], "load_average_1min": os.getloadavg()[0]}
    for name, scored in result["scorers"].items():
        assert scored["bytes"] == result["bytes"], (name, scored["bytes"])  # the same targets for every model
        print(f"  {name:42s} {scored['bpb']:.4f} ({scored['bpb'] - full:+.3f} bits/byte, "
              f"{scored['bpb'] / full - 1:+.1%} vs the full model)")
        key = (name.replace("llama.cpp ", "llama_cpp_").replace("fine path, PyTorch", "fine_path")
               .replace("-token pieces", "").replace(", ", "_").replace(" ", "_").lower())
        figures[f"{key}_bpb"] = scored["bpb"]
    return figures


if __name__ == "__main__":
    from .common import defaults

    torch.set_num_threads(defaults().threads)
    run(defaults())
