"""The `cluster` stage and its parts: duplicates planted and found, separated groups recovered,
names that say what a cluster holds, weights that balance, word categories, and the runner
keeping marked duplicates out of every later stage while never deleting them."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import adjusted_rand_score

from selftrain.config import ModelConfig, config_from_dict
from selftrain.data import clustering, dedup
from selftrain.data.order import order_of
from selftrain.data.pool import Pool
from selftrain.errors import SelftrainError
from selftrain.evaluation.word_categories import score_against, word_clusters
from selftrain.modeling.embeddings import embed_texts, length_batches, whole_word_tokens
from selftrain.modeling.factory import build_initial, train_tokenizer
from selftrain.runner import Runner
from tests.conftest import MICRO_ARCH, make_corpus, micro_config
from tests.example_stage import LengthClassesStage  # noqa: F401  (registers example_lengths)

VOCAB = [f"{a}{b}{c}" for a in "bcdfgklmnprstvz" for b in "aeiou" for c in "dgklmnrst"]  # 675 made-up words


def random_texts(n: int, words: int = 30, seed: int = 0) -> list[str]:
    """Texts of random words: no two share more than chance does, so every duplicate is planted."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        sentences = [" ".join(rng.choice(VOCAB) for _ in range(words // 3)).capitalize() + "." for _ in range(3)]
        out.append(" ".join(sentences))
    return out


def change_words(text: str, k: int, seed: int) -> str:
    rng = random.Random(seed)
    words = text.split()
    for i in rng.sample(range(len(words)), k):
        words[i] = rng.choice(VOCAB)
    return " ".join(words)


@pytest.fixture
def micro_lm():
    model, tok, _ = build_initial(ModelConfig(preset="tiny", vocab_size=320, architecture=MICRO_ARCH),
                                  make_corpus(60).split("\n\n"), 0)
    return model.eval(), tok


def run_pipeline(path):
    return Runner(config_from_dict(yaml.safe_load(path.read_text()))).run()


# ---------------------------------------------------------------------------- duplicates
def test_planted_exact_and_near_duplicates_are_found_and_nothing_else():
    texts = random_texts(200)
    planted_exact = {200: 3, 201: 50}
    planted_near = {202: 7, 203: 90, 204: 120}
    texts += ["  " + texts[3].upper() + " ", texts[50].replace(".", "!")]  # case, spacing, punctuation
    texts += [change_words(texts[7], 2, 1), change_words(texts[90], 1, 2)]
    first, *rest = texts[120].split(". ")
    texts.append(". ".join([*rest, first]))  # sentences reordered

    exact = dedup.exact_duplicates(texts)
    assert exact == planted_exact
    near = dedup.near_duplicates(texts, threshold=0.6, skip=set(exact))
    assert near == planted_near  # each points at its original; no distinct pair is flagged


def test_near_duplicates_keep_the_first_of_a_group_and_point_at_kept_rows():
    base = random_texts(1, words=60, seed=3)[0]
    texts = [base, change_words(base, 1, 0), change_words(base, 1, 1), random_texts(1, seed=9)[0]]
    found = dedup.near_duplicates(texts, threshold=0.7)
    assert found == {1: 0, 2: 0}
    assert dedup.near_duplicates(["", "", "x"], threshold=0.7) == {1: 0}  # empty texts are one shingle


def test_semantic_duplicates_only_within_a_cluster():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 16))
    vecs = np.vstack([base, base[1] + 0.01 * rng.normal(size=16), base[2] + 0.01 * rng.normal(size=16)])
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    assert dedup.semantic_duplicates(vecs, [0, 1, 2, 3, 1, 2], threshold=0.95) == {4: 1, 5: 2}
    assert dedup.semantic_duplicates(vecs, [0, 1, 2, 3, 0, 0], threshold=0.95) == {}  # other clusters: not compared
    assert dedup.semantic_duplicates(vecs, [0] * 6, threshold=0.95, block=2) == {4: 1, 5: 2}  # blocked the same


# ---------------------------------------------------------------------------- clusters
def blobs(per_group: list[int], dim: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(per_group), dim)) * 4
    x = np.vstack([c + rng.normal(size=(n, dim)) for c, n in zip(centres, per_group)])
    truth = np.repeat(np.arange(len(per_group)), per_group)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), truth


