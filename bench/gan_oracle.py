"""Benchmark: the synthetic-oracle test of the text-GAN literature (SeqGAN, LeakGAN, Texygen), and
the same game on real text.

(a) oracle. A randomly initialised LSTM (fixed seed; vocabulary 5,000, hidden 32, parameters drawn
from N(0, 1) as SeqGAN's) writes 10,000 training sequences of 20 tokens and 2,000 test ones. A
generator (a tiny Llama of hidden size 32 on a word-level tokenizer "t0".."t4999") is trained by
maximum likelihood (``training.lm_train``), then by the `adversarial` stage (its real code path:
discriminator pre-training and calibration, GRPO on P(real) with KL and an MLE term, weakening,
collapse checks). Reported side by side for MLE and adversarial:

- NLL-oracle: the oracle's mean per-token NLL of 5,000 generator samples (lower: the samples are
  more like what the oracle writes);
- NLL-test: the generator's mean per-token NLL of the test sequences (lower: it covers the data);
- wall time. Also MLE sampled at temperatures 0.9 and 0.8 (Caccia et al. 2020: a colder MLE
  model also lowers NLL-oracle; the honest baseline for a GAN's gain).

Target: adversarial NLL-oracle below MLE's (SeqGAN: 9.04 -> 8.74) with NLL-test rising <= 5%.

(b) pydocs. A tiny Llama pretrained on the standard library's docstrings (MLE), then the
`adversarial` stage through the runner: held-out perplexity and distinct-n of MLE vs adversarial.

    python bench/gan_oracle.py [--part a|b|all] [--quick]

Ends with one JSON line (part a's NLL-oracle ratio, adversarial / MLE).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch
from torch import nn

from selftrain.config import config_from_dict
from selftrain.data.pool import Pool, make_examples, to_dataset
from selftrain.modeling.factory import load_checkpoint, save_checkpoint
from selftrain.modeling.generation import SamplingParams, TransformersBackend
from selftrain.stages.adversarial import AdversarialConfig, AdversarialStage
from selftrain.stages.base import RunState
from selftrain.training.lm import LMOptions, lm_train
from selftrain.training.precision import resolve_precision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapters import cpu_flags  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"
VOCAB, LENGTH, HIDDEN = 5000, 20, 32


# ----------------------------------------------------------------------------- the oracle
class OracleLSTM(nn.Module):
    """SeqGAN's oracle: an LSTM language model whose every parameter is drawn from N(0, 1)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.lstm = nn.LSTM(HIDDEN, HIDDEN, batch_first=True)
        self.out = nn.Linear(HIDDEN, VOCAB)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    @torch.no_grad()
    def sample(self, n: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        token, state, out = torch.zeros(n, 1, dtype=torch.long), None, []  # token 0 starts, as SeqGAN's
        for _ in range(LENGTH):
            h, state = self.lstm(self.embed(token), state)
            token = torch.multinomial(torch.softmax(self.out(h[:, -1]), -1), 1, generator=gen)
            out.append(token)
        return torch.cat(out, 1)

    @torch.no_grad()
    def nll(self, seqs: list[list[int]]) -> float:
        """Mean per-token negative log-likelihood under the oracle."""
        total, count = 0.0, 0
        for i in range(0, len(seqs), 500):
            batch = seqs[i:i + 500]
            width = max(map(len, batch))
            ids = torch.tensor([s + [0] * (width - len(s)) for s in batch])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch], dtype=torch.bool)
            inputs = torch.cat([torch.zeros(len(batch), 1, dtype=torch.long), ids[:, :-1]], 1)
            logp = torch.log_softmax(self.out(self.lstm(self.embed(inputs))[0]), -1)
            nll = -logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            total += float(nll[mask].sum())
            count += int(mask.sum())
        return total / count


