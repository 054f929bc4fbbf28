"""A short check of the GPU paths of `selftrain.training` (not a test: CI has no GPU).

One run on CUDA with `precision: auto` (bf16 where the GPU has it) and `run.report_to:
tensorboard`, stages: pretrain (all weights), pretrain with a LoRA adapter, selfplay/spin (DPO
with an adapter: the reference is the adapter switched off) and selfplay/tasks (GRPO, bf16
autocast rollouts). Prints one JSON line per stage (decision, precision, loss first -> last,
tokens/s, tracking files) and one summary line; exits 1 if a stage failed.

    python scripts/gpu_check.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from selftrain.config import config_from_dict
from selftrain.runner import Runner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp()) / "gpu-check")
    ap.add_argument("--smoke", action="store_true", help="CPU, a few steps: that the script runs")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device")
    steps = (lambda n: 2) if args.smoke else (lambda n: n)
    arch = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 4, "max_position_embeddings": 256}
    lora = {"r": 8, "target_modules": "all-linear"}
    cfg = config_from_dict({
        "run": {"name": "gpu-check", "output_dir": str(args.out), "device": "cpu" if args.smoke else "cuda", "report_to": "tensorboard"},
        "model": {"preset": "tiny", "vocab_size": 2048, "architecture": arch},
        "data": {"train": "builtin:pydocs", "max_documents": 3000},
        "guard": {"tolerance": 10.0},  # every stage is judged here by its own numbers, not rolled back
        "eval": {"max_tokens": 8192, "samples": 8},
        "stages": [
            {"pretrain": {"max_steps": steps(150), "batch_size": 32, "learning_rate": 2e-3}},
            {"pretrain": {"max_steps": steps(60), "batch_size": 32, "learning_rate": 2e-3, "adapter": lora}},
            {"selfplay": {"env": "spin", "num_prompts": 32, "max_steps": steps(8), "batch_size": 8, "prefix_tokens": 16,
                          "continuation_tokens": 16, "learning_rate": 1e-4, "adapter": lora}},
            {"selfplay": {"env": "tasks", "problem_source": "generator", "max_steps": steps(4), "num_generations": 8,
                          "groups_per_step": 4, "learning_rate": 1e-4, "adapter": lora}},
        ],
    })
    manifest = Runner(cfg).run()
    failed = 0
    for e in manifest["stages"]:
        m = e.get("stage_metrics") or {}
        tracking = sorted(str(p.relative_to(args.out)) for p in (args.out / "stages" / e["key"]).rglob("events.out.*"))
        failed += e["status"] == "failed"
        print(json.dumps({"stage": e["key"], "status": e["status"], "reason": e.get("reason"),
                          "precision": m.get("precision"), "adapter": m.get("adapter"),
                          "loss": [m.get("first_logged_loss"), m.get("last_logged_loss")],
                          "tokens_per_s": m.get("train_tokens_per_s"), "ppl": [e["metrics_before"].get("heldout_ppl"),
                                                                               (e.get("metrics_after") or {}).get("heldout_ppl")],
                          "signals": {k: v for k, v in m.items() if k.endswith(("/first", "/last"))},
                          "tracking_files": tracking}, default=str))
    gpu = torch.cuda.is_available()
    print(json.dumps({"gpu": torch.cuda.get_device_name() if gpu else None, "torch": torch.__version__,
                      "bf16": gpu and torch.cuda.is_bf16_supported(), "stages_failed": failed}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
