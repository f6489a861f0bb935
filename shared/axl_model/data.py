"""Training data: real code on disk -> filtered documents -> a memory-mapped token file -> random windows.

    prepared = prepare_data(["src/", "more/*.py", "pairs.jsonl"], cache_dir="runs/x/data")
    sampler = WindowSampler(prepared.train, seq_len=256, batch_size=8, seed=0)
    x, y, mask = sampler.batch(step)                       # (B, T) int64, (B, T) int64, (B, T) float

Inputs are files, folders (searched recursively) or globs of `.py`/`.txt` and `.jsonl`, or named parts of a training
mix, `mix:stdlib` and `mix:site-packages` (`axl train --mix`; see "the training mix" below). A raw file becomes
BOS + its bytes + EOS. A `.jsonl` line with `source_code`/`target_code` (or `prompt`/`completion`) becomes prompt
bytes + target bytes + EOS, and the loss mask covers the target (and EOS) only; a line that names a known
`specialist` is rendered with that specialist's prompt layout, and a line with `text` is a raw document. The record
format and its one parser live in `axl_mesh.training_records` (the gateway checks uploads with the same parser).

Quality filter: line count within [min_lines, max_lines], `.py` files must parse (`ast`), exact duplicates are
dropped (by content hash, first kept), and so, in the training mix, are files whose header says they are generated.
Near-duplicates (line-set Jaccard >= 0.8, found by MinHash with LSH
banding and then checked exactly) form clusters, and a cluster never straddles the split: it goes wholly to the
side of its first member's key, and on the validation side only that representative is kept (a held-out file
that nearly repeats another adds bytes, not evidence). The train/validation split is by *file*: a stable hash of
the path relative to its input root (`json/decoder.py`, never `python3.11/json/decoder.py`) decides, so a file
never leaks across the split and the split does not move with the Python version (a `.jsonl` record is split by
its `file` field when it has one, else by its line). Tokens are stored as uint16 (`tokens.bin`) with a loss
mask (`mask.bin`, uint8) and a JSON index of document offsets, memory-mapped on use and never loaded whole. The
validation split holds library files first and test files (`test_*.py`, `*/tests/*`, ...) after them, so the
two are scored separately (`TokenDataset.groups`). `split.json` records what went where (the validation files,
content hashes of the training files); a checkpoint carries it (`split_record`). The folder is keyed by a hash
of the inputs (paths, sizes, mtimes, filter settings), so a second run reuses it.
"""
from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import sysconfig
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
import torch

from axl_mesh.training_records import (
    CodePair,
    CompletionPair,
    TrainingRecord,
    TrainingRecordError,
    jsonl_lines,
    parse_training_record,
)

from .tokenizer import BOS_ID, EOS_ID, FIM_MIDDLE_ID, FIM_PREFIX_ID, FIM_SUFFIX_ID

FORMAT_VERSION = 2  # 2: keys relative to the input root, near-duplicate clusters, split.json, val groups
TEXT_SUFFIXES = (".py", ".txt")
JSONL_SUFFIXES = (".jsonl",)
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git", ".venv", "node_modules"}
TOKEN_DTYPE = np.uint16  # vocab 258 (+ FIM markers) fits


def default_corpus() -> list[str]:
    """The running Python's standard library source (site-packages excluded by the folder walk)."""
    return [sysconfig.get_paths()["stdlib"]]


# ---------------------------------------------------------------------------------------------- the training mix
# Named parts of a training mix, given as data inputs `mix:<part>` (`axl train --mix stdlib,site-packages`):
#   stdlib         the running Python's standard library, keyed exactly as `--data <stdlib folder>` (json/decoder.py)
#   site-packages  the .py files of the distributions installed in the running environment (sysconfig purelib and
#                  platlib), one root per distribution: site-packages/<name>/<path in its RECORD>, so a key does not
#                  move with the venv's path, the Python version or the package's version. Left out: distributions
#                  of a held-out evaluation corpus (`corpora.PYPI_PACKAGES` and every fetched manifest), the
#                  project's own code (editable installs, the axl_model/axl_mesh/services packages) and vendored
#                  copies (_vendor/, vendor/, third_party/ ...); exact and near-duplicates are dropped across the
#                  whole mix by the usual filter. A split records the distributions it read by name and version
#                  (`mix:site-packages=name==version,...`), so `axl eval` rebuilds it from those only.
# A part may carry a weight (`--mix stdlib:3,site-packages:1`, inputs `mix:stdlib:3`): training then draws its windows
# from each part's training bytes weight times as often as from plain bytes, so a small part is not diluted by a large
# one (the standard library is a sixth of stdlib + site-packages). The split is the same as without weights; the
# training split is written part by part, its index records each part's range and weight (`WindowSampler` reads them),
# and the weights are in the recorded inputs (hence in the data folder's key). Weights all 1 are no weights.
# The mix drops generated code (`FilterConfig.generated`: "generated by", "do not edit" ... in a file's first lines,
# e.g. protobuf modules or API clients generated from a spec) unless `--keep-generated`.
MIX_PREFIX = "mix:"
MIX_PARTS = ("stdlib", "site-packages")
VENDORED_DIRS = {"_vendor", "vendor", "_vendored", "vendored", "third_party", "_thirdparty", "_bundled"}
PROJECT_PACKAGES = {"axl_model", "axl_mesh", "services"}


def mix_inputs(spec: str | Sequence[str]) -> list[str]:
    """`stdlib,site-packages` (or a list of part names) -> the data inputs ["mix:stdlib", "mix:site-packages"];
    `stdlib:3,site-packages:1` (weights, see above) -> ["mix:stdlib:3", "mix:site-packages:1"]."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    weights: dict[str, float] = {}
    for item in (n.strip() for n in names):
        if not item:
            continue
        part, weight = _part_weight(item, item)
        if part not in MIX_PARTS:
            raise ValueError(f"unknown part {part!r} of the training mix; parts: {', '.join(MIX_PARTS)} "
                             f"(comma-separated, each optionally with a weight: stdlib:3,site-packages:1)")
        value = 1.0 if weight is None else weight
        if weights.setdefault(part, value) != value:
            raise ValueError(f"the training mix gives {part} two weights ({spec!r})")
    if not weights:
        raise ValueError(f"no part in the training mix {spec!r}; parts: {', '.join(MIX_PARTS)}")
    if set(weights.values()) == {1.0}:  # weights all 1 draw as no weights do
        return [MIX_PREFIX + p for p in weights]
    return [f"{MIX_PREFIX}{p}:{w:g}" for p, w in weights.items()]


def _part_weight(text: str, where: str) -> tuple[str, float | None]:
    """The one reader of a part's weight spelling: "stdlib:3" -> ("stdlib", 3.0); "stdlib" -> ("stdlib", None)."""
    part, _, weight = (x.strip() for x in text.partition(":"))
    if not weight:
        return part, None
    try:
        value = float(weight)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ValueError(f"{where!r}: a part's weight is a positive number (stdlib:3), got {weight!r}")
    return part, value


