"""Curriculum training: LM blocks drawn easy to hard by a paced sampler, with self-paced
re-scoring, sequence-length warm-up, and the loss of each difficulty bucket traced over the steps.

``paced_lm_train`` is what the ``curriculum`` stage and a ``pretrain`` stage with
``order: {policy: paced}`` call. Texts are sorted by difficulty before packing, so a block holds
texts of like difficulty, and a block's difficulty is the token-weighted mean of its texts'.

Self-paced mode re-scores every block with the model being trained (its own mean token loss)
every ``rescore_every`` steps. The latest scores and the trace are written to the trainer
directory at each re-score and probe, so a killed run resumes with the ranking it had, not the
first one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TrainerCallback

from selftrain.data.pacing import (
    PacedSampler,
    PacingOptions,
    competence,
    is_constant,
    length_at,
    rank_rows,
)
from selftrain.data.packing import block_values, pack_texts
from selftrain.errors import SelftrainError
from selftrain.modeling.scoring import sequence_losses
from selftrain.training.lm import LMOptions, lm_train
from selftrain.workspace import atomic_write_text

PROBE_BUCKETS = 5  # difficulty quintiles whose loss is traced
PROBE_ROWS = 16  # rows per bucket: enough for a stable mean, cheap to score


class LengthWarmupCollator:
    """Causal packed blocks cut to the warm-up length of the current step: B blocks of S tokens
    become B*S/L rows of L tokens, so every token is still trained and a step's token count holds."""

    def __init__(self, length: Callable[[int], int]):
        self.length, self.step = length, 0

    def __call__(self, rows):
        ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
        ids = ids.reshape(-1, self.length(self.step))
        return {"input_ids": ids, "labels": ids.clone()}


