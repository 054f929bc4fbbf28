"""Benchmark: does balanced sampling by cluster help the topics a corpus has little of?

BBC News leads with one topic cut to a tenth (the labels only build the imbalance and are never
seen by a stage). The `cluster` stage embeds and clusters the training texts and sets each row's
``weight`` (inverse cluster size, tempered by 0.5); k is fixed at 8, finer than the topics, because
with one topic cut to a tenth the silhouette merges it into another and no cluster is rare. A tiny Llama is then trained from the same
initial weights for the same number of steps twice per seed: random order, and draws weighted by
``weight``. Held-out texts are placed in the found clusters by their nearest centroid, and
perplexity is measured on the texts placed in the smallest clusters (together at most 15% of the
training texts: "rare") and on the whole held-out set.

    python bench/cluster_balance.py [--steps 300] [--seeds 0 1 2] [--rare-topic tech]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from selftrain.config import ModelConfig
from selftrain.data import clustering
from selftrain.data.pool import Pool, make_examples, to_dataset
from selftrain.evaluation.perplexity import heldout_perplexity
from selftrain.modeling.embeddings import embed_texts, load_encoder
from selftrain.modeling.factory import build_initial, load_checkpoint, save_checkpoint
from selftrain.stages.base import RunState
from selftrain.stages.cluster import ClusterConfig, ClusterStage
from selftrain.stages.pretrain import PretrainConfig, PretrainStage
from selftrain.tasks.generators import bbc_news

RARE_SHARE = 0.15


def corpus(rare_topic: str, keep: float, heldout_per_topic: int, seed: int):
    rows = bbc_news(max_chars=1200, seed=seed)
    by_topic: dict[str, list[str]] = {}
    for r in rows:
        by_topic.setdefault(r["label"], []).append(r["text"])
    train, heldout = [], []
    for topic, texts in sorted(by_topic.items()):
        heldout += texts[:heldout_per_topic]
        rest = texts[heldout_per_topic:]
        train += rest[:max(1, int(len(rest) * keep))] if topic == rare_topic else rest
    random.Random(seed).shuffle(train)
    return train, heldout


def run_stage(stage, config, state):
    state.stage_dir.mkdir(parents=True, exist_ok=True)
    return stage.run(state, config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rare-topic", default="tech")
    ap.add_argument("--keep", type=float, default=0.1, help="share of the rare topic's training articles kept")
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--k", type=int, default=8, help="clusters (finer than the 5 topics, so sizes differ)")
    args = ap.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="cluster-balance-"))

    train, heldout = corpus(args.rare_topic, args.keep, 40, 0)
    print(f"{len(train)} training leads ({args.rare_topic} cut to {args.keep:.0%}), {len(heldout)} held out", flush=True)
    model, tok, kind = build_initial(ModelConfig(preset="tiny", vocab_size=4096), train, 0)
    start = save_checkpoint(model, tok, work / "start")
    pool = Pool(to_dataset(make_examples(train, origin="real", op="original", stage="data", round=0)))

    # cluster once: weights, and centroids to place held-out texts
    config = ClusterConfig(k=args.k, weight_temperature=args.temperature, word_categories=None, map="none")
    state = RunState(config=None, checkpoint=start, kind=kind, pool=pool, heldout=heldout, seed=0,
                     stage_key="cluster", stage_dir=work / "cluster")
    result = run_stage(ClusterStage(), config, state)
    pool = pool.annotated([result.annotations]).without_duplicates()
    m = result.metrics
    print(f"cluster: k={m['k']}, {m['duplicate_total']} duplicates; sizes "
          f"{[c['size'] for c in m['clusters']]}", flush=True)
    rare, held = set(), 0.0  # the smallest clusters, together at most RARE_SHARE of the texts (at least one)
    for c in sorted(m["clusters"], key=lambda c: c["share"]):
        if rare and held + c["share"] > RARE_SHARE:
            break
        rare.add(c["cluster"])
        held += c["share"]
    encoder, encoder_tok = load_encoder(m["embedder"]) if m["embedder"] != "model" else (model, tok)
    centroids = np.load(result.artefacts["cluster_centroids"])["centroids"]
    placed = clustering.assign(embed_texts(encoder, encoder_tok, heldout, max_length=config.max_length), centroids)
    groups = {"all": heldout, "rare": [t for t, c in zip(heldout, placed) if c in rare]}
    print(f"rare clusters {sorted(rare)} ({held:.0%} of the training texts); {len(groups['rare'])} held-out texts "
          "placed in them", flush=True)

    results: dict[str, dict[str, list[float]]] = {}
    for seed in args.seeds:
        for policy in ("random", "weighted"):
            order = {"policy": policy, "column": "weight"} if policy == "weighted" else {"policy": "random"}
            pconfig = PretrainConfig(max_steps=args.steps, block_size=128, batch_size=16, learning_rate=2e-3,
                                     save_steps=10**6, logging_steps=50, order=order)
            key = f"{policy}-{seed}"
            state = RunState(config=_run_config(), checkpoint=start, kind=kind, pool=pool, heldout=heldout,
                             seed=seed, stage_key=key, stage_dir=work / key)
            torch.manual_seed(seed)
            out = run_stage(PretrainStage(), pconfig, state)
            trained, trained_tok = load_checkpoint(out.checkpoint, kind)
            for name, texts in groups.items():
                ppl = heldout_perplexity(trained, trained_tok, texts, max_tokens=16384)["heldout_ppl"]
                results.setdefault(policy, {}).setdefault(name, []).append(ppl)
            print(f"seed {seed} {policy:8s}: held-out ppl all {results[policy]['all'][-1]:.1f}, "
                  f"rare clusters {results[policy]['rare'][-1]:.1f}", flush=True)

    def summary(policy, name):
        xs = results[policy][name]
        return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    for name in groups:
        (r, rs), (w, ws) = summary("random", name), summary("weighted", name)
        print(f"{name:5s} held-out ppl: random {r:.1f} ± {rs:.1f}   weighted {w:.1f} ± {ws:.1f}   ratio {w / r:.3f}")
    rare_ratio = summary("weighted", "rare")[0] / summary("random", "rare")[0]
    all_ratio = summary("weighted", "all")[0] / summary("random", "all")[0]
    print(json.dumps({"bench": "cluster_balance", "metric": "rare_cluster_heldout_ppl_weighted_over_random",
                      "value": round(summary("weighted", "rare")[0], 2), "baseline": round(summary("random", "rare")[0], 2),
                      "ratio": round(rare_ratio, 4), "target": "< 1", "met": rare_ratio < 1,
                      "all_heldout_ratio": round(all_ratio, 4), "seeds": args.seeds, "steps": args.steps,
                      "k": m["k"], "rare_clusters": sorted(rare), "per_seed": results}))


def _run_config():
    """The least RunConfig the pretrain stage reads (report_to)."""
    from selftrain.config import config_from_dict

    return config_from_dict({"model": {"preset": "tiny"}, "data": {"train": "builtin:pydocs"},
                             "stages": ["pretrain"]})


if __name__ == "__main__":
    main()
