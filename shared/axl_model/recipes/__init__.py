"""Training data for each specialist, derived from real Python source with `ast` and `tokenize`. No torch.

    summary = build_dataset("docs", out_dir="data/docs")          # the running Python's standard library
    summaries = build_all(out_root="data")                        # every specialist, data/<name>/

Each dataset is a folder: train.jsonl and val.jsonl (one pair a line: {"source_code", "target_code",
"specialist", "file", "rule"}) and summary.json. Everything is deterministic: files in sorted order, random
choices seeded by (seed, file), exact-duplicate pairs dropped (first one kept), and the split decided per source
file by a hash of its relative path, so a file's pairs are all in train or all in val and stay there.
Render a pair for training with `get_specialist(name).render_pair(source_code, target_code)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from axl_model.recipes.bugs import debugger, fixer
from axl_model.recipes.common import Pair, SourceFile, default_source_root, iter_source_paths, read_source
from axl_model.recipes.refactor import refactor
from axl_model.recipes.secure import secure
from axl_model.recipes.testgen import testgen
from axl_model.recipes.text import chat, coder, comment, docs, reasoning
from axl_model.recipes.translate import MissingTranslationSources, check_sources, translate

__all__ = ["RECIPES", "MissingTranslationSources", "Pair", "Summary", "build_all", "build_dataset", "iter_pairs",
           "split_of"]

Recipe = Callable[[SourceFile, int], Iterable[Pair]]

RECIPES: dict[str, Recipe] = {
    "coder": coder, "debugger": debugger, "fixer": fixer, "refactor": refactor, "testgen": testgen,
    "docs": docs, "comment": comment, "secure": secure, "chat": chat, "reasoning": reasoning,
    "translate": translate,
}
N_EXAMPLES = 3


@dataclasses.dataclass
class Summary:
    specialist: str
    out_dir: str
    sources: list[str]
    seed: int
    val_fraction: float
    files: int = 0  # Python files read
    files_with_pairs: int = 0
    pairs: int = 0
    train_pairs: int = 0
    val_pairs: int = 0
    train_bytes: int = 0
    val_bytes: int = 0
    duplicates_removed: int = 0
    rules: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: list[dict] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def split_of(relpath: str, val_fraction: float) -> str:
    """"val" or "train" for a source file, from a hash of its relative path (stable across runs and machines)."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def _get_recipe(specialist: str) -> Recipe:
    if specialist not in RECIPES:
        raise ValueError(f"unknown specialist {specialist!r}; recipes exist for: {', '.join(RECIPES)}")
    return RECIPES[specialist]


def _source_paths(specialist: str, sources: Iterable[str | os.PathLike] | None,
                  max_files: int | None) -> tuple[list[str], list[tuple[str, str]]]:
    roots = [str(s) for s in sources] if sources is not None else [default_source_root()]
    for root in roots:
        if not os.path.exists(root):
            raise ValueError(f"source path does not exist: {root}")
    paths = iter_source_paths(roots, include_tests=False)
    if specialist == "translate":
        check_sources(paths)
    if max_files is not None:
        if max_files < 1:
            raise ValueError(f"max_files must be at least 1, got {max_files}")
        paths = paths[:max_files]
    return roots, paths


def iter_pairs(specialist: str, sources: Iterable[str | os.PathLike] | None = None, seed: int = 0,
               max_files: int | None = None, progress: bool = False) -> Iterator[tuple[str, Pair]]:
    """(relative path, pair) for every pair the recipe makes, before de-duplication and splitting."""
    recipe = _get_recipe(specialist)
    _, paths = _source_paths(specialist, sources, max_files)
    iterator: Iterable[tuple[str, str]] = paths
    if progress:
        from tqdm import tqdm

        iterator = tqdm(paths, desc=f"data {specialist}", unit="file")
    for root, relpath in iterator:
        source = read_source(root, relpath)
        if source is None or source.tree is None:
            continue
        for pair in recipe(source, seed):
            if pair.source_code.strip() and pair.target_code.strip() and pair.source_code != pair.target_code:
                yield relpath, pair


