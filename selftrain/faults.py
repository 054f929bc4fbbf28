"""Named fault points for the reliability tests (tests/fault_harness.py).

Each ``point(name)`` marks a place where a real run can be cut short: a training step, an
evaluation batch, a generation batch, a file written but not yet renamed into place, a directory
between the two renames that swap it in. With ``SELFTRAIN_FAULT`` unset (every normal run) a
point costs one dictionary lookup and does nothing. Set, it does one of:

    SELFTRAIN_FAULT=census        append "<stage>\\t<point>" per hit to $SELFTRAIN_FAULT_LOG
    SELFTRAIN_FAULT=kill@S/P#N    SIGKILL this process at the N-th hit of point P inside stage S
    SELFTRAIN_FAULT=enospc@S/P#N  raise "No space left on device" there (a full disk, simulated)

S is a stage key (``r1-02-cluster``) or ``setup``, ``resume``, ``finish``. SIGKILL is what an
out-of-memory killer or ``kill -9`` sends: no handler runs, so it tests the files, not the code.
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter

_stage = "setup"
_hits: Counter = Counter()


def in_stage(key: str) -> None:
    """Name the part of the run the following points belong to. A fault aimed at the part now left
    that never fired (a resumed stage passes its points fewer times) fires here, at its end."""
    global _stage
    action, where, nth = _parse()
    if key != _stage and where.partition("/")[0] == _stage and _hits[where] < nth:
        _hits[where] = nth
        _fire(action, f"{_stage}/(end)")
    _stage = key


def _parse() -> tuple[str, str, int]:
    spec = os.environ.get("SELFTRAIN_FAULT") or ""
    action, _, target = spec.partition("@")
    where, _, nth = target.rpartition("#")
    return action, where, int(nth) if nth.isdigit() else 0


def _fire(action: str, where: str) -> None:
    os.write(2, f"selftrain fault: {action} at {where}\n".encode())
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), where)
    else:
        raise ValueError(f"SELFTRAIN_FAULT: the action is kill or enospc, not {action!r}")


def point(name: str) -> None:
    spec = os.environ.get("SELFTRAIN_FAULT")
    if not spec:
        return
    if spec == "census":
        with open(os.environ["SELFTRAIN_FAULT_LOG"], "a", encoding="utf-8") as f:
            f.write(f"{_stage}\t{name}\n")
        return
    action, where, nth = _parse()
    if where != f"{_stage}/{name}":
        return
    _hits[where] += 1
    if _hits[where] == nth:
        _fire(action, where)