def _mix_input(raw: str) -> tuple[str, float | None, str]:
    """A recorded mix input: "mix:site-packages:3=a==1,b==2" -> ("site-packages", 3.0, "a==1,b==2");
    "mix:stdlib" -> ("stdlib", None, "")."""
    spelled, _, pins = raw.removeprefix(MIX_PREFIX).partition("=")
    return *_part_weight(spelled, raw), pins


def mix_weights(data: Sequence[str | os.PathLike] | None) -> dict[str, float] | None:
    """Part -> weight of a weighted mix among data inputs (a part without one, and plain files and folders, the
    part "data", at 1); None when no part carries a weight."""
    parts = [_mix_input(raw)[:2] if raw.startswith(MIX_PREFIX) else ("data", None) for raw in map(str, data or ())]
    if all(weight is None for _, weight in parts):
        return None
    weights: dict[str, float] = {}
    for part, weight in parts:
        weights.setdefault(part, 1.0 if weight is None else weight)
    return weights


def mix_shares(parts: dict[str, dict[str, int]], weights: dict[str, float] | None) -> dict[str, float]:
    """Part -> its share of the training windows: its training bytes times its weight (1 without weights), over all
    parts' (`DataStats.parts`, `DataStats.weights`)."""
    weights = weights or {}
    mass = {name: p["train_bytes"] * weights.get(name, 1.0) for name, p in parts.items() if name != "val-data"}
    total = sum(mass.values())
    return {name: m / total for name, m in mass.items()} if total else {}


def stdlib_dir() -> Path:
    return Path(default_corpus()[0])


def site_package_dirs() -> list[Path]:
    """The running environment's folders of installed packages (purelib, platlib; one when they agree)."""
    paths = sysconfig.get_paths()
    folders = dict.fromkeys(os.path.realpath(paths[k]) for k in ("purelib", "platlib"))
    return [Path(p) for p in folders if os.path.isdir(p)]


def normalize_name(name: str) -> str:
    """PEP 503 normalized distribution name (Markdown == markdown, more_itertools == more-itertools)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def held_out_package_names() -> dict[str, str]:
    """Normalized distribution name -> the held-out evaluation corpus it belongs to (never trained on): the
    pinned PyPI list and the packages of every fetched corpus's manifest."""
    from .corpora import CORPORA, PYPI_PACKAGES, load_manifest

    names = {normalize_name(p.name): "pypi" for p in PYPI_PACKAGES}
    for corpus in CORPORA:
        for entry in (load_manifest(corpus) or {}).get("packages", []):
            names[normalize_name(entry["name"])] = corpus
    return names


@dataclass(frozen=True)
class InstalledPackage:
    """An installed distribution as a root of the site-packages part: its .py files (file, key) after the
    vendored/cache folders are left out, and why the whole distribution is left out ("" when it is in)."""

    name: str  # normalized
    version: str
    files: tuple[tuple[Path, str], ...]
    excluded: str = ""


def installed_packages(site_dirs: Sequence[str | os.PathLike] | None = None) -> list[InstalledPackage]:
    """Every distribution in site_dirs (default `site_package_dirs()`), by name; the first folder wins a name."""
    import importlib.metadata

    held_out = held_out_package_names()
    out: dict[str, InstalledPackage] = {}
    for site in map(Path, site_package_dirs() if site_dirs is None else site_dirs):
        dists = [(normalize_name(d.metadata["Name"] or ""), d)
                 for d in importlib.metadata.distributions(path=[str(site)])]
        for name, dist in sorted(dists, key=lambda item: item[0]):
            if not name or name in out:
                continue
            records = [PurePosixPath(str(entry)) for entry in dist.files or ()]
            tops = {r.parts[0].removesuffix(".py") for r in records if r.parts and not r.is_absolute()}
            files = []
            for rel in records:
                folders = rel.parts[:-1]
                if rel.suffix != ".py" or rel.is_absolute() or ".." in rel.parts \
                        or rel.name.startswith("__editable__") or any(
                            f in SKIPPED_DIRS or f in VENDORED_DIRS or f.endswith((".dist-info", ".egg-info", ".data"))
                            for f in folders):
                    continue
                if (site / rel).is_file():
                    files.append((site / rel, f"site-packages/{name}/{rel.as_posix()}"))
            excluded = ""
            if name in held_out:
                excluded = f"in the held-out {held_out[name]} corpus"
            elif _editable(dist):
                excluded = "the project's own code (editable install)"
            elif tops & PROJECT_PACKAGES:
                excluded = "the project's own code"
            elif dist.files is None:
                excluded = "no file list (RECORD)"
            out[name] = InstalledPackage(name, dist.version or "", tuple(files), excluded)
    return sorted(out.values(), key=lambda p: p.name)


def _editable(dist) -> bool:
    try:
        return bool(json.loads(dist.read_text("direct_url.json") or "{}").get("dir_info", {}).get("editable"))
    except (ValueError, AttributeError):
        return False


def _mix_part(raw: str) -> tuple[str, dict[str, str] | None]:
    """"mix:site-packages=a==1,b==2" (or weighted, "mix:site-packages:3=a==1,b==2") -> ("site-packages",
    {"a": "1", "b": "2"}); no pins: None."""
    part, _, pins = _mix_input(raw)
    if part not in MIX_PARTS:
        raise ValueError(f"unknown part {part!r} of the training mix in {raw!r}; parts: {', '.join(MIX_PARTS)}")
    if not pins:
        return part, None
    pinned = {}
    for pin in pins.split(","):
        name, sep, version = pin.partition("==")
        if not sep or not name:
            raise ValueError(f"{raw!r}: a pin is name==version, got {pin!r}")
        pinned[normalize_name(name)] = version
    return part, pinned


def _mix_files(raw: str, roots: list[dict]) -> list[tuple[Path, str, str]]:
    """(file, key, part) of one mix input; its roots ({"part", "name", "version"} or with "excluded") go to roots."""
    part, pins = _mix_part(raw)
    if part == "stdlib":
        root = stdlib_dir()
        roots.append({"part": "stdlib", "name": "python-stdlib", "version": platform.python_version()})
        return [(file, key, part) for file, key, _ in _walk(root, part)]
    found = []
    for package in installed_packages():
        entry = {"part": part, "name": package.name, "version": package.version}
        if pins is not None and pins.get(package.name) != package.version:
            continue  # a recorded split: only the distributions it read, at the versions it read
        if package.excluded:
            roots.append({**entry, "excluded": package.excluded})
            continue
        roots.append(entry)
        found += [(file, key, part) for file, key in package.files]
    return found


