"""Training arguments: one builder for ``transformers.TrainingArguments`` and TRL's configs.

``build_arguments(SFTConfig, ...)`` sets what every trainer shares from the run (output dir,
seed, precision, device, tracking, no dataloader workers, no gradient checkpointing), then the
method's own fields, then the user's ``trainer_args``. ``check_trainer_args`` refuses, when the
config loads, user arguments that do not exist or that an option of the stage already sets.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

from transformers import SchedulerType, TrainingArguments

from selftrain import distributed
from selftrain.config import unknown_name
from selftrain.errors import SelftrainError

SCHEDULERS = [s.value for s in SchedulerType]
# the three schedules the stages offer by short name -> transformers' scheduler
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
TRAINING_ARGS = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # report_to -> package


def check_scheduler(name: str) -> str:
    """A transformers scheduler name, else ValueError naming the closest."""
    if name not in SCHEDULERS:
        raise ValueError(unknown_name(name, SCHEDULERS, what="scheduler"))
    return name


def check_trainer_args(args: dict[str, Any], own: dict[str, str]) -> dict[str, Any]:
    """ValueError for a key that is no TrainingArguments field, or one that ``own`` maps to the
    option that sets it (given twice they would clash mid-run)."""
    for key in args:
        if key in own:
            raise ValueError(f"{key!r} is set by the stage itself: use {own[key]} instead")
        if key not in TRAINING_ARGS:
            raise ValueError(unknown_name(key, TRAINING_ARGS, what="TrainingArguments field",
                                          listing="see transformers.TrainingArguments"))
    return args


def report_to_value(report_to: str) -> str | list[str]:
    """``run.report_to`` as TrainingArguments takes it; SelftrainError if the tracker is missing."""
    if report_to == "none":
        return "none"
    package = TRACKERS.get(report_to)
    if package is None:
        raise SelftrainError(f"run.report_to: {unknown_name(report_to, ['none', *TRACKERS], what='tracker')}")
    if importlib.util.find_spec(package) is None:
        raise SelftrainError(f"run.report_to={report_to} needs the {package} package: pip install {package}"
                             + (" (or selftrain[tracking])" if package == "tensorboard" else ""))
    return [report_to]


def build_arguments(config_cls: type[TrainingArguments], *, output_dir: Path | str, seed: int, precision: str,
                    device: str, report_to: str = "none", user_args: dict[str, Any] | None = None,
                    where: str = "training arguments", split_batch: bool = True, **fields) -> TrainingArguments:
    """``config_cls`` (TrainingArguments, SFTConfig, GRPOConfig, DPOConfig) with the shared fields,
    then ``fields`` (the method's), then ``user_args``. A bad value is bad input: SelftrainError
    naming ``where`` (e.g. ``pretrain.trainer_args``).

    Under N processes a stage's batch size stays the *global* batch (``split_batch``): each rank
    takes 1/N of it, so a config trains the same way on one process or many. GRPO keeps its
    per-process batch (a rank's rollouts are whole groups)."""
    n = distributed.world_size()
    batch = fields.get("per_device_train_batch_size")
    if split_batch and n > 1 and batch:
        if batch % n:
            raise SelftrainError(f"{where}: the batch size {batch} does not split over {n} processes; "
                                 f"use a multiple of {n}")
        fields["per_device_train_batch_size"] = batch // n
    common = dict(output_dir=str(output_dir), seed=seed, bf16=precision == "bf16", fp16=precision == "fp16",
                  use_cpu=device == "cpu", report_to=report_to_value(report_to), dataloader_num_workers=0)
    if not {"activation_checkpointing", "gradient_checkpointing"} & set(user_args or {}):
        common["activation_checkpointing"] = False  # TRL turns it on; small models need no memory saving
    try:
        return config_cls(**{**common, **fields, **(user_args or {})})
    except (ValueError, TypeError, ImportError, OSError) as e:
        shown = f"{where} {user_args}" if user_args else where
        raise SelftrainError(f"{shown}: {e}") from None