class CurriculumCallback(TrainerCallback):
    """Re-scores the sampler's rows with the current model (self-paced), tells the length warm-up
    collator the step, and traces the mean loss of each difficulty bucket's probe rows."""

    def __init__(self, sampler: PacedSampler, rows: list[list[int]], probes: list[list[int]], *,
                 options: PacingOptions, probe_every: int, state_file: Path, trace: dict,
                 log: Callable[[dict], None], stage_key: str, collator: LengthWarmupCollator | None = None,
                 pad_id: int = 0):
        self.sampler, self.rows, self.probes, self.options = sampler, rows, probes, options
        self.probe_every, self.state_file, self.trace = probe_every, state_file, trace
        self.log, self.stage_key, self.collator, self.pad_id = log, stage_key, collator, pad_id

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not any(p["step"] == state.global_step for p in self.trace["bucket_loss"]):
            self.probe(model, state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.collator is not None:
            self.collator.step = state.global_step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        every = self.options.rescore_every
        if every and step % every == 0 and step < state.max_steps:
            self.sampler.rescore(sequence_losses(model, self.rows, pad_id=self.pad_id))
            self.trace["rescored_at"].append(step)
            self.save()
        if step % self.probe_every == 0 or step == state.max_steps:
            self.probe(model, step)

    def probe(self, model, step: int) -> None:
        losses = [sum(ls) / len(ls) for ls in
                  (sequence_losses(model, [self.rows[i] for i in rows], pad_id=self.pad_id) for rows in self.probes)]
        record = {"step": step, "competence": round(self.sampler.competence(step), 4), "losses": losses}
        self.trace["bucket_loss"].append(record)
        self.log({"stage": self.stage_key, "phase": "curriculum", **record})
        self.save()

    def save(self) -> None:
        atomic_write_text(self.state_file, json.dumps({"difficulty": self.sampler.difficulty, "trace": self.trace}))


def probe_rows(difficulty: list[float | None], seed: int) -> list[list[int]]:
    """Up to PROBE_ROWS rows from each difficulty quintile (easiest first), evenly spaced in rank."""
    ranking = [i for i in rank_rows(difficulty, "easy_first", seed) if difficulty[i] is not None]
    buckets = [ranking[len(ranking) * b // PROBE_BUCKETS:len(ranking) * (b + 1) // PROBE_BUCKETS]
               for b in range(PROBE_BUCKETS)]
    return [b[::max(1, len(b) // PROBE_ROWS)][:PROBE_ROWS] for b in buckets if b]


def schedule(options: PacingOptions, total_steps: int, block_size: int, points: int = 50) -> list[dict]:
    """Competence and row length at evenly spaced steps: the curve the plots draw."""
    steps = sorted({round(total_steps * k / points) for k in range(points + 1)})
    return [{"step": s, "competence": round(competence(s, total_steps, options), 4),
             "length": length_at(s, total_steps, block_size, options)} for s in steps]


def paced_lm_train(model, tokenizer, texts: list[str], difficulty: list[float | None], opts: LMOptions,
                   pacing: PacingOptions, *, block_size: int, objective: str, out_dir: Path, seed: int,
                   device: str, log: Callable[[dict], None] = lambda r: None, stage_key: str = "",
                   report_to: str = "none", probe_every: int | None = None,
                   callbacks: list | None = None) -> tuple[object, dict]:
    """Train ``model`` on ``texts`` packed into blocks and drawn under ``pacing`` by ``difficulty``
    (one value per text; None ranks last); return (model, metrics with the curriculum trace)."""
    if len(texts) != len(difficulty):
        raise SelftrainError(f"{len(texts)} texts but {len(difficulty)} difficulties")
    if pacing.length_warmup is not None and objective != "clm":
        raise SelftrainError("sequence-length warm-up (length_warmup) is for causal LM blocks; set it to null for mlm")
    if pacing.rescore_every is not None and objective != "clm":
        raise SelftrainError("self-paced re-scoring (rescore_every) scores with a causal LM's loss; set it to null for mlm")
    order = rank_rows(difficulty, "easy_first", seed)  # blocks of like difficulty; direction is the sampler's
    texts, difficulty = [texts[i] for i in order], [difficulty[i] for i in order]
    blocks = pack_texts(texts, tokenizer, block_size, objective)
    values = block_values(texts, difficulty, tokenizer, block_size, objective)
    fallback = None
    if pacing.pacing != "none" and is_constant(values):
        # No ranking to follow: a "curriculum" would only open random subsets. Train in random order.
        fallback = "every block is equally difficult: trained in random order (pacing none)"
        pacing = pacing.model_copy(update={"pacing": "none"})
        log({"stage": stage_key, "phase": "curriculum", "warning": fallback})
    probes = probe_rows(values, seed)  # by the first difficulty, so a resumed run probes the same rows
    out_dir = Path(out_dir)
    state_file = out_dir / "curriculum_state.json"
    trace = {"bucket_loss": [], "rescored_at": []}
    if state_file.is_file():  # a killed attempt: resume with the ranking and trace it had
        saved = json.loads(state_file.read_text())
        if len(saved["difficulty"]) == len(values):
            values, trace = saved["difficulty"], saved["trace"]
    per_step = opts.batch_size * opts.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))
    sampler = PacedSampler(values, pacing, total_steps=opts.max_steps, per_step=per_step, seed=seed)
    collator = None
    if pacing.length_warmup is not None:
        collator = LengthWarmupCollator(lambda step: length_at(step, opts.max_steps, block_size, pacing))
    rows = list(blocks["input_ids"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    callback = CurriculumCallback(sampler, rows, probes, options=pacing,
                                  probe_every=probe_every or max(1, opts.max_steps // 10), state_file=state_file,
                                  trace=trace, log=log, stage_key=stage_key, collator=collator, pad_id=pad)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, metrics = lm_train(model, tokenizer, blocks, opts, objective=objective, out_dir=out_dir, seed=seed,
                              device=device, log=log, stage_key=stage_key, report_to=report_to, order=sampler,
                              callbacks=[callback, *(callbacks or [])], collator=collator)
    known = [v for v in values if v is not None]
    return model, {**metrics, "blocks": len(blocks), "pacing": pacing.model_dump(), "fallback": fallback,
                   "block_difficulty": {"min": min(known), "max": max(known), "mean": sum(known) / len(known)},
                   "schedule": schedule(pacing, opts.max_steps, block_size), **trace}


def draw_curriculum(metrics: dict, competence_path: Path, buckets_path: Path) -> dict[str, Path]:
    """Two PNGs from ``paced_lm_train``'s metrics: competence (and row length) over the steps,
    and the mean loss of each difficulty bucket's probe rows over the steps."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from selftrain.workspace import atomic_write_bytes

    def save(fig, path: Path) -> Path:
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        atomic_write_bytes(path, buffer.getvalue())
        return path

    pacing, sched = metrics["pacing"], metrics["schedule"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([p["step"] for p in sched], [p["competence"] for p in sched], color="tab:blue", label="competence")
    for s in metrics.get("rescored_at", []):
        ax.axvline(s, color="grey", lw=0.6, ls=":")
    ax.set(xlabel="optimizer step", ylabel="share of the ranking open", ylim=(0, 1.05),
           title=f"pacing {pacing['pacing']} (c0={pacing['c0']}, ramp={pacing['ramp']}, {pacing['direction']})"
                 + (", dotted: self-paced re-scoring" if metrics.get("rescored_at") else ""))
    if pacing.get("length_warmup"):
        twin = ax.twinx()
        twin.step([p["step"] for p in sched], [p["length"] for p in sched], where="post", color="tab:orange")
        twin.set_ylabel("tokens per row (length warm-up)", color="tab:orange")
    paths = {"curriculum_competence": save(fig, competence_path)}

    probes = metrics.get("bucket_loss") or []
    if probes:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        cmap = plt.get_cmap("viridis")
        n = len(probes[0]["losses"])
        for b in range(n):
            ax.plot([p["step"] for p in probes], [p["losses"][b] for p in probes], marker=".",
                    color=cmap(b / max(1, n - 1)), label=f"bucket {b + 1}" + (" (easiest)" if b == 0 else
                                                                               " (hardest)" if b == n - 1 else ""))
        ax.set(xlabel="optimizer step", ylabel="mean token loss of the bucket's probe rows",
               title="loss per difficulty bucket (first difficulty ranking)")
        ax.legend(fontsize=8, frameon=False)
        paths["curriculum_bucket_loss"] = save(fig, buckets_path)
    return paths
