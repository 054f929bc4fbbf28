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
      .ranks/<rank>/       multi-process runs: the other ranks' stage outputs (scratch, removed at the end)
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    model_validator,
)

from selftrain import distributed, faults
from selftrain.errors import SelftrainError

MANIFEST_VERSION = 2
# Names our atomic writes use while in flight (.x.tmp-PID, .model.tmp, .final.old): a crash can
# leave them behind; they are never the truth, so the next run under the lock removes them.
TEMP_NAME = re.compile(r"\..+\.(tmp(-\d+)?|old)")
# Metric dicts in the manifest: non-finite numbers are stored as strings and read back as floats.
METRIC_KEYS = ("baseline_metrics", "accepted_metrics", "final_metrics", "metrics_before", "metrics_after")
NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        faults.point(f"write:{path.name}")
    except BaseException:  # a failed write (a full disk) leaves the old file and no temp file
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_write_figure(fig, path: Path, dpi: float | None = None) -> Path:
    """A matplotlib figure as a PNG, rendered in memory and written atomically (a kill never
    leaves half an image); the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **({"dpi": dpi} if dpi else {}))
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """inf / nan as the strings "inf", "-inf", "nan": bare Infinity / NaN tokens are not JSON, and
    tools other than Python's json module refuse them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def from_json_metrics(metrics: dict) -> dict:
    """The inverse of json_safe for one flat dict of metrics."""
    return {k: NON_FINITE[v] if isinstance(v, str) and v in NON_FINITE else v for k, v in metrics.items()}


def dumps(obj: Any, **kw) -> str:
    return json.dumps(json_safe(obj), allow_nan=False, default=_default, **kw)


