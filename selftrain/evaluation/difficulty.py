"""Difficulty scorers for a curriculum: how hard each text is, judged without human grading.

Higher is harder. Model-free scorers read the text and the corpus (Platanios et al. 2019):

- ``length``:  tokens in the text;
- ``rarity``:  mean negative log unigram probability of its tokens, counted on the corpus itself
               (a mean, not Platanios' sum, so rarity is not length again: combine the two for both).

Model-based scorers ask the model being trained:

- ``self_loss``:    its mean next-token loss on the text (nats per token, the first ``max_tokens``);
- ``cluster_loss``: the mean self_loss of the text's cluster (from the ``cluster`` stage), so a
                    whole topic the model finds hard is scheduled together;
- ``solve_rate``:   for a text that states a problem of a task family, 1 - the share of the model's
                    sampled answers the family's checker accepts; texts that state no problem get None.

``rank_combination`` averages percentile ranks, so scorers on different scales weigh the same.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from selftrain.data.packing import TOKENISE_TEXTS, token_batches
from selftrain.modeling.chat import render_prompt
from selftrain.modeling.generation import SamplingParams, TransformersBackend
from selftrain.modeling.scoring import sequence_losses

MODEL_BASED = ("self_loss", "cluster_loss", "solve_rate")  # these ask a causal LM


def length(texts: Sequence[str], tokenizer) -> list[float]:
    return [float(len(ids)) for chunk in token_batches(texts, tokenizer) for ids in chunk]


def rarity(texts: Sequence[str], tokenizer) -> list[float]:
    """Mean -log p(token) under the corpus's own add-one-smoothed unigram distribution; an empty
    text scores 0.0 (nothing rare in it). Two passes (count, then score), so no text's tokens are kept."""
    counts: Counter = Counter()
    for chunk in token_batches(texts, tokenizer):
        for row in chunk:
            counts.update(row)
    total, vocab = sum(counts.values()), len(counts) + 1
    nll = {t: -math.log((c + 1) / (total + vocab)) for t, c in counts.items()}
    return [sum(nll[t] for t in row) / len(row) if row else 0.0
            for chunk in token_batches(texts, tokenizer) for row in chunk]


def self_loss(model, tokenizer, texts: Sequence[str], *, max_tokens: int = 256, batch_size: int = 16,
              progress: bool = False) -> list[float]:
    """The model's mean next-token loss on each text (its first ``max_tokens`` tokens, after a
    BOS/EOS so the first token is predicted too)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    head = [start] if start is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[float] = []
    # sequence_losses batches by length inside each chunk
    for chunk in tqdm(token_batches(texts, tokenizer), total=-(-len(texts) // TOKENISE_TEXTS), desc="self_loss",
                      disable=not progress, leave=False):
        out += sequence_losses(model, [head + ids[:max_tokens] for ids in chunk], batch_size=batch_size, pad_id=pad)
    return out


def cluster_loss(losses: Sequence[float], clusters: Sequence[int | None]) -> list[float]:
    """Each text's cluster's mean loss; a text outside every cluster (None, -1) keeps its own."""
    sums: dict[int, list[float]] = {}
    for loss, c in zip(losses, clusters):
        if c is not None and c >= 0:
            sums.setdefault(c, []).append(loss)
    means = {c: sum(v) / len(v) for c, v in sums.items()}
    return [means[c] if c is not None and c >= 0 else loss for loss, c in zip(losses, clusters)]


def solve_rate(model, tokenizer, texts: Sequence[str], family, *, samples: int = 4, chat: bool = False,
               max_new_tokens: int = 16, seed: int = 0, batch_size: int = 32) -> list[float | None]:
    """1 - the share of ``samples`` sampled answers that ``family.check`` accepts, for each text
    ``family.parse`` reads as a problem; None for the others."""
    problems = {i + k: p for i in range(0, len(texts), TOKENISE_TEXTS)
                for k, t in enumerate(texts[i:i + TOKENISE_TEXTS])
                if (p := family.parse(t)) is not None}
    posed = sorted(problems)
    out: list[float | None] = [None] * len(texts)
    if not posed:
        return out
    backend = TransformersBackend(model, tokenizer, batch_size=batch_size)
    prompts = [render_prompt(tokenizer, family.solver_question(problems[i]), chat=chat,
                             plain=f"Question: {family.solver_question(problems[i])}\nAnswer:") for i in posed]
    solved = [0] * len(posed)
    for s in range(samples):
        answers = backend.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0,
                                                           seed=seed * 1000 + s, stop=("\n",)))
        for k, (i, a) in enumerate(zip(posed, answers)):
            solved[k] += bool(family.check(a, problems[i]))
    for k, i in enumerate(posed):
        out[i] = 1.0 - solved[k] / samples
    return out


def percentile_ranks(values: Sequence[float | None]) -> list[float | None]:
    """Each value's rank among the known values, scaled to [0, 1] (ties share their mean rank)."""
    known = [i for i, v in enumerate(values) if v is not None]
    out: list[float | None] = [None] * len(values)
    if not known:
        return out
    from scipy.stats import rankdata  # scikit-learn's own dependency

    ranks = rankdata([values[i] for i in known])  # 1..n, ties averaged
    scale = max(1, len(known) - 1)
    for i, r in zip(known, ranks):
        out[i] = float((r - 1) / scale)
    return out


def rank_combination(scores: Sequence[Sequence[float | None]]) -> list[float | None]:
    """The mean percentile rank of each text over the scorers that scored it (None if none did)."""
    ranks = np.array([[np.nan if r is None else r for r in percentile_ranks(s)] for s in scores], dtype=float)
    with np.errstate(invalid="ignore"):
        counts = (~np.isnan(ranks)).sum(0)
        means = np.where(counts > 0, np.nansum(ranks, 0) / np.maximum(counts, 1), np.nan)
    return [None if np.isnan(m) else float(m) for m in means]
