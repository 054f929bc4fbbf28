"""Diversity of generated text: a collapsing model repeats itself long before its perplexity says so.

distinct-n (Li et al., 2016): unique n-grams / all n-grams over every sample together.
repetition rate: share of 4-grams in a sample that already occurred earlier in that sample.
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


def diversity_metrics(samples: list[str]) -> dict:
    return {"distinct_1": distinct_n(samples, 1), "distinct_2": distinct_n(samples, 2),
            "repetition_rate": repetition_rate(samples),
            "sample_words": sum(len(words(s)) for s in samples) / max(1, len(samples))}
