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
        with open(f, "rb") as handle:
            out["." if f == path else f.relative_to(path).as_posix()] = hashlib.file_digest(handle, "sha256").hexdigest()
    return out


def record(manifest: dict, root: Path, rel: str) -> None:
    """Remember the checksums of ``root / rel`` (call it before the manifest that names ``rel`` is saved)."""
    manifest.setdefault("checksums", {})[rel] = digest(Path(root) / rel)


def forget(manifest: dict, rel: str) -> None:
    manifest.get("checksums", {}).pop(rel, None)


def verify(manifest: dict, root: Path, rel: str, what: str) -> None:
    """Raise unless ``root / rel`` is exactly what was recorded. Paths recorded by a selftrain that
    kept no checksums (older runs) are let through."""
    expected = manifest.get("checksums", {}).get(rel)
    if expected is None:
        return
    path = Path(root) / rel
    if not path.exists():
        raise SelftrainError(f"{what} {path} is missing; the run recorded it. Restore it from a backup, or "
                             "redo the stage that wrote it with --restart-from")
    actual = digest(path)
    changed = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
    if changed:
        names = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise SelftrainError(f"{what} {path} is damaged: {names} differ(s) from the checksums recorded when it "
                             "was written, so it is not loaded. Restore it from a backup, or redo the stage "
                             "that wrote it with --restart-from")
