"""General-purpose compressors as baselines for bits per byte: what a model has to beat on the same bytes.

    report = compressor_baselines([b"def f():\\n    return 1\\n", ...])
    report["xz-9e"]["per_file_bpb"], report["xz-9e"]["concatenated_bpb"]

A model's held-out bits/byte is a code length: -log2 p(byte) summed over the held-out files. A compressor's
output size is one too, so `compressed bytes * 8 / input bytes` is on the same scale, and a model that cannot
beat xz on code it never saw has learnt less than a dictionary coder does in one pass over the file.

Two ways, both reported:
- per file: each file compressed alone, sizes summed. The fair comparison with a model that starts every file
  from scratch (`axl eval` scores each file from its own BOS), though the model brings what it learnt in
  training and the compressor brings nothing; each output also carries its format's header and checksum
  (zlib 6 bytes, zstd about 10, xz about 60), which weighs on small files.
- concatenated: the whole set as one stream, so a compressor reuses what it saw in earlier files (xz's and
  zstd-19's windows cover a few MB; zlib's only 32 KB). The stronger baseline for a large set.

The denominator is the files' bytes. (`axl eval`'s model figure also predicts one end-of-file token per file,
counted as a byte; on the held-out sets here that is under 0.1% of the bytes.)

Compressors: zlib level 9 and xz/LZMA preset 9 | PRESET_EXTREME (both in the standard library), zstd level 19
when the `zstandard` package is installed (the `eval` extra); otherwise the report says it is unavailable.
"""
from __future__ import annotations

import lzma
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["COMPRESSORS", "available_compressors", "compressor_baselines", "compressor_names"]

# name -> (what it is, in the words the tables use)
COMPRESSORS: dict[str, str] = {
    "zlib-9": "zlib (DEFLATE) level 9",
    "zstd-19": "Zstandard level 19 (the `zstandard` package)",
    "xz-9e": "xz / LZMA2, preset 9 | PRESET_EXTREME",
}


def _zstd() -> Callable[[bytes], bytes] | str:
    """zstd-19, or why it is unavailable."""
    try:
        import zstandard
    except ImportError:
        return "the `zstandard` package is not installed (pip install 'axl-mesh[eval]')"
    compressor = zstandard.ZstdCompressor(level=19)
    return compressor.compress


def available_compressors() -> tuple[dict[str, Callable[[bytes], bytes]], dict[str, str]]:
    """({name: compress function}, {name: why it is unavailable}) in COMPRESSORS' order."""
    functions: dict[str, Callable[[bytes], bytes]] = {
        "zlib-9": lambda data: zlib.compress(data, 9),
        "xz-9e": lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),
    }
    missing: dict[str, str] = {}
    zstd = _zstd()
    if isinstance(zstd, str):
        missing["zstd-19"] = zstd
    else:
        functions["zstd-19"] = zstd
    return {name: functions[name] for name in COMPRESSORS if name in functions}, missing


def compressor_baselines(documents: Sequence[bytes], names: Sequence[str] | None = None) -> dict[str, Any]:
    """Bits per byte of each compressor on these files, file by file and concatenated.

    Returns {"bytes": total input bytes, "files": count, "unavailable": {name: reason},
    <name>: {"per_file_bpb", "concatenated_bpb", "per_file_bytes", "concatenated_bytes", "seconds"}}.
    Empty files are skipped (they carry no bytes to predict, and the format overhead alone would be counted).
    """
    files = [bytes(d) for d in documents if len(d)]
    total = sum(map(len, files))
    functions, missing = available_compressors()
    if names is not None:
        unknown = [n for n in names if n not in COMPRESSORS]
        if unknown:
            raise ValueError(f"unknown compressor(s) {unknown}; choose from {', '.join(COMPRESSORS)}")
        functions = {n: f for n, f in functions.items() if n in names}
        missing = {n: why for n, why in missing.items() if n in names}
    report: dict[str, Any] = {"bytes": total, "files": len(files), "unavailable": missing}
    if not total:
        return report
    whole = b"".join(files)
    for name, compress in functions.items():
        started = time.perf_counter()
        per_file = sum(len(compress(f)) for f in files)
        concatenated = len(compress(whole))
        report[name] = {"per_file_bpb": per_file * 8 / total, "concatenated_bpb": concatenated * 8 / total,
                        "per_file_bytes": per_file, "concatenated_bytes": concatenated,
                        "seconds": round(time.perf_counter() - started, 3)}
    return report


def compressor_names(report: dict[str, Any]) -> list[str]:
    """The compressors a `compressor_baselines` report measured, in COMPRESSORS' order."""
    return [name for name in COMPRESSORS if isinstance(report.get(name), dict)]
