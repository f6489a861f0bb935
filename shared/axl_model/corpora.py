"""Held-out corpora: real code that no training run reads, to score models on code unlike their training data.

    fetch_pypi_corpus()                    # `axl data corpus pypi`: pinned wheels from PyPI -> data/corpora/pypi/
    files = corpus_files("pypi")           # the unpacked .py files ([] when the corpus was never fetched)
    refuse_held_out_training(["data/"])    # ValueError: data/ holds a held-out corpus

The PyPI corpus is a fixed list of pure-Python packages (name, version, sha256 of the wheel, license), none of
them a dependency of this project or installed beside it, so a model trained on the standard library and the
project's environment has never seen them. `pip download --require-hashes` fetches exactly those wheels; their
.py files are unpacked (licenses kept beside them), and `manifest.json`, written last, records what came from
where. A corpus folder carries a marker file (`HELD_OUT_MARKER`), and training refuses any input under it.
"""
from __future__ import annotations

import dataclasses
import email
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

__all__ = [
    "CORPORA",
    "CORPORA_ROOT",
    "HELD_OUT_MARKER",
    "PYPI_PACKAGES",
    "CorpusError",
    "PinnedPackage",
    "corpus_dir",
    "corpus_files",
    "fetch_pypi_corpus",
    "refuse_held_out_training",
]

CORPORA_ROOT = Path("data") / "corpora"  # relative to the working directory, like data/<specialist>/
CORPORA = ("pypi",)  # the held-out corpora `axl eval --corpus` knows
CORPUS_CHOICES = ("auto", "split", "both", *CORPORA)  # `axl eval --corpus`: see corpora_to_score
HELD_OUT_MARKER = "HELD_OUT"  # a file in a corpus folder: training refuses every input below it
MANIFEST = "manifest.json"
PIP_TIMEOUT_S = 20  # per network read; with one retry, an offline machine fails in well under a minute


class CorpusError(RuntimeError):
    """A corpus could not be fetched or read (the message says why and what to do)."""


@dataclasses.dataclass(frozen=True)
class PinnedPackage:
    name: str
    version: str
    sha256: str  # of the py3-none-any wheel on PyPI
    license: str


