"""metrics.jsonl, TensorBoard, callbacks and the console, written by rank 0 only.

On resume, rows of the resumed stage past the checkpoint's step are dropped (the file is
rewritten atomically, a torn last line ignored), so a killed-and-resumed run ends with
the same file as an uninterrupted one.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from llmforge.atomic import atomic_write_text

TB_TAGS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
    "mfu": "train/mfu", "memory_mb": "train/memory_mb", "skipped_steps": "train/skipped_steps",
    "val_loss": "val/loss", "val_ppl": "val/ppl",
}


def read_rows(path: Path) -> list[dict]:
    """Rows of a metrics file; a torn (unparseable) last line from a kill is ignored."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def truncate_rows(path: Path, stage: str, step: int) -> None:
    """Keep other stages' rows and this stage's rows up to `step` (the checkpoint's step)."""
    rows = [r for r in read_rows(path) if r.get("stage") != stage or r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


class Log:
    """Console + run.log. Plain lines when stdout is not a TTY; rank 0 only."""

    def __init__(self, path: Path | None, enabled: bool = True):
        self.enabled = enabled
        self.file = open(path, "a", buffering=1) if (enabled and path) else None
        self.tty = sys.stdout.isatty()
        self._console = None
        self._showwarning = None

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            self._console = Console(highlight=False)
        return self._console

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.console.print(msg, markup=False)
        else:
            print(msg, flush=True)
        if self.file:
            self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    def detail(self, msg: str) -> None:
        """To run.log only: what a user may need later (a traceback) but need not read on the console."""
        if self.enabled and self.file:
            self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    def capture_warnings(self) -> None:
        """Python warnings go to run.log only, until close().

        What reaches the console of a run is llmforge's; the libraries' warnings (torch's
        deprecations, notices about a single-process checkpoint) are nothing a user can act
        on, but stay on record. A Log without a file (ranks > 0) leaves them on stderr.
        """
        if self.file and self._showwarning is None:
            self._showwarning = warnings.showwarning
            warnings.showwarning = self._warning

    def _warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        self.detail(warnings.formatwarning(message, category, filename, lineno, line).rstrip())

    def close(self) -> None:
        if self._showwarning is not None:
            warnings.showwarning, self._showwarning = self._showwarning, None
        if self.file:
            self.file.close()
            self.file = None


class Metrics:
    """Writes metric rows to metrics.jsonl, TensorBoard and the registered callbacks."""

    def __init__(self, path: Path, tb_dir: Path | None, *, enabled: bool, callbacks: list[Any] = ()):
        self.enabled = enabled
        self.path = path
        self.tb_dir = tb_dir
        self.callbacks = list(callbacks)
        self.purge_step: int | None = None  # set on resume: TensorBoard drops events from here on
        self.tb = None
        self._file = None

    def _open(self) -> None:
        # Opened on first use, after a resume has truncated the file it appends to.
        self._file = open(self.path, "a", buffering=1)
        if self.tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.tb_dir), purge_step=self.purge_step)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._open()
        self._file.write(json.dumps(row) + "\n")
        if self.tb is not None:
            stage, step = row["stage"], row["step"]
            for key, value in row.items():
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                if key in TB_TAGS:
                    self.tb.add_scalar(f"{stage}/{TB_TAGS[key]}", value, step)
                elif key.startswith("moe/"):  # an MoE model's router losses and expert load (models.moe)
                    self.tb.add_scalar(f"{stage}/{key}", value, step)
                elif row.get("kind") != "train" and key not in ("step", "tokens"):
                    # eval rows, and a stage's own kinds (the RL stage's `rollout` rows)
                    self.tb.add_scalar(f"{stage}/{row['kind']}/{key}", value, step)
        for cb in self.callbacks:
            cb.on_log(row)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled and self._file is None:
            self._open()
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self.tb is not None:
            self.tb.close()
