"""Rewards for self-conversation, each in [0, 1], from models and text alone (no labels).

- ``coherence``: how likely a frozen copy of the *starting* model finds the response after the
  conversation, per token (exp of the mean token log-prob): fluent, on-context text scores high,
  and the frozen judge cannot drift with the policy.
- ``relevance``: cosine similarity between embeddings of the response and the previous turn.
- ``non_repetition``: 1 minus the share of the response's word trigrams that repeat inside it
  or copy the conversation so far (so relevance cannot be won by echoing the last turn).
"""

from __future__ import annotations

import math
import re

import torch

from selftrain.modeling.embeddings import embed_texts
from selftrain.modeling.scoring import loglikelihoods, split_pair
from selftrain.rewards import completion_text


def _lengths_match(name: str, completions, column) -> None:
    if column is None or len(column) != len(completions):
        raise ValueError(f"{name}: {len(completions)} completions but "
                         f"{'no' if column is None else len(column)} values in its column")


class Coherence:
    """Length-normalised log-likelihood under a frozen model, as a per-token probability."""

    __name__ = "coherence"

    def __init__(self, frozen_model, tokenizer, batch_size: int = 16):
        self.model, self.tok, self.batch_size = frozen_model, tokenizer, batch_size

    def __call__(self, prompts, completions, context=None, **_) -> list[float | None]:
        _lengths_match("coherence", completions, context)
        texts = [completion_text(c) for c in completions]
        pairs = [(ctx, text) for ctx, text in zip(context, texts)]
        scorable = [i for i, t in enumerate(texts) if t.strip()]
        out: list[float | None] = [0.0] * len(texts)  # an empty response is not coherent
        if scorable:
            scores = loglikelihoods(self.model, self.tok, [pairs[i] for i in scorable], batch_size=self.batch_size)
            for i, total in zip(scorable, scores):
                n = max(1, len(split_pair(self.tok, *pairs[i])[1]))
                out[i] = math.exp(total / n)
        return out


class Embedder:
    """Mean-pooled last hidden states of an encoder or causal LM, L2-normalised (as torch rows)."""

    def __init__(self, model, tokenizer, max_length: int = 128):
        self.model, self.tok, self.max_length = model, tokenizer, max_length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(embed_texts(self.model, self.tok, [t or " " for t in texts], max_length=self.max_length))


class Relevance:
    """Cosine similarity of the response to the previous turn, clipped to [0, 1]."""

    __name__ = "relevance"

    def __init__(self, embed):
        self.embed = embed

    def __call__(self, prompts, completions, previous_turn=None, **_) -> list[float | None]:
        _lengths_match("relevance", completions, previous_turn)
        texts = [completion_text(c) for c in completions]
        a, b = self.embed(texts), self.embed(list(previous_turn))
        sims = (a * b).sum(-1).clamp(0, 1).tolist()
        return [s if t.strip() else 0.0 for s, t in zip(sims, texts)]


def _trigrams(text: str) -> list[tuple[str, ...]]:
    w = re.findall(r"\w+", text.lower())
    return [tuple(w[i:i + 3]) for i in range(len(w) - 2)] if len(w) >= 3 else [tuple(w)] if w else []


def non_repetition(prompts, completions, context=None, **_) -> list[float | None]:
    """1 - (repeated or copied trigrams / trigrams); an empty response scores 0."""
    _lengths_match("non_repetition", completions, context)
    out: list[float | None] = []
    for c, ctx in zip(completions, context):
        grams = _trigrams(completion_text(c))
        if not grams:
            out.append(0.0)
            continue
        seen, before, bad = set(), set(_trigrams(ctx)), 0
        for g in grams:
            bad += g in seen or g in before
            seen.add(g)
        out.append(1.0 - bad / len(grams))
    return out
