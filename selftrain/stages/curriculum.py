"""Stage `curriculum` — curriculum learning: the model grades its own data and learns easy to hard.

1. **Difficulty.** Every text in the pool gets a ``difficulty`` annotation from the scorers in
   ``difficulty`` (``selftrain.evaluation.difficulty``: length, rarity, the model's own loss, its
   cluster's mean loss, its solve rate on a task family); several scorers are combined by mean
   percentile rank. Higher is harder.
2. **Training** (``train: true``): causal LM on the pool, packed by difficulty and drawn under
   the pacing options (competence from ``c0`` to 1 over ``ramp`` of the steps; Platanios et al.
   2019), optionally self-paced (re-scored with the current model every ``rescore_every`` steps)
   and with sequence-length warm-up (``selftrain.training.curriculum``).
3. **Order for later stages** (``publish: true``): the artefact ``curriculum`` names the column and
   the pacing; a later training stage with no ``order`` of its own trains under it.

Plots: competence over the steps, and the loss of each difficulty bucket over the steps.
"""

from __future__ import annotations

import json
import shutil
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from selftrain.data.order import column_values
from selftrain.data.pacing import PacingOptions, is_constant
from selftrain.data.pool import Pool
from selftrain.errors import SelftrainError
from selftrain.evaluation import difficulty as scorers
from selftrain.modeling.chat import use_chat
from selftrain.modeling.factory import save_checkpoint
from selftrain.stages.base import (
    RunState,
    Stage,
    StageConfig,
    StageResult,
    code_span,
    fmt,
    register,
)
from selftrain.tasks.families import make_family
from selftrain.training.adapters import check_adapter
from selftrain.training.curriculum import draw_curriculum, paced_lm_train
from selftrain.training.lm import LMOptions, check_lm_input
from selftrain.workspace import atomic_write_text

Scorer = Literal["length", "rarity", "self_loss", "cluster_loss", "solve_rate"]


