"""Benchmark: the duplicate detectors of selftrain/data/dedup.py on a corpus with injected duplicates.

Base: the docstrings of the Python standard library (``builtin:pydocs``) of >= 200 characters.
Their own duplicates are removed first (exact, and near at an estimated Jaccard >= 0.4 by
character 5-grams or word 3-grams, below every threshold tried here), so every pair a detector
finds is either one we injected or a false positive. A size that needs more distinct texts than
the base has (~1,900) gets fillers: base texts with half their words replaced by corpus words,
distinct by construction (Jaccard with their source ~0.2) but of the same length and shape.

Copies of a seeded 5% of the distinct texts per kind are appended after all of them (detectors
keep the first of a group, so the copy is the one to flag):

    exact       case, spacing and punctuation changed (equal after dedup.normalise)
    words       5% of the words (at least one) replaced by other corpus words
    reorder     the sentences shuffled (texts of >= 3 sentences)
    paraphrase  rewritten by SmolLM2-135M-Instruct (--paraphrase N base texts; slow on CPU,
                cached in --cache; the small model often copies or drifts, which is data too)

A flagged pair (dup -> kept) is right when dup is an injected copy and kept is its source or
another copy of the same source; precision = right / flagged, recall of a kind = its copies
flagged right / its copies. The detectors run as the cluster stage runs them: exact; near on what
exact left; semantic (all-MiniLM-L6-v2, cosine within k-means clusters) on what both left; and
each alone, to show what it catches by itself. Exact and near are timed at every --sizes (peak
RSS is taken before any model is loaded: paraphrasing runs in a child process). Semantic runs on
a --semantic-texts corpus only (embedding is ~20-30 texts/s on 2 cores), with no fillers at the
default size. Target: near duplicates (kinds words + reorder) found by the near detector after
exact with precision and recall >= 0.95, at every size.

    python bench/dedup.py [--sizes 10000,100000] [--paraphrase 40] [--semantic-texts 1500]
    python bench/dedup.py --sizes 2000 --paraphrase 8 --semantic-texts 1000  # quick
    python bench/dedup.py --near 0.6 --shingle words --shingle-size 3  # another near setting
    python bench/dedup.py --threads 1  # a busy machine: 2 torch threads on shared cores crawl

Ends with one JSON line: min(precision, recall) of near on kinds words + reorder, worst size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from adapters import cpu_flags  # bench/ is on the path when run as a script

from selftrain.data import dedup
from selftrain.data.sources import load_documents

KINDS = ("exact", "words", "reorder", "paraphrase")
NEAR_KINDS = ("words", "reorder")  # what the target is about
COPY_KINDS = 3  # kinds made by rule at --rate each (paraphrases ride on top)
WORD = re.compile(r"[A-Za-z]+")  # the units replaced: runs of letters, so punctuation and code stay
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
PREAMBLE = re.compile(r"^\s*(here|sure|certainly)\b[^\n]*:\s*", re.IGNORECASE)  # "Here is a paraphrase:"


@dataclass
class Corpus:
    texts: list[str]
    group: list[int]  # the distinct text each row is (a copy of): its position in the pool
    kind: list[str | None]  # the copy's kind; None for a distinct text
    distinct: int
    fillers: int


# -----------------------------------------------------------------------------
# the corpus


def load_base(source: str, min_chars: int) -> tuple[list[str], int]:
    """The source's texts of >= ``min_chars``, less every one that exact or near (Jaccard >= 0.4)
    already pairs with an earlier one; and how many there were before."""
    texts = [t for _, t in load_documents(source) if len(t) >= min_chars]
    flagged = set(dedup.exact_duplicates(texts))
    for unit, n in (("chars", 5), ("words", 3)):
        flagged |= set(dedup.near_duplicates(texts, threshold=0.4, unit=unit, n=n, skip=flagged))
    return [t for i, t in enumerate(texts) if i not in flagged], len(texts)


def replace_words(text: str, count: int, rng: random.Random, vocab: list[str]) -> str:
    """``text`` with ``count`` of its words swapped for other words drawn from ``vocab`` (drawn by
    frequency, so the result reads like the corpus)."""
    spans = [m.span() for m in WORD.finditer(text)]
    out, last = [], 0
    for k in sorted(rng.sample(range(len(spans)), min(count, len(spans)))):
        a, b = spans[k]
        new = rng.choice(vocab)
        while new.casefold() == text[a:b].casefold():
            new = rng.choice(vocab)
        out += [text[last:a], new]
        last = b
    return "".join(out) + text[last:]


def restyle(text: str, rng: random.Random) -> str:
    """An exact copy in disguise: the case of some words, the spacing and punctuation of some gaps
    changed, all of which ``dedup.normalise`` erases."""
    parts = re.split(r"([\W_]+)", text)  # words at even positions, gaps at odd ones
    for k, part in enumerate(parts):
        if rng.random() > 0.3:  # a third of words and gaps changed: a copy re-typed, not scrambled
            continue
        if k % 2 == 0:
            parts[k] = rng.choice((str.upper, str.lower, str.title))(part)
        elif any(c.isspace() for c in part):
            parts[k] = rng.choice((" ", "  ", "\n", ", ", " - "))
        else:
            parts[k] = rng.choice((".", "-", "/", ":"))
    out = "".join(parts)
    # a few Unicode letters change under upper() in ways casefold() does not undo: keep it plain
    return out if dedup.normalise(out) == dedup.normalise(text) else "  " + text + " ."


def sentences(text: str) -> list[str]:
    return SENTENCE_END.split(text.strip())


def reorder(text: str, rng: random.Random) -> str:
    """The sentences of ``text`` in another order (callers pass texts of >= 3 distinct sentences)."""
    parts = sentences(text)
    order = list(range(len(parts)))
    while order == sorted(order):
        rng.shuffle(order)
    return " ".join(parts[k] for k in order)


def reorderable(text: str) -> bool:
    parts = sentences(text)
    return len(parts) >= 3 and len(set(parts)) == len(parts)


def vocabulary(texts: list[str]) -> list[str]:
    """Every word occurrence of the corpus: drawing from it draws words by their frequency."""
    return [w for t in texts for w in WORD.findall(t)]


def distinct_pool(base: list[str], count: int, seed: int, vocab: list[str], change: float) -> list[str]:
    """``count`` distinct texts: the base shuffled, then fillers (a base text with ``change`` of its
    words replaced). Seeded and made in order, so a smaller count gives a prefix of a larger one:
    every size's corpus holds the same real texts."""
    rng = random.Random(seed)
    pool = rng.sample(base, len(base))
    while len(pool) < count:
        src = rng.choice(base)
        pool.append(replace_words(src, round(change * len(WORD.findall(src))), rng, vocab))
    return pool[:max(count, len(base))]


