"""Trainer callbacks that forward what a trainer logs to the run's metrics log."""

from __future__ import annotations

import time

from transformers import TrainerCallback


class MetricsCallback(TrainerCallback):
    """Forward the Trainer's loss logs to the run's metrics.jsonl and keep the loss curve."""

    def __init__(self, log, stage_key: str):
        self.log, self.stage_key, self.losses = log, stage_key, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.record(state.global_step, logs)

    def record(self, step: int, logs: dict | None) -> None:
        if logs and "loss" in logs:
            self.losses.append((step, float(logs["loss"])))
            self.log({"stage": self.stage_key, "phase": "train", **{k: v for k, v in logs.items()
                                                                   if isinstance(v, (int, float))}, "step": step})

    def summary(self, prefix: str = "") -> dict:
        """First and last logged loss (``<prefix>first_logged_loss`` ...)."""
        return {f"{prefix}first_logged_loss": self.losses[0][1] if self.losses else None,
                f"{prefix}last_logged_loss": self.losses[-1][1] if self.losses else None}


class StepRecorder(TrainerCallback):
    """Keeps one record per logged step: TRL's metrics (rewards, KL, lengths) plus the
    environment's own (solve rate, difficulty, skipped samples), and forwards it to the run log.

    ``env`` has ``pop_metrics()`` and ``rollout_seconds`` (or is None); ``rewards`` have
    ``__name__`` and ``skipped``."""

    def __init__(self, env, log, stage_key: str, rewards: list, phase: str = "selfplay"):
        self.env, self.log, self.stage_key, self.rewards, self.phase = env, log, stage_key, rewards, phase
        self.records: list[dict] = []
        self.start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        record = {"step": state.global_step, "seconds": round(time.perf_counter() - self.start, 1)}
        record.update({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})
        if self.env is not None:
            record.update(self.env.pop_metrics())
            record["rollout_seconds"] = round(self.env.rollout_seconds, 2)
            self.env.rollout_seconds = 0.0
        for r in self.rewards:
            record[f"skipped/{r.__name__}"] = r.skipped
        self.records.append(record)
        self.log({"stage": self.stage_key, "phase": self.phase, **record})