class CurriculumConfig(StageConfig, LMOptions, PacingOptions):
    option_prefix: ClassVar[str] = "curriculum."

    difficulty: list[Scorer] = Field(
        default_factory=lambda: ["self_loss"],
        description="Scorer(s): length, rarity, self_loss, cluster_loss, solve_rate; several are rank-combined.")
    max_tokens: int = Field(256, ge=2, description="self_loss / cluster_loss: tokens of each text scored.")
    family: str | None = Field(None, description="solve_rate: the task family whose problems the texts state (arithmetic, strings).")
    samples: int = Field(4, ge=1, description="solve_rate: sampled answers per problem.")
    chat: bool | Literal["auto"] = Field("auto", description="solve_rate: ask through the chat template (auto: when the tokenizer has one).")
    train: bool = Field(True, description="Train the model under the curriculum in this stage (false: only score and publish).")
    block_size: int = Field(128, ge=8, description="Tokens per packed training block.")
    data: Literal["pool", "real"] = Field("pool", description="Score and train the whole pool or only real text.")
    publish: bool = Field(True, description="Later training stages with no `order` of their own train under this pacing.")

    @field_validator("difficulty", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _scorers_fit(self):
        if not self.difficulty:
            raise ValueError("difficulty needs at least one scorer")
        if "solve_rate" in self.difficulty and not self.family:
            raise ValueError("difficulty solve_rate needs `family` (the task family the texts state problems of)")
        return self

    def pacing_options(self) -> PacingOptions:
        return PacingOptions(**{k: getattr(self, k) for k in PacingOptions.model_fields})


@register
class CurriculumStage(Stage):
    name = "curriculum"
    Config = CurriculumConfig

    def runs_model_code(self, config: CurriculumConfig) -> bool:
        return "solve_rate" in config.difficulty and config.family == "python"  # parsing runs the program

    def preflight(self, config, *, model, tokenizer, kind, train_texts):
        model_based = [s for s in config.difficulty if s in scorers.MODEL_BASED]
        if kind != "causal" and model_based:
            raise SelftrainError(f"curriculum.difficulty={model_based[0]} asks a causal LM (its own next-token loss "
                                 f"or answers); this model is {kind}: use length or rarity")
        if kind != "causal" and config.train and (config.rescore_every or config.length_warmup):
            raise SelftrainError("curriculum: rescore_every and length_warmup need a causal LM")
        if config.family:
            make_family(config.family)  # an unknown family fails here, not mid-run
        if config.train:
            if kind != "causal":
                raise SelftrainError("curriculum.train trains a causal LM; set train: false to only score (or use "
                                     "pretrain with order: {policy: paced} for a masked model)")
            check_adapter(config.adapter, model)
            check_lm_input(config, model, tokenizer, train_texts, config.block_size)

    def run(self, state: RunState, config: CurriculumConfig) -> StageResult:
        model, tokenizer = state.load_model()
        ds = state.pool.ds
        rows = np.arange(len(ds)) if config.data == "pool" else state.pool.positions("real")
        chosen = ds.select_columns(["id", "text"])  # memory-mapped: read a batch at a time
        if config.data != "pool":
            chosen = chosen.select(rows)
        ids, texts = Pool(chosen).ids(), chosen["text"]
        cache: dict = {}  # self_loss, computed once when cluster_loss needs it too
        scores = {name: self.score(name, model, tokenizer, texts, ds, rows, config, state, cache)
                  for name in config.difficulty}
        difficulty = scores[config.difficulty[0]] if len(scores) == 1 else scorers.rank_combination(list(scores.values()))
        known = [i for i, d in enumerate(difficulty) if d is not None]
        if not known:
            raise SelftrainError(f"curriculum: no text got a difficulty from {', '.join(config.difficulty)}")
        ranked = sorted(known, key=lambda i: difficulty[i])  # stable: ties keep pool order
        metrics: dict = {
            "scorers": config.difficulty, "scored": len(known), "texts": len(texts),
            "constant": is_constant(difficulty),
            "difficulty": {"min": difficulty[ranked[0]], "max": difficulty[ranked[-1]],
                           "mean": sum(difficulty[i] for i in known) / len(known)},
            "length_rank_correlation": length_correlation(difficulty, texts, tokenizer),
            "easiest": [t[:160] for t in texts[ranked[:3]]], "hardest": [t[:160] for t in texts[ranked[-3:]]],
        }
        result = StageResult(annotations={"difficulty": {i: d for i, d in zip(ids, difficulty) if d is not None}})
        pacing = config.pacing_options()
        if config.publish:
            path = state.stage_dir / "curriculum.json"
            atomic_write_text(path, json.dumps({"column": "difficulty", "pacing": pacing.model_dump()}, indent=2))
            result.artefacts["curriculum"] = path
        if config.train:
            trainer_dir = state.stage_dir / "trainer"
            model, train_metrics = paced_lm_train(
                model, tokenizer, chosen, difficulty, config, pacing, block_size=config.block_size, objective="clm",
                out_dir=trainer_dir, seed=state.seed, device=state.device, log=state.log,
                stage_key=state.stage_key, report_to=state.config.run.report_to,
                blocks_path=state.stage_dir / "blocks.arrow")
            result.checkpoint = save_checkpoint(model, tokenizer, state.stage_dir / "model")
            shutil.rmtree(trainer_dir, ignore_errors=True)
            (state.stage_dir / "blocks.arrow").unlink(missing_ok=True)
            result.artefacts.update(draw_curriculum(train_metrics, state.stage_dir / "competence.png",
                                                    state.stage_dir / "bucket_loss.png"))
            metrics.update(train_metrics)
        result.metrics = metrics
        return result

    @staticmethod
    def score(name: str, model, tokenizer, texts, ds, rows, config: CurriculumConfig, state: RunState,
              cache: dict) -> list:
        if name == "length":
            return scorers.length(texts, tokenizer)
        if name == "rarity":
            return scorers.rarity(texts, tokenizer)
        if name == "solve_rate":
            family = make_family(config.family)
            out = scorers.solve_rate(model, tokenizer, texts, family, samples=config.samples, seed=state.seed,
                                     chat=use_chat(config.chat, tokenizer, what="curriculum.chat"))
            if all(v is None for v in out):
                raise SelftrainError(f"curriculum.difficulty=solve_rate: no text states a problem the {config.family} "
                                     "family can parse; use a model-free or self_loss scorer for this pool")
            return out
        if "self_loss" not in cache:
            cache["self_loss"] = scorers.self_loss(model, tokenizer, texts, max_tokens=config.max_tokens, progress=True)
        losses = cache["self_loss"]
        if name == "self_loss":
            return losses
        if "cluster" not in ds.column_names:  # cluster_loss (checked first: its message says what to run)
            raise SelftrainError("curriculum.difficulty=cluster_loss needs the `cluster` column: run the cluster "
                                 "stage before this one")
        return scorers.cluster_loss(losses, column_values(ds, "cluster", rows))

    def report(self, entry: dict) -> str:
        m = entry["stage_metrics"]
        if "scorers" not in m:
            return ""
        d = m["difficulty"]
        lines = [f"Difficulty of {m['scored']} of {m['texts']} texts by {' + '.join(m['scorers'])}"
                 f" (min {fmt(d['min'], 3)}, mean {fmt(d['mean'], 3)}, max {fmt(d['max'], 3)}; rank correlation "
                 f"with length {fmt(m.get('length_rank_correlation'), 2)})."]
        if m.get("constant"):
            lines.append("Every text scored the same: there is no easy-to-hard order"
                         + (", so training ran in random order." if "pacing" in m else "."))
        if "pacing" in m:
            p = m["pacing"]
            resc = f", re-scored at steps {m['rescored_at']}" if m.get("rescored_at") else ""
            lines += ["", f"Trained {p['pacing']} pacing ({p['direction']}, c0 {p['c0']}, ramp {p['ramp']}{resc}) on "
                          f"{m['blocks']} blocks: logged loss {fmt(m.get('first_logged_loss'), 3)} -> "
                          f"{fmt(m.get('last_logged_loss'), 3)}, {fmt(m.get('train_tokens_per_s'), 0)} tokens/s."]
            probes = m.get("bucket_loss") or []
            if probes:
                lines += ["", "| step | competence | " + " | ".join(f"bucket {b + 1}" for b in range(len(probes[0]["losses"])))
                          + " |", "|---|---|" + "---|" * len(probes[0]["losses"])]
                lines += [f"| {p['step']} | {p['competence']:.2f} | " + " | ".join(f"{x:.3f}" for x in p["losses"]) + " |"
                          for p in probes]
        lines += ["", "Easiest: " + " / ".join(code_span(t, 60) for t in m["easiest"]),
                  "Hardest: " + " / ".join(code_span(t, 60) for t in m["hardest"])]
        arts = entry.get("artefacts") or {}
        for name, title in (("curriculum_competence", "competence"), ("curriculum_bucket_loss", "loss per bucket")):
            if name in arts:
                lines += ["", f"![{title}]({arts[name]})"]
        return "\n".join(lines)


def length_correlation(difficulty: list, texts: list[str], tokenizer) -> float | None:
    """Spearman correlation of difficulty with token length: how much of the ranking is length alone."""
    pairs = [(d, n) for d, n in zip(difficulty, scorers.length(texts, tokenizer)) if d is not None]
    if len(pairs) < 3 or len({d for d, _ in pairs}) < 2 or len({n for _, n in pairs}) < 2:
        return None
    from scipy.stats import spearmanr

    return round(float(spearmanr([d for d, _ in pairs], [n for _, n in pairs]).statistic), 4)
