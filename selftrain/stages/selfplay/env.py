"""What every self-play environment shares: its per-step metrics and running counts."""

from __future__ import annotations

from collections import Counter, defaultdict


class EnvMetrics:
    """What a GRPO environment reports: per-step means (``note``) and running ``counts``."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.rollout_seconds = 0.0  # time spent generating, summed by the rollout hook
        self._step: dict[str, list[float]] = defaultdict(list)

    def note(self, name: str, value: float) -> None:
        self._step[name].append(value)

    def pop_metrics(self) -> dict:
        """Means since the last call, plus the running counts (``<name>_total``)."""
        out = {f"env/{k}": sum(v) / len(v) for k, v in self._step.items() if v}
        out.update({f"env/{k}_total": v for k, v in self.counts.items()})
        self._step = defaultdict(list)
        return out