def test_well_separated_groups_are_recovered_with_k_chosen_automatically():
    x, truth = blobs([60, 50, 40, 30])
    found = clustering.cluster(x, k=None, seed=0, k_max=10)
    assert found.k == 4 and max(found.scores, key=found.scores.get) == 4
    assert adjusted_rand_score(truth, found.labels) == 1.0
    assert found.labels[0] == 0 and found.labels[-1] == 3  # numbered from the largest cluster down
    again = clustering.cluster(x, k=None, seed=0, k_max=10)
    assert (again.labels == found.labels).all()  # same seed, same clusters
    other = clustering.cluster(x, k=4, seed=5)
    assert adjusted_rand_score(found.labels, other.labels) == 1.0
    assert (clustering.assign(x, found.centroids) == found.labels).all()
    hdb = clustering.cluster(x, k=None, seed=0, algorithm="hdbscan", min_cluster_size=10)
    assert adjusted_rand_score(truth[hdb.labels >= 0], hdb.labels[hdb.labels >= 0]) == 1.0


def test_degenerate_inputs_have_defined_clusters():
    x, _ = blobs([5])
    assert clustering.cluster(x[:1], k=None, seed=0).k == 1  # one text
    same = np.repeat(x[:1], 6, axis=0)
    one = clustering.cluster(same, k=None, seed=0)  # all identical: one cluster, no silhouette
    assert one.k == 1 and set(one.labels) == {0} and one.scores == {}
    assert clustering.cluster(x, k=1, seed=0).labels.tolist() == [0] * 5
    assert clustering.cluster(x[:2], k=None, seed=0).k == 1  # two texts cannot show two clusters


def test_ctfidf_names_a_cluster_by_the_words_peculiar_to_it():
    sport = ["the striker scored a goal in the match", "the goalkeeper saved the penalty in the match",
             "a late goal won the match for the team"]
    cooking = ["stir the sauce and add the butter", "bake the bread and add some butter",
               "the sauce needs more salt and butter"]
    terms = clustering.ctfidf_terms(sport + cooking, [0, 0, 0, 1, 1, 1], top_n=3)
    assert {"match", "goal"} <= {t for t, _ in terms[0]}
    assert {"butter", "sauce"} <= {t for t, _ in terms[1]}
    assert clustering.ctfidf_terms(["the and of", "a the"], [0, 1]) == {0: [], 1: []}  # only stop words


def test_balanced_weights_temper_cluster_sizes():
    labels = [0] * 90 + [1] * 10
    flat = clustering.balanced_weights(labels, 0.0)
    assert flat == pytest.approx([1.0] * 100)
    equal = clustering.balanced_weights(labels, 1.0)
    assert sum(equal[:90]) == pytest.approx(sum(equal[90:]))  # each cluster the same total weight
    half = clustering.balanced_weights(labels, 0.5)
    assert np.mean(half) == pytest.approx(1.0) and half[-1] / half[0] == pytest.approx(3.0)
    draws = [i for s in range(20) for i in order_of(half, "weighted", s)]
    assert 0.2 < sum(i >= 90 for i in draws) / len(draws) < 0.35  # rare cluster: 25% of draws, not 10%
    unweighed = [i for s in range(50) for i in order_of([None, 2.0, 2.0], "weighted", s)]
    assert 0.25 < unweighed.count(0) / len(unweighed) < 0.42  # a row added later is drawn at the mean weight


# ---------------------------------------------------------------------------- embeddings
def test_length_bucketed_embeddings_equal_one_at_a_time(micro_lm):
    model, tok = micro_lm
    texts = ["a short one", "a somewhat longer text about the garden and the house", "x", "",
             "the cat sees the red ball"]
    together = embed_texts(model, tok, texts, max_tokens=24)
    alone = np.vstack([embed_texts(model, tok, [t]) for t in texts])
    assert together.shape == (5, model.config.hidden_size)
    np.testing.assert_allclose(together, alone, atol=1e-5)  # padding and order change nothing
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert length_batches([3, 10, 1, 7], 20) == [[1, 3], [0, 2]]  # longest first, padded size <= budget
    in_bf16 = embed_texts(model, tok, texts, precision="bf16")  # autocast (emulated where the CPU lacks bf16)
    assert in_bf16.dtype == np.float32 and float((in_bf16 * together).sum(1).min()) > 0.98


