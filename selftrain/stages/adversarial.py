"""Stage `adversarial` — a generator and a discriminator teach each other (GANs for text).

1. A discriminator (``modeling.discriminator``: a small encoder from scratch, MiniLM, or the LM's
   own body with a head) learns real text (label 1) from the model's samples (label 0), then is
   calibrated (one temperature) on real texts it never trained on and fresh samples.
2. The game, ``rounds`` x ``steps_per_round`` generator steps: GRPO (``training.grpo``; text is
   discrete, so a policy gradient, as SeqGAN) with the discriminator's P(real) of each sample as its
   reward, a KL term to the pre-adversarial model (``beta``) and optionally a maximum-likelihood
   term on real text (``mle_weight``). After each generator step the discriminator is scored on
   that step's samples (fresh: it has not trained on them) against real texts it never trained on,
   then updated ``updates`` times on them.
3. Failure modes: a discriminator that keeps winning (accuracy on fresh samples >= ``weaken_above``
   for ``weaken_patience`` steps; its reward then says nothing) is weakened — label smoothing and
   instance noise up, updates per step halved — and the event is logged. After each round, samples
   are checked for mode collapse against the pre-adversarial model's: self-BLEU up by more than
   ``max_self_bleu_rise`` or distinct-2 below ``min_distinct_ratio`` of it stops the game; the stage
   returns the last healthy round's generator, or hands the collapse to the guard (which rolls the
   stage back) when the first round already collapsed.
4. Discriminator-approved synthesis: ``synthesize`` samples, kept from the highest P(real) down to
   ``keep_fraction`` of them, each adding at least ``min_novel_bigrams`` unseen word pairs to what
   was kept (a diversity floor); they join the pool with origin ``adversarial``.

Each finished round is saved whole (generator, discriminator, the game's state) under ``game/``:
a killed stage resumes after its last finished round with both models. The discriminator is
published as the auxiliary model ``discriminator`` (``augment`` and ``self_instruct`` can filter
with it). Plots: ``adversarial.png``.
"""

from __future__ import annotations

import array
import dataclasses
import json
import math
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from transformers import TrainerCallback

from selftrain import distributed
from selftrain.data.packing import token_batches
from selftrain.data.pool import Pool, make_examples
from selftrain.errors import SelftrainError
from selftrain.evaluation.diversity import distinct_n, self_bleu, words
from selftrain.evaluation.perplexity import heldout_perplexity
from selftrain.modeling.discriminator import KINDS, Discriminator
from selftrain.modeling.embeddings import check_embedder
from selftrain.modeling.factory import load_checkpoint, save_checkpoint
from selftrain.modeling.generation import SamplingParams, TransformersBackend
from selftrain.rewards.discriminator import DiscriminatorReward
from selftrain.stages.base import RunState, Stage, StageConfig, StageResult, fmt, register
from selftrain.training.discriminator import DiscriminatorUpdater, Weakening, accuracy, calibrate
from selftrain.training.grpo import EnvMetrics, GRPOOptions, MLETerm, grpo_train
from selftrain.workspace import (
    atomic_write_figure,
    atomic_write_json,
    atomic_write_text,
    replace_dir,
)

STATE = "state.json"
OPTIMIZER = "discriminator_optimizer.pt"  # its AdamW moments, so a resumed game updates it as an unbroken one


class DiscriminatorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field("scratch", description="scratch (small encoder on the model's tokenizer), minilm, lm (the model's body + a head), or a local classifier directory.")
    learning_rate: float = Field(5e-4, gt=0, description="AdamW learning rate (use ~2e-5 for minilm or lm).")
    batch_size: int = Field(32, ge=2, description="Texts per update, half real and half generated.")
    pretrain_steps: int = Field(300, ge=0, description="Updates before the game, on real text vs the start model's samples (60 on 128 samples left a scratch encoder at chance on docstrings; 300 on 1,000 reached 0.65 on unseen ones).")
    pretrain_samples: int = Field(512, ge=2, description="Samples of the start model for those updates (more samples generalise better than more updates).")
    updates: int = Field(1, ge=0, description="Updates per generator step (k); 0 freezes the discriminator after pre-training.")
    calibration_texts: int = Field(64, ge=4, description="Real texts held back from its training (and as many fresh samples) to fit its temperature.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="One-sided label smoothing from the start (real targets 1 - s).")
    noise: float = Field(0.0, ge=0, lt=1, description="Share of input tokens replaced at random during updates, from the start.")
    weaken_above: float = Field(0.95, gt=0.5, le=1, description="Accuracy on fresh samples at which it counts as winning too easily.")
    weaken_patience: int = Field(3, ge=1, description="Consecutive such steps before it is weakened.")
    max_length: int | None = Field(None, ge=8, description="Tokens it reads per text; default: the generated window's length + 8.")


class AdversarialConfig(StageConfig):
    rounds: int = Field(2, ge=1, description="Rounds of the game; each ends with a health check and a saved state.")
    steps_per_round: int = Field(10, ge=1, description="Generator (GRPO) steps per round.")
    learning_rate: float = Field(1e-5, gt=0, description="Generator learning rate (constant within a round).")
    groups_per_step: int = Field(4, ge=1, description="Prompt groups per generator step.")
    num_generations: int = Field(4, ge=2, description="Samples per prompt (a GRPO group).")
    completion_tokens: int = Field(32, ge=2, description="Tokens the generator writes per sample.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the generator.")
    prompt: Literal["bos", "prefix"] = Field("bos", description="bos: write texts from nothing; prefix: continue the first prefix_tokens of real texts.")
    prefix_tokens: int = Field(8, ge=1, description="prefix: tokens of real text given as the prompt.")
    beta: float = Field(0.05, ge=0, description="KL penalty to the pre-adversarial model (0: none).")
    mle_weight: float = Field(0.0, ge=0, description="Weight of a maximum-likelihood term on real text added to the generator's loss (0: off).")
    mle_block_size: int = Field(64, ge=4, description="Tokens per real block of that term.")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field("dapo", description="TRL's GRPO loss normalisation.")
    discriminator: DiscriminatorOptions = Field(default_factory=DiscriminatorOptions, description="The discriminator and how it is trained and weakened.")
    eval_samples: int = Field(64, ge=4, description="Samples per round for self-BLEU, distinct-n and the discriminator's score.")
    eval_tokens: int = Field(8192, ge=64, description="Held-out tokens scored for perplexity after each round.")
    max_self_bleu_rise: float = Field(0.15, gt=0, description="Collapse: self-BLEU-4 above the start's by more than this.")
    min_distinct_ratio: float = Field(0.75, gt=0, le=1, description="Collapse: distinct-2 below this share of the start's.")
    synthesize: int = Field(128, ge=0, description="Samples drawn after the game for the pool (0: add none).")
    keep_fraction: float = Field(0.25, gt=0, le=1, description="Share of them kept, highest P(real) first.")
    min_score: float = Field(0.0, ge=0, le=1, description="Lowest P(real) a kept sample may have.")
    min_novel_bigrams: float = Field(0.5, ge=0, le=1, description="Diversity floor: share of a kept sample's word pairs not in any sample kept before it.")
    generation_batch_size: int = Field(64, ge=1, description="Prompts the generation backend samples together.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 where the device has it.")


@register
class AdversarialStage(Stage):
    name = "adversarial"
    Config = AdversarialConfig
    requires_causal = True  # the generator samples text

    def preflight(self, config, *, model, tokenizer, kind, train_texts):
        if distributed.world_size() > 1:  # each rank would train its own discriminator on its own fakes
            raise SelftrainError("the adversarial stage runs in one process; run this config without torchrun / "
                                 "accelerate launch, or leave the stage out of the multi-process run")
        d = config.discriminator.kind
        if d not in KINDS and not (Path(d) / "config.json").is_file():
            raise SelftrainError(f"adversarial.discriminator.kind {d!r}: not {', '.join(KINDS)} or a model directory "
                                 "with a config.json")
        if d == "minilm":
            check_embedder("minilm", "adversarial.discriminator.kind")
        if config.prompt == "prefix":
            long_enough = sum(len(ids) > config.prefix_tokens for ids in
                              tokenizer(train_texts[:2000], add_special_tokens=False)["input_ids"])
            if long_enough < 2:
                raise SelftrainError(f"adversarial prompt=prefix needs real texts longer than prefix_tokens="
                                     f"{config.prefix_tokens} tokens; {long_enough} are")

    # ------------------------------------------------------------------ the stage
    def run(self, state: RunState, config: AdversarialConfig) -> StageResult:
        console = Console(stderr=True)
        model, tokenizer = state.load_model()
        game_dir = state.stage_dir / "game"
        rows = real_rows(state.pool)
        env = AdversarialEnv(tokenizer, rows, config, seed=state.seed)
        if len(env.real_windows) < config.discriminator.calibration_texts + 2:
            raise SelftrainError(f"adversarial: {len(env.real_windows)} real texts, but the discriminator holds "
                                 f"back {config.discriminator.calibration_texts} for calibration and trains on the rest")
        opts = config.discriminator
        real_cal, real_train = env.real_windows[:opts.calibration_texts], env.real_windows[opts.calibration_texts:]
        max_length = opts.max_length or env.window_tokens + 8
        game = load_game(game_dir)
        if game is None:  # a new game: train and calibrate the discriminator, measure the start
            disc = Discriminator.build(opts.kind, generator_dir=state.checkpoint, tokenizer=tokenizer,
                                       max_length=max_length, seed=state.seed)
            disc.model.to(state.device)
            weakening = Weakening(label_smoothing=opts.label_smoothing, noise=opts.noise, updates=opts.updates)
            updater = DiscriminatorUpdater(disc, learning_rate=opts.learning_rate, batch_size=opts.batch_size,
                                           seed=state.seed)
            console.print(f"adversarial: discriminator ({opts.kind}) pre-training, {opts.pretrain_steps} updates")
            first_fakes = env.sample(model, opts.pretrain_samples, seed=state.seed)[0]
            updater.update(real_train, first_fakes, steps=opts.pretrain_steps, weakening=weakening)
            cal_fakes = env.sample(model, opts.calibration_texts, seed=state.seed + 1)[0]
            start = {**calibrate(disc, real_cal, cal_fakes), **accuracy(disc, real_cal, cal_fakes)}
            game = {"round": 0, "weakening": weakening.as_dict(), "records": [], "events": [],
                    "discriminator_start": start, "healthy_round": 0,
                    "rounds": [{"round": 0, **health(model, tokenizer, disc, env, real_cal, config, state)}]}
            save_round(game_dir, game, None, tokenizer, disc, updater)
        else:
            console.print(f"adversarial: resuming after round {game['round']}")
            folder = game_dir / f"round-{game['round']}"
            disc = Discriminator.load(folder / "discriminator")
            disc.model.to(state.device)
            if game["round"] > 0:
                model = load_checkpoint(folder / "generator", "causal")[0].to(state.device)
            weakening = Weakening(**game["weakening"])
            updater = DiscriminatorUpdater(disc, learning_rate=opts.learning_rate, batch_size=opts.batch_size,
                                           seed=state.seed)
            updater.load(folder / OPTIMIZER)
            game["resumed_from_round"] = game["round"]
        mle = None
        if config.mle_weight > 0:
            mle = MLETerm(blocks=real_blocks(tokenizer, rows["text"], config.mle_block_size),
                          weight=config.mle_weight, seed=state.seed)
        base = game["rounds"][0]
        while game["round"] < config.rounds and "collapse" not in game:
            r = game["round"] + 1
            console.print(f"adversarial: round {r}/{config.rounds}, {config.steps_per_round} generator steps")
            env.rng = random.Random(state.seed * 1000 + r)  # per round, so a resumed game draws as an unbroken one
            updater.reseed(state.seed * 7919 + r)
            round_mle = dataclasses.replace(mle, seed=state.seed * 1000 + r) if mle else None  # new real blocks each round
            turn = DiscriminatorTurn(env, disc, updater, weakening, real_train, real_cal, opts, state, round_=r,
                                     step_offset=len(game["records"]))
            model.config._name_or_path = str(state.checkpoint)  # TRL's KL reference: the pre-adversarial model
            model, records, _ = grpo_train(
                model, tokenizer, env, {"discriminator": (DiscriminatorReward(disc), 1.0)},
                opts=grpo_options(config), out_dir=state.stage_dir / "trainer", seed=state.seed + r, log=state.log,
                stage_key=state.stage_key, callbacks=[turn], report_to=state.config.run.report_to, mle=round_mle,
                phase="adversarial")
            offset = len(game["records"])
            game["records"] += [{**rec, "round": r, "step": offset + i + 1} for i, rec in enumerate(records)]
            game["events"] += turn.events
            cal_fakes = env.sample(model, opts.calibration_texts, seed=state.seed + 100 * r)[0]
            calibration = calibrate(disc, real_cal, cal_fakes)
            now = {"round": r, **health(model, tokenizer, disc, env, real_cal, config, state),
                   "temperature": calibration["temperature"]}
            game["rounds"].append(now)
            game["round"], game["weakening"] = r, weakening.as_dict()
            reason = collapse_reason(base, now, config)
            if reason:
                game["collapse"] = reason
                game["events"].append({"event": "collapse", "round": r, "reason": reason})
                console.print(f"[yellow]adversarial: mode collapse in round {r}: {reason}[/]")
            else:
                game["healthy_round"] = r
            save_round(game_dir, game, model, tokenizer, disc, updater)
        return self._finish(state, config, game, game_dir, env, console)

    def _finish(self, state, config, game, game_dir, env, console) -> StageResult:
        chosen = game["healthy_round"] or game["round"]  # round 1 collapsed: hand it to the guard
        folder = game_dir / f"round-{chosen}"
        handed_to_guard = "collapse" in game and not game["healthy_round"]
        model, tokenizer = load_checkpoint(folder / "generator", "causal")
        disc = Discriminator.load(folder / "discriminator")
        disc.model.to(state.device)
        approved, synthesis = ([], {"sampled": 0, "kept": 0}) if handed_to_guard else approve(
            model.to(state.device), disc, env, config, seed=state.seed, pool=state.pool)
        additions = make_examples([a["text"] for a in approved], origin="adversarial", op="approved",
                                  stage=state.stage_key, round=state.round,
                                  parent_ids=[a["parent_id"] for a in approved],
                                  metas=[{"disc_score": a["score"]} for a in approved])
        samples = state.stage_dir / "approved_samples.jsonl"
        atomic_write_text(samples, "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in approved))
        steps = state.stage_dir / "steps.jsonl"
        atomic_write_text(steps, "".join(json.dumps(r) + "\n" for r in game["records"]))
        plot = plot_game(game, state.stage_dir / "adversarial.png")
        metrics = {"rounds": game["rounds"], "events": game["events"], "discriminator_start": game["discriminator_start"],
                   "discriminator": {"kind": config.discriminator.kind, **game["weakening"]},
                   "returned_round": chosen, "synthesis": synthesis, **summary(game["records"])}
        if "resumed_from_round" in game:
            metrics["resumed_from_round"] = game["resumed_from_round"]
        if handed_to_guard:
            metrics["collapse"] = game["collapse"]  # the runner's guard rolls the stage back
        console.print(f"adversarial: returned round {chosen}; {len(approved)} of {synthesis['sampled']} samples approved")
        artefacts = {"adversarial_steps": steps, "adversarial_samples": samples}
        if plot:
            artefacts["adversarial_plot"] = plot
        return StageResult(checkpoint=folder / "generator", additions=additions, artefacts=artefacts,
                           auxiliary={"discriminator": folder / "discriminator"}, metrics=metrics)

    def report(self, entry: dict) -> str:
        m = entry["stage_metrics"]
        if "rounds" not in m:
            return ""
        d = m["discriminator_start"]
        lines = [f"Adversarial game, discriminator `{m['discriminator']['kind']}`: at the start it told real from generated "
                 f"with accuracy {fmt(d.get('accuracy'), 3)} (calibration error {fmt(d.get('ece_before'), 3)} → "
                 f"{fmt(d.get('ece_after'), 3)}, temperature {fmt(d.get('temperature'), 3)}).", "",
                 "| round | held-out ppl | self-BLEU-4 | distinct-2 | P(real) of samples | disc accuracy |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {r['round']} | {fmt(r.get('heldout_ppl'))} | {fmt(r.get('self_bleu'), 3)} | {fmt(r.get('distinct_2'), 3)} "
                  f"| {fmt(r.get('disc_score'), 3)} | {fmt(r.get('disc_accuracy'), 3)} |" for r in m["rounds"]]
        for e in m.get("events", []):
            lines.append(f"- {e['event']} (round {e.get('round')}" + (f", step {e['step']}" if "step" in e else "") + "): "
                         + (e.get("reason") or ", ".join(f"{k} {v}" for k, v in e.items() if k not in ("event", "round", "step"))))
        s = m.get("synthesis") or {}
        if s.get("sampled"):
            lines += ["", f"Approved {s['kept']} of {s['sampled']} samples (mean P(real) {fmt(s.get('kept_mean_score'), 3)} "
                      f"vs {fmt(s.get('mean_score'), 3)} for all); rejected: "
                      + (", ".join(f"{k} {v}" for k, v in s.get("rejected", {}).items()) or "none") + "."]
        if (entry.get("artefacts") or {}).get("adversarial_plot"):
            lines += ["", f"![{entry['key']}]({entry['artefacts']['adversarial_plot']})"]
        return "\n".join(lines)


# ---------------------------------------------------------------------- the environment
class AdversarialEnv(EnvMetrics):
    """What the generator plays: prompts (nothing, or a real prefix), samples, the windows the
    discriminator judges. Keeps the latest rollout's windows for the discriminator's turn."""

    def __init__(self, tokenizer, rows: datasets.Dataset, config: AdversarialConfig, seed: int):
        super().__init__()
        self.tok, self.config, self.rng = tokenizer, config, random.Random(seed)
        self.prefix = config.prefix_tokens if config.prompt == "prefix" else 0
        self.window_tokens = self.prefix + config.completion_tokens
        order = array.array("q", range(len(rows)))  # 8 bytes a row
        random.Random(seed).shuffle(order)  # the draw a shuffle of the rows themselves makes
        drawn = rows.select_columns(["id", "text"])[list(order[:20000])]  # plenty for the discriminator
        ids = tokenizer(drawn["text"], add_special_tokens=False)["input_ids"] if drawn["text"] else []
        keep = [(i, t) for i, t in zip(drawn["id"], ids) if len(t) > self.prefix]
        self.real_windows = [tokenizer.decode(t[:self.window_tokens], skip_special_tokens=True) for _, t in keep]
        self.prefixes = [(i, tokenizer.decode(t[:self.prefix], skip_special_tokens=True)) for i, t in keep]
        self.fresh: list[str] = []

    def _prompts(self, n: int, rng: random.Random) -> tuple[list[str], list[str | None]]:
        if not self.prefix:
            return [""] * n, [None] * n
        picks = [rng.choice(self.prefixes) for _ in range(n)]
        return [p for _, p in picks], [i for i, _ in picks]

    def _windows(self, prompt_ids, completion_ids) -> list[str]:
        """What the discriminator judges: prompt + completion; "" when the completion is blank (a bare
        real prefix is no sample, and empty text scores 0)."""
        return [self.tok.decode(p + c, skip_special_tokens=True)
                if self.tok.decode(c, skip_special_tokens=True).strip() else "" for p, c in zip(prompt_ids, completion_ids)]

    def rollout(self, groups: int, g: int, backend, sampling) -> dict:
        prompts, _ = self._prompts(groups, self.rng)
        ids_in, ids_out = backend.generate_ids([p for p in prompts for _ in range(g)], sampling)
        windows = self._windows(ids_in, ids_out)
        self.fresh = windows
        self.note("sample_words", sum(len(w.split()) for w in windows) / len(windows))
        return {"prompt_ids": ids_in, "completion_ids": ids_out, "window": windows}

    def sample(self, model, n: int, *, seed: int) -> tuple[list[str], list[str], list[str | None]]:
        """``n`` samples of ``model`` with seeded prompts and sampling: the windows (prompt + completion),
        the completions alone, and each prefix's source row id."""
        prompts, parents = self._prompts(n, random.Random(seed))
        backend = TransformersBackend(model, self.tok, batch_size=self.config.generation_batch_size)
        sampling = SamplingParams(max_new_tokens=self.config.completion_tokens, temperature=self.config.temperature,
                                  seed=seed)
        ids_in, ids_out = backend.generate_ids(prompts, sampling)
        return self._windows(ids_in, ids_out), self.tok.batch_decode(ids_out, skip_special_tokens=True), parents


class DiscriminatorTurn(TrainerCallback):
    """After each generator step: score the discriminator on that step's samples (fresh) against
    held-back real texts, weaken it if it keeps winning, then update it on the samples and real
    texts from its training slice."""

    def __init__(self, env, disc, updater, weakening: Weakening, real: list[str], held_back: list[str],
                 opts: DiscriminatorOptions, state: RunState, round_: int, step_offset: int):
        self.env, self.disc, self.updater, self.weakening, self.opts = env, disc, updater, weakening, opts
        self.real, self.held_back = real, held_back  # trained on / never trained on (its accuracy is measured there)
        self.state, self.round, self.step_offset = state, round_, step_offset
        self.rng = random.Random(state.seed * 7919 + round_)
        self.streak, self.events = 0, []

    def on_step_end(self, args, state, control, **kwargs):
        fake = self.env.fresh
        if not fake:
            return
        scores = accuracy(self.disc, self.rng.sample(self.held_back, min(len(fake), len(self.held_back))), fake)
        real = self.rng.sample(self.real, min(len(fake), len(self.real)))
        self.env.note("disc_accuracy", scores["accuracy"])
        self.env.note("disc_p_real_of_generated", scores["p_real_of_generated"])
        self.streak = self.streak + 1 if scores["accuracy"] >= self.opts.weaken_above else 0
        if self.streak >= self.opts.weaken_patience and self.weakening.updates:  # a frozen one has nothing to weaken
            self.weakening.weaken()
            event = {"event": "discriminator_weakened", "round": self.round, "step": self.step_offset + state.global_step,
                     "accuracy": round(scores["accuracy"], 3), **self.weakening.as_dict()}
            self.events.append(event)
            self.state.log({"stage": self.state.stage_key, "phase": "adversarial", **event})
            self.streak = 0
        if self.weakening.updates:
            self.env.note("disc_loss", self.updater.update(real, fake, steps=self.weakening.updates,
                                                          weakening=self.weakening))
        self.env.note("label_smoothing", self.weakening.label_smoothing)


def grpo_options(config: AdversarialConfig) -> GRPOOptions:
    return GRPOOptions(max_steps=config.steps_per_round, learning_rate=config.learning_rate,
                       groups_per_step=config.groups_per_step, num_generations=config.num_generations,
                       completion_tokens=config.completion_tokens, temperature=config.temperature, beta=config.beta,
                       loss_type=config.loss_type, scale_rewards="group", lr_scheduler="constant",
                       generation_batch_size=config.generation_batch_size, precision=config.precision)


def real_rows(pool: Pool) -> datasets.Dataset:
    """The pool's real rows that hold text: a selection of the memory-mapped pool, not a copy."""
    positions, texts = pool.positions("real"), pool.ds.select_columns(["text"])
    has_text = np.array([bool(t.strip()) for i in range(0, len(positions), 1000)
                         for t in texts[positions[i:i + 1000].tolist()]["text"]], dtype=bool)
    return pool.ds.select(positions[has_text])


def real_blocks(tokenizer, texts: Sequence[str], block_size: int, limit: int = 4096) -> list[list[int]]:
    """Consecutive ``block_size``-token blocks of the real texts (EOS between texts), read a slice
    at a time until they fill ``limit`` blocks (the text that crosses the limit is kept whole)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in (ids for batch in token_batches(texts, tokenizer) for ids in batch):
        stream += ids + ([eos] if eos is not None else [])
        if len(stream) >= block_size * limit:
            break
    blocks = [stream[i:i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
    if not blocks:
        raise SelftrainError(f"adversarial mle_weight: the real text has fewer than mle_block_size={block_size} tokens")
    return blocks


# ---------------------------------------------------------------------- health and collapse
def health(model, tokenizer, disc, env: AdversarialEnv, held_back: list[str], config: AdversarialConfig,
           state: RunState) -> dict:
    """What one round did to the generator: held-out perplexity, the diversity of its samples, and
    how real they look to the discriminator (and whether it can still tell them from real texts it
    never trained on, ``held_back``)."""
    samples, generated, _ = env.sample(model, config.eval_samples, seed=state.seed + 12345)
    real = random.Random(state.seed).sample(held_back, min(len(samples), len(held_back)))
    ppl = heldout_perplexity(model, tokenizer, state.heldout, max_tokens=config.eval_tokens) if state.heldout else {}
    scores = accuracy(disc, real, samples)
    return {"heldout_ppl": round(ppl["heldout_ppl"], 3) if ppl else None,
            "self_bleu": round(self_bleu(generated), 4), "distinct_1": round(distinct_n(generated, 1), 4),
            "distinct_2": round(distinct_n(generated, 2), 4), "disc_score": round(scores["p_real_of_generated"], 4),
            "disc_accuracy": round(scores["accuracy"], 4)}


def collapse_reason(base: dict, now: dict, config: AdversarialConfig) -> str | None:
    """Why ``now``'s samples count as collapsed against the pre-adversarial ``base``, or None."""
    if now["self_bleu"] > base["self_bleu"] + config.max_self_bleu_rise:
        return (f"self-BLEU {base['self_bleu']:.3f} -> {now['self_bleu']:.3f} rose more than "
                f"max_self_bleu_rise {config.max_self_bleu_rise}")
    if now["distinct_2"] < base["distinct_2"] * config.min_distinct_ratio:
        return (f"distinct-2 {base['distinct_2']:.3f} -> {now['distinct_2']:.3f} fell below "
                f"min_distinct_ratio {config.min_distinct_ratio} of the start")
    return None


# ---------------------------------------------------------------------- saved rounds
def save_round(game_dir: Path, game: dict, model, tokenizer, disc: Discriminator, updater) -> None:
    """The round's generator and discriminator as one directory moved into place, then the state
    that names it; older rounds but the last healthy one are removed."""
    final = game_dir / f"round-{game['round']}"
    tmp = game_dir / f".round-{game['round']}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if model is not None:
        save_checkpoint(model, tokenizer, tmp / "generator")
    disc.save(tmp / "discriminator")
    updater.save(tmp / OPTIMIZER)
    replace_dir(tmp, final)
    atomic_write_json(game_dir / STATE, game)
    keep = {final.name, f"round-{game['healthy_round']}"}
    for old in game_dir.glob("round-*"):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)


def load_game(game_dir: Path) -> dict | None:
    path = game_dir / STATE
    if not path.is_file():
        return None
    game = json.loads(path.read_text())
    return game if (game_dir / f"round-{game['round']}").is_dir() else None


# ---------------------------------------------------------------------- approved samples
def approve(model, disc: Discriminator, env: AdversarialEnv, config: AdversarialConfig, *, seed: int,
            pool: Pool) -> tuple[list[dict], dict]:
    """The samples the discriminator finds most real, down to ``keep_fraction``, each adding enough
    unseen word pairs (the diversity floor) and none a copy of a pool text, the beginning of a real
    text, or a copy of another."""
    if config.synthesize == 0:
        return [], {"sampled": 0, "kept": 0}
    texts, completions, parents = env.sample(model, config.synthesize, seed=seed + 777)
    scores = disc.p_real(texts)
    target = max(1, round(config.keep_fraction * len(texts)))
    # only a sample that gets as far as the copy check is looked for (a short empty or low-scoring
    # one would let most of the pool past the prefilter of copies_in_pool)
    copies = copies_in_pool({" ".join(t.split()) for t, c, score in zip(texts, completions, scores)
                             if t.strip() and c.strip() and score >= config.min_score}, pool)
    seen: set[tuple[str, str]] = set()
    kept, rejected = [], {}
    for i in np.argsort(-scores, kind="stable"):
        if len(kept) >= target:
            break
        text, reason = texts[i].strip(), None
        pairs = set(zip(words(text), words(text)[1:]))
        if not text or not completions[i].strip():
            reason = "empty"
        elif scores[i] < config.min_score:
            reason = "below_min_score"
        elif " ".join(text.split()) in copies:
            reason = "duplicate"
        elif not pairs or len(pairs - seen) / len(pairs) < config.min_novel_bigrams:
            reason = "not_novel"
        if reason:
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        copies.add(" ".join(text.split()))
        seen |= pairs
        kept.append({"text": text, "score": round(float(scores[i]), 4), "parent_id": parents[i]})
    return kept, {"sampled": len(texts), "kept": len(kept), "rejected": rejected,
                  "mean_score": round(float(scores.mean()), 4),
                  "kept_mean_score": round(float(np.mean([k["score"] for k in kept])), 4) if kept else None,
                  "kept_distinct_2": round(distinct_n([k["text"] for k in kept], 2), 4) if kept else None}


def copies_in_pool(candidates: set[str], pool: Pool) -> set[str]:
    """The ``candidates`` (whitespace-normalised samples) that equal a pool text or begin a real one
    (a memorised beginning is no new text), found in one pass over the memory-mapped pool: the
    samples are few, the pool may be larger than memory, so the pool is streamed past them."""
    lengths = sorted({len(c) for c in candidates if c})
    shortest = lengths[0] if lengths else 0
    starts = {c[:shortest] for c in candidates}  # a real text no candidate can begin is passed at once
    found: set[str] = set()
    for batch in pool.ds.select_columns(["text", "origin"]).iter(batch_size=1000):
        for text, origin in zip(batch["text"], batch["origin"]):
            normal = " ".join(text.split())
            if normal in candidates:
                found.add(normal)
            if origin == "real" and lengths and normal[:shortest] in starts:
                found.update(start for n in lengths if n <= len(normal) and (start := normal[:n]) in candidates)
    return found


# ---------------------------------------------------------------------- summary and plot
def summary(records: list[dict]) -> dict:
    from selftrain.training.grpo import summarize

    return summarize(records, ["rewards/discriminator/mean", "env/disc_accuracy", "kl", "mle_loss"])


def plot_game(game: dict, path: Path) -> Path | None:
    if not game["records"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in game["records"]]
    rounds = game["rounds"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    per_step = [("discriminator accuracy on fresh samples", "env/disc_accuracy"),
                ("generator reward: P(real)", "rewards/discriminator/mean"), ("KL to the start model", "kl")]
    for ax, (title, key) in zip(axes[0], per_step):
        ax.plot(steps, [r.get(key, math.nan) for r in game["records"]], lw=1.2)
        for e in game["events"]:
            if e["event"] == "discriminator_weakened":
                ax.axvline(e["step"], color="orange", ls="--", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("generator step")
        ax.grid(alpha=0.3)
    per_round = [("held-out perplexity", "heldout_ppl"), ("self-BLEU-4 (higher: less varied)", "self_bleu"),
                 ("distinct-n of samples", "distinct_2")]
    for ax, (title, key) in zip(axes[1], per_round):
        xs = [r["round"] for r in rounds]
        ax.plot(xs, [r.get(key) if r.get(key) is not None else math.nan for r in rounds], marker="o",
                label=key.replace("_", "-"))
        if key == "distinct_2":
            ax.plot(xs, [r.get("distinct_1", math.nan) for r in rounds], marker="o", label="distinct-1")
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round (0: before the game)")
        ax.grid(alpha=0.3)
    fig.suptitle("adversarial game")
    fig.tight_layout()
    return atomic_write_figure(fig, path, dpi=100)
