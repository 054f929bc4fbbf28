"""The run-level figures of the report, from the manifest and metrics.jsonl: held-out metrics across
stages and rounds, training loss, rewards, and the pool by origin. Stages draw their own (cluster
map, curriculum competence, the discriminator game) and embed them in their report sections."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from selftrain.workspace import Workspace, atomic_write_figure

COLOURS = {"accepted": "tab:green", "rolled_back": "tab:red", "failed": "black", "skipped": "lightgrey"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(value) -> float:
    return min(float(value), 1e12) if isinstance(value, (int, float)) and not math.isnan(value) else math.nan


def heldout_metric(ws: Workspace, manifest: dict, metric: str, path: Path) -> Path | None:
    """``metric`` after each stage (red: rolled back) and the accepted model's across the run (line)."""
    stages = [e for e in manifest["stages"] if e.get("metrics_after")]
    start = manifest.get("baseline_metrics", {}).get(metric)
    if start is None:
        return None
    plt = _pyplot()
    labels = ["start"] + [e["key"] for e in stages]
    values = [_finite(start)] + [_finite(e["metrics_after"].get(metric)) for e in stages]
    accepted, current = [], _finite(start)
    for e in stages:
        if e.get("decision") == "accepted":
            current = _finite(e["metrics_after"].get(metric, current))
        accepted.append(current)
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(labels)), 3.4))
    xs = range(len(labels))
    ax.plot(xs, [values[0], *accepted], color="tab:blue", lw=1.5, label="accepted model", zorder=1)
    ax.scatter(xs, values, c=["grey"] + [COLOURS.get(e.get("decision"), "grey") for e in stages], zorder=2,
               label="after each stage")
    rounds = [e.get("round", 1) for e in stages]
    for i in range(1, len(rounds)):
        if rounds[i] != rounds[i - 1]:
            ax.axvline(i + 0.5, color="grey", ls=":", lw=1)
    if all(v > 0 for v in values if not math.isnan(v)) and metric.endswith("ppl"):
        ax.set_yscale("log")
    ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} after each stage (green accepted, red rolled back; dotted: a new round)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return atomic_write_figure(fig, path, dpi=110)


def curves(log: list[dict], key: str, ylabel: str, path: Path, phases: tuple[str, ...] | None = None) -> Path | None:
    """One line per stage of ``key`` against the optimizer step, from the run's log records."""
    records = [m for m in log if isinstance(m.get(key), (int, float)) and "step" in m
               and (phases is None or m.get("phase") in phases)]
    if not records:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for stage in dict.fromkeys(m["stage"] for m in records):
        pts = [(m["step"], m[key]) for m in records if m["stage"] == stage]
        ax.plot(*zip(*pts), label=stage, marker=".", lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return atomic_write_figure(fig, path, dpi=110)


def pool_by_origin(ws: Workspace, manifest: dict, path: Path) -> tuple[Path | None, list[tuple[str, dict]]]:
    """The pool's rows by origin after set-up and after each stage that added rows (stacked bars),
    read from the pool's own ``stage`` and ``origin`` columns; and the table behind it."""
    from selftrain.data.pool import Pool

    pool_dir = ws.abs(manifest.get("pool", "data/pool"))
    if not pool_dir.exists():
        return None, []
    arrow = Pool.load(pool_dir).ds.with_format("arrow")
    pairs = Counter(zip(arrow["stage"].to_pylist(), arrow["origin"].to_pylist()))
    origins = sorted({o for _, o in pairs}, key=lambda o: (o != "real", o))
    steps: list[tuple[str, dict]] = []
    running: Counter = Counter()
    for stage in ["data"] + [e["key"] for e in manifest["stages"]]:
        added = {o: n for (s, o), n in pairs.items() if s == stage}
        if not added and stage != "data":
            continue
        running.update(added)
        steps.append(("start" if stage == "data" else stage, dict(running)))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(steps)), 3.4))
    bottom = [0] * len(steps)
    for origin in origins:
        heights = [counts.get(origin, 0) for _, counts in steps]
        ax.bar(range(len(steps)), heights, bottom=bottom, label=origin)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(range(len(steps)), [s for s, _ in steps], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("rows in the pool")
    ax.legend(fontsize=7)
    ax.set_title("the pool by origin (real rows are never dropped)", fontsize=9)
    fig.tight_layout()
    return atomic_write_figure(fig, path, dpi=110), steps