# ---------------------------------------------------------------------------- word categories
def test_word_categories_found_in_input_embeddings_and_scored(micro_lm):
    groups = {"colour": ["red", "green", "blue", "yellow", "purple", "orange"],
              "day": ["monday", "tuesday", "friday", "sunday", "saturday", "thursday"],
              "number": ["seven", "eight", "three", "twelve", "twenty", "nine"]}
    words = [w for ws in groups.values() for w in ws]
    tok = train_tokenizer([" " + " ".join(words)] * 50, vocab_size=600)
    model, _ = micro_lm
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    rng = np.random.default_rng(0)
    centres = {g: rng.normal(size=model.config.hidden_size) * 3 for g in groups}
    with torch.no_grad():  # plant the structure a trained model would have: each group near its own centre
        emb = model.get_input_embeddings().weight
        emb.normal_()
        for g, ws in groups.items():
            for w in ws:
                (i,) = tok(" " + w, add_special_tokens=False)["input_ids"]
                emb[i] = torch.tensor(centres[g] + rng.normal(size=len(centres[g])) * 0.3)
    found = word_clusters(model, tok, words=1000, k=6)
    assert set(words) <= set(found["words"])
    truth = {w: g for g, ws in groups.items() for w in ws}
    score = score_against(found, truth)
    assert score["scored_words"] == 18 and score["purity"] == 1.0 and score["random_purity"] < 0.8
    assert {m["category"] for m in score["majority"] if m["share"] == 1.0} == set(groups)
    assert ("red", tok(" red", add_special_tokens=False)["input_ids"][0]) in whole_word_tokens(tok, 100)


# ---------------------------------------------------------------------------- the stage, through the runner
def planted_corpus(path):
    texts = random_texts(40, words=24)
    texts += [texts[0].upper(), change_words(texts[1], 1, 0), change_words(texts[2], 1, 1)]  # 3 duplicates
    path.write_text("\n\n".join(texts) + "\n")
    return texts


def cluster_options(**kw):
    return {"embedder": "model", "k": 3, "map": "pca", "word_categories": {"words": 50, "k": 3},
            "dedup": {"near": 0.6, "semantic": None}, **kw}


def test_later_stages_skip_rows_marked_duplicate_of_which_stay_in_the_pool(tmp_path):
    corpus = tmp_path / "planted.txt"
    texts = planted_corpus(corpus)
    cfg = micro_config(tmp_path / "run", corpus, [{"cluster": cluster_options()}, {"example_lengths": {}},
                                                  {"pretrain": {"max_steps": 2, "block_size": 32, "batch_size": 4,
                                                                "order": {"policy": "weighted", "column": "weight"}}}],
                       data={"heldout_fraction": 0.05, "min_chars": 10})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    manifest = run_pipeline(path)
    cluster, lengths, pretrain = manifest["stages"]
    assert [s["status"] for s in manifest["stages"]] == ["accepted"] * 3, [s.get("reason") for s in manifest["stages"]]
    run = tmp_path / "run"
    pool = Pool.load(run / manifest["pool"])
    marks = json.loads((run / cluster["annotations"]["path"]).read_text())
    in_pool = {t: i for i, t in zip(pool.ds["id"], pool.ds["text"])}
    planted = {in_pool[t]: in_pool[texts[j]] for t, j in zip(texts[40:], range(3)) if t in in_pool and texts[j] in in_pool}
    assert planted and marks["duplicate_of"] == planted  # every planted copy, pointing at its original
    assert set(marks["cluster"]) == set(pool.ds["id"])  # every row has a cluster
    assert all(marks["cluster"][d] == marks["cluster"][o] for d, o in planted.items())
    assert set(marks["weight"]) == set(pool.ds["id"]) - set(planted)
    assert set(planted) <= set(pool.ds["id"])  # marked, never deleted
    assert lengths["stage_metrics"]["rows"] == len(pool) - len(planted)  # the next stage never saw them
    assert pretrain["stage_metrics"]["order"] == "weighted"
    m = cluster["stage_metrics"]
    assert m["k"] == 3 and m["duplicates"] == {"exact": 1, "near": 2} and m["embedder"] == "model"
    for name in ("cluster_report", "cluster_map", "cluster_centroids"):
        assert (run / cluster["artefacts"][name]).stat().st_size > 0
    report = json.loads((run / cluster["artefacts"]["cluster_report"]).read_text())
    assert len(report["clusters"]) == 3 and all(c["typical"] and c["terms"] for c in report["clusters"])
    assert "## r1-01-cluster" in (run / "report.md").read_text()


