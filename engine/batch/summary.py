"""The outcome of a batch: one row per input (file, status, error, seconds), kept as ``summary.csv``."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text

SUMMARY_FILE = "summary.csv"
SUMMARY_COLUMNS = ("file", "status", "error", "seconds")


@dataclass
class BatchSummary:
    """Outcome of ``run_batch``: one row per input (file, status, error, seconds)."""

    rows: list[dict[str, Any]]
    csv_path: Path
    cancelled: bool = False
    workers: int = 0
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "failed"]


def summary_row(job_name: str, status: str, error: str = "", seconds: float = 0.0) -> dict[str, Any]:
    """One summary row."""
    return {"file": job_name, "status": status, "error": error, "seconds": round(seconds, 3)}


def write_summary(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write the summary rows as CSV (``SUMMARY_COLUMNS``), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in SUMMARY_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def read_summary(path: str | Path) -> list[dict[str, str]]:
    """Rows of a summary CSV as dicts of strings."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