# Pure-Python wheels, permissive licenses, not in pyproject.toml's dependencies nor in the project's venv
# (attrs, sortedcontainers, pyparsing, dateutil, click, Jinja2 ... are, through the dev and eval tools).
# About 4 MB of .py files in 28 packages. Change the list only on purpose: results are comparable only
# across the same list.
PYPI_PACKAGES: tuple[PinnedPackage, ...] = (
    PinnedPackage("astor", "0.8.1", "070a54e890cefb5b3739d19f30f5a5ec840ffc9c50ffa7d23cc9fc1a38ebbfc5", "BSD-3-Clause"),
    PinnedPackage("blinker", "1.9.0", "ba0efaa9080b619ff2f3459d1d500c57bddea4a6b424b60a91141db6fd2f08bc", "MIT"),
    PinnedPackage("boltons", "26.2.0", "41942cbce440211bbcf2487ccdc356964ad674f95a01068b8a0dd7a1d1fed036", "BSD-3-Clause"),
    PinnedPackage("bottle", "0.13.4", "045684fbd2764eac9cdeb824861d1551d113e8b683d8d26e296898d3dd99a12e", "MIT"),
    PinnedPackage("cachetools", "8.0.0", "5af562e5078f0086771a1e3832a9c3dbf5d336b6e2794a2c12a64680a4c9087d", "MIT"),
    PinnedPackage("decorator", "5.3.1", "f47fe6fdbd2edd623ecfe36875d37aba411624e2670dd395dddae1358689bb3c", "BSD-2-Clause"),
    PinnedPackage("funcy", "2.1", "290794186530c944f7e444d2e28b98f33a55685f2bfb9b7a61dac564decab8f8", "BSD-3-Clause"),
    PinnedPackage("glom", "25.12.0", "b9f21e77f71a6576a43864e85066b8cc3f0f778d0d50961563f8981377a6dcb1", "BSD-3-Clause"),
    PinnedPackage("humanize", "4.17.0", "02d0899527760efe18011944f882df4970943b4cdff7b5a0ba7fed43a576ef98", "MIT"),
    PinnedPackage("inflection", "0.5.1", "f38b2b640938a4f35ade69ac3d053042959b62a0f1076a5bbaa1b9526605a8a2", "MIT"),
    PinnedPackage("itsdangerous", "2.2.0", "c6242fc49e35958c8b15141343aa660db5fc54d4f13a1db01a3f5891b98700ef", "BSD-3-Clause"),
    PinnedPackage("jmespath", "1.1.0", "a5663118de4908c91729bea0acadca56526eb2698e83de10cd116ae0f4e97c64", "MIT"),
    PinnedPackage("markdown", "3.11.3", "e1a31a112232504d753e5c01bb8c2de90d3f0ba986b063e10770cf7695b09e73", "BSD-3-Clause"),
    PinnedPackage("marshmallow", "4.4.0", "03a882ff2eabb9a4e24b433c2949f359ef4d172a12fdc14cde10375fd55328b4", "MIT"),
    PinnedPackage("mccabe", "0.7.0", "6c2d30ab6be0e4a46919781807b4f0d834ebdd6c6e3dca0bda5a15f863427b6e", "MIT"),
    PinnedPackage("more-itertools", "11.2.1", "35a7377edd1dd6608dcb2cdf534ded55ea32d49448875ad042cd3f879fb1ded0", "MIT"),
    PinnedPackage("parse", "1.22.4", "ae430a4477316eed4a9710f642b2db968ec89d5d82e6b0908b8169673b476847", "MIT"),
    PinnedPackage("ply", "3.11", "096f9b8350b65ebd2fd1346b12452efe5b9607f7482813ffca50c22722a807ce", "BSD-3-Clause"),
    PinnedPackage("pycodestyle", "2.15.0", "12fd2f73c7b8ee8845a0431111df8faf4c1a07d6e64e2ee7f0c74014dab14181", "MIT"),
    PinnedPackage("pyflakes", "4.1.0", "b2e05e6bac8e49b67be2a6ffa63422c60f7193fc72e8180255907b41ec997dc1", "MIT"),
    PinnedPackage("schema", "0.7.8", "00bd977fadc7d9521bf289850cd8a8aa5f4948f575476b8daaa5c1b57af2dce1", "MIT"),
    PinnedPackage("six", "1.17.0", "4721f391ed90541fddacab5acf947aa0d3dc7d27b2e1e8eda2be8970586c3274", "MIT"),
    PinnedPackage("sqlparse", "0.6.1", "3be5a72d04c873d690d7c6dedd33d6fae2ef82759881ceec02fc2efd0cba564f", "BSD-3-Clause"),
    PinnedPackage("tabulate", "0.10.0", "f0b0622e567335c8fabaaa659f1b33bcb6ddfe2e496071b743aa113f8774f2d3", "MIT"),
    PinnedPackage("tenacity", "9.2.1", "9e56f17539296baab7beabb08b92f6ee3d7be92d8be72d763360677c2ad6580e", "Apache-2.0"),
    PinnedPackage("tomlkit", "0.15.2", "05562412163a3037b94497385fb7f9204c637bc605af7a48199e41cf2272f437", "MIT"),
    PinnedPackage("toolz", "1.2.0", "890f820b1cb8152785aaf9386d8707770110809035800985ca65cb24ce1120ef", "BSD-3-Clause"),
    PinnedPackage("xmltodict", "1.0.4", "a4a00d300b0e1c59fc2bfccb53d7b2e88c32f200df138a0dd2229f842497026a", "MIT"),
)


def corpus_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; corpora: {', '.join(CORPORA)}")
    return Path(root) / name if root is not None else CORPORA_ROOT / name


