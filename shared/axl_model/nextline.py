"""Next-line completion: does the model write the line a programmer writes next? The number autocomplete lives by.

    cases = sample_lines(documents, n=200, seed=0)          # documents: (name, text) of held-out files
    report = evaluate_nextline(generate_fn, documents, n=200)
    report["exact"], report["similarity"], report["baseline"]   # model vs "repeat the previous non-blank line"

A case is one non-blank line of a held-out file, drawn uniformly over all non-blank lines of all files with a
fixed seed (so every run and every model sees the same lines). The prompt is the file up to the start of that
line (the generator keeps the last window - max_tokens bytes of it); the model decodes greedily until a
newline. Exact match compares the lines with trailing whitespace removed (indentation counts: it is Python);
edit similarity is difflib's ratio (2 * matches / total length, 1.0 = identical). The baseline answers with
the previous non-blank line of the file, the cheapest guess an editor could make.
"""
from __future__ import annotations

import dataclasses
import difflib
import random
from collections.abc import Sequence
from typing import Any

__all__ = ["NEXTLINE_MAX_TOKENS", "NEXTLINE_SEED", "LineCase", "evaluate_nextline", "sample_lines",
           "split_documents", "split_file_bytes", "edit_similarity", "recorded_split_documents"]

NEXTLINE_MAX_TOKENS = 160  # longest line generated, in bytes (PEP 8 lines are under 80)
NEXTLINE_SEED = 0
Document = tuple[str, str]  # (name, text)


@dataclasses.dataclass(frozen=True)
class LineCase:
    file: str
    line: int  # 0-based line number in the file
    prompt: str  # the file up to the start of the line
    target: str  # the line, trailing whitespace removed
    previous: str  # the previous non-blank line ("" at the top of a file), trailing whitespace removed


