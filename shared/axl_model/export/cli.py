"""`axl export gguf CHECKPOINT --type q4_k_m [--kind llama|multiscale|both] [--out DIR]` and
`axl export release CHECKPOINT --out DIR [--dtype float16]`."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .formats import EXPORT_KINDS, GGUF_TYPES


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `export` command (with its `gguf` subcommand) to the `axl` CLI's subparsers."""
    export = subparsers.add_parser("export", help="export a checkpoint to other formats (GGUF)",
                                   description="Export a checkpoint to other formats.")
    formats = export.add_subparsers(dest="export_format", metavar="FORMAT", required=True)
    gguf = formats.add_parser(
        "gguf", help="GGUF files for llama.cpp / Ollama (fine scale only) and for the AXL worker (full model)",
        description="Write GGUF files. --kind llama: the fine-scale path alone as a llama-architecture GGUF for "
                    "llama.cpp and Ollama (lower quality: the medium and coarse scales are dropped), with an Ollama "
                    "Modelfile. --kind multiscale: the full model (architecture axl-multiscale) that the AXL model "
                    "worker loads with AXL_CHECKPOINT=<file>.gguf.")
    gguf.add_argument("checkpoint", type=Path, help="checkpoint folder (or an axl-multiscale .gguf)")
    gguf.add_argument("--type", dest="types", action="append", choices=GGUF_TYPES,
                      help="tensor type; repeat for several (default: f32)")
    gguf.add_argument("--kind", choices=(*EXPORT_KINDS, "both"), default="both",
                      help="llama (llama.cpp/Ollama, fine scale only), multiscale (full model), or both (default)")
    gguf.add_argument("--out", type=Path, default=None, help="output folder (default: <checkpoint>-gguf)")
    gguf.add_argument("--name", default=None, help="file name prefix (default: axl-<preset>)")
    gguf.add_argument("--specialist", default=None,
                      help="specialist whose prompt template goes in the Modelfile (default: from checkpoint metadata)")
    gguf.add_argument("--json", action="store_true", help="print the report as JSON")
    gguf.add_argument("--verbose", action="store_true", help="list every tensor's type")
    gguf.set_defaults(func=run_export_gguf)
    release = formats.add_parser(
        "release", help="a serving copy of a checkpoint: float16 weights, config and metadata, no optimizer state",
        description="Write a checkpoint folder that serves and evaluates like the source but holds only the weights "
                    "(cast to --dtype), config.json and metadata.json (the training split included): the form the "
                    "shipped default model takes in weights/.")
    release.add_argument("checkpoint", type=Path, help="checkpoint folder")
    release.add_argument("--out", type=Path, required=True, help="output folder (replaced atomically)")
    release.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    release.set_defaults(func=run_export_release)
    return export


def run_export_gguf(args: argparse.Namespace) -> int:
    from .gguf import export_checkpoint

    logging.getLogger("axl_model.export.gguf").setLevel(logging.ERROR)  # the report repeats every warning
    kinds = EXPORT_KINDS if args.kind == "both" else (args.kind,)
    checkpoint = Path(args.checkpoint)
    out = args.out or checkpoint.with_name(f"{checkpoint.stem if checkpoint.suffix == '.gguf' else checkpoint.name}-gguf")
    try:
        report = export_checkpoint(checkpoint, out, types=args.types or ["f32"], kinds=kinds,
                                   specialist=args.specialist, name=args.name, progress=not args.json)
    except (ValueError, RuntimeError) as exc:
        print(f"axl export gguf: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render(verbose=args.verbose))
    return 0


def run_export_release(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError, export_release

    try:
        out = export_release(args.checkpoint, args.out, dtype=args.dtype)
    except (CheckpointError, ValueError) as exc:
        print(f"axl export release: error: {exc}", file=sys.stderr)
        return 2
    size = (out / "model.safetensors").stat().st_size
    print(f"{out}: {args.dtype} weights, {size / 2**20:.1f} MiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (`python -m axl_model.export.cli gguf ...`) until the `axl` CLI registers us."""
    parser = argparse.ArgumentParser(prog="axl")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