@dataclass
class FilterConfig:
    min_lines: int = 3
    max_lines: int = 20_000
    check_syntax: bool = True  # .py files must parse with `ast`
    dedupe: bool = True
    near_duplicate_jaccard: float = 0.8  # line-set Jaccard at which two files are one cluster; 0 disables
    generated: bool = False  # drop .py files whose header says they are generated (`generated_header`): on for --mix


@dataclass
class DataStats:
    files: int = 0
    documents: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    tokens: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    rejected: dict[str, int] = field(default_factory=lambda: {"too_short": 0, "too_long": 0, "syntax": 0,
                                                              "generated": 0, "duplicate": 0, "near_duplicate": 0,
                                                              "unreadable": 0})
    near_duplicate_clusters: int = 0  # clusters of two or more files (each kept wholly on one side)
    near_duplicate_files: int = 0  # files in those clusters
    split_note: str = ""
    # what each source contributed after the filters: part ("data", "stdlib", "site-packages", "val-data") ->
    # {"files" read, "documents"/"bytes" kept, "train"/"val" documents, "train_bytes"/"val_bytes"}
    parts: dict[str, dict[str, int]] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)  # a weighted mix's part -> weight (`mix_weights`)


# ---------------------------------------------------------------------------------------------- token files
class TokenDataset:
    """One split on disk: tokens.bin (uint16), mask.bin (uint8, 1 = predict this token), index.json."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index_file = self.folder / "index.json"
        try:
            self.index = json.loads(index_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{index_file} is missing or corrupt ({exc}); delete {self.folder.parent} to rebuild") from None
        self.n_tokens = int(self.index["n_tokens"])
        self.tokens = np.memmap(self.folder / "tokens.bin", dtype=TOKEN_DTYPE, mode="r", shape=(self.n_tokens,)) \
            if self.n_tokens else np.zeros(0, dtype=TOKEN_DTYPE)
        self.mask = np.memmap(self.folder / "mask.bin", dtype=np.uint8, mode="r", shape=(self.n_tokens,)) \
            if self.n_tokens else np.zeros(0, dtype=np.uint8)

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def document_offsets(self) -> list[int]:
        return self.index["offsets"]

    @property
    def n_predicted(self) -> int:
        """Tokens the loss is taken on (bytes of raw files, targets of pairs), i.e. held-out 'bytes'."""
        return int(self.index["n_predicted"])

    @property
    def groups(self) -> dict[str, tuple[int, int]]:
        """Kind of file -> its token range [start, stop): 'library' and 'test' in a validation split (each
        present only when non-empty), 'all' in a training split."""
        groups = self.index.get("groups") or {"all": [0, self.n_tokens]}
        return {kind: (int(a), int(b)) for kind, (a, b) in groups.items() if b > a}

    @property
    def part_weights(self) -> dict[str, float]:
        """A weighted mix's training split: part -> weight, each part's tokens being its `groups` range ({} else)."""
        return {part: float(w) for part, w in (self.index.get("part_weights") or {}).items()}

    def window(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.tokens[start : start + length]), np.asarray(self.mask[start : start + length])


class _SplitWriter:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True)
        self.folder = folder
        self.tokens = open(folder / "tokens.bin", "wb")
        self.mask = open(folder / "mask.bin", "wb")
        self.offsets: list[int] = []
        self.n_tokens = 0
        self.n_predicted = 0
        self.groups: dict[str, list[int]] = {}  # kind -> [start, stop) of documents added in kind order
        self.extra: dict = {}  # more index entries ("part_weights")

    def add(self, tokens: np.ndarray, mask: np.ndarray, kind: str | None = None) -> None:
        if kind is not None:
            self.groups.setdefault(kind, [self.n_tokens, self.n_tokens])[1] = self.n_tokens + len(tokens)
        self.offsets.append(self.n_tokens)
        tokens.astype(TOKEN_DTYPE).tofile(self.tokens)
        mask.astype(np.uint8).tofile(self.mask)
        self.n_tokens += len(tokens)
        self.n_predicted += int(mask.sum())

    def close(self) -> None:
        self.tokens.close()
        self.mask.close()
        index = {"format_version": FORMAT_VERSION, "n_tokens": self.n_tokens, "n_predicted": self.n_predicted,
                 "offsets": self.offsets, **({"groups": self.groups} if self.groups else {}), **self.extra}
        (self.folder / "index.json").write_text(json.dumps(index))


# ---------------------------------------------------------------------------------------------- reading inputs
@dataclass
class Document:
    split_key: str  # what decides train/val: the file's relative path (+ the record's source file)
    tokens: np.ndarray  # uint16
    mask: np.ndarray  # uint8
    content_hash: str


def resolve_inputs(paths: Sequence[str | os.PathLike]) -> list[tuple[Path, str]]:
    """(file, path relative to its input root) for every data file named by paths, folders, globs and parts of
    the training mix (`mix:stdlib`, `mix:site-packages`)."""
    return [(file, key) for file, key, _ in _resolve(paths)[0]]


def _resolve(paths: Sequence[str | os.PathLike]) -> tuple[list[tuple[Path, str, str]], list[dict]]:
    """(file, key, part) of every data file (part: "data", or the mix part it came from), in reading order (keys
    sorted; the site-packages part after everything else, so a file it shares with the standard library or the
    given data is kept from those), and the roots of the mix's parts."""
    found: dict[Path, tuple[str, str]] = {}
    roots: list[dict] = []
    for raw in paths:
        raw = str(raw)
        if raw.startswith(MIX_PREFIX):
            for file, key, part in _mix_files(raw, roots):
                found.setdefault(file.resolve(), (key, part))
            continue
        if glob.has_magic(raw):
            prefix = re.split(r"[*?\[]", raw, maxsplit=1)[0]
            root = Path(os.path.dirname(prefix) or ".")  # the folder before the first wildcard
            matches = sorted(Path(m) for m in glob.glob(raw, recursive=True))
            if not matches:
                raise ValueError(f"data glob {raw!r} matches no files")
            for match in matches:
                if match.is_file() and match.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES:
                    found.setdefault(match.resolve(), (_relative(match, root), "data"))
            continue
        path = Path(raw)
        if path.is_dir():
            for file, key, part in _walk(path, "data"):
                found.setdefault(file.resolve(), (key, part))
        elif path.is_file():
            if path.suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES:
                raise ValueError(f"data file {path} is not .py, .txt or .jsonl")
            found.setdefault(path.resolve(), (path.name, "data"))
        else:
            raise ValueError(f"data path {path} does not exist")
    ordered = sorted(found.items(), key=lambda item: (item[1][1] == "site-packages", item[1][0]))
    return [(file, key, part) for file, (key, part) in ordered], roots


