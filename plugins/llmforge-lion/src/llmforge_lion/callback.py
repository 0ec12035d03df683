"""`csv_logger`: every metrics row, train and eval, appended to a CSV file in the run dir."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from llmforge_lion.options import CSVLoggerOptions


def flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'eval': {'loss': 1.0}} -> {'eval/loss': 1.0}; lists become JSON so one row stays one line."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


class CSVFile:
    """An append-only CSV whose header grows when a row brings a new key.

    Train and eval rows have different keys, so the header cannot be known up front. A new
    key rewrites the file once, atomically, with the wider header; every other row is a
    plain append. An existing file (a resumed run) is continued with its own header.
    """

    def __init__(self, path: Path, columns: list[str] | None = None):
        self.path = path
        self.fixed = columns is not None
        self.columns: list[str] = list(columns or [])
        if path.exists() and path.stat().st_size:
            with path.open(newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            if not self.fixed:
                self.columns = header
            elif header != self.columns:
                self._rewrite(self.columns)  # the spec's columns changed between runs

    def write(self, row: dict[str, Any]) -> None:
        new = [k for k in row if k not in self.columns]
        if new and not self.fixed:
            self._rewrite([*self.columns, *new])
        elif not self.path.exists() or not self.path.stat().st_size:
            self._rewrite(self.columns)
        with self.path.open("a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow(["" if row.get(c) is None else row[c] for c in self.columns])

    def _rewrite(self, columns: list[str]) -> None:
        rows: list[dict[str, str]] = []
        if self.path.exists():
            with self.path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.columns = columns


class CSVLogger:
    def __init__(self, options: CSVLoggerOptions, run_dir: Path):
        self.metrics = CSVFile(Path(run_dir) / options.filename, options.columns)
        self.summaries = CSVFile(Path(run_dir) / options.summary_filename) if options.summary_filename else None

    def on_log(self, row: dict[str, Any]) -> None:
        self.metrics.write(flatten(row))

    def on_stage_end(self, stage: str, summary: dict[str, Any]) -> None:
        if self.summaries is not None:
            self.summaries.write(flatten({"stage": stage, **summary}))


def build_csv_logger(options: CSVLoggerOptions, *, run_dir: Path, spec: Any = None, stage: Any = None) -> CSVLogger:
    """Factory for the `csv_logger` callback (`llmforge.plugin.CallbackFactory`); one file for every stage."""
    return CSVLogger(options, run_dir)
