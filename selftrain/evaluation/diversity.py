"""Diversity of generated text: a collapsing model repeats itself long before its perplexity says so.

distinct-n (Li et al., 2016): unique n-grams / all n-grams over every sample together.
repetition rate: share of 4-grams in a sample that already occurred earlier in that sample.
self-BLEU (Zhu et al., 2018, Texygen): each sample's BLEU against all the others as references,
averaged; near 1 when the samples are copies of each other (mode collapse), low when varied.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def distinct_n(samples: list[str], n: int) -> float:
    grams = [tuple(w[i:i + n]) for w in map(words, samples) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(samples: list[str], n: int = 4) -> float:
    repeated = total = 0
    for w in map(words, samples):
        seen = set()
        for i in range(len(w) - n + 1):
            g = tuple(w[i:i + n])
            repeated += g in seen
            seen.add(g)
            total += 1
    return repeated / total if total else 0.0


def self_bleu(samples: list[str], n: int = 4, max_samples: int = 200) -> float:
    """Mean BLEU-``n`` (uniform weights, nltk's smoothing method 1) of each of the first
    ``max_samples`` samples against all the other samples."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    tokens = [words(s) for s in samples]
    tokens = [t for t in tokens if t]
    if len(tokens) < 2:
        return 0.0
    smooth, weights = SmoothingFunction().method1, tuple([1.0 / n] * n)
    scores = [sentence_bleu(tokens[:i] + tokens[i + 1:], hyp, weights=weights, smoothing_function=smooth)
              for i, hyp in enumerate(tokens[:max_samples])]
    return sum(scores) / len(scores)


def diversity_metrics(samples: list[str]) -> dict:
    return {"distinct_1": distinct_n(samples, 1), "distinct_2": distinct_n(samples, 2),
            "repetition_rate": repetition_rate(samples), "self_bleu": self_bleu(samples),
            "sample_words": sum(len(words(s)) for s in samples) / max(1, len(samples))}
