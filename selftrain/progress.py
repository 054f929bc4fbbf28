"""Live progress: one line per stage (step, ETA, the latest loss or reward), whatever trains inside
it, and ``progress.json`` in the run directory for ``selftrain inspect RUN --follow``.

The runner hands each stage a ``StageLog`` as its ``log``: log records go on to metrics.jsonl; the
trainers' ``phase: "progress"`` records (``training.callbacks.ProgressReporter``) only move the
line and the file, and count the stage's optimizer steps (a record with ``start`` begins another
trainer: its steps add to those before), which the run's step budgets read."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from selftrain.workspace import atomic_write_json

PROGRESS_FILE = "progress.json"


class StageLog:
    live = True  # the trainers leave the console to this line (training.callbacks.quiet_if_live)

    def __init__(self, log, key: str, console: Console | None = None, progress_path: Path | None = None):
        self.log, self.key, self.path = log, key, progress_path
        self.done, self.last = 0, 0  # steps of finished trainers, and the current one's
        self.trainer_start: tuple[float, int] | None = None  # (time, step) the current trainer was first seen
        self.metrics: dict[str, float] = {}
        self._written = 0.0
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                            TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[metric]}"),
                            console=console, transient=False) if console is not None else None
        self.task = None

    @property
    def total(self) -> int:
        return self.done + self.last

    def __call__(self, record: dict) -> None:
        if record.get("phase") != "progress":
            self.log(record)
            return
        if record.get("start"):  # another trainer of the stage (a resumed one starts at its checkpoint's step)
            self.done += self.last
            self.trainer_start = None
        self.last = record["step"]
        self._progress(record)

    def _progress(self, record: dict) -> None:
        step, total = record["step"], record.get("max_steps") or record["step"]
        now = time.monotonic()
        if self.trainer_start is None:
            self.trainer_start = (now, step)
        t0, s0 = self.trainer_start
        eta = (now - t0) / (step - s0) * (total - step) if step > s0 else None
        self.metrics = {k: record[k] for k in ("loss", "reward") if isinstance(record.get(k), (int, float))}
        shown = "  ".join(f"{k} {v:.4g}" for k, v in self.metrics.items())
        if self.bar is not None:
            if self.task is None:
                self.bar.start()
                self.task = self.bar.add_task(self.key, total=total, metric=shown)
            self.bar.update(self.task, completed=step, total=total, metric=shown)
        if self.path is not None and (now - self._written >= 1.0 or step >= total):
            self._written = now
            atomic_write_json(self.path, {"stage": self.key, "step": step, "max_steps": total,
                                          "eta_seconds": None if eta is None else round(eta, 1),
                                          "metrics": self.metrics, "time": round(time.time(), 1)})

    def close(self) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.stop()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def read_progress(run_dir: Path) -> dict | None:
    """The running stage's last progress record, or None (between stages, or none written)."""
    try:
        return json.loads((Path(run_dir) / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None


def progress_line(record: dict | None) -> str:
    if not record:
        return ""
    eta = record.get("eta_seconds")
    eta_text = "-" if eta is None else f"{int(eta) // 60}:{int(eta) % 60:02d}"
    metrics = "  ".join(f"{k} {v:.4g}" for k, v in (record.get("metrics") or {}).items())
    age = time.time() - record.get("time", time.time())
    return (f"{record['stage']}: step {record['step']}/{record['max_steps']}, ETA {eta_text}  {metrics}"
            + (f"  (updated {age:.0f} s ago)" if age > 30 else ""))
