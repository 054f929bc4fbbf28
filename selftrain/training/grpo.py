"""GRPO through TRL for environments that play themselves (self-play).

An environment supplies a *rollout*: given the trainer's batch of prompt slots it generates
(through our generation backend), builds whatever prompts it plays (a proposer prompt, a solver
prompt, the next turn of a dialogue) and returns token ids plus per-completion columns that the
reward functions read. TRL does the rest: group-relative advantages, the clipped loss, the KL to
the reference model when ``beta > 0`` (with an adapter: the model with the adapter switched off),
weighted sums of several rewards.

Rewards are wrapped by ``GuardedReward``: a reward function that raises or returns the wrong
number of values has that batch skipped (its rewards are None, i.e. no signal) and counted; only
after ``max_failures`` such batches does training stop, with the last error in the message.

An optional maximum-likelihood term (``MLETerm``) adds ``weight`` x the causal-LM loss of a batch of
real text blocks to every GRPO loss: the policy is pulled toward the data while it chases a reward
(the adversarial stage's generator, which would otherwise drift to whatever fools its critic).
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from selftrain.modeling.generation import SamplingParams, TransformersBackend
from selftrain.training.adapters import LoraOptions, lora_config, merge
from selftrain.training.arguments import SCHEDULES, build_arguments
from selftrain.training.callbacks import StepRecorder
from selftrain.training.precision import resolve_precision
from selftrain.training.tracking import train_and_clean


@dataclass
class GRPOOptions:
    max_steps: int = 50  # optimizer steps
    learning_rate: float = 1e-5
    groups_per_step: int = 4  # prompt groups per step
    num_generations: int = 8  # completions per group
    completion_tokens: int = 16  # token cap of a completion
    temperature: float = 0.7  # sampling temperature of rollouts (TRL scores with the same)
    beta: float = 0.0  # KL penalty to the start model (0 loads no reference)
    loss_type: str = "dapo"  # TRL's loss normalisation: grpo, dr_grpo, dapo, bnpo
    scale_rewards: str = "group"  # divide advantages by the std of: group, batch, none
    lr_scheduler: str = "cosine"  # cosine, linear, constant
    warmup_steps: int = 0
    max_reward_failures: int = 5  # batches a reward may fail before training stops
    generation_batch_size: int = 64  # prompts the backend samples together
    precision: str = "auto"
    adapter: LoraOptions | None = None  # LoRA, merged after training; None: full fine-tuning


class EnvMetrics:
    """What a GRPO environment reports: per-step means (``note``) and running ``counts``; read by
    the step recorder at each logged step."""

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


@dataclass
class MLETerm:
    blocks: list[list[int]]  # token ids of real text, all of one length
    weight: float = 0.1  # multiplies the LM loss added to each GRPO loss
    batch_size: int = 8  # blocks per added loss
    seed: int = 0


def with_mle(trainer_cls: type) -> type:
    """``trainer_cls`` (TRL's GRPOTrainer) whose loss also carries ``mle.weight`` x the LM loss of real blocks."""

    class GRPOWithMLE(trainer_cls):
        def __init__(self, *args, mle: MLETerm, **kwargs):
            super().__init__(*args, **kwargs)
            self.mle = mle
            self._mle_gen = torch.Generator().manual_seed(mle.seed)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            rows = torch.randint(len(self.mle.blocks), (self.mle.batch_size,), generator=self._mle_gen).tolist()
            ids = torch.tensor([self.mle.blocks[r] for r in rows], device=loss.device)
            lm_loss = model(input_ids=ids, labels=ids).loss
            self._metrics["train"]["mle_loss"].append(float(lm_loss.detach()))
            # TRL's loss is already divided for gradient accumulation (the Trainer does not divide it again)
            return loss + self.mle.weight * lm_loss / self.current_gradient_accumulation_steps

    return GRPOWithMLE


class GuardedReward:
    """A reward function that fails soft: errors become skipped samples, counted in ``failures``."""

    def __init__(self, fn: Callable, name: str, max_failures: int):
        self.fn, self.__name__, self.max_failures = fn, name, max_failures
        self.failures, self.skipped, self.last_error = 0, 0, ""

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        n = len(completions)
        try:
            values = list(self.fn(prompts, completions, **columns))
            if len(values) != n:
                raise ValueError(f"returned {len(values)} values for {n} completions")
            values = [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values]
        except Exception as e:  # a broken reward must not end the run on the first batch
            self.failures += 1
            self.skipped += n
            self.last_error = f"{type(e).__name__}: {e}"
            if self.failures >= self.max_failures:
                # not bad input: the run's stage fails (and is rolled back), the run goes on
                raise RuntimeError(f"reward function {self.__name__!r} failed on {self.failures} batches "
                                   f"(last: {self.last_error})") from e
            return [None] * n
        return values


def backend_rollout(env, sampling: SamplingParams, batch_size: int, autocast_dtype=None):
    """TRL ``rollout_func``: the environment plays with a backend over the trainer's current model.

    ``autocast_dtype`` (bf16 on CPUs that have it) roughly halves sampling time; it is entered and
    left around each rollout, so the weights it casts are always the ones just updated."""

    def rollout(prompts: list, trainer) -> dict:
        model = trainer.accelerator.unwrap_model(trainer.model)
        backend = TransformersBackend(model, trainer.processing_class, batch_size=batch_size)
        start = time.perf_counter()
        with torch.autocast(model.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = env.rollout(len(prompts) // trainer.num_generations, trainer.num_generations, backend, sampling)
        env.rollout_seconds += time.perf_counter() - start
        if len(out["completion_ids"]) != len(prompts):
            raise RuntimeError(f"environment returned {len(out['completion_ids'])} completions for {len(prompts)} slots")
        return {"logprobs": None, **out}

    return rollout


def grpo_train(model, tokenizer, env, rewards: dict[str, tuple[Callable, float]], *, opts: GRPOOptions,
               out_dir: Path, seed: int, log: Callable[[dict], None] = lambda r: None, stage_key: str = "",
               callbacks: list | None = None, report_to: str = "none",
               mle: MLETerm | None = None, phase: str = "selfplay") -> tuple[object, list[dict], list[GuardedReward]]:
    """Run GRPO for ``opts.max_steps`` steps; return (the trained plain model, per-step records,
    guarded rewards). ``env`` has ``rollout(groups, g, backend, sampling)`` and the ``EnvMetrics``
    bookkeeping; ``rewards`` maps a name to (function, weight). ``callbacks`` are extra
    ``TrainerCallback``s (a bench's time budget and learning curve). The dataset is one placeholder
    row per slot (``groups_per_step * max_steps``): the environment, not a data order, decides what
    each slot plays (a curriculum drives it through the environment). ``mle`` adds a
    maximum-likelihood term on real text to the loss."""
    from trl import GRPOConfig, GRPOTrainer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is what lets our backend generate
    device = str(model.device.type)
    precision = resolve_precision(opts.precision, device)
    groups, g = opts.groups_per_step, opts.num_generations
    # One placeholder row per slot: the environment, not the dataset, decides what each slot plays.
    slots = datasets.Dataset.from_dict({"prompt": [f"slot {i}" for i in range(groups * max(1, opts.max_steps))]})
    guarded = [GuardedReward(fn, name, opts.max_reward_failures) for name, (fn, _) in rewards.items()]
    args = build_arguments(
        GRPOConfig, output_dir=out_dir, seed=seed, precision=precision, device=device, report_to=report_to,
        max_steps=opts.max_steps, learning_rate=opts.learning_rate, per_device_train_batch_size=groups * g,
        gradient_accumulation_steps=1, num_generations=g, max_completion_length=opts.completion_tokens,
        temperature=opts.temperature, beta=opts.beta, reward_weights=[w for _, w in rewards.values()],
        loss_type=opts.loss_type, scale_rewards=opts.scale_rewards, lr_scheduler_type=SCHEDULES[opts.lr_scheduler],
        warmup_steps=opts.warmup_steps, logging_steps=1, save_strategy="no", disable_tqdm=False,
        shuffle_dataset=False, split_batch=False,
    )
    sampling = SamplingParams(max_new_tokens=opts.completion_tokens, temperature=opts.temperature,
                              top_p=1.0, seed=None)  # no reseeding: fresh samples every step
    trainer_cls, extra = (with_mle(GRPOTrainer), {"mle": mle}) if mle is not None and mle.weight > 0 else (GRPOTrainer, {})
    trainer = trainer_cls(
        **extra, model=model, reward_funcs=guarded, args=args, train_dataset=slots, processing_class=tokenizer,
        rollout_func=backend_rollout(env, sampling, batch_size=opts.generation_batch_size,
                                     autocast_dtype=torch.bfloat16 if precision == "bf16" else None),
        peft_config=lora_config(opts.adapter, model) if opts.adapter else None)
    recorder = StepRecorder(env, log, stage_key, guarded, phase=phase)
    train_and_clean(trainer, out_dir, [recorder, *(callbacks or [])])
    return merge(trainer.model), recorder.records, guarded


def summarize(records: list[dict], keys: list[str]) -> dict:
    """First and last values (mean of the first/last quarter of steps) of each metric, for the report."""
    out: dict = {}
    if not records:
        return out
    q = max(1, len(records) // 4)
    by_key = defaultdict(list)
    for r in records:
        for k in keys:
            if isinstance(r.get(k), (int, float)) and not math.isnan(r[k]):
                by_key[k].append(r[k])
    for k, values in by_key.items():
        out[f"{k}/first"] = round(sum(values[:q]) / len(values[:q]), 4)
        out[f"{k}/last"] = round(sum(values[-q:]) / len(values[-q:]), 4)
    return out
