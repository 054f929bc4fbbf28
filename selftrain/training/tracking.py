"""Experiment tracking (``run.report_to``) kept inside the stage directory.

Trainers log to TensorBoard, MLflow or W&B through transformers' own integrations; this only
points them at ``<out_dir's parent>/tracking/<out_dir's name>`` (inside the stage directory)
for the duration of ``train()``: TensorBoard event files go there, and MLflow's file store /
W&B's local files too unless the user configured them (MLFLOW_TRACKING_URI, WANDB_DIR).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def tracking_dir(out_dir: Path) -> Path:
    """Where a trainer whose scratch folder is ``out_dir`` keeps its tracking logs (kept after training)."""
    out_dir = Path(out_dir)
    return out_dir.parent / "tracking" / out_dir.name


def train_and_clean(trainer, out_dir: Path, callbacks=()):
    """``trainer.train()`` with ``callbacks`` added and tracking kept inside the stage, then remove
    ``out_dir`` (a scratch folder: nothing is saved there, the stage saves the model); its output."""
    from selftrain.training.callbacks import quiet_if_live

    for cb in callbacks:
        trainer.add_callback(cb)
    quiet_if_live(trainer)
    with tracking_into(trainer, tracking_dir(out_dir)):
        out = trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    return out


@contextmanager
def tracking_into(trainer, folder: Path) -> Iterator[None]:
    """Point ``trainer``'s tracker callbacks at ``folder`` while the block runs."""
    from transformers.integrations import TensorBoardCallback

    folder = Path(folder)
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback):
            cb.logging_dir = str(folder)  # read when training begins
    names = {type(cb).__name__ for cb in trainer.callback_handler.callbacks}
    env = {}
    if "MLflowCallback" in names:
        env["MLFLOW_TRACKING_URI"] = (folder / "mlruns").resolve().as_uri()
    if "WandbCallback" in names:
        env["WANDB_DIR"] = str(folder.resolve())
    env = {k: v for k, v in env.items() if k not in os.environ}  # the user's own setting wins
    if names & {"TensorBoardCallback", "MLflowCallback", "WandbCallback"}:
        folder.mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    try:
        yield
    finally:
        for k in env:
            os.environ.pop(k, None)
