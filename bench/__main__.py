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

MODULES = ("train_throughput", "quality_per_cpu_minute", "generation_speed", "gateway_latency", "gateway_streams")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"a subset of: {', '.join(MODULES)}")
    parser.add_argument("--budget", type=float, default=90.0,
                        help="quality_per_cpu_minute: training seconds per model (default 90)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all CPUs)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in MODULES]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(MODULES)}")
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