def _default(obj: Any) -> Any:
    try:
        return json_safe(float(obj))  # numpy / torch scalars
    except (TypeError, ValueError):
        return str(obj)  # paths and the like


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, dumps(obj, indent=2, sort_keys=False) + "\n")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place; the old one (if any) goes only after."""
    final = Path(final)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    faults.point(f"save:{final.name}")
    if final.exists():
        os.replace(final, old)
        faults.point(f"swap:{final.name}")  # the nastiest moment: the old copy aside, the new not in place
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

    @property
    def scratch_dir(self) -> Path:
        """Where a rank other than 0 keeps its own stage outputs (only rank 0 writes the run)."""
        return self.root / ".ranks" / str(distributed.rank())

    def stage_dir(self, key: str) -> Path:
        return (self.root if distributed.is_main() else self.scratch_dir) / "stages" / key

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
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SelftrainError(f"cannot read {self.manifest_path}: {e}") from None
        check_manifest(manifest, self.manifest_path)
        for e in (manifest, *manifest["stages"]):
            for k in METRIC_KEYS:
                if isinstance(e.get(k), dict):
                    e[k] = from_json_metrics(e[k])
        return manifest

    def save_manifest(self, manifest: dict) -> None:
        if not distributed.is_main():  # the other ranks keep the same manifest in memory
            return
        manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_json(self.manifest_path, manifest)

    def log_metrics(self, record: dict) -> None:
        """Append one whole line with a single write on an O_APPEND descriptor, so a kill can cut
        only the last line. If the file ends in a cut line, start on a new line: the torn one stays
        alone (the reader skips it) instead of swallowing this record. Rank 0 alone logs."""
        if not distributed.is_main():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        line = dumps({"time": round(time.time(), 3), **record}) + "\n"
        fd = os.open(self.metrics_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = "\n" + line
            faults.point("append:metrics.jsonl")
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_metrics(self) -> list[dict]:
        """Every whole record; torn lines (a kill mid-write) are skipped."""
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_bytes().decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append(from_json_metrics(record))
        return out

    def drop_metrics(self, stages: set[str]) -> None:
        """Remove the records of these stages (a retried or redone stage logs afresh, not twice)."""
        if not distributed.is_main():
            return
        records = self.read_metrics()
        kept = [r for r in records if r.get("stage") not in stages]
        if len(kept) != len(records):
            atomic_write_text(self.metrics_path, "".join(dumps(r) + "\n" for r in kept))

    def clean_temp(self) -> None:
        """Remove what a crash left mid-write (call with the lock held: then nothing is in flight).
        A directory interrupted between replace_dir's two renames is put back first."""
        places = [self.root, self.data_dir, self.root / "checkpoints", *self.root.glob("stages/*")]
        found = [p for place in places if place.is_dir() for p in place.glob(".*")]  # where our writes go
        for path in sorted(found, key=lambda p: len(p.parts)):
            if not TEMP_NAME.fullmatch(path.name) or not os.path.lexists(path):
                continue
            if path.name.endswith(".old"):
                recover_dir(path.with_name(path.name[1:-len(".old")]))
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                path.unlink()

    # ------------------------------------------------------------------ locking
    def lock(self) -> None:
        """One process per run directory. flock is released by the kernel if we are killed."""
        self.root.mkdir(parents=True, exist_ok=True)
        f = open(self.root / ".lock", "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(f.fileno()).st_ino != os.stat(self.root / ".lock").st_ino:
                raise BlockingIOError  # the file was removed (by a run that just ended) while we waited
        except (BlockingIOError, FileNotFoundError):
            f.close()
            raise SelftrainError(f"another selftrain process is running in {self.root} "
                                 "(setting it up or training); wait for it, or stop it first") from None
        self._lock_file = f

    def in_use(self) -> bool:
        """Whether a selftrain process holds this run's lock now (asked without taking it for long)."""
        try:
            f = open(self.root / ".lock")
        except FileNotFoundError:
            return False
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    @contextmanager
    def locked(self):
        """Hold the lock for the block, released on every path. A directory this call made is
        removed again if the block left nothing in it but the lock (bad input writes nothing)."""
        created = not self.root.exists()
        self.lock()
        try:
            yield self
        finally:
            if created and [p.name for p in self.root.iterdir()] == [".lock"]:
                (self.root / ".lock").unlink()  # while still held: no one can lock the file we remove
                self.root.rmdir()
            self.unlock()

    def unlock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None


# ---------------------------------------------------------------------------- what a manifest holds
# Checked on every load, so that a manifest edited by hand (or by a tool) is refused with one message
# naming the field, instead of failing later wherever that field is read. Strict: "3" is not 3.
Number = StrictFloat | StrictInt | StrictBool | Literal["inf", "-inf", "nan"] | None


def _numbers(metrics: dict) -> dict:
    """Metric values are numbers (non-finite ones as "inf", "-inf", "nan"); a diverged model's
    evaluation also says why, in words (``diverged_reason``)."""
    for k, v in metrics.items():
        if isinstance(v, str) and v not in NON_FINITE and not k.startswith("diverged"):
            raise ValueError(f"metric {k!r} is {v!r}, not a number")
    return metrics


Metrics = Annotated[dict[str, Number | str], AfterValidator(_numbers)]
Count = Annotated[StrictInt, Field(ge=1)]


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _Check(_Part):
    name: str
    ok: bool
    detail: str = ""


class _Annotations(_Part):
    path: str
    rows: dict[str, StrictInt] = {}


class _Stop(_Part):
    reason: str
    after: str | None = None
    rounds: StrictInt = 0
    minutes: StrictFloat | StrictInt = 0
    steps: StrictInt = 0


class _Entry(_Part):
    # A field that may be absent is typed without None unless the runner writes None: a default is
    # not validated, so absent passes and a hand-written null is refused.
    key: str
    status: Literal["running", "accepted", "rolled_back", "failed", "skipped", "interrupted", "error"]
    round: Count
    index: Count
    name: str
    attempts: Annotated[StrictInt, Field(ge=0)]
    fingerprint: str = ""
    decision: str = ""
    reason: str = ""
    start_checkpoint: str
    checkpoint: str | None = None
    metrics_before: Metrics
    metrics_after: Metrics = {}
    stage_metrics: dict[str, Any] = {}
    checks: list[_Check] = []
    artefacts: dict[str, str] = {}
    auxiliary: dict[str, str] = {}
    annotations: _Annotations | None = None  # written only when a stage annotated
    seconds: StrictFloat | StrictInt = 0
    eval_seconds: StrictFloat | StrictInt = 0
    steps: StrictInt = 0
    pool_added: StrictInt = 0
    pool_dropped_by_cap: StrictInt = 0
    scrubbed: dict[str, StrictInt] = {}

    @model_validator(mode="after")
    def _decided(self):
        if self.status in ("accepted", "rolled_back", "failed") and not (self.metrics_after and self.reason):
            raise ValueError(f"a stage {self.status} has metrics_after and a reason")
        return self


class _Manifest(_Part):
    run_name: str
    status: str
    model_kind: Literal["causal", "masked"]
    current_checkpoint: str
    initial_checkpoint: str = ""
    pool: str
    baseline_metrics: Metrics
    accepted_metrics: Metrics
    final_metrics: Metrics = {}
    data: dict[str, Any]
    stages: list[_Entry]
    run_fingerprints: dict[str, str] = {}
    checksums: dict[str, dict[str, str]] = {}
    stop: _Stop | None = None  # read with .get(): null means none
    initial_samples: list[str] = []
    sample_prompts: list[str] = []
    eval_documents: Count = 1


def check_manifest(manifest: Any, path: Path) -> None:
    """A manifest that is not what selftrain writes is refused with one message, not a KeyError."""
    if not isinstance(manifest, dict):
        raise SelftrainError(f"{path} is not a selftrain manifest (not a JSON object)")
    try:
        _Manifest.model_validate(manifest)
        _check_consistent(manifest)
    except SelftrainError as e:
        raise SelftrainError(f"{path} is not consistent: {e}") from None
    except ValidationError as e:
        where = list(dict.fromkeys(_location(err["loc"]) for err in e.errors()))  # in the manifest's order
        shown = ", ".join(where[:10]) + (f" and {len(where) - 10} more" if len(where) > 10 else "")
        raise SelftrainError(f"{path} is not a complete selftrain manifest: {shown} missing or malformed "
                             f"({e.errors()[0]['msg']}). Was it edited? Restore it from a backup") from None


def _location(loc: tuple) -> str:
    """("stages", 0, "status") -> "stages[0].status"; pydantic's own validator names are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" not in str(part) and "-" not in str(part):
            out += f".{part}" if out else str(part)
    return out or "(top)"


def _check_consistent(manifest: dict) -> None:
    """The pointers agree with the stages: the current model and pool are the start or an accepted
    stage's, and stage keys are unique. (A run resumed from anything else could delete what it names.)"""
    accepted = [e for e in manifest["stages"] if e["status"] == "accepted"]
    models = {manifest.get("initial_checkpoint"), *(e.get("checkpoint") for e in accepted)} - {None}
    pools = {"data/pool", *(f"data/pool-{e['key']}" for e in accepted)}
    keys = [e["key"] for e in manifest["stages"]]
    paths = [manifest["current_checkpoint"], manifest["pool"], manifest.get("initial_checkpoint") or "checkpoints",
             *manifest.get("checksums", {}),
             *(p for e in manifest["stages"] for p in (e.get("checkpoint"), e.get("start_checkpoint"),
                                                       *(e.get("artefacts") or {}).values(),
                                                       *(e.get("auxiliary") or {}).values(),
                                                       (e.get("annotations") or {}).get("path")) if p is not None)]
    outside = [p for p in paths if not p or p.startswith(("/", "~")) or ".." in Path(p).parts]
    problem = (f"path {outside[0]!r} leads out of the run directory" if outside else"current_checkpoint is not the initial checkpoint nor one an accepted stage wrote"
               if manifest["current_checkpoint"] not in models and "initial_checkpoint" in manifest else
               "pool is not the initial pool nor one an accepted stage wrote"
               if manifest["pool"] not in pools and not manifest["pool"].startswith("data/pool-restart-") else
               "a stage key appears twice" if len(set(keys)) != len(keys) else None)
    if problem:
        raise SelftrainError(f"{problem}. Was it edited? Restore it from a backup")
