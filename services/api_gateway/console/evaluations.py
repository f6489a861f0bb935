"""Each model's evaluation row for the Models page: from its model-store entry (``evaluation``, an ``axl eval``
report row) or else from the data block ``axl eval`` embeds in ``docs/results.md`` (matched by model name or by the
checkpoint folder's name). Anything not measured says so."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class EvaluationCells:
    bits_per_byte: str = NOT_MEASURED
    next_line: str = NOT_MEASURED
    humaneval: str = NOT_MEASURED
    date: str = ""
    source: str = ""


def load_results_rows(results_file: str | Path) -> list[dict[str, Any]]:
    """The rows of the results table (empty when the file or its data block is missing or broken)."""
    from axl_model.evaluate import read_results_rows  # numpy, no torch: loaded when the page is first shown

    return read_results_rows(Path(results_file))


def _row_for(name: str, entry: dict[str, Any] | None, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str] | None:
    if entry and isinstance(entry.get("evaluation"), dict):
        return entry["evaluation"], "model store"
    for row in rows:
        checkpoint = str(row.get("checkpoint") or "").rstrip("/").rsplit("/", 1)[-1]
        if name in (row.get("model"), checkpoint):
            return row, "docs/results.md"
    return None


def _pct(value: Any) -> str:
    return f"{100 * float(value):.1f}%"


def cells(name: str, entry: dict[str, Any] | None, rows: list[dict[str, Any]]) -> EvaluationCells:
    found = _row_for(name, entry, rows)
    if found is None:
        return EvaluationCells()
    row, source = found
    try:
        held = row.get("held_out") or {}
        bpb = f"{float(held['bpb']):.3f}" if "bpb" in held else NOT_MEASURED
        next_line = (
            "; ".join(
                f"{'held-out' if corpus == 'held_out' else corpus}: "
                f"exact {_pct(r['exact'])}, sim {float(r['similarity']):.3f}"
                for corpus, r in (row.get("nextline") or {}).items()
            )
            or NOT_MEASURED
        )
        he = row.get("humaneval") or {}
        humaneval = (
            f"pass@1 {_pct(he['pass@1'])} ({he.get('problems', '?')} problems)" if "pass@1" in he else NOT_MEASURED
        )
    except (KeyError, TypeError, ValueError):  # a hand-edited row: show what is sure, not a 500
        return EvaluationCells(source=source)
    return EvaluationCells(
        bits_per_byte=bpb, next_line=next_line, humaneval=humaneval, date=str(row.get("date") or ""), source=source
    )
