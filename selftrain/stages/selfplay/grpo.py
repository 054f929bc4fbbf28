"""GRPO through TRL for the self-play environments.

An environment supplies a *rollout*: given the trainer's batch of prompt slots it generates
(through our generation backend), builds whatever prompts it plays (a proposer prompt, a solver
prompt, the next turn of a dialogue) and returns token ids plus per-completion columns that the
reward functions read. TRL does the rest: group-relative advantages, the clipped loss, the KL to
the reference model when ``beta > 0``, weighted sums of several rewards.

Rewards are wrapped by ``GuardedReward``: a reward function that raises or returns the wrong
number of values has that batch skipped (its rewards are None, i.e. no signal) and counted; only
after ``max_failures`` such batches does the stage stop, with the last error in the message.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable

import datasets
import torch
from transformers import TrainerCallback

from selftrain.errors import SelftrainError
from selftrain.modeling.generation import SamplingParams, TransformersBackend
from selftrain.stages.pretrain import resolve_precision

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


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
                raise SelftrainError(f"reward function {self.__name__!r} failed on {self.failures} batches "
                                     f"(last: {self.last_error})") from e
            return [None] * n
        return values


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


class StepRecorder(TrainerCallback):
    """Keeps one record per logged step: TRL's metrics (rewards, KL, lengths) plus the
    environment's own (solve rate, difficulty, skipped samples), and forwards it to the run log."""

    def __init__(self, env, log, stage_key: str, rewards: list[GuardedReward]):
        self.env, self.log, self.stage_key, self.rewards = env, log, stage_key, rewards
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
        self.log({"stage": self.stage_key, "phase": "selfplay", **record})


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


def grpo_train(model, tokenizer, env, rewards: dict[str, tuple[Callable, float]], *, opts, out_dir, seed: int,
               log, stage_key: str, callbacks: list | None = None) -> tuple[object, list[dict], list[GuardedReward]]:
    """Run GRPO for ``opts.max_steps`` steps; return (model, per-step records, guarded rewards).
    ``callbacks`` are extra ``TrainerCallback``s (a bench's time budget and learning curve)."""
    from trl import GRPOConfig, GRPOTrainer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is what lets our backend generate
    precision = resolve_precision(opts.precision, str(model.device.type))
    groups, g = opts.groups_per_step, opts.num_generations
    guarded = [GuardedReward(fn, name, opts.max_reward_failures) for name, (fn, _) in rewards.items()]
    args = GRPOConfig(
        output_dir=str(out_dir), max_steps=opts.max_steps, learning_rate=opts.learning_rate,
        per_device_train_batch_size=groups * g, gradient_accumulation_steps=1, num_generations=g,
        max_completion_length=opts.completion_tokens, temperature=opts.temperature,
        beta=opts.beta, reward_weights=[w for _, w in rewards.values()], loss_type=opts.loss_type,
        scale_rewards=opts.scale_rewards, lr_scheduler_type=SCHEDULES[opts.lr_scheduler], warmup_steps=opts.warmup_steps,
        logging_steps=1, save_strategy="no", report_to=[], seed=seed, disable_tqdm=False,
        bf16=precision == "bf16", fp16=precision == "fp16", gradient_checkpointing=False,
        use_cpu=model.device.type == "cpu", dataloader_num_workers=0, shuffle_dataset=False,
    )
    # One placeholder row per slot: the environment, not the dataset, decides what each slot plays.
    slots = datasets.Dataset.from_dict({"prompt": [f"slot {i}" for i in range(groups * max(1, opts.max_steps))]})
    sampling = SamplingParams(max_new_tokens=opts.completion_tokens, temperature=opts.temperature,
                              top_p=1.0, seed=None)  # no reseeding: fresh samples every step
    trainer = GRPOTrainer(model=model, reward_funcs=guarded, args=args, train_dataset=slots,
                          processing_class=tokenizer,
                          rollout_func=backend_rollout(env, sampling, batch_size=opts.generation_batch_size,
                                                       autocast_dtype=torch.bfloat16 if precision == "bf16" else None))
    recorder = StepRecorder(env, log, stage_key, guarded)
    trainer.add_callback(recorder)
    for cb in callbacks or []:
        trainer.add_callback(cb)
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)  # nothing is saved there (save_strategy=no); the stage saves
    return trainer.model, recorder.records, guarded


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