def sample_lines(documents: Sequence[Document], n: int, seed: int = NEXTLINE_SEED) -> list[LineCase]:
    """n non-blank lines drawn uniformly (without replacement, seeded) from all documents, in document order."""
    if n < 1:
        raise ValueError(f"the next-line sample needs n >= 1, got {n}")
    candidates = [(d, i) for d, (_, text) in enumerate(documents)
                  for i, line in enumerate(text.split("\n")) if line.strip()]
    chosen = sorted(random.Random(seed).sample(range(len(candidates)), min(n, len(candidates))))
    cases: list[LineCase] = []
    lines_of: dict[int, list[str]] = {}
    for index in chosen:
        d, i = candidates[index]
        lines = lines_of.setdefault(d, documents[d][1].split("\n"))
        previous = next((lines[j].rstrip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        prompt = "".join(line + "\n" for line in lines[:i])
        cases.append(LineCase(documents[d][0], i, prompt, lines[i].rstrip(), previous))
    return cases


def edit_similarity(prediction: str, target: str) -> float:
    """difflib's ratio: 2 * matched characters / (len(prediction) + len(target)); 1.0 when both are empty."""
    if not prediction and not target:
        return 1.0
    return difflib.SequenceMatcher(None, prediction, target, autojunk=False).ratio()


def evaluate_nextline(generate_fn, documents: Sequence[Document], n: int, *, seed: int = NEXTLINE_SEED,
                      max_tokens: int = NEXTLINE_MAX_TOKENS) -> dict[str, Any]:
    """Exact match and edit similarity of greedy next lines against the previous-line baseline.

    generate_fn is an `evaluate.GenerateFn` ((prompts, n, GenerationSpec) -> texts), e.g. `model_generate_fn`
    (batched decoding with the KV cache).
    """
    from .evaluate import GenerationSpec

    cases = sample_lines(documents, n, seed)
    if not cases:
        raise ValueError("no non-blank line to complete in the held-out files")
    texts = generate_fn([c.prompt for c in cases], 1, GenerationSpec(max_tokens, 0.0, ("\n",)))
    results = []
    for case, (text,) in zip(cases, texts):
        prediction = text.split("\n", 1)[0].rstrip()
        results.append({"file": case.file, "line": case.line + 1, "target": case.target, "prediction": prediction,
                        "exact": prediction == case.target, "similarity": edit_similarity(prediction, case.target),
                        "baseline_exact": case.previous == case.target,
                        "baseline_similarity": edit_similarity(case.previous, case.target)})
    count = len(results)

    def mean(key: str) -> float:
        return sum(float(r[key]) for r in results) / count

    return {"lines": count, "files": len({c.file for c in cases}), "seed": seed, "max_tokens": max_tokens,
            "exact": mean("exact"), "similarity": mean("similarity"),
            "baseline": {"name": "previous non-blank line", "exact": mean("baseline_exact"),
                         "similarity": mean("baseline_similarity")},
            "results": results}


def split_documents(dataset) -> list[Document]:
    """The raw files of a prepared split (`data.TokenDataset`) as (name, text): BOS/EOS stripped, UTF-8 decoded.

    Documents that are not plain files (pairs, anything beyond bytes) are skipped."""
    return [(name, data.decode("utf-8", "replace")) for name, data in split_file_bytes(dataset)]


def split_file_bytes(dataset) -> list[tuple[str, bytes]]:
    """The raw files of a prepared split as (name, bytes), exactly the bytes the model scores (BOS/EOS stripped);
    what `split_documents` decodes and the compressor baselines compress."""
    import numpy as np

    from .tokenizer import BOS_ID, EOS_ID

    offsets = list(dataset.document_offsets) + [len(dataset)]
    documents: list[tuple[str, bytes]] = []
    for k, (start, stop) in enumerate(zip(offsets, offsets[1:])):
        tokens = np.asarray(dataset.tokens[start:stop])
        if len(tokens) < 2 or tokens[0] != BOS_ID or not np.asarray(dataset.mask[start + 1:stop]).all():
            continue  # not a raw file (a prompt/target pair scores its target only)
        body = tokens[1:-1] if tokens[-1] == EOS_ID else tokens[1:]
        if body.size and int(body.max()) > 255:
            continue
        documents.append((f"held-out document {k}", body.astype(np.uint8).tobytes()))
    return documents


def held_out_split_documents(checkpoint, data: Sequence[str] | None = None,
                             val_fraction: float | None = None) -> list[Document]:
    """The held-out split `axl eval` scores for bits/byte (`evaluate.split_to_score`: by default the one the
    checkpoint recorded) as documents. Refused, as bits/byte is (`evaluate.refuse_training_overlap`), when one
    of its files is, by content, a file the checkpoint trained on: a line the model saw is not a completion.

    The checkpoint's own split is read straight from the files it recorded (`recorded_split_documents`: seconds,
    where rebuilding a `--mix` split takes minutes); another split, or a recorded one whose files moved or
    changed, is prepared as training prepares it (reusing the run's data folder when it matches)."""
    import tempfile

    from .data import default_corpus, prepare_data
    from .evaluate import prepared_data_cache, refuse_training_overlap, split_to_score

    settings = split_to_score(checkpoint, data, val_fraction)
    paths = settings["data"] or default_corpus()
    where = f"next-line completion on the held-out split of {list(map(str, paths))}"
    recorded = settings["recorded"]
    if recorded and settings["source"] == "the checkpoint's split":
        documents = recorded_split_documents(recorded)
        if documents is not None:
            refuse_training_overlap(recorded, recorded, checkpoint, where)
            return documents
    cache_dir = prepared_data_cache(checkpoint, settings)
    with tempfile.TemporaryDirectory(prefix="axl-nextline-data-") as tmp:
        prepared = prepare_data(settings["data"], cache_dir or tmp, val_data=settings["val_data"],
                                val_fraction=settings["val_fraction"], filters=settings["filters"], progress=False)
        refuse_training_overlap(prepared.split, recorded, checkpoint, where)
        return split_documents(prepared.val)


def recorded_split_documents(split: dict[str, Any]) -> list[Document] | None:
    """The validation files a split records, read back from disk (`data.recorded_val_files`), as (path, text) in
    scoring order: the same bytes `split_documents` takes out of the prepared split, without reading, parsing and
    deduplicating the whole corpus. None when they cannot be read back as they were (the caller prepares the data)."""
    from .data import recorded_val_files

    files = recorded_val_files(split)
    if files is None:
        return None
    documents: list[Document] = []
    names: set[str] = set()
    for entry, data in files:
        name = entry["path"] if entry["path"] not in names else f"{entry['path']} #{len(documents)}"
        names.add(name)
        documents.append((name, data.decode("utf-8", "replace")))
    return documents


def corpus_documents(name: str, root=None) -> list[Document]:
    """Every file of a held-out corpus (axl_model.corpora) as documents."""
    from .corpora import load_corpus

    return [(path, data.decode("utf-8", "replace")) for path, data in load_corpus(name, root)]
