"""Checksums of what the manifest points to, recorded when it is written and verified before it is read.

Atomic renames already mean a kill never leaves half a file where the manifest looks. The
checksums catch the rest: a file changed or truncated behind the run's back (a disk error, a
copy that stopped early, a hand edit). ``manifest["checksums"]`` maps each recorded path (a
checkpoint, a pool version, an annotation layer, an artefact) to the sha256 of every file in it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from selftrain.errors import SelftrainError


def digest(path: Path) -> dict[str, str]:
    """sha256 of each file under ``path`` (or of ``path`` itself, named ``.``), by relative name."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    out = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                h.update(chunk)
        out["." if f == path else f.relative_to(path).as_posix()] = h.hexdigest()
    return out


def inside(root: Path, rel: str) -> Path:
    """``root / rel``, refused if it leads out of ``root`` (a manifest edited by hand names it)."""
    path = (Path(root) / rel).resolve()
    if not path.is_relative_to(Path(root).resolve()) or path == Path(root).resolve():
        raise SelftrainError(f"path {rel!r} in the manifest is not inside the run directory {root}")
    return path


def record(manifest: dict, root: Path, rel: str) -> None:
    """Remember the checksums of ``root / rel`` (call it before the manifest that names ``rel`` is saved)."""
    manifest.setdefault("checksums", {})[rel] = digest(inside(root, rel))


def forget(manifest: dict, *, under: str) -> None:
    """Drop the checksums of ``under`` and everything below it (a removed pool version, a stage redone)."""
    sums = manifest.get("checksums", {})
    for rel in [r for r in sums if r == under or r.startswith(under.rstrip("/") + "/")]:
        del sums[rel]


def verify(manifest: dict, root: Path, rel: str, what: str) -> None:
    """Raise unless ``root / rel`` is exactly what was recorded. Paths recorded by a selftrain that
    kept no checksums (older runs) are let through."""
    expected = manifest.get("checksums", {}).get(rel)
    if expected is None:
        return
    path = inside(root, rel)
    # a stage's output can be redone; the pools and held-out data are the run's own, made at set-up
    way_out = "Restore it from a backup" + ("" if rel.startswith("data/") else
                                             ", or redo the stage that wrote it with --restart-from")
    if not path.exists():
        raise SelftrainError(f"{what} {path} is missing; the run recorded it. {way_out}")
    actual = digest(path)
    changed = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
    if changed:
        names = "its contents differ" if changed == ["."] else (
            ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "") + " differ")
        raise SelftrainError(f"{what} {path} is damaged: {names} from the checksums recorded when it was "
                             f"written, so it is not loaded. {way_out}")
