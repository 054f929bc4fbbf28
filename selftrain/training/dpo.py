"""DPO through TRL on preference pairs (``prompt``, ``chosen``, ``rejected``).

Without an adapter TRL loads a frozen reference copy of the model from its directory; with a
LoRA adapter no copy is needed: the reference is the model with the adapter switched off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets

from selftrain import distributed
from selftrain.training.adapters import LoraOptions, lora_config, merge
from selftrain.training.arguments import SCHEDULES, build_arguments
from selftrain.training.callbacks import StepRecorder
from selftrain.training.precision import resolve_precision
from selftrain.training.sampling import check_order, ordered
from selftrain.training.tracking import train_and_clean


@dataclass
class DPOOptions:
    max_steps: int = 50  # optimizer steps
    learning_rate: float = 1e-5
    batch_size: int = 8  # pairs per step (at most the number of pairs)
    beta: float = 0.1  # strength of the implicit KL to the reference model
    lr_scheduler: str = "cosine"  # cosine, linear, constant
    warmup_steps: int = 0
    precision: str = "auto"
    max_length: int | None = None  # prompt+completion tokens; None: the model's context
    adapter: LoraOptions | None = None  # LoRA, merged after training; None: full fine-tuning


def dpo_train(model, tokenizer, pairs: list[dict], opts: DPOOptions, *, out_dir: Path, seed: int,
              log: Callable[[dict], None] = lambda r: None, stage_key: str = "", report_to: str = "none",
              order: Sequence[int] | None = None, callbacks: list | None = None) -> tuple[object, list[dict]]:
    """Train on ``pairs``; return (the trained plain model, per-step records). ``order`` lists pair
    indices in training order (None: shuffled)."""
    from trl import DPOConfig, DPOTrainer

    order = check_order(order, len(pairs))
    device = model.device.type
    precision = resolve_precision(opts.precision, device)
    n = distributed.world_size()
    args = build_arguments(
        DPOConfig, output_dir=out_dir, seed=seed, precision=precision, device=device, report_to=report_to,
        max_steps=opts.max_steps, learning_rate=opts.learning_rate,
        # a batch the ranks can split: the pair count comes from the model's own samples
        per_device_train_batch_size=max(n, min(opts.batch_size, len(pairs)) // n * n), beta=opts.beta,
        lr_scheduler_type=SCHEDULES[opts.lr_scheduler], warmup_steps=opts.warmup_steps, logging_steps=1,
        save_strategy="no", max_length=opts.max_length or getattr(model.config, "max_position_embeddings", 1024),
    )
    data = datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    trainer = ordered(DPOTrainer)(model=model, args=args, train_dataset=data, processing_class=tokenizer, order=order,
                                  peft_config=lora_config(opts.adapter, model) if opts.adapter else None)
    recorder = StepRecorder(None, log, stage_key, [])
    train_and_clean(trainer, out_dir, [recorder, *(callbacks or [])])
    return merge(trainer.model), recorder.records