def _walk(path: Path, part: str) -> Iterator[tuple[Path, str, str]]:
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        for name in sorted(filenames):
            file = Path(dirpath) / name
            if file.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES:
                # relative to the folder itself: the stdlib's json/decoder.py has the same key under
                # python3.11/ and python3.12/, so the split does not move with the Python version
                yield file, _relative(file, path), part


def _relative(file: Path, root: Path) -> str:
    try:
        return file.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return file.name


def _raw_document(split_key: str, data: bytes) -> Document:
    tokens = np.empty(len(data) + 2, dtype=TOKEN_DTYPE)
    tokens[0], tokens[-1] = BOS_ID, EOS_ID
    tokens[1:-1] = np.frombuffer(data, dtype=np.uint8)
    mask = np.ones(len(tokens), dtype=np.uint8)
    mask[0] = 0  # BOS is never a target
    return Document(split_key, tokens, mask, hashlib.sha1(data).hexdigest())


def _pair_document(split_key: str, prompt: str, target: str) -> Document:
    p, t = prompt.encode("utf-8"), target.encode("utf-8")
    tokens = np.empty(1 + len(p) + len(t) + 1, dtype=TOKEN_DTYPE)
    tokens[0], tokens[-1] = BOS_ID, EOS_ID
    tokens[1 : 1 + len(p)] = np.frombuffer(p, dtype=np.uint8)
    tokens[1 + len(p) : -1] = np.frombuffer(t, dtype=np.uint8)
    mask = np.zeros(len(tokens), dtype=np.uint8)
    mask[1 + len(p) :] = 1  # loss on the target and EOS only
    return Document(split_key, tokens, mask, hashlib.sha1(b"%d\0" % len(p) + p + t).hexdigest())


def _render_record(record: TrainingRecord) -> tuple[str, str] | str:
    """(prompt, target) for a pair record, or the text of a raw record."""
    if isinstance(record, CodePair):
        if record.specialist:
            from .specialists import SPECIALISTS

            if record.specialist in SPECIALISTS:
                return SPECIALISTS[record.specialist].render_pair(record.source_code, record.target_code)
        return record.source_code, record.target_code
    if isinstance(record, CompletionPair):
        return record.prompt, record.completion
    return record.text


def read_documents(file: Path, relpath: str, filters: FilterConfig, rejected: dict[str, int]) -> Iterator[Document]:
    """The documents of one data file that pass the quality filter (duplicates are removed later)."""
    try:
        data = file.read_bytes()
    except OSError:
        rejected["unreadable"] += 1
        return
    if file.suffix in JSONL_SUFFIXES:
        for line_no, line in jsonl_lines(data.decode("utf-8", errors="replace")):
            if not line.strip():
                continue
            try:  # the gateway's upload check runs the same parser: what it let in, this reads
                record = parse_training_record(line)
            except TrainingRecordError as exc:
                raise ValueError(f"{file}:{line_no}: {exc}") from None
            rendered = _render_record(record)
            key = f"{relpath}::{line_no if record.file is None else record.file}"
            if isinstance(rendered, str):
                yield _raw_document(key, rendered.encode("utf-8"))
            else:
                yield _pair_document(key, *rendered)
        return
    n_lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    if n_lines < filters.min_lines:
        rejected["too_short"] += 1
        return
    if n_lines > filters.max_lines:
        rejected["too_long"] += 1
        return
    if file.suffix == ".py" and filters.check_syntax:
        try:
            ast.parse(data, filename=str(file))
        except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
            rejected["syntax"] += 1
            return
    if file.suffix == ".py" and filters.generated and generated_header(data):
        rejected["generated"] = rejected.get("generated", 0) + 1
        return
    yield _raw_document(relpath, data)


# What generators write at the top of their output: protobuf's "Generated by the protocol buffer compiler.  DO NOT
# EDIT!", Stainless's "File generated from our OpenAPI spec" (openai's API client), "Autogenerated by Sphinx",
# "@generated", "This file is generated by mkstringprep.py", the codecs' "... generated from 'CP037.TXT' with
# gencodec.py". Only comments and the module docstring before any code count, and "generated by/from/with" only where
# it opens the line ("generated by/from", after "This file is" ...) or names a file it was generated from or with:
# prose such as "tables generated by pgen" or "pickles generated with Python 2" stays.
GENERATED_HEADER_LINES = 10
_GENERATED_MARK = re.compile(rb"auto-?generated|@generated|\b(?:do\s+not|don't)\s+(?:edit|modify)\b", re.IGNORECASE)
_GENERATED_BY = rb"generated\s+(?:by|from|with|using)\b"
_TRIPLE = rb'(?:"""|' + rb"''')"
_GENERATED_OPENING = re.compile(rb"^(?:#+|[rRuU]?" + _TRIPLE + rb")?\s*(?:(?:this\s+)?(?:file|module|code|source)\s+"
                                rb"(?:is\s+|was\s+|has\s+been\s+)?)?(?:automatically\s+)?"
                                rb"generated\s+(?:by|from|using)\b",
                                re.IGNORECASE)
_GENERATED_FROM_FILE = re.compile(_GENERATED_BY + rb".*\b[\w-]+\.(?:py|proto|txt|json|ya?ml|xml|in|idl|thrift|g4)\b",
                                  re.IGNORECASE)
_QUOTES = (b'"""', b"'''")


def generated_header(data: bytes) -> bool:
    """Whether one of a file's first GENERATED_HEADER_LINES lines, in a comment or in the module docstring before
    any code, says the file is generated."""
    in_docstring = False
    for line in data[:4096].split(b"\n")[:GENERATED_HEADER_LINES]:
        stripped = line.strip()
        opens = not in_docstring and stripped.lstrip(b"rRuU").startswith(_QUOTES)
        if (stripped.startswith(b"#") or in_docstring or opens) and (
                _GENERATED_MARK.search(stripped) or _GENERATED_OPENING.search(stripped)
                or _GENERATED_FROM_FILE.search(stripped)):
            return True
        if opens:
            body = stripped.lstrip(b"rRuU")[3:]
            in_docstring = not any(q in body for q in _QUOTES)  # a one-line docstring closes on its line
        elif in_docstring:
            in_docstring = not any(q in stripped for q in _QUOTES)
        elif stripped and not stripped.startswith(b"#"):
            break  # code began: the header is over
    return False