def build_dataset(
    specialist: str,
    sources: Iterable[str | os.PathLike] | None = None,
    out_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_files: int | None = None,
    progress: bool = True,
) -> Summary:
    """Build one specialist's dataset into out_dir (default data/<specialist>) and return its summary.

    Args:
        specialist: one of RECIPES.
        sources: folders or .py files to read; default: the running Python's standard library.
        out_dir: where train.jsonl, val.jsonl and summary.json are written (replaced atomically).
        val_fraction: share of source files whose pairs go to val.jsonl.
        seed: seeds every random choice (together with each file's path).
        max_files: read only the first N files (sorted order): for quick runs and tests.
        progress: show a tqdm bar over files.

    Raises:
        ValueError: unknown specialist, bad fraction, missing source path;
            MissingTranslationSources (a ValueError) for translate without parallel sources.
    """
    _get_recipe(specialist)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    roots, paths = _source_paths(specialist, sources, max_files)
    out = Path(out_dir) if out_dir is not None else Path("data") / specialist
    out.mkdir(parents=True, exist_ok=True)
    summary = Summary(specialist, str(out), roots, seed, val_fraction)
    seen: set[bytes] = set()
    files: set[str] = set()
    rules: Counter[str] = Counter()
    tmp = {split: out / f".{split}.jsonl.tmp" for split in ("train", "val")}
    handles = {split: open(path, "w", encoding="utf-8") for split, path in tmp.items()}
    try:
        for relpath, pair in iter_pairs(specialist, sources, seed, max_files, progress):
            key = hashlib.sha256(f"{pair.source_code}\0{pair.target_code}".encode()).digest()
            if key in seen:
                summary.duplicates_removed += 1
                continue
            seen.add(key)
            files.add(relpath)
            record = {"source_code": pair.source_code, "target_code": pair.target_code, "specialist": specialist,
                      "file": relpath, "rule": pair.rule}
            line = json.dumps(record, ensure_ascii=False) + "\n"
            split = split_of(relpath, val_fraction)
            handles[split].write(line)
            size = len(line.encode("utf-8"))
            if split == "train":
                summary.train_pairs += 1
                summary.train_bytes += size
            else:
                summary.val_pairs += 1
                summary.val_bytes += size
            if rules[pair.rule] == 0 and len(summary.examples) < N_EXAMPLES:
                summary.examples.append(record)
            rules[pair.rule] += 1
    finally:
        for handle in handles.values():
            handle.close()
    for split, path in tmp.items():
        os.replace(path, out / f"{split}.jsonl")
    summary.files = len(paths)
    summary.files_with_pairs = len(files)
    summary.pairs = summary.train_pairs + summary.val_pairs
    summary.rules = dict(sorted(rules.items()))
    with open(out / ".summary.json.tmp", "w", encoding="utf-8") as f:
        json.dump(summary.to_dict(), f, indent=2, ensure_ascii=False)
    os.replace(out / ".summary.json.tmp", out / "summary.json")
    return summary


def build_all(
    out_root: str | os.PathLike = "data",
    sources: Iterable[str | os.PathLike] | None = None,
    specialists: Iterable[str] | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_files: int | None = None,
    progress: bool = True,
) -> dict[str, Summary | str]:
    """Build every specialist's dataset into out_root/<name>/. A specialist whose sources are missing
    (translate, usually) maps to the error message instead of a Summary; other errors propagate."""
    sources = list(sources) if sources is not None else None
    results: dict[str, Summary | str] = {}
    for name in specialists if specialists is not None else RECIPES:
        try:
            results[name] = build_dataset(name, sources, Path(out_root) / name, val_fraction, seed, max_files,
                                          progress)
        except MissingTranslationSources as exc:
            results[name] = str(exc)
    return results