def distinct_count(size: int, rate: float) -> int:
    """Distinct texts in a corpus of ``size``: the rest are the copies of three kinds at ``rate``."""
    return round(size / (1 + COPY_KINDS * rate))


def build_corpus(pool: list[str], n_base: int, size: int, *, rate: float, word_change: float,
                 vocab: list[str], paraphrases: dict[int, str], seed: int) -> Corpus:
    """The first distinct texts of the pool, then their copies of every kind, shuffled among
    themselves (an original always comes before its copies)."""
    distinct = distinct_count(size, rate)
    rng = random.Random(seed * 1_000_003 + distinct)
    per_kind = round(rate * distinct)
    copies = [(restyle(pool[i], rng), i, "exact") for i in rng.sample(range(distinct), per_kind)]
    for i in rng.sample(range(distinct), per_kind):
        count = max(1, round(word_change * len(WORD.findall(pool[i]))))
        copies.append((replace_words(pool[i], count, rng, vocab), i, "words"))
    eligible = [i for i in range(distinct) if reorderable(pool[i])]
    copies += [(reorder(pool[i], rng), i, "reorder") for i in rng.sample(eligible, min(per_kind, len(eligible)))]
    copies += [(text, i, "paraphrase") for i, text in paraphrases.items() if i < distinct]
    rng.shuffle(copies)
    return Corpus(texts=pool[:distinct] + [c[0] for c in copies], group=list(range(distinct)) + [c[1] for c in copies],
                  kind=[None] * distinct + [c[2] for c in copies], distinct=distinct,
                  fillers=max(0, distinct - n_base))