def load_manifest(name: str, root: str | os.PathLike | None = None) -> dict | None:
    """The corpus's manifest, or None when it was never (completely) fetched."""
    return _read_json(corpus_dir(name, root) / MANIFEST)


def corpus_files(name: str, root: str | os.PathLike | None = None) -> list[Path]:
    """The corpus's .py files in a stable order ([] when it was never fetched)."""
    if load_manifest(name, root) is None:
        return []
    return sorted(corpus_dir(name, root).rglob("*.py"))


# ---------------------------------------------------------------------------------------------- the guard
def refuse_held_out_training(paths: Sequence[str | os.PathLike] | None) -> None:
    """Raise ValueError when a training input is, or holds, a held-out corpus (a folder with HELD_OUT_MARKER).

    Checked on the named paths and, for folders, below them, so `--data data/` is refused as well as
    `--data data/corpora/pypi/boltons-26.2.0/`.
    """
    for raw in paths or ():
        text = str(raw)
        path = Path(text.split("*", 1)[0] or ".")  # a glob: the part before the first wildcard
        path = path.resolve() if path.exists() else path.absolute()
        for parent in (path, *path.parents):
            if (parent / HELD_OUT_MARKER).is_file():
                raise ValueError(_refusal(text, parent))
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                if HELD_OUT_MARKER in filenames:
                    raise ValueError(_refusal(text, Path(dirpath)))
                dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]


def _refusal(path: str, corpus: Path) -> str:
    return (f"training data {path} includes the held-out corpus {corpus} (it has a {HELD_OUT_MARKER} file): "
            f"a model trained on it cannot be scored on it; train on other folders")


# ---------------------------------------------------------------------------------------------- fetching
def fetch_pypi_corpus(out_dir: str | os.PathLike | None = None, *, packages: Sequence[PinnedPackage] | None = None,
                      source: str | None = None, force: bool = False) -> dict:
    """Download the pinned wheels, check their sha256, unpack their .py files into out_dir; returns the manifest.

    source None: PyPI through pip's usual configuration (index, proxy); a folder or file:// URL of wheels
    (offline mirrors, tests): only that, no index. An existing complete corpus of the same packages is kept
    unless force. Raises CorpusError (with pip's reason) when a wheel cannot be fetched or does not match.
    """
    out = Path(out_dir) if out_dir is not None else corpus_dir("pypi")
    packages = PYPI_PACKAGES if packages is None else tuple(packages)
    wanted = [dataclasses.asdict(p) for p in packages]
    existing = _read_json(out / MANIFEST)
    if existing and not force and [_pin(p) for p in existing.get("packages", [])] == [_pin(p) for p in wanted]:
        return existing
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="axl-pypi-wheels-") as wheels:
        _pip_download(packages, Path(wheels), source)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            entries = [_unpack(package, _wheel_of(package, Path(wheels)), staging) for package in packages]
            manifest = {"corpus": "pypi", "held_out": True, "source": source or "PyPI (pip's index)",
                        "made_by": "axl data corpus pypi", "packages": entries,
                        "files": sum(e["files"] for e in entries), "bytes": sum(e["bytes"] for e in entries)}
            (staging / HELD_OUT_MARKER).write_text(
                "Evaluation-only corpus: `axl train` refuses inputs below this folder.\n", encoding="utf-8")
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
            if out.exists():
                shutil.rmtree(out)
            os.replace(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _pin(entry: dict) -> tuple[str, str, str]:
    return _normalize(entry["name"]), entry["version"], entry["sha256"]


def _normalize(name: str) -> str:
    """PEP 503 name normalization (Markdown == markdown, more_itertools == more-itertools)."""
    return "-".join(name.replace("_", "-").replace(".", "-").lower().split("-"))


def _pip_download(packages: Sequence[PinnedPackage], dest: Path, source: str | None) -> None:
    requirements = dest / "requirements.txt"
    requirements.write_text("".join(f"{p.name}=={p.version} --hash=sha256:{p.sha256}\n" for p in packages),
                            encoding="utf-8")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--require-hashes",
               "-r", str(requirements), "-d", str(dest), "--disable-pip-version-check", "--no-input",
               "--retries", "1", "--timeout", str(PIP_TIMEOUT_S)]
    env = dict(os.environ)
    if source is not None:
        location = source.removeprefix("file://") if source.startswith("file://") else source
        if "://" not in source and not Path(location).is_dir():
            raise CorpusError(f"wheel source {source} is not a folder")
        command += ["--no-index", "--find-links", source]
        env["PIP_CONFIG_FILE"] = os.devnull  # only this source: no configured index or extra links
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=30 * PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CorpusError(f"pip download did not finish in {30 * PIP_TIMEOUT_S} s; is PyPI reachable?") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines()
                 if line.strip() and "is ignored: it is neither a file nor a directory" not in line]
        reason = " / ".join(lines[-3:]) or f"exit status {done.returncode}"
        where = source or "PyPI"
        raise CorpusError(f"could not download the pinned wheels from {where} "
                          f"(no network, a proxy, or a changed file?): pip says: {reason}")


