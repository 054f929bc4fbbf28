"""Trainer callbacks that forward what a trainer logs to the run's metrics log, and its progress
(step, max steps) to the runner's live progress line.

A record with ``phase: "progress"`` is for the progress line only (the runner never writes it to
metrics.jsonl); a ``log`` callable with ``live = True`` draws that line itself, and then the
trainer's own tqdm bar and printed log dicts are removed (``quiet_if_live``)."""

from __future__ import annotations

import time

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from selftrain import faults


class ProgressReporter(TrainerCallback):
    """Send ``{"phase": "progress", "step", "max_steps", <last logged loss/reward>}`` when training
    begins (with ``start``), at most once a second, and at the last step."""

    every_seconds = 1.0

    def __init__(self, log, stage_key: str):
        self.log, self.stage_key = log, stage_key
        self.latest: dict[str, float] = {}
        self._sent = 0.0

    def on_train_begin(self, args, state, control, **kwargs):  # marks where this trainer's steps begin
        self._sent = time.monotonic()
        self.log({"stage": self.stage_key, "phase": "progress", "start": True, "step": state.global_step,
                  "max_steps": state.max_steps})

    def on_step_end(self, args, state, control, **kwargs):
        faults.point("train")
        now = time.monotonic()
        if now - self._sent >= self.every_seconds or state.global_step >= state.max_steps:
            self._sent = now
            self.log({"stage": self.stage_key, "phase": "progress", "step": state.global_step,
                      "max_steps": state.max_steps, **self.latest})

    def remember(self, logs: dict | None) -> None:
        for key in ("loss", "reward"):
            if logs and isinstance(logs.get(key), (int, float)):
                self.latest[key] = float(logs[key])


class MetricsCallback(ProgressReporter):
    """Forward the Trainer's loss logs to the run's metrics.jsonl and keep the loss curve."""

    def __init__(self, log, stage_key: str):
        super().__init__(log, stage_key)
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.remember(logs)
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


class StepRecorder(ProgressReporter):
    """Keeps one record per logged step: TRL's metrics (rewards, KL, lengths) plus the
    environment's own (solve rate, difficulty, skipped samples), and forwards it to the run log.

    ``env`` has ``pop_metrics()`` and ``rollout_seconds`` (or is None); ``rewards`` have
    ``__name__`` and ``skipped``."""

    def __init__(self, env, log, stage_key: str, rewards: list, phase: str = "selfplay"):
        super().__init__(log, stage_key)
        self.env, self.rewards, self.phase = env, rewards, phase
        self.records: list[dict] = []
        self.start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.remember(logs)
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


def quiet_if_live(trainer) -> None:
    """When the runner draws the progress line (a ``log`` with ``live``), drop the trainer's own
    tqdm bar and printed log dicts: one line per stage, whatever the trainer."""
    ours = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ProgressReporter)]
    if any(getattr(cb.log, "live", False) for cb in ours):
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
