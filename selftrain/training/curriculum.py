"""Curriculum training: LM blocks drawn easy to hard by a paced sampler, with self-paced
re-scoring, sequence-length warm-up, and the loss of each difficulty bucket traced over the steps.

``paced_lm_train`` is what the ``curriculum`` stage and a ``pretrain`` stage with
``order: {policy: paced}`` call. Texts are sorted by difficulty before packing, so a block holds
texts of like difficulty, and a block's difficulty is the token-weighted mean of its texts'.

Self-paced mode re-scores every block with the model being trained (its own mean token loss)
every ``rescore_every`` steps. The sampler's ranking history and the trace are saved into every
Trainer checkpoint, so a killed run resumes with the rankings it had, not the first one, and
draws what the uninterrupted run drew.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import torch
from transformers import TrainerCallback

from selftrain import distributed
from selftrain.data.arrowfile import text_batches
from selftrain.data.pacing import (
    PacedSampler,
    PacingOptions,
    check_difficulty,
    competence,
    is_constant,
    length_at,
    rank_rows,
)
from selftrain.data.packing import pack_batches
from selftrain.errors import SelftrainError
from selftrain.modeling.scoring import sequence_losses
from selftrain.training.lm import LMOptions, last_complete_checkpoint, lm_train
from selftrain.workspace import atomic_write_figure, atomic_write_text

PROBE_BUCKETS = 5  # difficulty quintiles whose loss is traced
PROBE_ROWS = 16  # rows per bucket: enough for a stable mean, cheap to score
STATE_FILE = "curriculum_state.json"  # beside each Trainer checkpoint


class LengthWarmupCollator:
    """Causal packed blocks cut to the warm-up length of their step: B blocks of S tokens become
    B*S/L rows of L tokens, so every token is still trained and a step's token count holds.

    The step is counted from the micro-batches collated (``micro_per_step`` per optimizer step,
    from ``start_step`` on a resume), not told by a callback: the data loader collates a batch
    before the trainer's step begins, so a told step would lag."""

    def __init__(self, length: Callable[[int], int], micro_per_step: int, start_step: int = 0):
        self.length, self.micro_per_step, self.start_step, self.calls = length, micro_per_step, start_step, 0

    def __call__(self, rows):
        step = self.start_step + self.calls // self.micro_per_step
        self.calls += 1
        ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
        ids = ids.reshape(-1, self.length(step))
        return {"input_ids": ids, "labels": ids.clone()}


