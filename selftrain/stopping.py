"""When the rounds end: a round that accepts no stage, a plateau of the guard metric, a budget.

Every decision is a function of the manifest (each stage's round, status, metrics, seconds and
steps) and the config, so a resumed run reaches the same one, and a run resumed with a larger
budget or more rounds goes on. ``rounds: auto`` turns the plateau and nothing-accepted stops on
by default; a fixed ``rounds: N`` runs N unless the ``stop`` section asks otherwise. Budgets are
checked between stages: a stage that has started runs to its end.
"""

from __future__ import annotations

from selftrain.config import RunConfig
from selftrain.guard import lower_is_better


def spent(entries: list[dict]) -> tuple[float, int]:
    """(minutes, optimizer steps) these stage executions took, evaluation included."""
    seconds = sum((e.get("seconds") or 0) + (e.get("eval_seconds") or 0) for e in entries)
    return seconds / 60, sum(e.get("steps") or 0 for e in entries)


def budget_left(cfg: RunConfig, manifest: dict, rnd: int) -> tuple[str, str] | None:
    """Before a stage of round ``rnd`` starts: ("run", why) when the run's budget is spent (the rounds
    end), ("round", why) when this round's is (its later stages are skipped), else None."""
    stop, stages = cfg.stop, manifest.get("stages", [])
    minutes, steps = spent(stages)
    if stop.max_minutes is not None and minutes >= stop.max_minutes:
        return "run", f"budget: {minutes:.1f} of stop.max_minutes={stop.max_minutes:g} spent"
    if stop.max_steps is not None and steps >= stop.max_steps:
        return "run", f"budget: {steps} of stop.max_steps={stop.max_steps} optimizer steps spent"
    minutes, steps = spent([e for e in stages if e.get("round") == rnd])
    if stop.round_max_minutes is not None and minutes >= stop.round_max_minutes:
        return "round", f"round budget: {minutes:.1f} of stop.round_max_minutes={stop.round_max_minutes:g} spent"
    if stop.round_max_steps is not None and steps >= stop.round_max_steps:
        return "round", f"round budget: {steps} of stop.round_max_steps={stop.round_max_steps} steps spent"
    return None


def metric_after_round(cfg: RunConfig, manifest: dict, rnd: int) -> float | None:
    """The guard metric of the model accepted when round ``rnd`` ended (0: the start)."""
    value = manifest["baseline_metrics"].get(cfg.guard.metric)
    for e in manifest.get("stages", []):
        if e.get("round", 0) <= rnd and e.get("status") == "accepted":
            value = (e.get("metrics_after") or {}).get(cfg.guard.metric, value)
    return value if isinstance(value, (int, float)) else None


def round_gain(cfg: RunConfig, manifest: dict, rnd: int) -> float | None:
    """Relative improvement of the guard metric over round ``rnd`` (positive: better)."""
    before, after = metric_after_round(cfg, manifest, rnd - 1), metric_after_round(cfg, manifest, rnd)
    if before is None or after is None or before == 0:
        return None
    change = (after - before) / abs(before)
    return -change if lower_is_better(cfg.guard, cfg.guard.metric) else change


def after_round(cfg: RunConfig, manifest: dict, rnd: int, last_round: int) -> str | None:
    """Why the rounds end after round ``rnd``, or None to go on."""
    stop, auto = cfg.stop, cfg.rounds == "auto"
    entries = [e for e in manifest.get("stages", []) if e.get("round") == rnd]
    nothing = stop.when_nothing_accepted if stop.when_nothing_accepted is not None else auto
    if nothing and not any(e.get("status") == "accepted" for e in entries):
        return f"round {rnd} accepted no stage"
    patience = stop.patience if stop.patience is not None else (1 if auto else None)
    if patience is not None and rnd >= patience:
        gains = [round_gain(cfg, manifest, r) for r in range(rnd - patience + 1, rnd + 1)]
        if all(g is not None and g < stop.min_delta for g in gains):
            shown = ", ".join(f"{g:+.2%}" for g in gains)
            return (f"plateau: {cfg.guard.metric} gained {shown} in the last {patience} round(s), less than "
                    f"stop.min_delta={stop.min_delta:.2%}")
    if rnd >= last_round:
        return (f"rounds: auto reached stop.max_rounds={last_round}" if auto
                else f"the {last_round} round(s) configured ran")
    return None
