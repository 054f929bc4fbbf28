"""The guard: after every stage, accept it or roll it back, on named checks.

A stage is judged on what it set out to improve *and* on what it must not harm:

- **target**: the metric the stage set out to raise must rise (by more than ``min_target_gain``).
  The config names it per stage (``- selfplay: {target: arith_0shot_acc, ...}``, an evaluation
  metric), or the stage reports its own (``{"target": {"metric", "before", "after", "mode"}}`` in
  its metrics: fewshot's accuracy on its set-aside rows). A stage with no target is judged by
  ``guard.metric``, which must not regress past ``tolerance``.
- **protect**: every protected metric (``guard.metric`` and ``guard.protect``) stays within
  ``tolerance`` of its value before the stage, or within ``forgetting_budget`` when the stage raised
  its target: a stage may trade a little perplexity for a task it lifted.
- **drift**: and within ``drift_budget`` of its best value in the run (the start included):
  per-stage regressions add up, and the budget bounds their sum.
- **collapse detectors**: the stage's own (``stage_metrics["collapse"]``), divergence, a distinct-2
  floor, an entropy floor, a self-BLEU ceiling and a perplexity ceiling.

Every check is recorded by name with its numbers; the decision names each one that failed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from selftrain.config import GuardConfig
from selftrain.evaluation import LOWER_IS_BETTER


@dataclass
class Check:
    name: str  # "target bbc-topics_acc", "protect heldout_ppl", "drift heldout_ppl", "distinct-2 floor", ...
    ok: bool
    detail: str


@dataclass
class Decision:
    accepted: bool
    reason: str
    checks: list[Check]

    def records(self) -> list[dict]:
        return [asdict(c) for c in self.checks]


def lower_is_better(guard: GuardConfig, name: str) -> bool:
    if name == guard.metric and guard.mode != "auto":
        return guard.mode == "min"
    return name in LOWER_IS_BETTER


def _num(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def best_values(guard: GuardConfig, history: list[dict]) -> dict[str, float]:
    """The best value of each protected metric over ``history`` (the start's metrics, then every
    accepted stage's): what the drift budget is measured from."""
    best: dict[str, float] = {}
    for metrics in history:
        for name in guard.protected():
            v = _num(metrics.get(name))
            if v is None or not math.isfinite(v):
                continue
            if name not in best or (v < best[name] if lower_is_better(guard, name) else v > best[name]):
                best[name] = v
    return best


def _limit(value: float, tolerance: float, lower: bool) -> float:
    """The worst value still within ``tolerance`` of ``value`` (relative; at zero, where nothing is
    relative to it, the tolerance counts as an absolute amount)."""
    room = abs(value) * tolerance if value != 0 else tolerance
    return value + room if lower else value - room


def _within(after: float, limit: float, lower: bool) -> bool:
    return after <= limit if lower else after >= limit


def stage_target(guard: GuardConfig, target_metric: str | None, before: dict, after: dict,
                 stage_metrics: dict) -> dict | None:
    """What the stage set out to raise, with its value before and after: the config's ``target``
    first (measured by the runner's evaluation), else the stage's own report."""
    if target_metric is not None:
        return {"metric": target_metric, "before": _num(before.get(target_metric)),
                "after": _num(after.get(target_metric)),
                "mode": "min" if lower_is_better(guard, target_metric) else "max", "source": "config"}
    own = stage_metrics.get("target")
    if isinstance(own, dict) and own.get("metric"):
        return {"metric": own["metric"], "before": _num(own.get("before")), "after": _num(own.get("after")),
                "mode": own.get("mode", "max"), "source": "stage"}
    return None


def judge(guard: GuardConfig, before: dict, after: dict, stage_metrics: dict | None = None, *,
          target_metric: str | None = None, best: dict[str, float] | None = None) -> Decision:
    """Accept or roll back a stage from the evaluation before and after it (and its own metrics).
    ``target_metric``: the stage's ``target`` option; ``best``: each protected metric's best value
    so far in the run (``best_values``)."""
    stage_metrics, best = stage_metrics or {}, best or {}
    checks: list[Check] = []
    if stage_metrics.get("collapse"):
        checks.append(Check("stage collapse detector", False, f"found by the stage: {stage_metrics['collapse']}"))
    if after.get("diverged"):
        checks.append(Check("divergence", False, after.get("diverged_reason", "non-finite metrics")))
        return _decide(checks, None)

    target = stage_target(guard, target_metric, before, after, stage_metrics)
    raised = False
    if target is not None:
        b, a, lower = target["before"], target["after"], target["mode"] == "min"
        if a is None or b is None:
            checks.append(Check(f"target {target['metric']}", False, "not measured before and after the stage"))
        else:
            gain = (b - a) if lower else (a - b)
            raised = gain > guard.min_target_gain
            checks.append(Check(f"target {target['metric']}", raised,
                                f"{b:.4g} -> {a:.4g} ({gain:+.4g}; must rise by more than {guard.min_target_gain:g})"))

    tolerance = guard.forgetting_budget if raised else guard.tolerance
    for name in guard.protected():
        if target is not None and name == target["metric"]:
            continue  # judged as the target
        b, a, lower = _num(before.get(name)), _num(after.get(name)), lower_is_better(guard, name)
        if a is None or b is None:
            checks.append(Check(f"protect {name}", False, "missing from evaluation"))
            continue
        if not math.isfinite(a):
            checks.append(Check(f"protect {name}", False, f"{a} (diverged)"))
            continue
        limit = _limit(b, tolerance, lower)
        what = "forgetting budget" if raised else "tolerance"
        ok = _within(a, limit, lower)
        checks.append(Check(f"protect {name}", ok, f"{b:.4g} -> {a:.4g} ({what} {tolerance:.0%}: limit {limit:.4g})"))
        if guard.drift_budget is not None and name in best:
            limit = _limit(best[name], guard.drift_budget, lower)
            checks.append(Check(f"drift {name}", _within(a, limit, lower),
                                f"{a:.4g} against the run's best {best[name]:.4g} (drift budget "
                                f"{guard.drift_budget:.0%}: limit {limit:.4g})"))

    floors = (("distinct-2 floor", "distinct_2", guard.min_distinct_2, False, ".3f", ""),
              ("entropy floor", "heldout_entropy", guard.min_entropy, False, ".3f", " nats"),
              ("self-BLEU ceiling", "self_bleu", guard.max_self_bleu, True, ".3f", ""),
              ("perplexity ceiling", "heldout_ppl", guard.max_heldout_ppl, True, ".4g", ""))
    for label, name, bound, ceiling, spec, unit in floors:
        value = _num(after.get(name))
        if bound is None or value is None:
            continue
        ok = value <= bound if ceiling else value >= bound
        checks.append(Check(label, ok, f"{name} {value:{spec}}{unit} ({'ceiling' if ceiling else 'floor'} {bound:g})"))
    return _decide(checks, target)


def _decide(checks: list[Check], target: dict | None) -> Decision:
    failed = [c for c in checks if not c.ok]
    if failed:
        return Decision(False, "; ".join(f"{c.name}: {c.detail}" for c in failed), checks)
    lead = next((c for c in checks if c.name.startswith(("target", "protect"))), None)
    return Decision(True, f"{lead.name}: {lead.detail}" if lead else "every check passed", checks)