def word_tokenizer():
    """"t0".."t4999" at ids 0..4999 (so generator ids are oracle tokens), then the specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    vocab.update({"<s>": VOCAB, "</s>": VOCAB + 1, "<pad>": VOCAB + 2, "<unk>": VOCAB + 3})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=64)


def text(seq: list[int]) -> str:
    return " ".join(f"t{i}" for i in seq)


def generator_samples(model, tok, n: int, temperature: float, seed: int) -> list[list[int]]:
    backend = TransformersBackend(model, tok, batch_size=500)
    _, out = backend.generate_ids([""] * n, SamplingParams(max_new_tokens=LENGTH, temperature=temperature, seed=seed))
    return [[t for t in ids[:next((k for k, t in enumerate(ids) if t >= VOCAB), len(ids))]] or [0] for ids in out]


@torch.no_grad()
def nll_test(model, tok, seqs: list[list[int]], temperature: float = 1.0) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(seqs), 500):
        ids = torch.tensor([[tok.bos_token_id] + s for s in seqs[i:i + 500]])
        logits = model(input_ids=ids).logits[:, :-1].float() / temperature
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                        reduction="sum"))
        count += ids[:, 1:].numel()
    return total / count


def part_a(args, work: Path) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    oracle = OracleLSTM(seed=0)
    train = oracle.sample(args.train_seqs, seed=1).tolist()
    test = oracle.sample(2000, seed=2).tolist()
    real_samples = oracle.sample(5000, seed=3).tolist()
    tok = word_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=32, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    print(f"(a) oracle: {len(train)} training sequences; the oracle's own NLL of its samples "
          f"{oracle.nll(real_samples):.3f}", flush=True)
    blocks = datasets.Dataset.from_dict({"input_ids": [[tok.bos_token_id] + s for s in train]})
    steps = args.mle_epochs * math.ceil(len(train) / 64)
    cached = CACHE / f"oracle-mle-{len(train)}-{args.mle_epochs}"  # the MLE model is the same every run: train it once
    start = time.perf_counter()
    if (cached / "mle_seconds.txt").is_file():
        model, _ = load_checkpoint(cached, "causal")
        mle_seconds = float((cached / "mle_seconds.txt").read_text())
        print(f"  MLE model from {cached} (trained in {mle_seconds:.0f} s)")
    else:
        model, _ = lm_train(model, tok, blocks, LMOptions(max_steps=steps, batch_size=64, learning_rate=5e-3,
                                                          precision="fp32", logging_steps=200, save_steps=steps),
                            objective="clm", out_dir=work / "mle", seed=0, device="cpu")
        mle_seconds = time.perf_counter() - start
        save_checkpoint(model, tok, cached)
        (cached / "mle_seconds.txt").write_text(f"{mle_seconds:.1f}")
    mle_dir = save_checkpoint(model, tok, work / "mle-model")
    rows = {"MLE": {"nll_oracle": oracle.nll(generator_samples(model, tok, 5000, 1.0, seed=4)),
                    "nll_test": nll_test(model, tok, test), "seconds": round(mle_seconds, 1)}}
    for t in (0.9, 0.8):
        rows[f"MLE, temperature {t}"] = {"nll_oracle": oracle.nll(generator_samples(model, tok, 5000, t, seed=4)),
                                         "nll_test": nll_test(model, tok, test, t), "seconds": None}
    print(f"  MLE ({args.mle_epochs} epochs, {mle_seconds:.0f} s): {rows['MLE']}", flush=True)

    if args.probe:
        rows_probe = probe_discriminator(oracle, model, tok, mle_dir)
        print(f"  discriminator probe (scratch, 900 updates on 5,000 + 5,000): {rows_probe}", flush=True)
    else:
        rows_probe = None

    # the adversarial stage, its own code path, on a hand-built run state
    (work / "train.txt").write_text("\n\n".join(text(s) for s in train))
    cfg = config_from_dict({"run": {"name": "oracle", "output_dir": str(work / "run"), "seed": 0},
                            "model": {"pretrained": str(mle_dir)}, "data": {"train": str(work / "train.txt")},
                            "stages": ["adversarial"]})
    pool = Pool(to_dataset(make_examples([text(s) for s in train], origin="real", op="source", stage="data", round=0)))
    stage_dir = work / "adversarial"
    stage_dir.mkdir()
    state = RunState(config=cfg, checkpoint=mle_dir, kind="causal", pool=pool, heldout=[text(s) for s in test[:200]],
                     seed=0, stage_key="adversarial", stage_dir=stage_dir)
    adv = AdversarialConfig(**json.loads(args.adversarial))
    start = time.perf_counter()
    result = AdversarialStage().run(state, adv)
    adv_seconds = time.perf_counter() - start
    model, _ = load_checkpoint(result.checkpoint, "causal")
    rows["adversarial"] = {"nll_oracle": oracle.nll(generator_samples(model, tok, 5000, 1.0, seed=4)),
                           "nll_test": nll_test(model, tok, test), "seconds": round(adv_seconds, 1)}
    for r in rows.values():
        r["nll_oracle"], r["nll_test"] = round(r["nll_oracle"], 4), round(r["nll_test"], 4)
    m = result.metrics
    return {"rows": rows, "oracle_self_nll": round(oracle.nll(real_samples), 4), "adversarial_config": adv.model_dump(),
            "rounds": m["rounds"], "events": m["events"], "discriminator_start": m["discriminator_start"],
            "reward_first_last": [m.get("rewards/discriminator/mean/first"), m.get("rewards/discriminator/mean/last")],
            "mle_epochs": args.mle_epochs, "discriminator_probe": rows_probe}


def probe_discriminator(oracle, model, tok, mle_dir: Path) -> dict:
    """How well can a discriminator tell the oracle's sequences from the MLE model's at all? Train
    one (scratch, as the stage's default) on 5,000 of each; accuracy on those and on 1,000 unseen."""
    from selftrain.modeling.discriminator import Discriminator
    from selftrain.training.discriminator import DiscriminatorUpdater, Weakening, accuracy

    real = [text(s) for s in oracle.sample(6000, seed=11).tolist()]
    fake = [text(s) for s in generator_samples(model, tok, 6000, 1.0, seed=12)]
    disc = Discriminator.build("scratch", generator_dir=mle_dir, tokenizer=tok, max_length=28, seed=0)
    DiscriminatorUpdater(disc, learning_rate=5e-4, batch_size=64, seed=0).update(
        real[:5000], fake[:5000], steps=900, weakening=Weakening())
    return {"seen_accuracy": round(accuracy(disc, real[:1000], fake[:1000])["accuracy"], 3),
            "unseen_accuracy": round(accuracy(disc, real[5000:], fake[5000:])["accuracy"], 3)}


# ----------------------------------------------------------------------------- (b) pydocs
def part_b(args, work: Path) -> dict:
    from selftrain.runner import Runner

    adv = json.loads(args.adversarial_pydocs)
    cfg = {"run": {"name": "gan-pydocs", "output_dir": str(work / "pydocs"), "seed": 0},
           "model": {"preset": "tiny", "vocab_size": 4096},
           "data": {"train": "builtin:pydocs", "heldout_fraction": 0.05, "max_documents": args.pydocs_docs},
           "guard": {"tolerance": 10.0}, "eval": {"samples": 64, "max_new_tokens": 48, "max_tokens": 32768},
           "stages": [{"pretrain": {"max_steps": args.pydocs_steps, "block_size": 128, "batch_size": 16,
                                    "learning_rate": 1e-3, "save_steps": args.pydocs_steps}},
                      {"adversarial": adv}]}
    start = time.perf_counter()
    manifest = Runner(config_from_dict(cfg)).run()
    pre, game = manifest["stages"]
    out = {"MLE": {k: pre["metrics_after"].get(k) for k in ("heldout_ppl", "distinct_1", "distinct_2", "repetition_rate")},
           "adversarial": {k: game["metrics_after"].get(k) for k in ("heldout_ppl", "distinct_1", "distinct_2",
                                                                    "repetition_rate")},
           "decision": game["decision"], "reason": game["reason"], "seconds": round(time.perf_counter() - start),
           "game_seconds": game["seconds"], "rounds": game["stage_metrics"]["rounds"],
           "events": game["stage_metrics"]["events"], "synthesis": game["stage_metrics"]["synthesis"]}
    print(f"(b) pydocs: MLE {out['MLE']}\n    adversarial {out['adversarial']} ({out['decision']})", flush=True)
    return out


ADV_ORACLE = {"rounds": 4, "steps_per_round": 25, "learning_rate": 1e-3, "groups_per_step": 8, "num_generations": 8,
              "completion_tokens": 20, "beta": 0.02, "mle_weight": 1.0, "mle_block_size": 21, "precision": "fp32",
              "eval_samples": 200, "eval_tokens": 4000, "synthesize": 0, "generation_batch_size": 64,
              "discriminator": {"pretrain_steps": 100, "pretrain_samples": 1000, "calibration_texts": 200,
                                "learning_rate": 5e-4, "batch_size": 64}}
ADV_PYDOCS = {"rounds": 3, "steps_per_round": 20, "learning_rate": 2e-4, "groups_per_step": 4, "num_generations": 8,
              "completion_tokens": 32, "beta": 0.05, "mle_weight": 0.5, "precision": "fp32", "eval_samples": 64,
              "synthesize": 128}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["a", "b", "all"], default="all")
    ap.add_argument("--train-seqs", type=int, default=10000, help="(a) oracle training sequences.")
    ap.add_argument("--mle-epochs", type=int, default=30, help="(a) maximum-likelihood epochs before the game.")
    ap.add_argument("--adversarial", default=json.dumps(ADV_ORACLE), help="(a) the adversarial stage's options, JSON.")
    ap.add_argument("--pydocs-docs", type=int, default=2000, help="(b) docstrings loaded.")
    ap.add_argument("--pydocs-steps", type=int, default=400, help="(b) pretrain steps (the MLE model).")
    ap.add_argument("--adversarial-pydocs", default=json.dumps(ADV_PYDOCS), help="(b) the stage's options, JSON.")
    ap.add_argument("--probe", action="store_true", help="(a) also measure how well a discriminator separates oracle from MLE samples at all.")
    ap.add_argument("--quick", action="store_true", help="Smoke run: small everything.")
    args = ap.parse_args()
    if args.quick:
        args.train_seqs, args.mle_epochs, args.pydocs_docs, args.pydocs_steps = 2000, 2, 300, 30
        small = {"rounds": 1, "steps_per_round": 3, "eval_samples": 16, "synthesize": 16,
                 "discriminator": {"pretrain_steps": 5, "pretrain_samples": 32, "calibration_texts": 16}}
        args.adversarial = json.dumps({**ADV_ORACLE, **small, "synthesize": 0})
        args.adversarial_pydocs = json.dumps({**ADV_PYDOCS, **small})
    logging.getLogger("transformers").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    print(f"cpu flags: {cpu_flags()}; precision fp32 (auto would be {resolve_precision('auto', 'cpu')}); "
          f"torch threads {torch.get_num_threads()}", flush=True)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("a", "all"):
            out["a"] = part_a(args, Path(tmp))
        if args.part in ("b", "all"):
            out["b"] = part_b(args, Path(tmp))
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / f"gan_oracle-{args.part}{'-quick' if args.quick else ''}.json").write_text(json.dumps(out, indent=1))
    if "a" in out:
        rows = out["a"]["rows"]
        print(f"{'':24s} {'NLL-oracle':>10s} {'NLL-test':>9s} {'seconds':>8s}")
        for name, r in rows.items():
            print(f"{name:24s} {r['nll_oracle']:10.3f} {r['nll_test']:9.3f} {r['seconds'] if r['seconds'] is not None else '-':>8}")
        mle, adv = rows["MLE"], rows["adversarial"]
        ratio = adv["nll_oracle"] / mle["nll_oracle"]
        test_rise = adv["nll_test"] / mle["nll_test"] - 1
        line = {"bench": "gan_oracle", "metric": "NLL-oracle, adversarial / MLE (NLL-test rise "
                f"{test_rise:+.1%})", "value": adv["nll_oracle"], "baseline": mle["nll_oracle"],
                "ratio": round(ratio, 4), "target": "< 1 with NLL-test rise <= 5%", "met": ratio < 1 and test_rise <= 0.05}
    else:
        b = out["b"]
        line = {"bench": "gan_oracle", "metric": "pydocs held-out perplexity, adversarial / MLE",
                "value": b["adversarial"]["heldout_ppl"], "baseline": b["MLE"]["heldout_ppl"],
                "ratio": round(b["adversarial"]["heldout_ppl"] / b["MLE"]["heldout_ppl"], 4), "target": None, "met": None}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
