"""Word categories found in the model's own input embeddings, and how well they match WordNet.

The rows of a language model's input embedding matrix place words that occur in similar contexts
near each other. Clustering the rows of whole-word tokens (centred, then unit length, so the
direction every row shares does not dominate) groups colours with colours and weekdays with
weekdays, untold. To measure it, each word's most frequent WordNet sense gives a coarse category
(``noun.time``, ``noun.food``...) and the clusters are scored by purity and NMI against them —
next to the purity of a random partition with the same cluster sizes, since purity rises with the
number of clusters alone. WordNet only ever scores; it never shapes the clusters.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from sklearn.metrics import normalized_mutual_info_score

from selftrain.data.clustering import kmeans, relabel_by_size
from selftrain.modeling.embeddings import whole_word_tokens


def word_clusters(model, tokenizer, *, words: int = 2000, k: int = 50, seed: int = 0) -> dict:
    """Cluster the input-embedding rows of up to ``words`` whole-word tokens into ``k`` groups.
    Returns ``{"words": [...], "labels": [...], "clusters": [[words, most central first], ...]}``."""
    pairs = whole_word_tokens(tokenizer, words)
    if len(pairs) < 2:
        return {"words": [w for w, _ in pairs], "labels": [0] * len(pairs), "clusters": [[w for w, _ in pairs]]}
    table = model.get_input_embeddings().weight.detach().float().cpu().numpy()
    vectors = table[[i for _, i in pairs]]
    vectors = vectors - vectors.mean(0)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    k = max(1, min(k, len(pairs) // 2))
    labels = relabel_by_size(kmeans(vectors, k, seed).labels_) if k > 1 else np.zeros(len(pairs), dtype=int)
    clusters = []
    for c in range(labels.max() + 1):
        members = np.flatnonzero(labels == c)
        centre = vectors[members].mean(0)
        ranked = members[np.argsort(-(vectors[members] @ centre), kind="stable")]
        clusters.append([pairs[i][0] for i in ranked])
    return {"words": [w for w, _ in pairs], "labels": labels.tolist(), "clusters": clusters}


def purity(labels: list[int], categories: list[str]) -> float:
    """Share of items whose category is their cluster's most common one."""
    by_cluster: dict[int, Counter] = {}
    for c, cat in zip(labels, categories):
        by_cluster.setdefault(c, Counter())[cat] += 1
    return sum(cnt.most_common(1)[0][1] for cnt in by_cluster.values()) / max(1, len(labels))


def score_against(found: dict, reference: dict[str, str], seed: int = 0, shuffles: int = 20) -> dict:
    """Purity and NMI of ``word_clusters`` output against ``reference`` ({word: category}) on the words
    it knows, beside the mean purity of ``shuffles`` random partitions with the same cluster sizes;
    and each cluster's majority category with its share."""
    known = [(lab, reference[w]) for w, lab in zip(found["words"], found["labels"]) if w in reference]
    if not known:
        return {"scored_words": 0}
    labels, cats = [lab for lab, _ in known], [cat for _, cat in known]
    rng = np.random.default_rng(seed)
    chance = float(np.mean([purity(list(rng.permutation(labels)), cats) for _ in range(shuffles)]))
    majority = []
    for members in found["clusters"]:
        counts = Counter(reference[w] for w in members if w in reference)
        top, n = counts.most_common(1)[0] if counts else (None, 0)
        majority.append({"category": top, "share": n / max(1, sum(counts.values()))})
    return {"scored_words": len(known), "purity": purity(labels, cats), "random_purity": chance,
            "nmi": float(normalized_mutual_info_score(cats, labels)), "majority": majority}
