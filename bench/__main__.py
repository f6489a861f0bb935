"""Run every benchmark in order and print a summary: `python -m bench [names...] [--budget SECONDS]`."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time

import torch

MODULES = ("train_throughput", "distributed_throughput", "quality_per_cpu_minute", "generation_speed", "decode_options",
           "gateway_latency", "gateway_streams", "chunked_prefill", "first_token", "prefix_hit", "large_model")
# Run only when named: minutes of traffic against a mesh (load), minutes of 4,096-byte training steps (long_window),
# minutes of scoring a trained checkpoint several ways (llama_export_quality).
ON_REQUEST = ("load", "long_window", "llama_export_quality")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"a subset of: {', '.join(MODULES)}; or {', '.join(ON_REQUEST)} (only when named)")
    parser.add_argument("--budget", type=float, default=90.0,
                        help="quality_per_cpu_minute: training seconds per model per seed (default 90)")
    quality = parser.add_argument_group("quality_per_cpu_minute")
    quality.add_argument("--seeds", type=int, default=3, help="seeds per model (default 3): mean ± spread")
    quality.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                         help="the budget in wall-clock seconds (default) or this process's CPU seconds")
    quality.add_argument("--eval-bytes", type=int, default=262_144,
                         help="held-out bytes scored per set (whole files; default 262144)")
    quality.add_argument("--corpora-root", metavar="DIR",
                         help="where `axl data corpus pypi --out DIR/pypi` put the PyPI corpus (default data/corpora)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all CPUs)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")
    parser.add_argument("--checkpoint", help="decode_options: also measure int8's held-out bits/byte cost on this checkpoint; "
                                             "llama_export_quality: the checkpoint to score (default weights/axl-coder)")
    parser.add_argument("--held-out-bytes", type=int,
                        help="llama_export_quality: held-out bytes scored (whole windows; default 131072)")
    load = parser.add_argument_group("load (python -m bench load)")
    load.add_argument("--url", help="a running gateway, e.g. http://127.0.0.1:8880 (default: boot a private mesh)")
    load.add_argument("--api-key", help="bearer key for --url")
    load.add_argument("--model", help="model to ask (default axl-coder)")
    load.add_argument("--clients", type=int, default=50, help="concurrent clients, every other one streaming (50)")
    load.add_argument("--duration", type=float, default=60.0, help="seconds of traffic (60)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in MODULES + ON_REQUEST]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(MODULES + ON_REQUEST)}")
    torch.set_num_threads(args.threads)
    print(f"# AXL benchmarks: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {args.threads} threads")
    results: dict[str, dict] = {}
    for name in args.names or MODULES:
        started = time.monotonic()
        print(f"\n## {name}")
        results[name] = importlib.import_module(f"bench.{name}").run(args)
        print(f"({time.monotonic() - started:.0f} s)")
    print("\n## summary")
    for name, figures in results.items():
        for key, value in figures.items():
            print(f"{name}.{key} = {value:,.4g}" if isinstance(value, float) else f"{name}.{key} = {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
