"""Benchmark: the generation backend's ``fast`` engine against plain ``model.generate``.

The workloads are the prompts the stages send, at the batch sizes they use, built by the stages'
own code: GRPO self-play rollouts (8 problems x 8 samples of the solver prompt, 16 tokens,
temperature 0.7; the proposer prompt x 8, 32 tokens, temperature 1.0), the harness's 3-shot
greedy evaluation of `arith` (batch 16, cut at the task's stop strings) and the adversarial
stage's continuations of real text (prefixes x 4, 32 tokens, temperature 1.0). Both engines run
in this process on the same model and dtype.

Tokens counted are the ones kept: up to the end of sequence or the end of the first stop string.
Greedy outputs of the two engines are compared text for text.

    python bench/rollout.py [--model tiny|smollm2-135m|both] [--quick]

Ends with one JSON line; target: the fast engine's rollout tokens/s >= 3x plain ``generate`` on
the GRPO solver rollouts, identical greedy outputs on every workload.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import torch
from adapters import cpu_flags  # bench/ is on the path when run as a script

from selftrain.config import ModelConfig
from selftrain.data.sources import python_docstrings
from selftrain.evaluation.harness import build_prompt
from selftrain.modeling.chat import has_chat_template
from selftrain.modeling.factory import build_initial
from selftrain.modeling.generation import SamplingParams, TransformersBackend, _cut
from selftrain.stages.selfplay.proposer_solver import ProposerSolverEnv
from selftrain.tasks import load_task, sample_demos
from selftrain.tasks.families import Arithmetic
from selftrain.training.precision import resolve_precision

ROOT = Path(__file__).resolve().parent


def workloads(tok, docs: list[str], batches: int) -> dict[str, tuple[list[str], SamplingParams, int]]:
    """name -> (prompts, sampling, batch size), each from the code of the stage it stands for."""
    chat = has_chat_template(tok)
    env = ProposerSolverEnv(Arithmetic(digits=2), tok, chat=chat, seed=0)
    rng = random.Random(0)
    problems = [env.family.random_problem(rng) for _ in range(8 * batches)]
    for p in problems[:3]:
        env.buffer[p.key] = p  # the proposer prompt shows earlier problems
    solver = [env.solver_prompt(p) for p in problems for _ in range(8)]
    proposer = [env.proposer_prompt() for _ in range(8 * batches) for _ in range(8)]
    task = load_task("arith")
    rows = task.docs()
    demo_pool = task.fewshot_docs() or rows
    shots = []
    for row in rows[:16 * batches]:
        demos = sample_demos(demo_pool, 3, task.text(row), task, random.Random(task.text(row)))
        shots.append(build_prompt(task, task.text(row), [(task.text(d), task.target_text(d)) for d in demos],
                                  tok, chat=chat))
    prefixes = [tok.decode(tok(d, add_special_tokens=False)["input_ids"][:8]) for d in docs[:16 * batches]]
    continuations = [p for p in prefixes for _ in range(4)]
    return {
        "grpo-solver": (solver, SamplingParams(max_new_tokens=16, temperature=0.7, seed=0), 64),
        "grpo-proposer": (proposer, SamplingParams(max_new_tokens=32, temperature=1.0, seed=0), 64),
        "fewshot-eval": (shots, SamplingParams(max_new_tokens=task.generation.max_new_tokens, temperature=0,
                                               stop=tuple(task.generation.until), seed=0), 16),
        "adversarial": (continuations, SamplingParams(max_new_tokens=32, temperature=1.0, seed=0), 64),
    }


def kept_tokens(tok, completions: list[list[int]], stop: tuple[str, ...]) -> int:
    """Tokens up to the end of the first stop string (or all of them): what a caller keeps."""
    total = 0
    for ids in completions:
        if not stop:
            total += len(ids)
            continue
        n = len(ids)
        for j in range(1, len(ids) + 1):
            text = tok.decode(ids[:j], skip_special_tokens=True)
            if any(s in text for s in stop):
                n = j
                break
        total += n
    return total


def run_engine(model, tok, engine: str, prompts, sampling, batch_size, autocast) -> tuple[float, list, list[str]]:
    backend = TransformersBackend(model, tok, batch_size=batch_size, engine=engine)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        backend.generate_ids(prompts[:2], SamplingParams(max_new_tokens=2, temperature=0))  # warm-up
        start = time.perf_counter()
        _, completions = backend.generate_ids(prompts, sampling)
        seconds = time.perf_counter() - start
    texts = [_cut(t, sampling.stop) for t in tok.batch_decode(completions, skip_special_tokens=True)]
    return seconds, completions, texts


def bench_model(preset: str, batches: int) -> dict:
    docs = [d for d in python_docstrings() if len(d) > 80]
    t0 = time.perf_counter()
    model, tok, _ = build_initial(ModelConfig(preset=preset), docs[:2000], seed=0)
    model.eval()
    precision = resolve_precision("auto", "cpu")
    print(f"\n{preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, loaded in "
          f"{time.perf_counter() - t0:.0f}s; precision {precision}", flush=True)
    results = {}
    for name, (prompts, sampling, batch_size) in workloads(tok, docs, batches).items():
        row = {"prompts": len(prompts), "batch_size": batch_size}
        for engine in ("generate", "fast"):
            seconds, completions, _ = run_engine(model, tok, engine, prompts, sampling, batch_size, precision == "bf16")
            kept = kept_tokens(tok, completions, sampling.stop)
            row[engine] = {"seconds": round(seconds, 2), "kept_tokens": kept, "tokens_per_s": round(kept / seconds, 1)}
        greedy = SamplingParams(max_new_tokens=sampling.max_new_tokens, temperature=0, stop=sampling.stop, seed=0)
        check = prompts[:batch_size]
        same = [a == b for a, b in zip(run_engine(model, tok, "generate", check, greedy, batch_size, precision == "bf16")[2],
                                       run_engine(model, tok, "fast", check, greedy, batch_size, precision == "bf16")[2])]
        row["greedy_identical"] = f"{sum(same)}/{len(same)}"
        row["ratio"] = round(row["fast"]["tokens_per_s"] / row["generate"]["tokens_per_s"], 2)
        results[name] = row
        print(f"  {name:14s} batch {batch_size:3d}: generate {row['generate']['tokens_per_s']:7.1f} tok/s, "
              f"fast {row['fast']['tokens_per_s']:7.1f} tok/s, ratio {row['ratio']:.2f}; greedy identical "
              f"{row['greedy_identical']}", flush=True)
    return {"precision": precision, "workloads": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2-135m", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="one batch per workload instead of two")
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    print(f"CPU flags {cpu_flags()}; torch threads {torch.get_num_threads()}", flush=True)
    presets = ["tiny", "smollm2-135m"] if args.model == "both" else [args.model]
    out = {p: bench_model(p, 1 if args.quick else 2) for p in presets}
    solver = [out[p]["workloads"]["grpo-solver"]["ratio"] for p in presets]
    identical = all(w["greedy_identical"].split("/")[0] == w["greedy_identical"].split("/")[1]
                    for p in presets for w in out[p]["workloads"].values())
    value = min(solver)
    (ROOT / ".cache").mkdir(exist_ok=True)
    (ROOT / ".cache" / "rollout.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({"bench": "rollout", "metric": "grpo_rollout_tokens_per_s_fast_over_generate_min_over_models",
                      "value": value, "baseline": 1.0, "ratio": value, "target": 3.0,
                      "met": bool(value >= 3.0 and identical), "greedy_identical": identical,
                      "models": presets, "cpu_flags": cpu_flags(), "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
