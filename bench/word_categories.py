"""Benchmark: word categories in a model's own input embeddings, scored against WordNet.

The `cluster` stage groups the input-embedding rows of the vocabulary's whole-word tokens with
k-means; nothing tells it what a colour or a weekday is. WordNet's lexicographer category of each
word's most frequent sense (``noun.time``, ``noun.food``, ``adj.all``... 45 in all) scores the
groups: purity and NMI, against the purity of random partitions with the same sizes (purity grows
with k by itself). Models: SmolLM2-135M (trained on 2T tokens) and, as a floor, the same
architecture freshly initialised. Needs WordNet (Debian: apt-get install wordnet-base).

    python bench/word_categories.py [--words 2000] [--k 50]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from transformers import AutoModelForCausalLM

from selftrain.data.wordnet import primary_lexnames, wordnet_dir
from selftrain.evaluation.word_categories import score_against, word_clusters

WATCH = {  # groups a person would look for, to print where they landed (never used to cluster or score)
    "colours": ["red", "green", "blue", "yellow", "black", "white", "purple", "orange", "brown", "pink"],
    "weekdays": ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"],
    "months": ["january", "february", "march", "april", "june", "july", "august", "september", "october"],
    "numbers": ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twenty", "hundred"],
    "countries": ["france", "germany", "china", "japan", "india", "canada", "italy", "spain", "russia"],
}


def where(found: dict, words: list[str]) -> dict:
    """For a watched group: how many of its words the vocabulary had, and the largest share in one cluster."""
    label = dict(zip(found["words"], found["labels"]))
    present = [w for w in words if w in label]
    if not present:
        return {"present": 0}
    counts: dict[int, int] = {}
    for w in present:
        counts[label[w]] = counts.get(label[w], 0) + 1
    best = max(counts, key=counts.get)
    return {"present": len(present), "in_one_cluster": counts[best], "cluster": best,
            "cluster_words": found["clusters"][best][:12]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--words", type=int, default=2000)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "selftrain-smollm2-135m")
    args = ap.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if wordnet_dir() is None:
        raise SystemExit("needs WordNet: apt-get install wordnet-base (or set SELFTRAIN_WORDNET)")
    from fewshot_bbc import smollm2  # bench/ is on the path when run as a script

    trained, tok = smollm2(args.cache)
    untrained = AutoModelForCausalLM.from_config(trained.config)
    out = {}
    for name, model in (("smollm2-135m", trained), ("untrained", untrained)):
        found = word_clusters(model, tok, words=args.words, k=args.k, seed=args.seed)
        score = score_against(found, primary_lexnames(set(found["words"])), seed=args.seed)
        out[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in score.items() if k != "majority"}
        out[name]["watched"] = {g: where(found, ws) for g, ws in WATCH.items()}
        print(f"{name}: {len(found['words'])} words, {score['scored_words']} in WordNet, k={len(found['clusters'])}: "
              f"purity {score['purity']:.3f} (random {score['random_purity']:.3f}), NMI {score['nmi']:.3f}", flush=True)
        for group, w in out[name]["watched"].items():
            if w["present"]:
                print(f"  {group:9s} {w['in_one_cluster']}/{w['present']} in cluster {w['cluster']}: "
                      f"{' '.join(w['cluster_words'])}")
        if name == "smollm2-135m":
            pure = sorted(((m["share"], i, m["category"]) for i, m in enumerate(score["majority"]) if m["category"]),
                          reverse=True)[:8]
            for share, i, category in pure:
                print(f"  cluster {i:2d} {share:4.0%} {category:18s} {' '.join(found['clusters'][i][:10])}")
    s, u = out["smollm2-135m"], out["untrained"]
    print(json.dumps({"bench": "word_categories", "metric": "wordnet_purity", "value": s["purity"],
                      "baseline": s["random_purity"], "ratio": round(s["purity"] / s["random_purity"], 3),
                      "target": None, "met": s["purity"] > s["random_purity"], "nmi": s["nmi"],
                      "untrained_purity": u["purity"], "untrained_nmi": u["nmi"], "words": args.words, "k": args.k,
                      "watched": s["watched"]}))


if __name__ == "__main__":
    main()
