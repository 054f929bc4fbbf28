"""Benchmark: the `pretrain` stage (transformers.Trainer) against a minimal plain-PyTorch loop.

Same model (tiny preset, identical initial weights), same packed blocks, batch, sequence length,
dtype and optimizer (AdamW + grad clipping). Reports tokens/s of both, their ratio (target >= 0.9)
and model-FLOPs utilisation against a matmul peak measured in this same process.

    python bench/pretrain.py [--steps 60] [--precision fp32|bf16] [--device cpu|cuda]

Trainer checkpoints are disabled here (save_steps > steps): we time the training loop, not disk I/O.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from selftrain.config import DataConfig, ModelConfig, RunConfig
from selftrain.data.packing import pack_texts
from selftrain.data.pool import Pool, prepare_corpus
from selftrain.modeling.factory import (
    build_initial,
    count_parameters,
    load_checkpoint,
    save_checkpoint,
)
from selftrain.stages.base import RunState
from selftrain.stages.pretrain import PretrainConfig, PretrainStage


def matmul_peak(device: str, dtype: torch.dtype, n: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of a large square matmul: the practical peak this process can reach."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def flops_per_token(model, seq: int) -> float:
    """6N for the dense weights plus attention scores (PaLM appendix B), forward + backward."""
    cfg = model.config
    n = count_parameters(model) - model.get_input_embeddings().weight.numel()
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq


def plain_loop(model, blocks, cfg: PretrainConfig, device: str, precision: str, seed: int) -> float:
    torch.manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    data = torch.tensor(blocks["input_ids"], dtype=torch.long)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    for step in range(cfg.max_steps):
        idx = order[(torch.arange(cfg.batch_size) + step * cfg.batch_size) % len(data)]
        x = data[idx].to(device)
        with autocast:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    return cfg.max_steps * cfg.batch_size * cfg.block_size / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=2, help="Alternating repeats of each arm; best is kept.")
    args = ap.parse_args()
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)

    train, heldout, _ = prepare_corpus(DataConfig(train="builtin:pydocs"), seed=0)
    texts = list(train["text"])
    model, tok, kind = build_initial(ModelConfig(preset="tiny"), texts, seed=0)
    cfg = PretrainConfig(max_steps=args.steps, block_size=128, batch_size=16, learning_rate=1e-3,
                         precision=args.precision, save_steps=10**9, logging_steps=10**9)
    blocks = pack_texts(texts, tok, cfg.block_size)

    with tempfile.TemporaryDirectory() as tmp:
        init = save_checkpoint(model, tok, Path(tmp) / "initial")
        run_cfg = RunConfig(model=ModelConfig(preset="tiny"), stages=["pretrain"])
        stage_rates, plain_rates = [], []
        for r in range(args.repeats):
            stage_dir = Path(tmp) / f"stage{r}"
            state = RunState(config=run_cfg, checkpoint=init, kind=kind, pool=Pool(train), heldout=[],
                             seed=0, stage_dir=stage_dir, device=args.device)
            result = PretrainStage().run(state, cfg)
            stage_rates.append(result.metrics["train_tokens_per_s"])
            fresh, _ = load_checkpoint(init, kind)
            plain_rates.append(plain_loop(fresh, blocks, cfg, args.device, args.precision, seed=0))
            print(f"repeat {r}: stage {stage_rates[-1]:.0f} tok/s, plain {plain_rates[-1]:.0f} tok/s", flush=True)

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = matmul_peak(args.device, dtype)
    fpt = flops_per_token(model, cfg.block_size)
    stage, plain = max(stage_rates), max(plain_rates)
    details = {"device": args.device, "precision": args.precision, "params": count_parameters(model),
               "steps": args.steps, "tokens_per_step": cfg.batch_size * cfg.block_size,
               "matmul_peak_tflops": peak / 1e12, "stage_mfu": stage * fpt / peak, "plain_mfu": plain * fpt / peak}
    print(json.dumps(details))
    ratio = stage / plain
    print(json.dumps({"bench": "pretrain", "metric": "train_tokens_per_s", "value": round(stage, 1),
                      "baseline": round(plain, 1), "ratio": round(ratio, 3), "target": 0.9, "met": ratio >= 0.9}))


if __name__ == "__main__":
    main()
