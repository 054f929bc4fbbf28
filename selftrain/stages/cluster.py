"""Stage `cluster` — unsupervised learning: the structure of the data, found without labels.

Every pool text is embedded (by the model being trained, mean-pooled, or by all-MiniLM-L6-v2),
clustered (k-means with k chosen by silhouette, or HDBSCAN) and each cluster named by its
c-TF-IDF terms and its most typical texts. Duplicates are found at three strengths — exact after
normalisation, near (MinHash LSH over shingles) and semantic (cosine within a cluster) — and
marked, never deleted: a row with ``duplicate_of`` stays in the pool file but no later stage
trains on it. Each row gets a ``weight`` (inverse cluster size, tempered) that any training
stage's ``order: {policy: weighted, column: weight}`` uses to give rare topics their share.
Separately, the model's input embeddings are clustered into word categories, scored against
WordNet when it is installed (scoring only). Annotations: ``cluster``, ``duplicate_of``,
``weight``; artefacts: ``cluster_report`` (JSON), ``cluster_map`` (PNG), ``cluster_centroids``.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from selftrain.data import clustering, dedup
from selftrain.data.arrowfile import text_batches
from selftrain.data.wordnet import primary_lexnames, wordnet_dir
from selftrain.errors import SelftrainError
from selftrain.evaluation.word_categories import score_against, word_clusters
from selftrain.modeling.embeddings import (
    check_embedder,
    embed_stream,
    load_encoder,
    resolve_embedder,
)
from selftrain.stages.base import (
    RunState,
    Stage,
    StageConfig,
    StageResult,
    code_span,
    fmt,
    register,
)
from selftrain.training.precision import resolve_precision
from selftrain.workspace import atomic_write_bytes, atomic_write_figure, atomic_write_text


class DedupOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exact: bool = Field(True, description="Mark texts equal after normalisation (case, punctuation, spacing).")
    near: float | None = Field(0.7, gt=0, le=1, description="MinHash Jaccard threshold for near duplicates; null: off.")
    shingle: Literal["chars", "words"] = Field("chars", description="Shingle unit for MinHash: character or word n-grams.")
    shingle_size: int = Field(5, ge=1, description="n of the shingle n-grams.")
    num_perm: int = Field(128, ge=16, description="MinHash permutations (more: a closer Jaccard estimate, slower).")
    semantic: float | None = Field(0.95, gt=0, le=1, description="Cosine threshold within a cluster (SemDeDup); null: off.")


class WordCategoryOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    words: int = Field(2000, ge=10, description="Whole-word tokens of the vocabulary to group (vocabulary order).")
    k: int = Field(50, ge=2, description="Number of word categories.")


class ClusterConfig(StageConfig):
    embedder: str = Field("auto", description="model (the model being trained), minilm (all-MiniLM-L6-v2), a local "
                                              "encoder directory, or auto (minilm when installed, else model).")
    max_length: int = Field(128, ge=4, description="Tokens of each text embedded (MiniLM was trained on 128).")
    max_batch_tokens: int = Field(8192, ge=64, description="Padded tokens per embedding batch (texts are batched by length).")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 where the CPU or GPU has it, else fp32.")
    algorithm: Literal["kmeans", "hdbscan"] = Field("kmeans", description="k-means (full batch; MiniBatchKMeans above 50k texts) or HDBSCAN (finds k, marks outliers -1).")
    k: int | Literal["auto"] = Field("auto", description="Number of clusters, or auto: the best silhouette over k_range.")
    lexical: float = Field(1.0, ge=0, description="Weight of each text's TF-IDF/SVD vector joined to its embedding for the partition (k is still chosen on the embedding); 0: embedding only.")
    k_range: tuple[int, int] = Field((2, 20), description="Smallest and largest k tried when k is auto.")
    silhouette_sample: int = Field(2000, ge=50, description="Texts the silhouette is measured on (a seeded sample).")
    min_cluster_size: int = Field(5, ge=2, description="HDBSCAN: the smallest group called a cluster.")
    top_terms: int = Field(8, ge=1, description="c-TF-IDF terms kept per cluster.")
    nearest: int = Field(3, ge=1, description="Most typical texts (nearest the centroid) kept per cluster.")
    dedup: DedupOptions = Field(default_factory=DedupOptions, description="Duplicate detectors and their thresholds.")
    weight_temperature: float = Field(0.5, ge=0, le=1, description="weight = cluster size ** -t (0: uniform, 1: every cluster equal).")
    word_categories: WordCategoryOptions | None = Field(default_factory=WordCategoryOptions,
                                                        description="Cluster the model's input embeddings into word categories; null: skip.")
    map: Literal["tsne", "pca", "none"] = Field("tsne", description="2-D projection for cluster_map.png (t-SNE after PCA to 50, or PCA).")
    map_points: int = Field(2000, ge=10, description="Texts drawn on the map at most (a seeded sample).")

    @model_validator(mode="after")
    def _ranges(self):
        lo, hi = self.k_range
        if not 2 <= lo <= hi:
            raise ValueError(f"k_range must be [low, high] with 2 <= low <= high; got {list(self.k_range)}")
        if isinstance(self.k, int) and self.k < 1:
            raise ValueError("k must be at least 1 (or auto)")
        return self


@register
class ClusterStage(Stage):
    name = "cluster"
    Config = ClusterConfig

    def preflight(self, config, *, model, tokenizer, kind, train_texts):
        check_embedder(config.embedder, "cluster.embedder")
        if isinstance(config.k, int) and config.k > len(train_texts):
            raise SelftrainError(f"cluster.k={config.k} but the pool holds {len(train_texts)} texts; "
                                 "lower k or use k: auto")

    def run(self, state: RunState, config: ClusterConfig) -> StageResult:
        ds = state.pool.ds
        # the texts are read in passes from the memory-mapped pool, never copied into one list
        ids, texts = state.pool.ids(), ds["text"]

        def stream():
            return (t for batch in text_batches(ds) for t in batch)

        if isinstance(config.k, int) and config.k > len(texts):
            raise SelftrainError(f"cluster.k={config.k} but the pool holds {len(texts)} texts")
        empty: set[int] = set()

        def normalised():  # one pass finds the empty texts and feeds exact dedup
            for i, text in enumerate(stream()):
                norm = dedup.normalise(text)
                if not norm:
                    empty.add(i)
                yield norm

        # 1. duplicates that need no model: exact, then near (each keeps the first of a group)
        started = time.perf_counter()
        duplicate: dict[int, int] = {}
        kinds: dict[str, int] = {}
        found = dedup.exact_duplicates(normalised(), normalised=True)  # the pass that also finds empty texts
        if config.dedup.exact:
            found = {i: j for i, j in found.items() if i not in empty}
            duplicate.update(found)
            kinds["exact"] = len(found)
        if config.dedup.near is not None:
            found = dedup.near_duplicates(stream(), threshold=config.dedup.near, num_perm=config.dedup.num_perm,
                                          unit=config.dedup.shingle, n=config.dedup.shingle_size,
                                          skip=set(duplicate) | empty, seed=state.seed)
            duplicate.update(found)
            kinds["near"] = len(found)
        dedup_seconds = time.perf_counter() - started

        # 2. embed and cluster the distinct texts
        kept = [i for i in range(len(texts)) if i not in duplicate and i not in empty]
        kept_ds = ds.select(kept)
        embedder = resolve_embedder(config.embedder)
        needs_model = embedder == "model" or config.word_categories is not None
        model, tokenizer = state.load_model() if needs_model else (None, None)  # not loaded when nothing uses it
        encoder, encoder_tok = (model, tokenizer) if embedder == "model" else load_encoder(embedder)
        encoder = encoder.to(state.device)
        precision = resolve_precision(config.precision, state.device)
        started = time.perf_counter()
        # written to a memory-mapped file as they are made (removed at the end of the stage)
        vectors = embed_stream(encoder, encoder_tok, text_batches(kept_ds, size=4096), len(kept),
                               state.stage_dir / "embeddings.npy", max_length=config.max_length,
                               max_tokens=config.max_batch_tokens, precision=precision)
        embed_seconds = time.perf_counter() - started
        found = find_clusters(vectors, kept_ds["text"], config, state.seed)
        label = dict(zip(kept, found.labels.tolist()))

        # 3. semantic duplicates: near in meaning, inside one cluster
        if config.dedup.semantic is not None and len(kept):
            found_sem = dedup.semantic_duplicates(vectors, found.labels, threshold=config.dedup.semantic)
            duplicate.update({kept[i]: kept[j] for i, j in found_sem.items()})
            kinds["semantic"] = len(found_sem)

        # 4. annotations: every row gets a cluster (a duplicate its original's; an empty text -1)
        def root(i: int) -> int:
            while i in duplicate:
                i = duplicate[i]
            return i
        cluster_of = {i: (-1 if i in empty else label[root(i)]) for i in range(len(texts))}
        trained = [i for i in range(len(texts)) if i not in duplicate]
        weights = clustering.balanced_weights([cluster_of[i] for i in trained], config.weight_temperature)
        annotations = {
            "cluster": {ids[i]: cluster_of[i] for i in range(len(texts))},
            "weight": {ids[i]: round(w, 6) for i, w in zip(trained, weights)},
        }
        if duplicate:
            annotations["duplicate_of"] = {ids[i]: ids[root(j)] for i, j in duplicate.items()}

        # 5. names, typical texts, word categories, the map
        distinct = [i for i in kept if i not in duplicate]
        named = naming_sample(distinct, cluster_of)
        terms = clustering.ctfidf_terms(list(ds.select(named)["text"]), [cluster_of[i] for i in named],
                                        config.top_terms) if named else {}
        typical = clustering.nearest_to_centroids(vectors, found.labels, found.centroids, config.nearest)
        sizes = Counter(cluster_of[i] for i in trained)
        weight_of = {cluster_of[i]: w for i, w in zip(trained, weights)}  # one weight per cluster
        clusters = [{"cluster": c, "size": sizes[c], "share": sizes[c] / max(1, len(trained)), "weight": weight_of[c],
                     "name": " / ".join(t for t, _ in terms.get(c, [])[:3]) or ("(empty texts)" if c == -1 else "-"),
                     "terms": [[t, round(s, 5)] for t, s in terms.get(c, [])],
                     "typical": [_snippet(texts[kept[j]]) for j in typical.get(c, [])]}
                    for c in sorted(sizes)]
        words = self._word_categories(model, tokenizer, config, state.seed)
        report = {"embedder": embedder, "precision": precision, "algorithm": config.algorithm, "k": found.k,
                  "silhouette": {str(k): round(s, 4) for k, s in found.scores.items()}, "clusters": clusters,
                  "duplicates": kinds, "empty": len(empty), "word_categories": words}
        artefacts = {"cluster_report": state.stage_dir / "cluster_report.json",
                     "cluster_centroids": state.stage_dir / "cluster_centroids.npz"}
        atomic_write_text(artefacts["cluster_report"], json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        _save_npz(artefacts["cluster_centroids"], centroids=found.centroids, embedder=np.array(embedder),
                  max_length=np.array(config.max_length))
        if config.map != "none" and len(kept) >= 3:
            artefacts["cluster_map"] = draw_map(vectors, found.labels, {c["cluster"]: c["name"] for c in clusters},
                                                state.stage_dir / "cluster_map.png", method=config.map,
                                                points=config.map_points, seed=state.seed)
        agreement = float((clustering.assign(vectors, found.centroids) == found.labels).mean()) \
            if found.k and config.algorithm == "kmeans" else None  # how well the saved centroids place texts
        metrics = {"embedder": embedder, "precision": precision, "algorithm": config.algorithm, "k": found.k,
                   "k_requested": config.k, "centroid_agreement": agreement,
                   "texts": len(texts), "embedded": len(kept),
                   "embed_texts_per_s": len(kept) / embed_seconds if embed_seconds > 0 else None,
                   "dedup_seconds": dedup_seconds, "duplicates": kinds, "duplicate_total": len(duplicate),
                   "empty": len(empty), "best_silhouette": max(found.scores.values()) if found.scores else None,
                   "clusters": [{k: c[k] for k in ("cluster", "size", "share", "weight", "name")}
                                | {"typical": c["typical"][:1]} for c in clusters]}
        if words:
            metrics["word_categories"] = {k: v for k, v in words.items() if k in ("purity", "random_purity", "nmi",
                                                                                    "scored_words", "k")}
            metrics["word_categories"]["examples"] = self._example_categories(words)
        (state.stage_dir / "embeddings.npy").unlink(missing_ok=True)  # scratch: the centroids are kept
        return StageResult(annotations=annotations, artefacts=artefacts, metrics=metrics)

    @staticmethod
    def _word_categories(model, tokenizer, config: ClusterConfig, seed: int) -> dict:
        if config.word_categories is None:
            return {}
        found = word_clusters(model, tokenizer, words=config.word_categories.words, k=config.word_categories.k, seed=seed)
        out = {"k": len(found["clusters"]), "words": len(found["words"]),
               "categories": [c[:12] for c in found["clusters"]]}
        if wordnet_dir() is not None:  # WordNet only scores: it never shapes the categories
            score = score_against(found, primary_lexnames(set(found["words"])), seed=seed)
            out.update({k: v for k, v in score.items() if k != "majority"})
            out["wordnet"] = score.get("majority")
        return out

    @staticmethod
    def _example_categories(words: dict, n: int = 6) -> list[dict]:
        """The word groups to show a person: the purest by WordNet when it scored them, else the largest."""
        groups = [{"words": ws[:10], **(words["wordnet"][i] if words.get("wordnet") else {})}
                  for i, ws in enumerate(words["categories"])]
        if words.get("wordnet"):
            groups.sort(key=lambda g: -(g.get("share") or 0))
        return groups[:n]

    def report(self, entry: dict) -> str:
        m = entry["stage_metrics"]
        if "k" not in m:
            return ""
        dups = ", ".join(f"{n} {kind}" for kind, n in m["duplicates"].items()) or "none looked for"
        lines = [f"{m['texts']} texts, {m['embedded']} embedded by {m['embedder']} ({m['precision']}, "
                 f"{fmt(m.get('embed_texts_per_s'), 1)} texts/s); {m['algorithm']} found {m['k']} clusters"
                 + (f" (best silhouette {fmt(m['best_silhouette'], 3)})" if m.get("best_silhouette") is not None else "")
                 + f". Duplicates marked (kept in the pool, never trained on): {dups}; {m['empty']} empty texts.", "",
                 "| cluster | texts | share | weight | named by | most typical text |", "|---|---|---|---|---|---|"]
        lines += [f"| {c['cluster']} | {c['size']} | {c['share']:.1%} | {c['weight']:.2f} | {c['name']} | "
                  f"{code_span((c.get('typical') or [''])[0], 200)} |" for c in m["clusters"]]
        if m.get("centroid_agreement") is not None:
            lines += ["", f"The saved centroids (embedding space) place {m['centroid_agreement']:.1%} of these texts in "
                          "their own cluster."]
        words = m.get("word_categories")
        if words and words.get("purity") is not None:
            lines += ["", f"Word categories from the model's input embeddings: {words['k']} groups of "
                          f"{words['scored_words']} words WordNet knows, purity {words['purity']:.3f} against its "
                          f"lexicographer categories (random partition {words['random_purity']:.3f}), "
                          f"NMI {words['nmi']:.3f}."]
        if words and words.get("examples"):
            lines += ["", "| words grouped together | WordNet's category (share) |", "|---|---|"]
            lines += [f"| {' '.join(g['words'])} | {g.get('category') or '-'}"
                      + (f" ({g['share']:.0%})" if g.get("share") is not None else "") + " |" for g in words["examples"]]
        arts = entry.get("artefacts") or {}
        if "cluster_map" in arts:
            lines += ["", f"![clusters]({arts['cluster_map']})"]
        if "cluster_report" in arts:
            lines += ["", f"Terms, typical texts and word categories: `{arts['cluster_report']}`."]
        return "\n".join(lines)


def find_clusters(vectors: np.ndarray, texts: Sequence[str], config: ClusterConfig, seed: int) -> clustering.Clustering:
    """The stage's partition of embedded texts (bench/cluster_bbc.py measures this same function)."""
    if not len(vectors):
        return clustering.Clustering(np.zeros(0, dtype=int), np.zeros((0, vectors.shape[1])), 0, {})
    lexical = clustering.lexical_vectors(texts, seed=seed) if config.lexical > 0 else None
    return clustering.cluster(vectors, k=None if config.k == "auto" else config.k, seed=seed,
                              k_min=config.k_range[0], k_max=config.k_range[1], sample=config.silhouette_sample,
                              algorithm=config.algorithm, min_cluster_size=config.min_cluster_size,
                              lexical=lexical, lexical_weight=config.lexical)