def _wheel_of(package: PinnedPackage, folder: Path) -> Path:
    """The downloaded wheel of a package, its sha256 checked again (pip checked it; the manifest records it)."""
    prefix = f"{package.name.replace('-', '_').lower()}-{package.version}-"
    for wheel in folder.glob("*.whl"):
        if wheel.name.lower().startswith(prefix):
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            if digest != package.sha256:
                raise CorpusError(f"{wheel.name}: sha256 {digest} is not the pinned {package.sha256}")
            return wheel
    raise CorpusError(f"pip reported success but no wheel of {package.name} {package.version} is in {folder}")


def _unpack(package: PinnedPackage, wheel: Path, staging: Path) -> dict:
    """Extract the wheel's .py files (and its license files, renamed so no loader reads them as text)."""
    target = staging / f"{_normalize(package.name)}-{package.version}"
    files, size, metadata = 0, 0, None
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            member = PurePosixPath(info.filename)
            if info.is_dir() or member.is_absolute() or ".." in member.parts:
                continue  # never write outside the corpus folder
            in_dist_info = member.parts[0].endswith(".dist-info")
            if in_dist_info and member.name == "METADATA":
                metadata = archive.read(info)
            elif in_dist_info and member.name.upper().startswith(("LICENSE", "COPYING", "NOTICE")):
                (target / "licenses").mkdir(parents=True, exist_ok=True)
                (target / "licenses" / f"{member.name}.license").write_bytes(archive.read(info))
            elif member.suffix == ".py" and not in_dist_info and not member.parts[0].endswith(".data"):
                path = target.joinpath(*member.parts)
                path.parent.mkdir(parents=True, exist_ok=True)
                data = archive.read(info)
                path.write_bytes(data)
                files += 1
                size += len(data)
    declared = ""
    if metadata is not None:
        message = email.message_from_bytes(metadata)
        declared = message.get("License-Expression") or "; ".join(
            c.split("::")[-1].strip() for c in message.get_all("Classifier") or [] if c.startswith("License ::"))
    return {"name": package.name, "version": package.version, "wheel": wheel.name, "sha256": package.sha256,
            "license": package.license, "declared_license": declared, "files": files, "bytes": size,
            "folder": target.name}


