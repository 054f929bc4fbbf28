"""The run directory. Every write is atomic (temp file + rename), so a kill at any moment
leaves either the old or the new version of a file, never half of one.

    runs/<name>/
      config.yaml          the resolved config (snapshot)
      manifest.json        every stage execution: status, checkpoints, metrics, decision, reason
      metrics.jsonl        one JSON line per evaluation / training log
      data/pool, data/heldout   Arrow datasets (the heldout split never changes)
      checkpoints/initial  the starting model (+ tokenizer)
      stages/<key>/        a stage's own directory: trainer checkpoints, its model, plots
      final/               the last accepted model, loadable with transformers
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from selftrain.errors import SelftrainError

MANIFEST_VERSION = 1


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place; the old one (if any) goes only after."""
    final = Path(final)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def recover_dir(final: Path) -> None:
    """Undo a replace_dir interrupted between its two renames."""
    old = final.with_name(f".{final.name}.old")
    if old.exists() and not final.exists():
        os.replace(old, final)


class Workspace:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self._lock_file = None

    # ------------------------------------------------------------------ paths
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def final_dir(self) -> Path:
        return self.root / "final"

    def stage_dir(self, key: str) -> Path:
        return self.root / "stages" / key

    def rel(self, path: Path | str | None) -> str | None:
        """Paths in the manifest are relative to the run directory, so a run can be moved."""
        return None if path is None else os.path.relpath(Path(path), self.root)

    def abs(self, rel: str | None) -> Path | None:
        if rel is None:
            return None
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root.resolve()):  # never follow a path out of the run
            raise SelftrainError(f"path {rel!r} in the manifest escapes the run directory")
        return path

    # ------------------------------------------------------------------ state
    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def load_manifest(self) -> dict:
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise SelftrainError(f"cannot read {self.manifest_path}: {e}") from None

    def save_manifest(self, manifest: dict) -> None:
        manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_json(self.manifest_path, manifest)

    def log_metrics(self, record: dict) -> None:
        """Append one line; a line cut by a kill is skipped by the reader."""
        self.root.mkdir(parents=True, exist_ok=True)
        record = {"time": round(time.time(), 3), **record}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    # ------------------------------------------------------------------ locking
    def lock(self) -> None:
        """One process per run directory. flock is released by the kernel if we are killed."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.root / ".lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SelftrainError(f"another selftrain process is running in {self.root}") from None

    def unlock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None