# -----------------------------------------------------------------------------
# paraphrases (a child process: torch and the model never inflate the timed process's memory)


def paraphrase(texts: list[str], cache: Path, seed: int, threads: int | None) -> list[str]:
    """SmolLM2-135M-Instruct's paraphrase of each text (sampled, seeded), preamble cut."""
    import logging
    import sys

    import torch

    from selftrain.modeling.chat import render_prompt
    from selftrain.modeling.generation import SamplingParams, TransformersBackend

    if threads:
        torch.set_num_threads(threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for fewshot_bbc
    from fewshot_bbc import smollm2

    model, tok = smollm2(cache)
    backend = TransformersBackend(model, tok, batch_size=8)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths batch together
    out = [""] * len(texts)
    for start in range(0, len(order), 8):
        batch = order[start:start + 8]
        prompts = [render_prompt(tok, "Paraphrase the following text, keeping its meaning:\n\n" + texts[i], chat=True)
                   for i in batch]
        longest = max(len(tok(texts[i])["input_ids"]) for i in batch)
        # room for a rewrite a bit longer than the text, not for the runaway repetition 135M falls into
        sampling = SamplingParams(max_new_tokens=round(1.25 * longest) + 16, temperature=0.7, top_p=0.9,
                                  seed=seed + start)
        for i, text in zip(batch, backend.generate(prompts, sampling)):
            out[i] = PREAMBLE.sub("", text.strip(), count=1).strip()
        print(f"  paraphrased {min(start + 8, len(order))}/{len(order)}", flush=True)
    return out


def paraphrases_for(pool: list[str], limit: int, n: int, *, seed: int, cache: Path, threads: int | None,
                    max_chars: int) -> dict[int, str]:
    """Paraphrases of ``n`` seeded base texts among the pool's first ``limit`` (so every corpus holds
    their sources), of at most ``max_chars``; cached on the sources and seed."""
    if n <= 0:
        return {}
    rng = random.Random(seed + 17)
    fits = [i for i in range(limit) if len(pool[i]) <= max_chars]
    sources = sorted(rng.sample(fits, min(n, len(fits))))
    key = hashlib.blake2b(json.dumps([seed] + [pool[i] for i in sources]).encode(), digest_size=8).hexdigest()
    path = cache / f"dedup-paraphrases-{key}.json"
    if path.is_file():
        texts = json.loads(path.read_text())
    else:
        started = time.perf_counter()
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool_ex:
            texts = pool_ex.submit(paraphrase, [pool[i] for i in sources], cache, seed, threads).result()
        print(f"paraphrased {len(sources)} texts in {time.perf_counter() - started:.0f} s")
        cache.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(texts))
    return {i: t for i, t in zip(sources, texts) if t}  # an empty answer is no copy


# -----------------------------------------------------------------------------
# scoring


def score(found: dict[int, int], corpus: Corpus, kinds=KINDS) -> dict:
    """Precision of the flagged pairs and recall of each injected kind (and of ``NEAR_KINDS`` as one)."""
    right = {i for i, j in found.items() if corpus.kind[i] is not None and corpus.group[i] == corpus.group[j]}
    out = {"flagged": len(found), "precision": len(right) / len(found) if found else None}
    for kind in (*kinds, "near"):
        members = [i for i, k in enumerate(corpus.kind) if k == kind or (kind == "near" and k in NEAR_KINDS)]
        out[kind] = sum(i in right for i in members) / len(members) if members else None
        out[f"{kind}_n"] = len(members)
    return out