NAMING_TEXTS = 2000  # texts per cluster its terms are counted on (evenly spaced): all of a small cluster


def naming_sample(rows: list[int], cluster_of: dict[int, int], per_cluster: int = NAMING_TEXTS) -> list[int]:
    """The rows whose words name the clusters: every row of a cluster up to ``per_cluster``, an
    evenly spaced subset of a larger one, in pool order."""
    members: dict[int, list[int]] = {}
    for i in rows:
        members.setdefault(cluster_of[i], []).append(i)
    picked = []
    for group in members.values():
        picked += group if len(group) <= per_cluster else [
            group[int(j)] for j in np.linspace(0, len(group) - 1, per_cluster).round()]
    return sorted(picked)


def _snippet(text: str, chars: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= chars else text[:chars].rsplit(" ", 1)[0] + " ..."


def _save_npz(path: Path, **arrays) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def draw_map(vectors: np.ndarray, labels: np.ndarray, names: dict[int, str], path: Path, *,
             method: str = "tsne", points: int = 2000, seed: int = 0) -> Path:
    """A 2-D projection of the embeddings, one colour per cluster, legend by cluster name."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(vectors), size=min(points, len(vectors)), replace=False))
    x = vectors[picked]
    if method == "tsne" and len(x) > 5:
        x = PCA(n_components=min(50, *x.shape), random_state=seed).fit_transform(x)
        xy = TSNE(n_components=2, perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=seed).fit_transform(x)
    else:
        xy = PCA(n_components=2, random_state=seed).fit_transform(x)
    fig, ax = plt.subplots(figsize=(8, 6), dpi=110)
    cmap = plt.get_cmap("tab20")
    for c in sorted(set(labels[picked].tolist())):
        at = labels[picked] == c
        colour = "lightgrey" if c == -1 else cmap(c % 20)
        ax.scatter(xy[at, 0], xy[at, 1], s=6, color=colour, label=f"{c}: {names.get(c, '')}"[:48])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{len(picked)} texts, {method.upper()} of their embeddings, coloured by cluster")
    if len(set(labels.tolist())) <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best", frameon=False)
    fig.tight_layout()
    return atomic_write_figure(fig, path)
