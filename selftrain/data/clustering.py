"""Clusters of embedded texts, their names, and the weights that balance them.

k-means is scikit-learn's MiniBatchKMeans; with ``k`` unknown it is fitted for every k in a range
and the k with the highest silhouette score on a fixed sample wins (cosine geometry: the vectors
are unit length). HDBSCAN (scikit-learn) finds the number itself and leaves outliers as -1.
Clusters are named the way BERTopic does it, by class-based TF-IDF: all texts of a cluster are one
document, a term scores by its frequency in that cluster times log(1 + mean words per cluster /
its frequency over all clusters), so words common everywhere sink and words peculiar to one
cluster rise. Optionally the partition also sees each text's whole vocabulary (TF-IDF reduced by
SVD), joined to its embedding (``cluster(lexical=...)``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import HDBSCAN, KMeans, MiniBatchKMeans
from sklearn.decomposition import PCA, TruncatedSVD
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.metrics import silhouette_score
from sklearn.preprocessing import normalize


@dataclass
class Clustering:
    labels: np.ndarray  # cluster per row; -1: HDBSCAN's noise
    centroids: np.ndarray  # [clusters, dim], unit length, in label order
    k: int
    scores: dict[int, float]  # silhouette per k tried (empty when k was given)


MINIBATCH_ABOVE = 50_000  # rows; below it full-batch k-means is fast and steadier (see kmeans)
FIT_SAMPLE = 10_000  # rows each candidate k is fitted on when k is chosen
HDBSCAN_DIMS = 50  # HDBSCAN's neighbour search degrades to brute force in high dimensions: PCA first


def kmeans(vectors: np.ndarray, k: int, seed: int, n_init: int = 10):
    """k-means, seeded, best of ``n_init`` starts. Up to ``MINIBATCH_ABOVE`` rows it is Lloyd's full
    batch (scikit-learn KMeans): on BBC News MiniBatchKMeans gave NMI 0.75-0.85 across seeds where
    KMeans gave 0.857 for every seed, in about 2 s. Above it, MiniBatchKMeans keeps the time flat."""
    if len(vectors) > MINIBATCH_ABOVE:
        return MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=n_init, batch_size=4096).fit(vectors)
    return KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit(vectors)


def choose_k(vectors: np.ndarray, k_min: int, k_max: int, seed: int, sample: int = 2000) -> tuple[int, dict[int, float]]:
    """The k in [k_min, k_max] whose k-means labels have the highest silhouette (cosine) on a seeded
    sample of at most ``sample`` rows; returns it and every k's score. Each candidate is fitted on
    at most ``FIT_SAMPLE`` rows: choosing k needs the shape of the data, not every row of it."""
    rng = np.random.default_rng(seed)
    fitted = vectors[np.sort(rng.choice(len(vectors), size=min(FIT_SAMPLE, len(vectors)), replace=False))]
    picked = rng.choice(len(fitted), size=min(sample, len(fitted)), replace=False)
    k_max = min(k_max, len(picked) - 1)
    scores = {}
    for k in range(max(2, k_min), k_max + 1):
        labels = kmeans(fitted, k, seed, n_init=3).labels_
        if len(set(labels[picked])) < 2:  # the sample saw one cluster: silhouette is undefined
            continue
        scores[k] = float(silhouette_score(fitted[picked], labels[picked], metric="cosine"))
    if not scores:
        return 1, scores
    return max(scores, key=lambda k: (scores[k], -k)), scores


LEXICAL_FIT_TEXTS = 20000  # TF-IDF and SVD are fitted on at most this many texts (evenly spaced)


def lexical_vectors(texts: Sequence[str], dims: int = 100, seed: int = 0,
                    fit_texts: int = LEXICAL_FIT_TEXTS) -> np.ndarray:
    """Each text's TF-IDF vector (sublinear counts, English stop words out) reduced to ``dims`` by
    truncated SVD (latent semantic analysis), unit length: the whole text's vocabulary, where an
    embedding sees only its first tokens. On more than ``fit_texts`` texts the vocabulary and the
    SVD are fitted on an evenly spaced sample and every text is transformed 10,000 at a time, so a
    large pool is never one sparse matrix."""
    n = len(texts)
    if n < 3:
        return np.zeros((n, 0), dtype=np.float32)
    sample = list(texts) if n <= fit_texts else [texts[int(i)] for i in np.linspace(0, n - 1, fit_texts).round()]
    vectorizer = TfidfVectorizer(stop_words="english", sublinear_tf=True, max_df=0.5, min_df=2 if n >= 50 else 1)
    try:
        tfidf = vectorizer.fit_transform(sample)
    except ValueError:  # no term left (stop words only)
        return np.zeros((n, 0), dtype=np.float32)
    dims = min(dims, tfidf.shape[0] - 1, tfidf.shape[1] - 1)
    if dims < 1:
        return np.zeros((n, 0), dtype=np.float32)
    svd = TruncatedSVD(n_components=dims, random_state=seed)
    reduced = svd.fit_transform(tfidf)
    if n > fit_texts:
        reduced = np.vstack([svd.transform(vectorizer.transform(list(texts[i:i + 10000])))
                             for i in range(0, n, 10000)])
    return (reduced / np.maximum(np.linalg.norm(reduced, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def cluster(vectors: np.ndarray, *, k: int | None, seed: int, k_min: int = 2, k_max: int = 20,
            sample: int = 2000, algorithm: str = "kmeans", min_cluster_size: int = 5,
            lexical: np.ndarray | None = None, lexical_weight: float = 0.0) -> Clustering:
    """Cluster unit-length ``vectors``: k-means with ``k`` given or chosen by silhouette (k=None),
    or HDBSCAN. A given k above the number of distinct vectors is lowered to it; too few distinct
    vectors to show two clusters (or fewer than HDBSCAN's ``min_cluster_size``) give one cluster.

    With ``lexical`` rows (``lexical_vectors``) and a weight above 0, the partition is fitted on
    each embedding joined to its weighted lexical vector, while k is still chosen on the embedding
    alone: on BBC News the silhouette of the embedding peaks at the true 5 topics, that of the
    joined or lexical vectors keeps rising with k, and the joined vectors separate the 5 better
    (NMI 0.857 -> 0.904 with MiniLM at 128 tokens; see bench/cluster_bbc.py)."""
    distinct = count_distinct(vectors, limit=max(k or 0, k_max) + 1)
    features = vectors
    if lexical is not None and lexical_weight > 0 and lexical.shape[1]:
        joined = np.hstack([vectors, lexical_weight * lexical])
        features = joined / np.maximum(np.linalg.norm(joined, axis=1, keepdims=True), 1e-12)
    scores: dict[int, float] = {}
    if algorithm == "hdbscan" and distinct >= 2 and len(vectors) >= min_cluster_size:
        if features.shape[1] > HDBSCAN_DIMS and len(features) > HDBSCAN_DIMS:
            features = PCA(n_components=HDBSCAN_DIMS, random_state=seed).fit_transform(features)
        labels = HDBSCAN(min_cluster_size=min_cluster_size).fit(features).labels_
    elif algorithm == "hdbscan" or k == 1 or distinct < 2 or (k is None and distinct < 3):
        labels = np.zeros(len(vectors), dtype=int)  # too few (distinct) texts to tell groups apart: one
    else:
        if k is None:
            k, scores = choose_k(vectors, k_min, min(k_max, distinct - 1), seed, sample)
        k = min(k, distinct)  # no more clusters than distinct texts
        labels = kmeans(features, k, seed).labels_ if k > 1 else np.zeros(len(vectors), dtype=int)
    labels = relabel_by_size(np.asarray(labels))
    found = sorted(set(labels.tolist()) - {-1})
    centroids = np.stack([_unit(vectors[labels == c].mean(0)) for c in found]) if found else np.zeros((0, vectors.shape[1]))
    return Clustering(labels=labels, centroids=centroids, k=len(found), scores=scores)


def count_distinct(vectors: np.ndarray, limit: int) -> int:
    """How many distinct rows ``vectors`` has, counted up to ``limit`` (enough to decide k without
    sorting every row)."""
    remaining = np.ones(len(vectors), dtype=bool)
    found = 0
    while remaining.any() and found < limit:
        first = vectors[np.argmax(remaining)]
        remaining &= np.abs(vectors - first).max(axis=1) > 1e-6
        found += 1
    return found


def relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0, 1, ... from the largest cluster down (ties by first row), noise kept at
    -1: the same partition always reads the same, whatever numbers the algorithm gave it."""
    counts = Counter(int(c) for c in labels if c != -1)
    first = {}
    for i, c in enumerate(labels.tolist()):
        first.setdefault(c, i)
    ranked = sorted(counts, key=lambda c: (-counts[c], first[c]))
    mapping = {c: new for new, c in enumerate(ranked)} | {-1: -1}
    return np.array([mapping[int(c)] for c in labels], dtype=int)


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def assign(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The nearest centroid (cosine) of each vector: new texts placed into existing clusters."""
    return np.argmax(vectors @ centroids.T, axis=1)


def ctfidf_terms(texts: Sequence[str], labels: Sequence[int], top_n: int = 8) -> dict[int, list[tuple[str, float]]]:
    """The ``top_n`` terms of each cluster by class-based TF-IDF (BERTopic's c-TF-IDF), with scores."""
    classes = sorted(set(int(c) for c in labels))
    docs = [" ".join(t for t, c in zip(texts, labels) if c == cls) for cls in classes]
    try:
        vectorizer = CountVectorizer(stop_words="english", token_pattern=r"(?u)\b[A-Za-z][A-Za-z]+\b")
        counts = vectorizer.fit_transform(docs).astype(float)  # sparse: clusters x vocabulary
    except ValueError:  # nothing but stop words or digits
        return {cls: [] for cls in classes}
    terms = vectorizer.get_feature_names_out()
    term_totals = np.asarray(counts.sum(0)).ravel()
    mean_words = term_totals.sum() / len(classes)
    idf = np.log(1 + mean_words / np.maximum(term_totals, 1))
    scores = normalize(counts, norm="l1").multiply(idf).tocsr()  # term frequency in the cluster x idf
    out = {}
    for row, cls in enumerate(classes):
        start, stop = scores.indptr[row], scores.indptr[row + 1]
        values, columns = scores.data[start:stop], scores.indices[start:stop]
        best = np.lexsort((columns, -values))[:top_n]  # highest score first, ties by vocabulary order
        out[cls] = [(str(terms[columns[j]]), float(values[j])) for j in best if values[j] > 0]
    return out


def nearest_to_centroids(vectors: np.ndarray, labels: np.ndarray, centroids: np.ndarray, n: int = 3) -> dict[int, list[int]]:
    """Per cluster, the rows nearest its centroid (the most typical members), nearest first."""
    out = {}
    for c in range(len(centroids)):
        members = np.flatnonzero(labels == c)
        sims = vectors[members] @ centroids[c]
        out[c] = [int(members[j]) for j in np.argsort(-sims, kind="stable")[:n]]
    return out


def balanced_weights(labels: Sequence[int], temperature: float = 0.5) -> list[float]:
    """A sampling weight per row, proportional to (its cluster's size) ** -temperature and scaled
    to mean 1: 0 keeps rows uniform (big clusters dominate as they do in the data), 1 gives every
    cluster the same total weight, between them tempers the imbalance (as multilingual LMs
    temper language sampling). Rows in no cluster (-1: HDBSCAN's outliers, empty texts) get the
    mean weight of the clustered rows: neither favoured nor pushed down as one big group."""
    sizes = Counter(int(c) for c in labels if c != -1)
    raw = [sizes[int(c)] ** -temperature if c != -1 else None for c in labels]
    clustered = [w for w in raw if w is not None]
    mean = math.fsum(clustered) / len(clustered) if clustered else 1.0
    raw = [mean if w is None else w for w in raw]
    scale = len(raw) / math.fsum(raw) if raw else 1.0
    return [w * scale for w in raw]