def fmt(x) -> str:
    return "   -  " if x is None else f"{x:6.3f}"


def print_scores(title: str, rows: dict[str, dict]) -> None:
    print(f"\n{title}")
    print(f"  {'detector':<34}{'flagged':>8}{'prec':>7}" + "".join(f"{k:>11}" for k in (*KINDS, "near(w+r)")))
    for name, s in rows.items():
        print(f"  {name:<34}{s['flagged']:>8}{fmt(s['precision']):>7}"
              + "".join(f"{fmt(s[k]):>7}/{s[f'{k}_n']:<3}" for k in (*KINDS, "near")))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -----------------------------------------------------------------------------
# the detectors


def staged(corpus: Corpus, near: dict) -> tuple[dict[int, int], dict[int, int], float, float]:
    """Exact, then near on what exact left, as the cluster stage runs them; with their seconds."""
    started = time.perf_counter()
    exact = dedup.exact_duplicates(corpus.texts)
    exact_s = time.perf_counter() - started
    started = time.perf_counter()
    found = dedup.near_duplicates(corpus.texts, skip=set(exact), **near)
    return exact, found, exact_s, time.perf_counter() - started


def semantic(corpus: Corpus, skip: set[int], thresholds: list[float], threads: int | None,
             max_length: int) -> tuple[dict[str, dict], dict]:
    """The semantic detector alone and after exact + near, at each threshold; MiniLM embeddings
    clustered by k-means with k chosen by silhouette, as the cluster stage does."""
    import torch

    from selftrain.data import clustering
    from selftrain.modeling.embeddings import embed_texts, load_encoder

    if threads:
        torch.set_num_threads(threads)
    model, tok = load_encoder("minilm")
    started = time.perf_counter()
    vectors = embed_texts(model, tok, corpus.texts, max_length=max_length, progress=True)
    embed_s = time.perf_counter() - started
    started = time.perf_counter()
    groups = clustering.cluster(vectors, k=None, seed=0)
    cluster_s = time.perf_counter() - started
    # how far apart the classes lie: a paraphrase from its source, a text from its nearest other text
    distinct = vectors[:corpus.distinct]
    sims = distinct @ distinct.T
    np.fill_diagonal(sims, -1.0)
    nearest = sims.max(1)
    para = [float(vectors[i] @ vectors[corpus.group[i]]) for i, k in enumerate(corpus.kind) if k == "paraphrase"]
    info = {"embed_s": round(embed_s, 1), "texts_per_s": round(len(corpus.texts) / embed_s, 1),
            "cluster_s": round(cluster_s, 1), "k": groups.k,
            "distinct_nearest_cos": quantiles(nearest), "paraphrase_source_cos": quantiles(np.array(para))}
    rows = {}
    for t in thresholds:
        rows[f"semantic {t} alone"] = score(dedup.semantic_duplicates(vectors, groups.labels, threshold=t), corpus)
        rows[f"semantic {t} after exact+near"] = score(
            dedup.semantic_duplicates(vectors, groups.labels, threshold=t, skip=skip), corpus)
        info[f"distinct_pairs_at_{t}"] = int((sims >= t).sum() // 2)
    return rows, info


def quantiles(x: np.ndarray) -> dict | None:
    if not len(x):
        return None
    q = np.quantile(x, [0, 0.5, 0.99, 1])
    return {"min": round(float(q[0]), 3), "median": round(float(q[1]), 3), "p99": round(float(q[2]), 3),
            "max": round(float(q[3]), 3)}


def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000", help="corpus sizes timed (the first is also the sweep's)")
    ap.add_argument("--source", default="builtin:pydocs", help="base texts (any load_documents spec)")
    ap.add_argument("--min-chars", type=int, default=200, help="shorter base texts are dropped")
    ap.add_argument("--rate", type=float, default=0.05, help="share of distinct texts copied, per kind")
    ap.add_argument("--word-change", type=float, default=0.05, help="share of words replaced in a `words` copy")
    ap.add_argument("--filler-change", type=float, default=0.5, help="share of words replaced in a filler")
    ap.add_argument("--paraphrase", type=int, default=40, help="base texts paraphrased by SmolLM2 (0: none)")
    ap.add_argument("--paraphrase-max-chars", type=int, default=400, help="longest text paraphrased (generation time)")
    ap.add_argument("--semantic-texts", type=int, default=1500, help="corpus size for the semantic detector (0: skip)")
    ap.add_argument("--semantic", default="0.9,0.95", help="cosine thresholds tried")
    ap.add_argument("--near", type=float, default=0.7, help="near threshold of the target (the stage's default)")
    ap.add_argument("--shingle", choices=("chars", "words"), default="chars")
    ap.add_argument("--shingle-size", type=int, default=5)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--sweep", default="0.5,0.6,0.7,0.8", help="near thresholds tried on the first size ('' : none)")
    ap.add_argument("--sweep-shingles", default="chars:5,words:3", help="shingle unit:n pairs the sweep tries")
    ap.add_argument("--threads", type=int, help="torch threads for paraphrasing and embedding (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "selftrain-smollm2-135m")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    near = {"threshold": args.near, "unit": args.shingle, "n": args.shingle_size, "num_perm": args.num_perm}

    # 1. the base, clean of its own duplicates; the distinct pool every size draws a prefix of
    started = time.perf_counter()
    base, raw = load_base(args.source, args.min_chars)
    vocab = vocabulary(base)
    need = max(distinct_count(s, args.rate) for s in [*sizes, args.semantic_texts])
    pool = distinct_pool(base, need, args.seed, vocab, args.filler_change)
    print(f"base: {raw} texts of >= {args.min_chars} chars from {args.source}, {raw - len(base)} dropped as their own "
          f"exact/near duplicates, {len(base)} kept; pool of {len(pool)} distinct "
          f"({max(0, len(pool) - len(base))} fillers) in {time.perf_counter() - started:.1f} s")

    # 2. paraphrases of base texts that every corpus holds
    firsts = [distinct_count(s, args.rate) for s in (sizes[0], args.semantic_texts) if s]
    paraphrases = paraphrases_for(pool, min([*firsts, len(base)]), args.paraphrase, seed=args.seed, cache=args.cache,
                                  threads=args.threads, max_chars=args.paraphrase_max_chars)

    # 3. exact and near at every size: time, memory, and the target
    per_size, first = {}, None
    for size in sizes:
        corpus = build_corpus(pool, len(base), size, rate=args.rate, word_change=args.word_change, vocab=vocab,
                              paraphrases=paraphrases, seed=args.seed)
        exact, found, exact_s, near_s = staged(corpus, near)
        n = len(corpus.texts)
        per_size[size] = {"texts": n, "fillers": corpus.fillers, "exact_s": round(exact_s, 2), "near_s": round(near_s, 2),
                          "texts_per_s": round(n / (exact_s + near_s), 1), "peak_rss_mb": round(peak_rss_mb(), 1),
                          "exact": score(exact, corpus), "near": score(found, corpus)}
        s = per_size[size]
        print(f"\nsize {size}: {n} texts ({corpus.distinct} distinct, {corpus.fillers} of them fillers, "
              f"{n - corpus.distinct} copies): exact {exact_s:.2f} s, near {near_s:.1f} s, "
              f"{s['texts_per_s']:.0f} texts/s, peak RSS {s['peak_rss_mb']:.0f} MB")
        print_scores(f"size {size}", {"exact": s["exact"], f"near {near['unit']}:{near['n']} {near['threshold']} after exact":
                                      s["near"]})
        if first is None:
            first = (corpus, exact, found)
    if len(sizes) > 1:
        a, b = sizes[0], sizes[-1]
        growth = (per_size[b]["exact_s"] + per_size[b]["near_s"]) / (per_size[a]["exact_s"] + per_size[a]["near_s"])
        print(f"\n{b / a:.0f}x the texts took {growth:.1f}x the time")

    # 4. on the first size: near alone, and a sweep of near settings after exact
    corpus, exact, found = first
    rows = {"exact": score(exact, corpus), "near alone": score(dedup.near_duplicates(corpus.texts, **near), corpus),
            "near after exact": score(found, corpus)}
    print_scores(f"detectors on the size-{sizes[0]} corpus (near: {near['unit']}:{near['n']} at {near['threshold']})",
                 rows)
    sweep = []
    for spec in filter(None, args.sweep_shingles.split(",")):
        unit, n = spec.split(":")
        for t in floats(args.sweep):
            started = time.perf_counter()
            found_t = dedup.near_duplicates(corpus.texts, threshold=t, unit=unit, n=int(n), num_perm=args.num_perm,
                                            skip=set(exact))
            sweep.append({"unit": unit, "n": int(n), "threshold": t, "seconds": round(time.perf_counter() - started, 1),
                          **score(found_t, corpus)})
    if sweep:
        print(f"\nnear after exact, size {sizes[0]}: settings swept")
        print(f"  {'shingle':<9}{'thr':>5}{'prec':>8}{'words':>8}{'reorder':>8}{'w+r':>8}{'paraph':>8}{'min':>8}{'s':>6}")
        for r in sweep:
            lo = min(r["precision"] or 0, r["near"] or 0)
            print(f"  {r['unit']}:{r['n']:<3}{r['threshold']:>7}{fmt(r['precision']):>8}{fmt(r['words']):>8}"
                  f"{fmt(r['reorder']):>8}{fmt(r['near']):>8}{fmt(r['paraphrase']):>8}{fmt(lo):>8}{r['seconds']:>6}")

    # 5. semantic, on a corpus small enough to embed
    sem, sem_info = {}, {}
    if args.semantic_texts:
        corpus = build_corpus(pool, len(base), args.semantic_texts, rate=args.rate, word_change=args.word_change,
                              vocab=vocab, paraphrases=paraphrases, seed=args.seed)
        exact, found, _, _ = staged(corpus, near)
        sem, sem_info = semantic(corpus, set(exact) | set(found), floats(args.semantic), args.threads, 128)
        print_scores(f"semantic on {len(corpus.texts)} texts ({corpus.fillers} fillers; MiniLM "
                     f"{sem_info['texts_per_s']} texts/s, k={sem_info['k']})",
                     {"exact": score(exact, corpus), "near after exact": score(found, corpus), **sem})
        print(f"  cosine, a distinct text to its nearest other: {sem_info['distinct_nearest_cos']}; "
              f"pairs at the thresholds: {[sem_info[f'distinct_pairs_at_{t}'] for t in floats(args.semantic)]}")
        print(f"  cosine, a paraphrase to its source: {sem_info['paraphrase_source_cos']}")

    # 6. the target: near duplicates, the near detector after exact, the worst size
    value = min(min(s["near"]["precision"] or 0, s["near"]["near"] or 0) for s in per_size.values())
    target = 0.95
    print(f"\nnear duplicates (words + reorder), near after exact, worst size: "
          f"min(precision, recall) = {value:.3f} (target >= {target})")

    def brief(s: dict) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items() if not k.endswith("_n")}

    print(json.dumps({
        "bench": "dedup", "metric": "near_precision_recall_min", "value": round(value, 4), "baseline": None,
        "ratio": None, "target": target, "met": value >= target,
        "near": near, "paraphrases": len(paraphrases), "base_texts": len(base),
        "sizes": {str(k): {**{x: v for x, v in s.items() if x not in ("exact", "near")},
                           "exact": brief(s["exact"]), "near": brief(s["near"])} for k, s in per_size.items()},
        "detectors": {k: brief(v) for k, v in rows.items()},
        "semantic": {k: brief(v) for k, v in sem.items()}, "semantic_run": sem_info, "sweep": [brief(r) for r in sweep], "cpu_flags": cpu_flags(),
    }))


if __name__ == "__main__":
    main()
