"""One figure per selfplay stage: every reward component, the environment's own signals (solve
rate, difficulty of proposed problems), the KL to the reference and the loss, against the step."""

from __future__ import annotations

import math
from pathlib import Path

from selftrain.workspace import atomic_write_figure

PANELS = [
    ("rewards", lambda k: k.startswith("rewards/") and k.endswith("/mean") or k == "reward"),
    ("environment", lambda k: k.startswith("env/") and not k.endswith("_total")),
    ("KL / DPO margin", lambda k: k in ("kl", "rewards/margins", "rewards/accuracies")),
    ("loss", lambda k: k == "loss"),
]


def plot_steps(records: list[dict], path: Path, title: str) -> Path | None:
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float))})
    panels = [(name, [k for k in keys if pick(k)]) for name, pick in PANELS]
    panels = [(name, ks) for name, ks in panels if ks]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), sharex=True, squeeze=False)
    steps = [r["step"] for r in records]
    for ax, (name, ks) in zip(axes[:, 0], panels):
        for k in ks:
            ys = [r.get(k, math.nan) for r in records]
            ys = [math.nan if y is None else y for y in ys]
            ax.plot(steps, ys, label=k.replace("rewards/", "").replace("/mean", ""), lw=1.2)
        ax.set_ylabel(name)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    return atomic_write_figure(fig, path, dpi=110)
