"""Quality filters for generated variants of real texts: each judges a (source, variant) pair and
names what it rejects, so a report can say how many variants each filter cost and why.

- ``length``: too few words, or a length ratio to the source outside bounds;
- ``duplicate``: a near copy (MinHash Jaccard at least the threshold, or equal after
  normalisation) of an original text or of an earlier kept variant;
- ``similarity``: cosine of sentence embeddings to the source outside [low, high] — below low
  the meaning drifted, above high the variant adds nothing;
- ``perplexity``: the current model finds the variant much less likely than its source
  (perplexity ratio above a ceiling), or above an absolute ceiling: it is no longer fluent text;
- ``discriminator``: the run's discriminator (trained by an accepted ``adversarial`` stage) gives the
  variant a probability of being real text below a floor.

Filters run cheapest first and each sees only what the previous ones kept.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from selftrain.data import dedup
from selftrain.modeling.embeddings import embed_texts
from selftrain.modeling.scoring import sequence_losses


@dataclass
class Judged:
    keep: list[bool]  # one per variant
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    similarity: list[float | None] = field(default_factory=list)
    perplexity_ratio: list[float | None] = field(default_factory=list)
    real_score: list[float | None] = field(default_factory=list)  # the discriminator's P(real)

    @classmethod
    def fresh(cls, n: int) -> Judged:
        """n variants, all kept, none scored yet."""
        return cls(keep=[True] * n, similarity=[None] * n, perplexity_ratio=[None] * n, real_score=[None] * n)

    def reject(self, i: int, reason: str) -> None:
        if self.keep[i]:
            self.keep[i] = False
            self.rejected[reason] += 1

    def alive(self) -> list[int]:
        return [i for i, k in enumerate(self.keep) if k]


def length_filter(judged: Judged, sources: Sequence[str], variants: Sequence[str], *, min_words: int,
                  ratio: tuple[float, float]) -> None:
    for i in judged.alive():
        n_source, n_variant = len(sources[i].split()), len(variants[i].split())
        if n_variant < min_words:
            judged.reject(i, "too_short")
        elif not ratio[0] <= n_variant / max(1, n_source) <= ratio[1]:
            judged.reject(i, "length_ratio")


def duplicate_filter(judged: Judged, references: Sequence[str], variants: Sequence[str], *, threshold: float | None,
                     seed: int, exact_only: set[int] | None = None) -> None:
    """Variants that copy a reference (an original text) or an earlier kept variant: equal after
    normalisation, or (``threshold`` not None) a MinHash near copy. Variants in ``exact_only`` (those
    of order-changing operations, whose shingles are their source's by construction) face only the
    exact test. The references are streamed (twice with ``threshold``), never copied: they may be
    a pool larger than memory."""
    alive = judged.alive()

    def texts():
        return itertools.chain(references, (variants[i] for i in alive))

    found = dict(dedup.exact_duplicates(texts()))
    if threshold is not None:
        shielded = {len(references) + k for k, i in enumerate(alive) if i in (exact_only or set())}
        found.update(dedup.near_duplicates(texts(), threshold=threshold, skip=set(found) | shielded, seed=seed))
    for position in sorted(found):
        if position >= len(references):
            judged.reject(alive[position - len(references)], "duplicate")


def similarity_filter(judged: Judged, encoder, encoder_tokenizer, sources: Sequence[str], variants: Sequence[str],
                      *, bounds: tuple[float, float], max_length: int = 128, precision: str = "fp32") -> None:
    """Texts are embedded on their first ``max_length`` tokens; where a source or its variant is
    longer, a change beyond them is invisible, so only the lower bound (drift) is applied there."""
    alive = judged.alive()
    if not alive:
        return
    pairs = [t for i in alive for t in (sources[i], variants[i])]
    sizes = [len(ids) for ids in encoder_tokenizer(pairs, add_special_tokens=True)["input_ids"]]
    longer = {i for k, i in enumerate(alive) if max(sizes[2 * k], sizes[2 * k + 1]) > max_length}
    distinct = sorted({sources[i] for i in alive})  # a source with many variants is embedded once
    row = {text: r for r, text in enumerate(distinct)}
    a = embed_texts(encoder, encoder_tokenizer, distinct, max_length=max_length, precision=precision)
    b = embed_texts(encoder, encoder_tokenizer, [variants[i] for i in alive], max_length=max_length, precision=precision)
    cosines = (a[[row[sources[i]] for i in alive]] * b).sum(1).tolist()
    for i, cos in zip(alive, cosines):
        judged.similarity[i] = round(cos, 4)
        if cos < bounds[0]:
            judged.reject(i, "meaning_drift")
        elif cos > bounds[1] and i not in longer:
            judged.reject(i, "too_similar")


def perplexity_filter(judged: Judged, model, tokenizer, sources: Sequence[str], variants: Sequence[str], *,
                      max_ratio: float | None, max_perplexity: float | None, max_length: int,
                      batch_size: int = 16) -> None:
    """Per-text perplexity under a causal ``model``, each text cut to its first ``max_length``
    tokens; a variant fails when ppl(variant) / ppl(source) > max_ratio or ppl(variant) > max_perplexity."""
    alive = judged.alive()
    if not alive:
        return
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    distinct = sorted({sources[i] for i in alive})  # a source with many variants is scored once
    row = {text: r for r, text in enumerate(distinct)}
    tokens = tokenizer(distinct + [variants[i] for i in alive], add_special_tokens=False,
                       truncation=True, max_length=max_length)["input_ids"]
    losses = sequence_losses(model, tokens, batch_size=batch_size, pad_id=pad)
    for k, i in enumerate(alive):
        if len(tokens[len(distinct) + k]) < 2 or len(tokens[row[sources[i]]]) < 2:
            if len(tokens[len(distinct) + k]) < 2 <= len(tokens[row[sources[i]]]):
                judged.reject(i, "too_short")  # one token predicts nothing: no perplexity to compare
            continue
        source_loss, variant_loss = losses[row[sources[i]]], losses[len(distinct) + k]
        ratio = math.exp(min(variant_loss - source_loss, 50.0))
        judged.perplexity_ratio[i] = round(ratio, 4)
        if max_ratio is not None and ratio > max_ratio:
            judged.reject(i, "perplexity_ratio")
        elif max_perplexity is not None and math.exp(min(variant_loss, 50.0)) > max_perplexity:
            judged.reject(i, "perplexity")


def cap_per_source(judged: Judged, parents: Sequence[int], limit: int, draws: np.ndarray) -> None:
    """At most ``limit`` kept variants per source: those with the smallest draw stay."""
    by_parent: dict[int, list[int]] = {}
    for i in judged.alive():
        by_parent.setdefault(parents[i], []).append(i)
    for members in by_parent.values():
        for i in sorted(members, key=lambda j: draws[j])[limit:]:
            judged.reject(i, "max_per_source")


def discriminator_filter(judged: Judged, variants: Sequence[str], discriminator, *, min_score: float) -> None:
    """Reject variants whose P(real) under ``discriminator`` (anything with ``p_real(texts)``, e.g.
    ``modeling.discriminator.Discriminator``) is below ``min_score``."""
    alive = judged.alive()
    if not alive:
        return
    for i, score in zip(alive, discriminator.p_real([variants[i] for i in alive])):
        judged.real_score[i] = round(float(score), 4)
        if score < min_score:
            judged.reject(i, "discriminator")