def split_of(split_key: str, val_fraction: float) -> str:
    """'val' or 'train' from a stable hash of the key (same answer on every run and machine)."""
    digest = hashlib.sha256(split_key.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


_TEST_DIRS = {"test", "tests", "testing", "idle_test", "unittests"}


def file_kind(split_key: str) -> str:
    """'test' for unit tests (test_*.py, *_test.py, conftest.py, anything under a test/tests folder), else 'library'.
    A .jsonl record is judged by the source file it names."""
    path = split_key.rsplit("::", 1)[-1]
    *folders, name = path.split("/")
    if name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py" or _TEST_DIRS & set(folders):
        return "test"
    return "library"


# ---------------------------------------------------------------------------------------------- near-duplicates
# MinHash over the set of a file's distinct non-blank lines (whitespace-stripped), LSH banding to find candidate
# pairs, then the exact line-set Jaccard of each candidate. 16 bands x 8 rows find a pair at Jaccard 0.8 with
# probability 1 - (1 - 0.8^8)^16 = 0.95 (0.9: 0.9999); pairs below ~0.6 rarely become candidates at all.
MINHASH_BANDS, MINHASH_ROWS = 16, 8
MINHASH_MIN_LINES = 8  # files with fewer distinct lines are compared by exact content only (too few to judge)
_PRIME = 4_294_967_311  # the smallest prime above 2^32: a, x < 2^32 keep a * x + b below 2^64 (no overflow)


def line_set(data: bytes) -> np.ndarray:
    """Sorted distinct 32-bit hashes of the whitespace-stripped non-blank lines of a file."""
    hashes = {zlib.crc32(line) for line in (raw.strip() for raw in data.split(b"\n")) if line}
    return np.fromiter(hashes, dtype=np.uint64, count=len(hashes)) if hashes else np.zeros(0, np.uint64)


def _minhash_params() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0x5EED)  # fixed: signatures (hence clusters, hence the split) are the same everywhere
    n = MINHASH_BANDS * MINHASH_ROWS
    return rng.integers(1, 1 << 32, size=n, dtype=np.uint64), rng.integers(0, 1 << 32, size=n, dtype=np.uint64)