class CurriculumCallback(TrainerCallback):
    """Self-paced re-scoring (``score(model)`` -> a difficulty per sampler row, every
    ``rescore_every`` steps, in force two steps later: the loader has drawn the next one already),
    the loss of each difficulty bucket's probe rows (``probe(model)`` -> a loss per bucket), and
    the sampler's ranking history and trace saved into each Trainer checkpoint, so a resumed run
    goes on with the ranking it had."""

    def __init__(self, sampler: PacedSampler, options: PacingOptions, *, score: Callable | None,
                 probe: Callable | None, probe_every: int, trace: dict, log: Callable[[dict], None], stage_key: str):
        self.sampler, self.options, self.score, self.probe = sampler, options, score, probe
        self.probe_every, self.trace, self.log, self.stage_key = probe_every, trace, log, stage_key

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:  # a resumed run has its earlier records from the checkpoint
            self.record(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        every = self.options.rescore_every
        if self.score is not None and every and step % every == 0 and step + 2 < state.max_steps:
            self.sampler.rescore(self.score(model), from_step=step + 2)
            self.trace["rescored_at"].append(step)
            self.log({"stage": self.stage_key, "phase": "curriculum", "step": step, "rescored": True})
        if step % self.probe_every == 0 or step == state.max_steps:
            self.record(model, step)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            atomic_write_text(checkpoint / STATE_FILE, json.dumps({"history": self.sampler.history, "trace": self.trace}))

    def record(self, model, step: int) -> None:
        if self.probe is None:
            return
        record = {"step": step, "competence": round(self.sampler.competence(step), 4), "losses": self.probe(model)}
        self.trace["bucket_loss"].append(record)
        self.log({"stage": self.stage_key, "phase": "curriculum", **record})


def resumed_state(out_dir: Path) -> tuple[int, list | None, dict]:
    """(step, ranking history, trace) saved with the checkpoint a resumed Trainer will load;
    (0, None, empty trace) when there is none. The trace keeps only what came before that step.

    The Trainer marks a checkpoint complete before ``on_save`` adds the curriculum's state, so a
    checkpoint without it was cut in between: it is removed and the one before it is resumed."""
    empty = {"bucket_loss": [], "rescored_at": []}
    while (checkpoint := last_complete_checkpoint(out_dir)) is not None and not (checkpoint / STATE_FILE).is_file():
        shutil.rmtree(checkpoint)
    if checkpoint is None:
        return 0, None, empty
    step = int(checkpoint.name.split("-")[-1])
    saved = json.loads((checkpoint / STATE_FILE).read_text())
    trace = {"bucket_loss": [p for p in saved["trace"]["bucket_loss"] if p["step"] <= step],
             "rescored_at": [s for s in saved["trace"]["rescored_at"] if s <= step]}
    return step, saved["history"], trace


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


def paced_lm_train(model, tokenizer, texts: Sequence[str] | datasets.Dataset, difficulty: list[float | None],
                   opts: LMOptions, pacing: PacingOptions, *, block_size: int, objective: str, out_dir: Path,
                   seed: int, device: str, log: Callable[[dict], None] = lambda r: None, stage_key: str = "",
                   report_to: str = "none", probe_every: int | None = None, callbacks: list | None = None,
                   blocks_path: Path | None = None) -> tuple[object, dict]:
    """Train ``model`` on ``texts`` packed into blocks and drawn under ``pacing`` by ``difficulty``
    (one value per text; None ranks last); return (model, metrics with the curriculum trace).

    ``texts`` may be a dataset with a ``text`` column (a memory-mapped pool's rows): it is read in
    difficulty order a batch at a time, and with ``blocks_path`` the blocks are written there, so
    a corpus larger than memory trains under a curriculum too (the caller removes the file)."""
    if len(texts) != len(difficulty):
        raise SelftrainError(f"{len(texts)} texts but {len(difficulty)} difficulties")
    check_difficulty(difficulty)
    if objective != "clm" and (pacing.length_warmup is not None or pacing.rescore_every is not None):
        raise SelftrainError("length_warmup and rescore_every need a causal LM: set them to null for mlm")
    if (pacing.length_warmup is not None or pacing.rescore_every) and opts.trainer_args.get("dataloader_num_workers"):
        # workers collate apart from the trainer and draw many steps ahead of a re-score
        raise SelftrainError("length_warmup and rescore_every need the data drawn in the training process: "
                             "drop trainer_args.dataloader_num_workers")
    docs = texts if isinstance(texts, datasets.Dataset) else datasets.Dataset.from_dict({"text": list(texts)})
    order = rank_rows(difficulty, "easy_first", seed)  # blocks of like difficulty; direction is the sampler's
    packed = pack_batches(text_batches(docs.select(order), size=2000), tokenizer, block_size, objective,
                          path=blocks_path, value_batches=([difficulty[i] for i in order[k:k + 2000]]
                                                           for k in range(0, len(order), 2000)))
    values = packed["value"][:]
    blocks = packed.select_columns(["input_ids"])
    fallback = None
    if pacing.pacing != "none" and is_constant(values):
        # No ranking to follow: a "curriculum" would open arbitrary subsets. The sampler draws in
        # random order until a re-score (self-paced) gives it one.
        fallback = "every block is equally difficult: random order" + (
            " until the first re-score" if pacing.rescore_every else " (pacing none)")
        if not pacing.rescore_every:
            pacing = pacing.model_copy(update={"pacing": "none"})
        log({"stage": stage_key, "phase": "curriculum", "warning": fallback})
    out_dir = Path(out_dir)
    # a killed attempt: go on with its ranking (rank 0's: the other ranks keep no checkpoints)
    start_step, history, trace = distributed.broadcast(resumed_state(out_dir))
    per_step = opts.batch_size * opts.grad_accum  # batch_size is the global batch, split over the ranks
    sampler = PacedSampler(values, pacing, total_steps=opts.max_steps, per_step=per_step, seed=seed, history=history)
    collator = None
    if pacing.length_warmup is not None:
        collator = LengthWarmupCollator(lambda step: length_at(step, opts.max_steps, block_size, pacing),
                                        opts.grad_accum, start_step)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    probes = [blocks[p]["input_ids"] for p in probe_rows(values, seed)] if objective == "clm" else []  # by the first ranking

    def probe(m):
        return [sum(ls) / len(ls) for ls in (sequence_losses(m, rows, pad_id=pad) for rows in probes)]

    def score(m):  # every block's loss, read from the (memory-mapped) blocks a chunk at a time
        return [loss for k in range(0, len(blocks), 4096)
                for loss in sequence_losses(m, blocks[k:k + 4096]["input_ids"], pad_id=pad)]

    callback = CurriculumCallback(sampler, pacing, score=score if objective == "clm" else None,
                                  probe=probe if probes else None,
                                  probe_every=probe_every or max(1, opts.max_steps // 10), trace=trace, log=log,
                                  stage_key=stage_key)
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, path: Path) -> Path:
        fig.tight_layout()
        return atomic_write_figure(fig, path)

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
