"""A per-run metrics log: metrics.jsonl (every record, as written) and metrics.csv (a fixed set of columns).

The original release's `TrainLogger`. Records are appended and flushed at once, so a killed run keeps what it
logged; a resumed run first drops the records written after the checkpoint it resumes from.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

CSV_COLUMNS = ("kind", "step", "elapsed_s", "loss", "val_bpb", "lr", "bytes_per_s", "tokens_seen")


class TrainLogger:
    def __init__(self, run_dir: str | os.PathLike, resume_from_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self.csv_path = self.run_dir / "metrics.csv"
        if resume_from_step is None:
            for path in (self.jsonl_path, self.csv_path):
                path.unlink(missing_ok=True)
        else:
            self._truncate_after(resume_from_step)
        new_csv = not self.csv_path.exists()
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._csv_file = open(self.csv_path, "a", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new_csv:
            self._csv.writeheader()

    def log(self, kind: str, **values: Any) -> None:
        """kind: "train" (a step), "eval" (validation) or "event" (start, checkpoint, end)."""
        record = {"kind": kind, **values}
        self._jsonl.write(json.dumps(record, default=str) + "\n")
        self._jsonl.flush()
        if kind != "event":
            self._csv.writerow({k: record.get(k, "") for k in CSV_COLUMNS})
            self._csv_file.flush()

    def close(self) -> None:
        self._jsonl.close()
        self._csv_file.close()

    def __enter__(self) -> "TrainLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _truncate_after(self, step: int) -> None:
        if self.jsonl_path.exists():
            kept = [line for line in self.jsonl_path.read_text(encoding="utf-8").splitlines()
                    if _parse(line) is not None and _parse(line).get("step", 0) <= step]
            self.jsonl_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        if self.csv_path.exists():
            with open(self.csv_path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= step]
            with open(self.csv_path, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
                writer.writeheader()
                writer.writerows(rows)


class NullLogger:
    """A TrainLogger that writes nothing: what the ranks other than 0 of a torchrun group log to."""

    def log(self, kind: str, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _parse(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by a kill
        return None
    return value if isinstance(value, dict) else None


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Every record of a run's metrics.jsonl (unreadable lines skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: is {run_dir} a training run folder?")
    return [r for r in map(_parse, path.read_text(encoding="utf-8").splitlines()) if r is not None]
