"""Duplicate detection at three strengths: exact, near (MinHash LSH) and semantic (embeddings).

Every detector walks the texts in the order given (the pool's: real rows first, then additions
in the order stages made them) and keeps the first of each group, so ``duplicate_of`` always
points at a row that is itself kept and a real text is never marked a copy of a synthetic one.
Each returns ``{position of a duplicate: position of the kept row it duplicates}``.

- exact: the same text after normalisation (Unicode NFKC, case-folded, sentence punctuation and
  runs of whitespace collapsed; operators and symbols kept), by hash;
- near: MinHash signatures of character or word shingles (``datasketch``), candidates from LSH,
  confirmed by the estimated Jaccard similarity reaching the threshold;
- semantic (SemDeDup, Abbas et al. 2023): within each cluster of the embedding space, a text
  whose cosine similarity to a kept text reaches the threshold.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

_PUNCTUATION = re.compile(r"[\s.,;:!?\"'`\u2018\u2019\u201c\u201d\u2026\u00ab\u00bb]+")


def normalise(text: str) -> str:
    """The form two texts share when they differ only in case, spacing or sentence punctuation
    (. , ; : ! ? quotes). Operators and other symbols stay: ``a + b`` and ``a - b`` differ."""
    return _PUNCTUATION.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def exact_duplicates(texts: Iterable[str], *, normalised: bool = False) -> dict[int, int]:
    """Texts equal to an earlier one after ``normalise`` (already applied when ``normalised``).
    Read once, in order; what is kept is a 64-bit hash per text (a collision is unlikely below
    billions of texts), so a pool larger than memory can be streamed through."""
    norms = texts if normalised else (normalise(t) for t in texts)
    keys = np.fromiter((int.from_bytes(hashlib.blake2b(n.encode("utf-8"), digest_size=8).digest(), "little")
                        for n in norms), dtype=np.uint64)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    owner = first[inverse.ravel()]
    copies = np.flatnonzero(owner != np.arange(len(keys)))
    return dict(zip(copies.tolist(), owner[copies].tolist()))


def shingles(text: str, unit: Literal["chars", "words"] = "chars", n: int = 5) -> set[bytes]:
    """The set of ``n``-grams of characters (or words) of the normalised text; a text shorter than
    ``n`` units is one shingle."""
    norm = normalise(text)
    seq: Sequence[str] = norm if unit == "chars" else norm.split()
    if len(seq) <= n:
        return {(norm if unit == "chars" else " ".join(seq)).encode("utf-8")}
    if unit == "chars":
        return {norm[i:i + n].encode("utf-8") for i in range(len(norm) - n + 1)}
    return {" ".join(seq[i:i + n]).encode("utf-8") for i in range(len(seq) - n + 1)}


def minhashes(texts: Iterable[str], *, num_perm: int = 128, unit: Literal["chars", "words"] = "chars",
              n: int = 5, seed: int = 1) -> list[LeanMinHash]:
    """One MinHash signature per text (the same ``seed`` makes signatures comparable)."""
    signatures = MinHash.bulk((list(shingles(t, unit, n)) for t in texts), num_perm=num_perm, seed=seed)
    return [LeanMinHash(m) for m in signatures]


def near_duplicates(texts: Iterable[str], *, threshold: float = 0.7, num_perm: int = 128,
                    unit: Literal["chars", "words"] = "chars", n: int = 5, skip: set[int] | None = None,
                    seed: int = 1) -> dict[int, int]:
    """Texts whose estimated shingle Jaccard similarity with an earlier kept text reaches
    ``threshold``. Positions in ``skip`` (already known duplicates) are neither tested nor kept.
    The texts are read once, in order; the signatures (``num_perm`` x 8 bytes a text) and the LSH
    index stay in memory."""
    skip = skip or set()
    todo: list[int] = []

    def tested():
        for i, text in enumerate(texts):
            if i not in skip:
                todo.append(i)
                yield text

    signatures = minhashes(tested(), num_perm=num_perm, unit=unit, n=n, seed=seed)  # fills todo
    sigs = dict(zip(todo, signatures))
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    found = {}
    for i in todo:
        best, best_j = None, threshold
        for key in lsh.query(sigs[i]):
            j = sigs[i].jaccard(sigs[key])
            if j >= best_j and (best is None or j > best_j or key < best):
                best, best_j = key, j
        if best is None:
            lsh.insert(i, sigs[i])
        else:
            found[i] = best
    return found


def semantic_duplicates(embeddings: np.ndarray, clusters: Sequence[int], *, threshold: float = 0.95,
                        skip: set[int] | None = None, block: int = 1024) -> dict[int, int]:
    """Rows whose cosine similarity with an earlier kept row of the same cluster reaches
    ``threshold``; ``embeddings`` are unit-length rows. Compared in blocks, so memory stays at
    ``block`` x cluster size."""
    skip = skip or set()
    by_cluster: dict[int, list[int]] = {}
    for i, c in enumerate(clusters):
        if i not in skip:
            by_cluster.setdefault(int(c), []).append(i)
    found = {}
    for members in by_cluster.values():
        vecs = embeddings[members]
        kept = np.zeros(len(members), dtype=bool)
        for start in range(0, len(members), block):
            sims = vecs[start:start + block] @ vecs[:start + block].T  # each row against all before it
            for r in range(sims.shape[0]):
                i = start + r
                earlier = np.flatnonzero(kept[:i])
                if earlier.size:
                    scores = sims[r, earlier]
                    best = int(np.argmax(scores))
                    if scores[best] >= threshold:
                        found[members[i]] = members[int(earlier[best])]
                        continue
                kept[i] = True
    return found
