"""Causal / masked language modelling on packed blocks, with ``transformers.Trainer``.

Causal LM predicts each next token (labels are the inputs; the model shifts them); masked LM
hides ``mlm_probability`` of the tokens and predicts them. Trainer checkpoints go to ``out_dir``
every ``save_steps``; a call whose ``out_dir`` holds a complete checkpoint resumes from it (the
killed attempt's loss logs are replayed), so a killed run loses at most ``save_steps`` steps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import datasets
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.utils.data import Sampler
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from selftrain import distributed
from selftrain.data.packing import count_tokens
from selftrain.errors import SelftrainError
from selftrain.training.adapters import LoraOptions, attach, merge
from selftrain.training.arguments import build_arguments, check_scheduler, check_trainer_args
from selftrain.training.callbacks import MetricsCallback, quiet_if_live
from selftrain.training.precision import Precision, resolve_precision
from selftrain.training.sampling import OrderedSampling, check_order
from selftrain.training.tracking import tracking_dir, tracking_into


class LMOptions(BaseModel):
    """Hyperparameters of LM training; a stage's Config extends this class and names its options
    with ``option_prefix`` in messages (``pretrain.`` -> "use pretrain.max_steps")."""

    model_config = ConfigDict(extra="forbid")
    option_prefix: ClassVar[str] = ""

    max_steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Blocks per device per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate (use ~5e-5 for pretrained models).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="Share of steps spent warming the LR up.")
    lr_scheduler: str = Field("cosine", description="Any transformers scheduler name (cosine, linear, constant).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="Share of tokens masked for mlm.")
    precision: Precision = Field(
        "auto", description="auto: bf16 autocast where the GPU or CPU (AMX/AVX512-BF16) has it, else fp32.")
    save_steps: int = Field(50, ge=1, description="Trainer checkpoint interval (for resume).")
    logging_steps: int = Field(10, ge=1, description="Loss logging interval.")
    trainer_args: dict[str, Any] = Field(
        default_factory=dict, description="Extra TrainingArguments (fsdp, deepspeed, optim, ...).")
    adapter: LoraOptions | None = Field(
        None, description="LoRA adapter ({type: lora, r, alpha, dropout, target_modules}), merged on save; null: full fine-tuning.")

    # Checked when the config loads, so a typo costs nothing: found mid-run, it would end the run.
    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, v: str) -> str:
        return check_scheduler(v)

    @field_validator("trainer_args")
    @classmethod
    def _known_trainer_args(cls, v: dict) -> dict:
        return check_trainer_args(v, cls.own_options())

    @classmethod
    def own_options(cls) -> dict[str, str]:
        """TrainingArguments set from an option (given twice they would clash mid-run) -> that option."""
        p = cls.option_prefix
        return {"output_dir": "the stage directory (automatic)", "max_steps": f"{p}max_steps",
                "per_device_train_batch_size": f"{p}batch_size", "gradient_accumulation_steps": f"{p}grad_accum",
                "learning_rate": f"{p}learning_rate", "weight_decay": f"{p}weight_decay",
                "warmup_steps": f"{p}warmup_ratio", "lr_scheduler_type": f"{p}lr_scheduler",
                "max_grad_norm": f"{p}max_grad_norm", "logging_steps": f"{p}logging_steps",
                "save_steps": f"{p}save_steps", "seed": "run.seed", "bf16": f"{p}precision",
                "fp16": f"{p}precision", "use_cpu": "run.device", "report_to": "run.report_to"}


def lm_arguments(opts: LMOptions, out_dir: Path, *, seed: int, precision: str, device: str,
                 report_to: str = "none") -> TrainingArguments:
    """The TrainingArguments of ``lm_train``; ``trainer_args`` may override the defaults that have
    no option of their own (save_total_limit, optim, ...)."""
    return build_arguments(
        TrainingArguments, output_dir=out_dir, seed=seed, precision=precision, device=device, report_to=report_to,
        user_args=opts.trainer_args, where=f"{opts.option_prefix}trainer_args",
        max_steps=opts.max_steps, per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum, learning_rate=opts.learning_rate,
        weight_decay=opts.weight_decay, warmup_steps=int(opts.warmup_ratio * opts.max_steps),
        lr_scheduler_type=opts.lr_scheduler, max_grad_norm=opts.max_grad_norm, logging_steps=opts.logging_steps,
        save_steps=opts.save_steps, save_total_limit=2, remove_unused_columns=False,
    )


def check_lm_input(opts: LMOptions, model, tokenizer, texts: Sequence[str], block_size: int) -> None:
    """SelftrainError, before anything is written, for LM training that cannot start: a bad
    ``trainer_args`` value, a block longer than the model's context, text shorter than one block."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the values in trainer_args, before the run
    lm_arguments(opts, Path("unused"), seed=0, precision="fp32", device=device)
    p = opts.option_prefix
    context = getattr(model.config, "max_position_embeddings", None)
    if context and block_size > context:
        raise SelftrainError(f"{p}block_size={block_size} exceeds the model's context ({context})")
    n = count_tokens(texts, tokenizer, at_least=block_size)  # stops early on a large corpus
    if n < block_size:
        raise SelftrainError(f"the training text is shorter than one block: {n} tokens < "
                             f"{p}block_size={block_size}. Add text or lower block_size.")