# ---------------------------------------------------------------------------------------------- reading
def load_corpus(name: str, root: str | os.PathLike | None = None,
                max_bytes: int | None = None) -> list[tuple[str, bytes]]:
    """(path relative to the corpus folder, contents) of every file, exact duplicates dropped, in a fixed
    pseudo-random order (sha256 of the path), so that with max_bytes the files kept are a sample across all
    packages rather than the alphabetically first. With max_bytes, whole files until that many bytes."""
    folder = corpus_dir(name, root)
    files = corpus_files(name, root)
    if not files:
        raise ValueError(f"the {name} corpus is not in {folder}: fetch it with `axl data corpus {name}`")
    keyed = sorted((hashlib.sha256(f.relative_to(folder).as_posix().encode()).hexdigest(), f) for f in files)
    out: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    total = 0
    for _, file in keyed:
        data = file.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if not data.strip() or digest in seen:
            continue
        seen.add(digest)
        out.append((file.relative_to(folder).as_posix(), data))
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    return out


class CorpusSplit:
    """Documents as one in-memory token split (BOS + bytes + EOS each, BOS never a target), shaped like
    `data.TokenDataset` for `train.evaluate_bpb`: every byte of a held-out corpus is scored."""

    def __init__(self, documents: Sequence[tuple[str, bytes]]) -> None:
        import numpy as np

        from .tokenizer import BOS_ID, EOS_ID

        pieces, masks = [], []
        for _, data in documents:
            tokens = np.empty(len(data) + 2, dtype=np.uint16)
            tokens[0], tokens[-1] = BOS_ID, EOS_ID
            tokens[1:-1] = np.frombuffer(data, dtype=np.uint8)
            mask = np.ones(len(tokens), dtype=np.uint8)
            mask[0] = 0
            pieces.append(tokens)
            masks.append(mask)
        self.tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)
        self.mask = np.concatenate(masks) if masks else np.zeros(0, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.tokens)

    def window(self, start: int, length: int):
        return self.tokens[start:start + length], self.mask[start:start + length]


def corpus_bpb(model, name: str, *, root: str | os.PathLike | None = None, seq_len: int = 256,
               max_bytes: int | None = None, batch_size: int = 8, compressors: bool = False) -> dict:
    """Bits per byte of a model on a whole held-out corpus (with max_bytes: the whole files `load_corpus` keeps).

    Returns {"corpus", "bpb", "perplexity_per_byte", "bytes" (scored), "files", "packages" (name==version)}, and
    with `compressors` "compressors": zlib/zstd/xz bits per byte on the same files (`axl_model.compressors`).
    """
    import numpy as np

    from .train import evaluate_bpb

    documents = load_corpus(name, root, max_bytes)
    split = CorpusSplit(documents)
    scored = int(np.asarray(split.mask[1:]).sum())  # every byte of the files kept, and each end-of-file
    bpb = evaluate_bpb(model, split, min(seq_len, model.config.max_seq_len), batch_size)
    manifest = load_manifest(name, root) or {}
    report = {"corpus": name, "bpb": bpb, "perplexity_per_byte": 2.0 ** bpb, "bytes": scored, "files": len(documents),
              "packages": [f"{p['name']}=={p['version']}" for p in manifest.get("packages", [])]}
    if compressors:
        from .compressors import compressor_baselines

        report["compressors"] = compressor_baselines([data for _, data in documents])
    return report


def corpora_to_score(choice: str, root: str | os.PathLike | None = None) -> tuple[bool, list[str]]:
    """(score the checkpoint's held-out split?, held-out corpora to score) for `axl eval --corpus CHOICE`.

    auto: the split, and every corpus that was fetched; split: the split only; both: the split and every corpus
    (each must be fetched); a corpus name: that corpus only (it must be fetched).
    """
    if choice not in CORPUS_CHOICES:
        raise ValueError(f"--corpus must be one of {', '.join(CORPUS_CHOICES)}; got {choice!r}")
    if choice == "split":
        return True, []
    names = list(CORPORA) if choice in ("auto", "both") else [choice]
    missing = [n for n in names if not corpus_files(n, root)]
    if choice != "auto" and missing:
        raise ValueError(f"the {missing[0]} corpus is not in {corpus_dir(missing[0], root)}: "
                         f"fetch it with `axl data corpus {missing[0]}`")
    return choice in ("auto", "both"), [n for n in names if n not in missing]