def test_bad_input_to_the_stage(tmp_path, corpus_file):
    from selftrain.stages.cluster import ClusterConfig

    with pytest.raises(ValueError, match="k_range"):
        ClusterConfig(k_range=(5, 2))
    with pytest.raises(ValueError):
        ClusterConfig(k=0)
    few = tmp_path / "few.txt"
    few.write_text("\n\n".join(random_texts(4)) + "\n")
    cfg = micro_config(tmp_path / "run", few, [{"cluster": cluster_options(k=5)}],
                       data={"heldout_fraction": 0.25, "min_chars": 10})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SelftrainError, match=r"cluster.k=5 but the pool holds 3 texts"):
        run_pipeline(path)
    assert not (tmp_path / "run" / "stages").exists()  # refused before anything ran


def test_identical_and_empty_texts_through_the_stage(tmp_path, micro_lm):
    from selftrain.data.pool import make_examples, to_dataset
    from selftrain.stages.base import RunState
    from selftrain.stages.cluster import ClusterConfig, ClusterStage

    model, tok = micro_lm
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    texts = ["same text here"] * 4 + ["Same text, here!", "", "  ...  "]
    pool = Pool(to_dataset(make_examples(texts, origin="augment", op="x", stage="s", round=1,
                                         parent_ids=[str(i) for i in range(len(texts))])))
    state = RunState(config=None, checkpoint=tmp_path / "ckpt", kind="causal", pool=pool, heldout=[], seed=0,
                     stage_dir=tmp_path / "stage")
    state.stage_dir.mkdir()
    result = ClusterStage().run(state, ClusterConfig(embedder="model", word_categories=None, map="pca"))
    ids = list(pool.ds["id"])
    a = result.annotations
    assert result.metrics["k"] == 1 and result.metrics["empty"] == 2
    assert a["duplicate_of"] == {ids[i]: ids[0] for i in (1, 2, 3, 4)}  # all identical: the first is kept
    assert [a["cluster"][i] for i in ids] == [0, 0, 0, 0, 0, -1, -1]  # empty texts: no topic (-1), not dropped
    assert set(a["weight"]) == {ids[0], ids[5], ids[6]}
    for config in (ClusterConfig(embedder="model", k=4, word_categories=None, map="none"),  # k above 1 distinct text
                   ClusterConfig(embedder="model", algorithm="hdbscan", word_categories=None, map="none")):
        again = ClusterStage().run(state, config)
        assert again.metrics["k"] == 1 and again.annotations["cluster"] == a["cluster"]


def test_the_stage_is_deterministic_and_handles_hdbscan_outliers(tmp_path, micro_lm):
    from selftrain.data.pool import make_examples, to_dataset
    from selftrain.stages.base import RunState
    from selftrain.stages.cluster import ClusterConfig, ClusterStage

    model, tok = micro_lm
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    texts = random_texts(30, words=12) + ["", "same words here"]
    pool = Pool(to_dataset(make_examples(texts, origin="real", op="original", stage="data", round=0)))
    runs = []
    for attempt in range(2):
        state = RunState(config=None, checkpoint=tmp_path / "ckpt", kind="causal", pool=pool, heldout=[], seed=3,
                         stage_dir=tmp_path / f"stage{attempt}")
        state.stage_dir.mkdir()
        runs.append(ClusterStage().run(state, ClusterConfig(embedder="model", k=3, word_categories=None, map="pca")))
    assert runs[0].annotations == runs[1].annotations  # same seed: same clusters, duplicates and weights
    assert runs[0].artefacts["cluster_report"].read_text() == runs[1].artefacts["cluster_report"].read_text()
    state.stage_dir = tmp_path / "hdbscan"
    state.stage_dir.mkdir()
    hdb = ClusterStage().run(state, ClusterConfig(embedder="model", algorithm="hdbscan", min_cluster_size=3,
                                                  word_categories=None, map="pca"))
    clusters, weights = hdb.annotations["cluster"], hdb.annotations["weight"]
    assert set(clusters) == set(pool.ds["id"]) and (hdb.artefacts["cluster_map"]).stat().st_size > 0
    outliers = [i for i, c in clusters.items() if c == -1]
    assert outliers and all(weights[i] > 0 for i in outliers)  # outliers and the empty text: drawn, not dropped
    assert np.mean(list(weights.values())) == pytest.approx(1.0)


