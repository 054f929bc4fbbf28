"""Supervised fine-tuning on (prompt, completion) pairs with TRL's ``SFTTrainer``: the loss is on
the completion only. The ``fewshot`` (pseudo-labels) and ``self_instruct`` stages use it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from selftrain.data.order import published_pacing
from selftrain.data.pacing import PacedSampler, PacingOptions, is_constant
from selftrain.errors import SelftrainError
from selftrain.modeling.scoring import loglikelihoods, split_pair
from selftrain.training.adapters import LoraOptions, lora_config, merge
from selftrain.training.arguments import build_arguments
from selftrain.training.callbacks import MetricsCallback
from selftrain.training.curriculum import CurriculumCallback
from selftrain.training.precision import Precision, resolve_precision
from selftrain.training.sampling import check_order, ordered
from selftrain.training.tracking import train_and_clean


class SFTOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(40, ge=1, description="Optimizer steps per fine-tuning round.")
    learning_rate: float = Field(3e-5, gt=0, description="Peak learning rate (1e-3 suits tiny models from scratch).")
    batch_size: int = Field(8, ge=1, description="Pairs per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_length: int = Field(512, ge=8, description="Prompt+completion tokens kept (prompts are cut from the left).")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Share of steps spent warming the LR up.")
    precision: Precision = Field("auto", description="auto: bf16 where the GPU or CPU has it, else fp32.")
    adapter: LoraOptions | None = Field(
        None, description="LoRA adapter ({type: lora, r, alpha, dropout, target_modules}), merged after training; null: full fine-tuning.")
    pacing: PacingOptions | None = Field(
        None, description="Curriculum: pairs ranked by the model's own -log p(completion), drawn under this pacing "
                          "({pacing: sqrt, c0, ramp, rescore_every, ...}); null: shuffled, or a curriculum stage's pacing.")


    @field_validator("pacing")
    @classmethod
    def _pairs_are_not_blocks(cls, v: PacingOptions | None) -> PacingOptions | None:
        if v is not None and v.length_warmup is not None:
            raise ValueError("length_warmup applies to packed LM blocks (pretrain, curriculum), not to SFT pairs")
        return v


def paced_by_curriculum(opts: SFTOptions, artefacts: dict) -> SFTOptions:
    """``opts`` under the pacing an accepted ``curriculum`` stage published, when ``opts`` sets no
    ``pacing`` of its own (length warm-up, which only packed blocks have, dropped)."""
    published = None if "pacing" in opts.model_fields_set else published_pacing(artefacts)
    if published is None:
        return opts
    pacing = published[1].model_copy(update={"length_warmup": None})
    return opts.model_copy(update={"pacing": pacing})


def tokenize_pairs(tokenizer, prompts: list[str], completions: list[str], max_length: int,
                   append_eos: bool) -> datasets.Dataset:
    """``input_ids`` + ``completion_mask``, split exactly as a choice is scored (so training and
    scoring see the same tokens), prompts cut from the left to fit."""
    rows = {"input_ids": [], "completion_mask": []}
    for prompt, completion in zip(prompts, completions):
        ctx, cont = split_pair(tokenizer, prompt, completion)
        if append_eos and tokenizer.eos_token_id is not None:
            cont = cont + [tokenizer.eos_token_id]
        ids, mask = (ctx + cont)[-max_length:], ([0] * len(ctx) + [1] * len(cont))[-max_length:]
        rows["input_ids"].append(ids)
        rows["completion_mask"].append(mask)
    return datasets.Dataset.from_dict(rows)


def sft_train(model, tokenizer, prompts: list[str], completions: list[str], opts: SFTOptions, *, out_dir: Path,
              seed: int, device: str, log: Callable[[dict], None] = lambda r: None, stage_key: str = "",
              append_eos: bool = True, report_to: str = "none", order: Sequence[int] | None = None,
              callbacks: list | None = None):
    """Fine-tune ``model`` on completion-only loss; return (the trained plain model, metrics).

    ``append_eos`` teaches the model to stop after a completion (instructions' responses); a
    pseudo-label is scored as a continuation, so there it is off and the loss is the label's alone.
    ``order`` lists pair indices in training order (None: shuffled, or paced by ``opts.pacing``).
    """
    from trl import SFTConfig, SFTTrainer  # heavy import, only when a stage trains

    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        # autocast caches low-precision copies of the weights until its outermost context exits, so
        # inside one the optimizer's updates are never seen by the forward pass (measured: SmolLM2's
        # label loss fell 8.3 -> 3.0 instead of 6.8 -> 0.02). The Trainer sets up its own precision.
        raise RuntimeError("sft_train was called inside torch.autocast; call it outside (see `precision`)")

    pacing_metrics, curriculum_callbacks = {}, []
    if order is not None and opts.pacing is not None and opts.pacing.pacing != "none":
        raise SelftrainError("sft_train got both an explicit order and a pacing: give one")
    if order is None and opts.pacing is not None and opts.pacing.pacing != "none":
        order, pacing_metrics = completion_curriculum(model, tokenizer, prompts, completions, opts, seed)
        if order is not None and opts.pacing.rescore_every:
            curriculum_callbacks.append(CurriculumCallback(
                order, opts.pacing, score=lambda m: completion_difficulty(m, tokenizer, prompts, completions, opts),
                probe=None, probe_every=opts.max_steps, trace=pacing_metrics.setdefault("sft_rescored", {
                    "bucket_loss": [], "rescored_at": []}), log=log, stage_key=stage_key))
    order = check_order(order, len(prompts))
    precision = resolve_precision(opts.precision, device)
    train = tokenize_pairs(tokenizer, prompts, completions, opts.max_length, append_eos)
    args = build_arguments(
        SFTConfig, output_dir=out_dir, seed=seed, precision=precision, device=device, report_to=report_to,
        max_steps=opts.max_steps, per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum, learning_rate=opts.learning_rate,
        warmup_steps=int(opts.warmup_ratio * opts.max_steps), lr_scheduler_type="cosine",
        logging_steps=max(1, opts.max_steps // 10), save_strategy="no",
        completion_only_loss=True, max_length=opts.max_length, dataset_num_proc=None,
    )
    callback = MetricsCallback(log, stage_key)
    trainer = ordered(SFTTrainer)(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                                 callbacks=[callback, *curriculum_callbacks, *(callbacks or [])], order=order,
                                 peft_config=lora_config(opts.adapter, model) if opts.adapter else None)
    start = time.perf_counter()
    out = train_and_clean(trainer, out_dir)
    losses = callback.losses
    return merge(trainer.model), {"sft_pairs": len(prompts), "sft_loss": float(out.training_loss),
                                  "sft_first_loss": losses[0][1] if losses else None,
                                  "sft_last_loss": losses[-1][1] if losses else None,
                                  "sft_seconds": round(time.perf_counter() - start, 1), "precision": precision,
                                  **pacing_metrics}


def completion_difficulty(model, tokenizer, prompts: list[str], completions: list[str], opts: SFTOptions) -> list[float]:
    """-log p(completion | prompt) under the model: its own odds of producing the whole completion."""
    return [-ll for ll in loglikelihoods(model, tokenizer, list(zip(prompts, completions)), batch_size=opts.batch_size)]


def completion_curriculum(model, tokenizer, prompts: list[str], completions: list[str], opts: SFTOptions,
                          seed: int) -> tuple[PacedSampler | None, dict]:
    """A paced sampler over the pairs, ranked by the model's own -log p(completion) (self-judged
    difficulty), and what it found; None (shuffled) when every pair scores the same and no
    re-score is to come."""
    difficulty = completion_difficulty(model, tokenizer, prompts, completions, opts)
    if is_constant(difficulty) and not opts.pacing.rescore_every:
        return None, {"sft_pacing": "none (every pair scored the same)"}
    per_step = opts.batch_size * opts.grad_accum  # batch_size is the global batch, split over the ranks
    sampler = PacedSampler(difficulty, opts.pacing, total_steps=opts.max_steps, per_step=per_step, seed=seed)
    return sampler, {"sft_pacing": opts.pacing.pacing, "sft_difficulty_mean": sum(difficulty) / len(difficulty)}
