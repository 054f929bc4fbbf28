"""Benchmark: executions per second of the sandbox against a plain `python -c` subprocess.

    python bench/sandbox.py [--runs 40]

Both run the same short program (the kind the `python` task family runs for every proposal) in
the same interpreter, alternating so that machine noise hits both alike. The plain baseline is
`python -I -S -c CODE` (no site, as the sandbox's interpreter starts; with site the plain run is
several times slower here, which would flatter the sandbox). The sandbox is started once (as in a
run) and forks a fresh, fully isolated child per program. Also timed: the `python` family parsing
a proposal (one sandboxed run each). Target: the sandbox at >= 0.5x plain's rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

from selftrain.sandbox import SandboxLimits, _interpreter, isolation_available, run_python

PROGRAM = "def f(x):\n    return sum(range(x)) + 3\nprint(f(7))"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=40, help="executions of each kind")
    args = ap.parse_args()
    level = isolation_available()
    exe = _interpreter()[0]
    limits = SandboxLimits(cpu_seconds=1, wall_seconds=3, memory_mb=256)
    plain_cmd = [exe, "-I", "-S", "-c", PROGRAM]
    assert subprocess.run(plain_cmd, capture_output=True, text=True).stdout == "24\n"
    assert run_python(PROGRAM, limits=limits, min_isolation="none").stdout == "24\n"  # warm (probe cached)

    plain_s = sandbox_s = 0.0
    for _ in range(args.runs):  # interleaved: a noisy neighbour slows both, not one
        t = time.perf_counter()
        subprocess.run(plain_cmd, capture_output=True, check=True)
        plain_s += time.perf_counter() - t
        t = time.perf_counter()
        r = run_python(PROGRAM, limits=limits, min_isolation="none")
        sandbox_s += time.perf_counter() - t
        assert r.ok, r.stderr

    from selftrain.tasks.families import make_family

    family = make_family("python")
    t = time.perf_counter()
    parsed = [family.parse(f"```python\n{PROGRAM.replace('3', str(i))}\n```") for i in range(10)]
    family_ms = (time.perf_counter() - t) / 10 * 1000
    assert all(p is not None for p in parsed)

    value, baseline = args.runs / sandbox_s, args.runs / plain_s
    print(f"isolation: {level}; machine: {platform.machine()}, {os.cpu_count()} cores")
    print(f"sandbox: {value:.1f} executions/s ({1000 / value:.0f} ms each); "
          f"plain python -I -S -c: {baseline:.1f}/s ({1000 / baseline:.0f} ms each)")
    print(f"python family parse (one sandboxed run): {family_ms:.0f} ms per proposal")
    ratio = value / baseline
    print(json.dumps({"bench": "sandbox", "metric": f"executions_per_s ({level} isolation)", "value": round(value, 2),
                      "baseline": round(baseline, 2), "ratio": round(ratio, 3), "target": 0.5,
                      "met": ratio >= 0.5}))


if __name__ == "__main__":
    main()
