"""What every self-play environment shares: its per-step metrics and running counts (the GRPO
path's ``EnvMetrics``, shared with the adversarial stage)."""

from selftrain.training.grpo import EnvMetrics

__all__ = ["EnvMetrics"]