def last_complete_checkpoint(folder: Path) -> Path | None:
    """Newest ``checkpoint-N`` whose trainer_state.json is whole JSON: Trainer writes it last, and
    not atomically, so a kill can leave it cut short."""
    ckpts = sorted(Path(folder).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if
                   p.name.split("-")[-1].isdigit() else -1, reverse=True)
    for c in ckpts:
        try:
            json.loads((c / "trainer_state.json").read_text())
            return c
        except (OSError, ValueError):
            continue
    return None


class CausalCollator:
    """Packed blocks are all full length: labels are the inputs (the model shifts them)."""

    def __call__(self, rows):
        ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone()}


class LMTrainer(OrderedSampling, Trainer):
    """``transformers.Trainer`` that can train its blocks in an explicit order."""


def lm_train(model, tokenizer, blocks: datasets.Dataset, opts: LMOptions, *, objective: str, out_dir: Path,
             seed: int, device: str, log: Callable[[dict], None] = lambda r: None, stage_key: str = "",
             report_to: str = "none", order: Sequence[int] | Sampler | None = None,
             callbacks: list | None = None, collator: Callable | None = None) -> tuple[Any, dict]:
    """Train ``model`` on ``blocks`` (``input_ids`` rows of equal length) with ``objective`` clm or
    mlm; return (the trained plain model, metrics).

    ``order`` lists block indices in the order they are trained (None: shuffled each epoch), or is a
    sampler (a curriculum's). ``collator`` replaces the objective's own (sequence-length warm-up).
    Checkpoints stay in ``out_dir`` so a killed call resumes; remove it once the model is saved.
    """
    order = check_order(order, len(blocks))
    out_dir = Path(out_dir)
    collator = collator or (DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=opts.mlm_probability, seed=seed)
                if objective == "mlm" else CausalCollator())
    precision = resolve_precision(opts.precision, device)
    args = lm_arguments(opts, out_dir, seed=seed, precision=precision, device=device, report_to=report_to)
    if opts.adapter is not None:
        model = attach(model, opts.adapter)
    callback = MetricsCallback(log, stage_key)
    trainer = LMTrainer(model=model, args=args, train_dataset=blocks, data_collator=collator,
                        callbacks=[callback, *(callbacks or [])], order=order)
    quiet_if_live(trainer)
    # every rank resumes from rank 0's checkpoint (the others keep none of their own)
    resume = distributed.broadcast(last_complete_checkpoint(out_dir))
    if resume:  # the runner dropped the killed attempt's records: the checkpoint's log replays them
        for logs in json.loads((resume / "trainer_state.json").read_text())["log_history"]:
            callback.record(logs.get("step", 0), logs)
    start = time.perf_counter()
    with tracking_into(trainer, tracking_dir(out_dir)):
        out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - start
    resumed_step = int(resume.name.split("-")[-1]) if resume else 0
    steps_run = opts.max_steps - resumed_step
    tokens = steps_run * args.per_device_train_batch_size * opts.grad_accum * len(blocks[0]["input_ids"]) * args.world_size
    losses = callback.losses
    return merge(trainer.model), {
        "precision": precision,
        "adapter": opts.adapter.type if opts.adapter else None,
        "train_loss": float(out.training_loss),
        **callback.summary(),
        "loss_curve": losses,
        "resumed_from_step": resumed_step,
        "train_tokens_per_s": tokens / seconds if seconds > 0 else None,
    }