def test_normalisation_keeps_what_changes_meaning():
    assert dedup.normalise("  Hello,   World!! ") == dedup.normalise("hello world") == "hello world"
    assert dedup.exact_duplicates(["x = a + b", "x = a - b", "2+3=5", "2*3=5"]) == {}  # operators are content


def test_wordnet_categories_read_from_the_database_files(tmp_path):
    from selftrain.data.wordnet import primary_lexnames

    header = "  1 This software and database is being provided to you, the LICENSEE ...\n"
    # index: lemma pos synset_cnt p_cnt [ptrs] sense_cnt tagsense_cnt offsets (most frequent sense first)
    (tmp_path / "index.noun").write_text(header + "monday n 1 1 @ 1 3 00000100  \nred n 1 0 1 2 00000200  \n")
    (tmp_path / "index.adj").write_text(header + "red a 1 0 1 9 00000300  \n")
    (tmp_path / "index.verb").write_text(header)
    (tmp_path / "index.adv").write_text(header)
    # data: offset lex_filenum ss_type w_cnt word lex_id ...
    (tmp_path / "data.noun").write_text(header + "00000100 28 n 01 Monday 0 000 | the first day\n"
                                        "00000200 07 n 01 red 0 000 | a colour\n")
    (tmp_path / "data.adj").write_text(header + "00000300 00 a 01 red 0 000 | of the colour of blood\n")
    found = primary_lexnames(path=tmp_path)
    assert found == {"monday": "noun.time", "red": "adj.all"}  # red: the adjective's sense was tagged more
    assert primary_lexnames({"monday"}, path=tmp_path) == {"monday": "noun.time"}


def test_lexical_vectors_join_the_partition_but_k_is_chosen_on_the_embedding():
    x, truth = blobs([40, 40, 40])
    noise = np.random.default_rng(1).normal(size=(120, 50)).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    joined = clustering.cluster(x, k=None, seed=0, k_max=8, lexical=noise, lexical_weight=0.5)
    assert joined.k == 3 and adjusted_rand_score(truth, joined.labels) == 1.0
    texts = ["goal match striker team"] * 5 + ["butter sauce bake salt"] * 5
    lex = clustering.lexical_vectors(texts)
    assert lex.shape[0] == 10 and np.allclose(lex[0], lex[4]) and float(lex[0] @ lex[9]) < 0.5
    assert clustering.lexical_vectors(["a", "b"]).shape == (2, 0)  # too few texts: no lexical view


def test_a_second_round_clusters_only_what_the_first_kept(tmp_path):
    corpus = tmp_path / "planted.txt"
    texts = planted_corpus(corpus)
    cfg = micro_config(tmp_path / "run", corpus, [{"cluster": cluster_options(map="none", word_categories=None)}],
                       data={"heldout_fraction": 0.05, "min_chars": 10}, rounds=2)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    first, second = run_pipeline(path)["stages"]
    assert first["decision"] == second["decision"] == "accepted"
    hidden = first["stage_metrics"]["duplicate_total"]
    assert hidden == 3 and second["stage_metrics"]["texts"] == first["stage_metrics"]["texts"] - hidden
    assert second["stage_metrics"]["duplicate_total"] == 0  # nothing left to mark: the copies are hidden
    run = tmp_path / "run"
    layers = [json.loads((run / e["annotations"]["path"]).read_text()) for e in (first, second)]
    pool = Pool.load(run / "data" / "pool").annotated(layers)
    assert len(layers[0]["duplicate_of"]) == 3 and set(layers[0]["duplicate_of"]) <= set(pool.ds["id"])  # kept in the file
    assert all(t in set(pool.ds["text"]) for t in texts[40:])  # the planted copies too
    assert set(layers[1]["cluster"]) == set(pool.without_duplicates().ds["id"])  # round 2 saw the kept rows only