def minhash(lines: np.ndarray, params: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(bands * rows,) MinHash signature of a line set under the universal hashes (a * x + b) mod (2^32 + 15)."""
    a, b = params
    return ((a[:, None] * lines[None, :] + b[:, None]) % np.uint64(_PRIME)).min(axis=1)  # (n_hashes,)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a & b| / |a | b| of two sorted arrays of distinct values."""
    common = len(np.intersect1d(a, b, assume_unique=True))
    return common / (len(a) + len(b) - common) if len(a) + len(b) else 1.0


def near_duplicate_clusters(line_sets: Sequence[np.ndarray | None], threshold: float) -> list[int]:
    """For each item, the index of its cluster's first item: items joined by line-set Jaccard >= threshold
    (transitively). Items with None or fewer than MINHASH_MIN_LINES lines stay alone."""
    parent = list(range(len(line_sets)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    params = _minhash_params()
    buckets: dict[tuple[int, bytes], list[int]] = {}
    for i, lines in enumerate(line_sets):
        if lines is None or len(lines) < MINHASH_MIN_LINES:
            continue
        signature = minhash(lines, params)
        for band in range(MINHASH_BANDS):
            rows = signature[band * MINHASH_ROWS:(band + 1) * MINHASH_ROWS]
            buckets.setdefault((band, rows.tobytes()), []).append(i)
    for members in buckets.values():
        for j, first in enumerate(members):
            for other in members[j + 1:]:
                root_a, root_b = find(first), find(other)
                if root_a != root_b and jaccard(line_sets[first], line_sets[other]) >= threshold:
                    parent[max(root_a, root_b)] = min(root_a, root_b)  # the earlier item stays the root
    return [find(i) for i in range(len(line_sets))]


# ---------------------------------------------------------------------------------------------- preparing
SPLIT_FILE = "split.json"


@dataclass
class PreparedData:
    folder: Path
    train: TokenDataset
    val: TokenDataset
    stats: DataStats

    @property
    def split(self) -> dict:
        """What went where (split.json): the inputs, filters, val_fraction, the validation files in scoring order
        ({"path", "kind", "sha1"}), and "train_sha1": content hashes of every training document."""
        return json.loads((self.folder / SPLIT_FILE).read_text())


def content_id(content_hash: str) -> str:
    """The short content hash a split records per document (64 bits: no accidental collision in any corpus)."""
    return content_hash[:16]


def val_files_digest(val_files: Sequence[dict]) -> str:
    """One hash of the validation file list (paths and contents), to tell whether two splits are the same."""
    h = hashlib.sha256()
    for entry in sorted(val_files, key=lambda e: (e["path"], e["sha1"])):
        h.update(f"{entry['path']}\0{entry['sha1']}\n".encode())
    return h.hexdigest()


def _inputs_key(train_files, val_files, filters: FilterConfig, val_fraction: float,
                weights: dict[str, float] | None = None) -> str:
    keyed = asdict(filters)
    if not filters.generated:  # off, as before the filter existed: the folders built then keep their keys
        del keyed["generated"]
    h = hashlib.sha256()
    h.update(json.dumps({"v": FORMAT_VERSION, "filters": keyed, "val_fraction": val_fraction}).encode())
    if weights:
        h.update(json.dumps({"weights": weights}).encode())
    for tag, files in (("train", train_files), ("val", val_files)):
        for file, rel in files:
            st = file.stat()
            h.update(f"{tag}\0{file}\0{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def prepared_folder(data: Sequence[str | os.PathLike] | None, cache_dir: str | os.PathLike, *,
                    val_data: Sequence[str | os.PathLike] | None = None, val_fraction: float = 0.05,
                    filters: FilterConfig | None = None) -> Path:
    """The folder prepare_data uses (or would build) for these inputs under cache_dir."""
    train_files = resolve_inputs(data if data else default_corpus())
    val_files = resolve_inputs(val_data) if val_data else []
    return Path(cache_dir) / _inputs_key(train_files, val_files, filters or FilterConfig(), val_fraction,
                                         mix_weights(data))


def recorded_val_files(split: dict) -> list[tuple[dict, bytes]] | None:
    """The validation files a split records (`PreparedData.split`), read back from disk in scoring order as
    (entry, bytes), without reading, parsing and deduplicating the whole corpus again (minutes for a mix). Each file
    is found by its recorded key among the recorded inputs (for a mix, exactly the distributions and versions it
    read) and must have its recorded content hash. None when that is not possible (a file gone or changed, a .jsonl
    record, a split that scores one document's tail): the caller then prepares the data."""
    entries = split.get("val_files") or []
    if not entries or split.get("split_note", "").startswith("one document only") \
            or any("::" in entry["path"] for entry in entries):
        return None
    inputs = [*(split.get("data") or default_corpus()), *(split.get("val_data") or [])]  # as `prepare_data` reads
    try:
        by_key: dict[str, list[Path]] = {}
        for file, key in resolve_inputs(inputs):
            by_key.setdefault(key, []).append(file)
    except ValueError:  # an input that no longer exists
        return None
    files: list[tuple[dict, bytes]] = []
    for entry in entries:
        for file in by_key.get(entry["path"], ()):
            try:
                data = file.read_bytes()
            except OSError:
                continue
            if content_id(hashlib.sha1(data).hexdigest()) == entry["sha1"]:
                files.append((entry, data))
                break
        else:
            return None  # moved or changed since training: the recorded split cannot be read back as it was
    return files


def write_val_split(folder: str | os.PathLike, files: Sequence[tuple[dict, bytes]]) -> TokenDataset:
    """A validation split of raw files ((entry with "kind", bytes), in scoring order: library files, then tests),
    written as `prepare_data` writes one: the same tokens, mask and groups."""
    writer = _SplitWriter(Path(folder))
    for entry, data in files:
        document = _raw_document(entry["path"], data)
        writer.add(document.tokens, document.mask, kind=entry["kind"])
    writer.close()
    return TokenDataset(folder)


def _pinned(data: Sequence[str | os.PathLike], roots: list[dict]) -> list[str]:
    """The inputs as a split records them: `mix:site-packages` (`mix:site-packages:<weight>`) names the
    distributions it read, with versions."""
    read = ",".join(f"{r['name']}=={r['version']}" for r in roots
                    if r["part"] == "site-packages" and "excluded" not in r)
    return [f"{str(p).partition('=')[0]}={read}" if str(p).startswith(f"{MIX_PREFIX}site-packages") else str(p)
            for p in data]


def prepare_data(data: Sequence[str | os.PathLike] | None, cache_dir: str | os.PathLike, *,
                 val_data: Sequence[str | os.PathLike] | None = None, val_fraction: float = 0.05,
                 filters: FilterConfig | None = None, progress: bool = True) -> PreparedData:
    """Filter, split and tokenize the inputs into cache_dir/<hash of inputs>/ (reused when it exists).

    Raises ValueError when a path does not exist, nothing is readable, or no training data is left.
    """
    filters = filters or FilterConfig()
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0.0 <= filters.near_duplicate_jaccard <= 1.0:
        raise ValueError(f"near_duplicate_jaccard must be in [0, 1], got {filters.near_duplicate_jaccard}")
    resolved, roots = _resolve(data if data else default_corpus())
    train_files = [(file, key) for file, key, _ in resolved]
    parts = {file: ("stdlib" if not data else part) for file, _, part in resolved}
    val_files = resolve_inputs(val_data) if val_data else []
    parts.update({file: "val-data" for file, _ in val_files})
    if not train_files:
        raise ValueError(f"no .py, .txt or .jsonl files found in {list(map(str, data or default_corpus()))}")
    weights = mix_weights(data)
    key = _inputs_key(train_files, val_files, filters, val_fraction, weights)
    folder = Path(cache_dir) / key
    if (folder / "stats.json").is_file():
        return _open(folder)

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_dir))
    inputs = {"data": _pinned(data, roots) if data else None, "corpus": [str(p) for p in data or default_corpus()],
              "val_data": [str(p) for p in val_data] if val_data else None}
    if roots:  # the mix's roots by name and version (no folder: the split does not depend on where they live)
        inputs["mix"] = roots
    if weights:
        inputs["mix_weights"] = weights
    try:
        _build(staging, train_files, val_files, filters, val_fraction, progress, inputs, parts, weights)
        if os.path.exists(folder):  # another process finished first
            shutil.rmtree(staging)
        else:
            os.rename(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _open(folder)


def _open(folder: Path) -> PreparedData:
    stats = DataStats(**json.loads((folder / "stats.json").read_text()))
    return PreparedData(folder, TokenDataset(folder / "train"), TokenDataset(folder / "val"), stats)


@dataclass
class _Kept:
    """A document that passed the filters, parked in the staging pool until its cluster's side is known."""

    key: str
    start: int  # in the pool's tokens
    length: int
    content_hash: str
    forced_val: bool  # from val_data
    lines: np.ndarray | None  # distinct line hashes of a raw file (near-duplicate search); None for records
    part: str = "data"  # the source it came from (DataStats.parts)


def _build(staging: Path, train_files, val_files, filters: FilterConfig, val_fraction: float, progress: bool,
           inputs: dict, parts: dict[Path, str] | None = None, weights: dict[str, float] | None = None) -> DataStats:
    from tqdm import tqdm

    stats = DataStats()
    seen: set[str] = set()
    # 1. Read, filter and drop exact duplicates; every kept document waits in a pool file (not in RAM).
    pool = _SplitWriter(staging / "pool")
    kept: list[_Kept] = []
    generated: list[tuple[str, str]] = []  # (part, key) of the files dropped as generated
    jobs = [(f, r, False) for f, r in train_files] + [(f, r, True) for f, r in val_files]
    bar = tqdm(jobs, desc="preparing data", unit="file", disable=not progress, leave=False)
    for file, relpath, forced_val in bar:
        stats.files += 1
        part = (parts or {}).get(file, "val-data" if forced_val else "data")
        stats.parts.setdefault(part, dict.fromkeys(("files", "documents", "bytes", "train", "val", "train_bytes",
                                                     "val_bytes"), 0))["files"] += 1
        dropped = stats.rejected.get("generated", 0)
        for doc in read_documents(file, relpath, filters, stats.rejected):
            if filters.dedupe:
                if doc.content_hash in seen:
                    stats.rejected["duplicate"] += 1
                    continue
                seen.add(doc.content_hash)
            lines = line_set(doc.tokens[1:-1].astype(np.uint8).tobytes()) \
                if filters.near_duplicate_jaccard and file.suffix in TEXT_SUFFIXES else None
            kept.append(_Kept(doc.split_key, pool.n_tokens, len(doc.tokens), doc.content_hash, forced_val, lines, part))
            pool.add(doc.tokens, doc.mask)
        if stats.rejected.get("generated", 0) > dropped:
            generated.append((part, relpath))
    bar.close()
    pool.close()

    # 2. Near-duplicate clusters; a cluster never straddles the split.
    cluster = (near_duplicate_clusters([k.lines for k in kept], filters.near_duplicate_jaccard)
               if filters.near_duplicate_jaccard else list(range(len(kept))))
    sizes: dict[int, int] = {}
    for root in cluster:
        sizes[root] = sizes.get(root, 0) + 1
    stats.near_duplicate_clusters = sum(1 for n in sizes.values() if n > 1)
    stats.near_duplicate_files = sum(n for n in sizes.values() if n > 1)
    trained_clusters = {cluster[i] for i, doc in enumerate(kept) if not doc.forced_val}
    split: list[str | None] = []  # None: dropped as a near-duplicate
    for i, doc in enumerate(kept):
        if val_files:  # given validation data: a validation file close to a training file would be a leak
            split.append(("val" if cluster[i] not in trained_clusters else None) if doc.forced_val else "train")
        else:  # the cluster goes where its first member's key says; val keeps only that representative
            side = split_of(kept[cluster[i]].key, val_fraction)
            split.append(None if side == "val" and cluster[i] != i else side)
    note = ""
    if not val_files and val_fraction > 0 and kept and "val" not in split:
        # The hash split held out nothing: the first file (a lone one if there is one) becomes the validation split.
        chosen = next((i for i in range(len(kept)) if sizes[cluster[i]] == 1), 0)
        for i in range(len(kept)):
            if cluster[i] == cluster[chosen]:
                split[i] = "val" if i == chosen else None
        note = "the hash split held out no file: the first file is the validation split"
    elif not val_files and "train" not in split and len({cluster[i] for i, side in enumerate(split) if side}) > 1:
        # The hash split held out every file (a tiny corpus): the first cluster trains.
        for i in range(len(kept)):
            if cluster[i] == cluster[0]:
                split[i] = "train"
        note = "the hash split held out every file: the first file (and its near-duplicates) is the training split"
    stats.rejected["near_duplicate"] = split.count(None)

    # 3. Write the splits: training in reading order; validation library files first, then test files.
    pool_data = TokenDataset(staging / "pool")
    writers = {"train": _SplitWriter(staging / "train"), "val": _SplitWriter(staging / "val")}
    train_ids = [i for i, side in enumerate(split) if side == "train"]
    val_ids = sorted((i for i, side in enumerate(split) if side == "val"), key=lambda i: file_kind(kept[i].key) == "test")
    hashed_train_ids = train_ids
    if not train_ids and len(val_ids) == 1 and not val_files:
        # A single document: hold out its tail so there is something honest to measure.
        doc = kept[val_ids[0]]
        tokens, mask = pool_data.window(doc.start, doc.length)
        cut = max(2, int(len(tokens) * (1 - max(val_fraction, 0.1))))
        writers["train"].add(tokens[:cut], mask[:cut])
        writers["val"].add(tokens[cut:], mask[cut:], kind=file_kind(doc.key))
        train_ids, hashed_train_ids = val_ids, []  # its content hash marks it held out (the tail is scored)
        note = "one document only: its last part is the validation split"
    elif weights:  # a weighted mix: the training split part by part, each part's range and weight in its index
        order = {part: n for n, part in enumerate(weights)}
        for i in sorted(train_ids, key=lambda i: order[kept[i].part]):
            writers["train"].add(*pool_data.window(kept[i].start, kept[i].length), kind=kept[i].part)
        writers["train"].extra["part_weights"] = {p: w for p, w in weights.items() if p in writers["train"].groups}
        for i in val_ids:
            writers["val"].add(*pool_data.window(kept[i].start, kept[i].length), kind=file_kind(kept[i].key))
    else:
        for i in train_ids:
            writers["train"].add(*pool_data.window(kept[i].start, kept[i].length))
        for i in val_ids:
            writers["val"].add(*pool_data.window(kept[i].start, kept[i].length), kind=file_kind(kept[i].key))
    del pool_data
    shutil.rmtree(staging / "pool")
    stats.split_note = note
    stats.weights = dict(weights or {})
    stats.documents = {"train": len(train_ids), "val": len(val_ids)}
    for side, ids in (("train", train_ids), ("val", val_ids)):
        for i in ids:
            counts = stats.parts[kept[i].part]
            counts["documents"] += 1
            counts["bytes"] += kept[i].length - 2  # without BOS and EOS
            counts[side] += 1
            counts[f"{side}_bytes"] += kept[i].length - 2
    for root in inputs.get("mix", ()):  # what each distribution (and the standard library) contributed
        if "excluded" not in root:
            prefix = f"site-packages/{root['name']}/" if root["part"] == "site-packages" else None
            mine = [i for i in (*train_ids, *val_ids) if kept[i].part == root["part"]
                    and (prefix is None or kept[i].key.startswith(prefix))]
            root.update(files=len(mine), bytes=sum(kept[i].length - 2 for i in mine))
            if filters.generated:
                root["generated"] = sum(1 for part, key in generated if part == root["part"]
                                        and (prefix is None or key.startswith(prefix)))
    for name, writer in writers.items():
        writer.close()
        stats.tokens[name] = writer.n_tokens
    if stats.tokens["train"] == 0:
        raise ValueError(f"no training data left after filtering {stats.files} file(s) "
                         f"(rejected: {', '.join(f'{k} {v}' for k, v in stats.rejected.items() if v) or 'none'}; "
                         f"filter keeps {filters.min_lines}..{filters.max_lines} lines)")
    val_entries = [{"path": kept[i].key, "kind": file_kind(kept[i].key), "sha1": content_id(kept[i].content_hash)}
                   for i in val_ids]
    record = {"format_version": FORMAT_VERSION, **inputs, "filters": asdict(filters), "val_fraction": val_fraction,
              "split_note": note, "val_files": val_entries, "val_files_sha256": val_files_digest(val_entries),
              "train_sha1": sorted({content_id(kept[i].content_hash) for i in hashed_train_ids})}
    (staging / SPLIT_FILE).write_text(json.dumps(record, indent=1))
    (staging / "stats.json").write_text(json.dumps(asdict(stats), indent=2))
    return stats


# ---------------------------------------------------------------------------------------------- batches
class Batch(NamedTuple):
    """One rank's rows of a global batch, and the loss's denominator (see `WindowSampler.shard`)."""

    x: torch.Tensor  # inputs (B, T)
    y: torch.Tensor  # next-token targets (B, T)
    mask: torch.Tensor  # loss weights of the targets (B, T)
    targets_per_rank: torch.Tensor  # scalar: weighted targets of the whole global batch / world_size (>= 1 / N)


class WindowSampler:
    """Random windows of seq_len + 1 tokens. Batch n depends only on (seed, n): the position in the
    stream is the batch counter, which the training state saves, so a resumed run sees the same batches.

    Under torchrun (`world_size` N > 1) batch n is a global batch of N x batch_size windows drawn exactly as one
    process with batch N x batch_size would draw it, and rank r keeps rows r, r + N, ...: N ranks at batch B see
    the same windows as one process at batch N x B, and a resumed group sees the same batches as one that never
    stopped (the position counts global batches).

    A weighted mix's training split (`TokenDataset.part_weights`) draws each window's part first, with probability
    proportional to the part's tokens times its weight, then a start uniformly within that part (a window near a
    part's end runs on into the next one's tokens, as windows run across files).

    With `fim_rate` > 0 (models with fill-in-the-middle tokens), that fraction of the windows is rearranged
    into prefix-suffix-middle order: <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle, the layout
    `ByteTokenizer.encode_fim` prompts with. The markers are inputs, never targets.
    """

    def __init__(self, dataset: TokenDataset, seq_len: int, batch_size: int, seed: int = 0,
                 fim_rate: float = 0.0, rank: int = 0, world_size: int = 1) -> None:
        if len(dataset) < seq_len + 1:
            raise ValueError(f"the training split has {len(dataset)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                             f"add data or lower seq_len")
        if not 0.0 <= fim_rate <= 1.0:
            raise ValueError(f"fim_rate must be in [0, 1], got {fim_rate}")
        self.dataset, self.seq_len, self.batch_size, self.seed = dataset, seq_len, batch_size, seed
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got {rank} of {world_size}")
        self.fim_rate = fim_rate
        self.rank, self.world_size = rank, world_size
        self.position = 0  # (global) batches drawn so far
        self.parts = self._weighted_parts(dataset, seq_len)

    @staticmethod
    def _weighted_parts(dataset: TokenDataset, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(first start, end of starts, probability) per part of a weighted mix's split; None: uniform starts."""
        weights = dataset.part_weights
        groups = {part: span for part, span in dataset.groups.items() if part in weights}
        if not weights or not groups:
            return None
        last = len(dataset) - seq_len  # starts are < last, so a window of seq_len + 1 tokens fits
        spans = np.array([[min(a, last - 1), max(min(b, last), min(a, last - 1) + 1)] for a, b in groups.values()])
        mass = np.array([(b - a) * weights[part] for part, (a, b) in groups.items()], dtype=np.float64)
        return spans[:, 0], spans[:, 1], mass / mass.sum()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.next_shard()[:3]

    def next_shard(self) -> Batch:
        batch = self.shard(self.position)
        self.position += 1
        return batch

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, mask): inputs (B, T), next-token targets (B, T), loss weights for the targets (B, T)."""
        return self.shard(n)[:3]

    def shard(self, n: int) -> Batch:
        """This rank's rows of global batch n, with the global batch's weighted target count / world_size: the
        denominator that makes the mean of the ranks' losses (what DDP's averaged gradients descend) the mean
        over the whole global batch, as one process with the global batch computes it."""
        rows = self.batch_size * self.world_size
        rng = np.random.default_rng([self.seed, n])
        starts = self.starts(rng, rows)
        tokens = np.stack([self.dataset.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        weights = np.stack([self.dataset.mask[s : s + self.seq_len + 1] for s in starts]).astype(np.float32)
        if self.fim_rate:  # over every row, mine or not: the rng stream is the global batch's
            for row in np.flatnonzero(rng.random(rows) < self.fim_rate):
                tokens[row], weights[row] = fim_rearrange(tokens[row], weights[row], rng)
        targets = torch.from_numpy(weights[:, 1:])
        per_rank = targets.sum().clamp_min(1.0) / self.world_size
        mine = slice(self.rank, None, self.world_size)
        tokens_t = torch.from_numpy(np.ascontiguousarray(tokens[mine]))
        return Batch(tokens_t[:, :-1], tokens_t[:, 1:], targets[mine].contiguous(), per_rank)

    def starts(self, rng: np.random.Generator, rows: int) -> np.ndarray:
        """Where `rows` windows start: uniformly over the split, or by part and weight in a weighted mix."""
        if self.parts is None:
            return rng.integers(0, len(self.dataset) - self.seq_len, size=rows)
        low, high, probability = self.parts
        part = rng.choice(len(probability), size=rows, p=probability)
        return low[part] + (rng.random(rows) * (high[part] - low[part])).astype(np.int64)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.position = int(state["seed"]), int(state["position"])


def fim_rearrange(tokens: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One window (tokens, per-token loss weights) in prefix-suffix-middle order, same length.

    The last three tokens make room for the markers; two random cuts split the rest into prefix, middle and
    suffix. Marker positions get weight 0 (they are given, not predicted).
    """
    body, body_weights = tokens[: len(tokens) - 3], weights[: len(weights) - 3]
    low, high = np.sort(rng.integers(0, len(body) + 1, size=2))
    marker = np.array([FIM_PREFIX_ID, FIM_SUFFIX_ID, FIM_MIDDLE_ID], dtype=tokens.dtype)
    pieces = (marker[:1], body[:low], marker[1:2], body[high:], marker[2:], body[low:high])
    zero = np.zeros(1, dtype=weights.dtype)
    piece_weights = (zero, body_weights[:low], zero, body_weights[high:], zero, body_weights[low:high])
    return np.concatenate(pieces), np.concatenate(piece_weights)


VAL_SAMPLE_SEED = 0  # one fixed sample for every run and every evaluation, so numbers compare


def eval_window_spans(n_tokens: int, seq_len: int, max_tokens: int | None = None,
                      seed: int = VAL_SAMPLE_SEED) -> list[tuple[int, int]]:
    """(start, length) of the windows (length <= seq_len + 1) that score a split of n_tokens tokens.

    The whole split (max_tokens None or not smaller than it): consecutive non-overlapping windows, every target
    once. Otherwise a fixed sample of max_tokens // seq_len full windows spread over the whole split: it is cut
    into that many equal strata and each gets one window at a seeded random offset, so every stretch of the
    split (every file of any size) is represented and the same windows are scored at every evaluation.
    """
    if max_tokens is None or n_tokens <= max_tokens + 1 or n_tokens <= seq_len + 1:
        spans, start = [], 0
        while start < n_tokens - 1:
            stop = min(start + seq_len + 1, n_tokens)
            spans.append((start, stop - start))
            start = stop - 1
        return spans
    count = max(1, max_tokens // seq_len)
    room = n_tokens - (seq_len + 1)  # the last possible start
    offsets = np.random.default_rng(seed).random(count)
    return [(int((i + offsets[i]) * room / count), seq_len + 1) for i in range(count)]


def eval_windows(dataset: TokenDataset, seq_len: int, max_tokens: int | None = None,
                 seed: int = VAL_SAMPLE_SEED) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The windows (tokens of length <= seq_len + 1, mask) of `eval_window_spans` over a split, in order."""
    for start, length in eval_window_spans(len(dataset), seq_len, max_tokens, seed):
        yield dataset.window(start, length)
