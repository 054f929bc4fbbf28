"""Corpora larger than memory: documents are streamed, split on hashes, written to Arrow and read
back memory-mapped; packing and embedding write to disk as they go. These tests force the small
cases (a chunk of 7 bytes, a document limit of 40 characters) and measure what Python holds."""

import random
import tracemalloc

import numpy as np
import pytest
from conftest import make_corpus, micro_lm

import selftrain.data.sources as sources
from selftrain.config import DataConfig
from selftrain.data import dedup
from selftrain.data.clustering import lexical_vectors
from selftrain.data.packing import pack_batches, pack_texts
from selftrain.data.pool import Pool, prepare_corpus
from selftrain.errors import SelftrainError
from selftrain.modeling.embeddings import embed_stream, embed_texts
from selftrain.modeling.factory import train_tokenizer
from selftrain.stages.cluster import naming_sample


def test_text_files_stream_in_chunks_with_the_same_paragraphs(tmp_path, monkeypatch):
    text = "Première ligne.\nsuite é\n\n \t\n\nDeux ü ñ 日本語.\n\n\n\nTrois" + "\n\n" + "quatre " * 20
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    whole = list(sources.iter_text_file(tmp_path / "a.txt"))
    monkeypatch.setattr(sources, "READ_BYTES", 7)  # multi-byte characters and breaks cut by chunk edges
    assert list(sources.iter_text_file(tmp_path / "a.txt")) == whole
    assert whole == ["Première ligne.\nsuite é", "Deux ü ñ 日本語.", "Trois", ("quatre " * 20).strip()]
    assert list(sources.iter_text_file(tmp_path / "a.txt", paragraphs=False)) == [text]


def test_one_enormous_line_is_cut_at_whitespace(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "READ_BYTES", 16)
    monkeypatch.setattr(sources, "MAX_DOCUMENT_CHARS", 40)
    words = [f"w{i:03d}" for i in range(100)]
    (tmp_path / "line.txt").write_text(" ".join(words))  # 499 characters, no paragraph break
    pieces = list(sources.iter_text_file(tmp_path / "line.txt"))
    assert len(pieces) > 10 and all(len(p) <= 40 for p in pieces)
    assert " ".join(pieces).split() == words  # nothing lost, no word cut
    (tmp_path / "bad.txt").write_bytes(b"ok " * 10 + b"\xff\xfe")
    with pytest.raises(SelftrainError, match=r"not UTF-8 text \(byte 30\)"):
        list(sources.iter_text_file(tmp_path / "bad.txt"))


def test_prepare_corpus_on_disk_matches_in_memory_and_is_memory_mapped(tmp_path):
    paras = [f"Paragraph {i} tells of {random.Random(i).random():.6f} things." for i in range(300)]
    (tmp_path / "c.txt").write_text("\n\n".join(paras + paras[:40] + ["tiny"]))
    cfg = DataConfig(train=str(tmp_path / "c.txt"), heldout_fraction=0.1, max_documents=250)
    train_mem, held_mem, stats_mem = prepare_corpus(cfg, seed=3)
    train, held, stats = prepare_corpus(cfg, seed=3, work_dir=tmp_path / "work")
    assert stats == stats_mem and stats["documents_loaded"] == 341 and stats["dropped_short_or_duplicate"] == 41
    assert train.to_dict() == train_mem.to_dict() and held.to_dict() == held_mem.to_dict()
    assert len(train) + len(held) == 250 and len(held) == 25
    assert train.cache_files and held.cache_files  # backed by files under work_dir, not by memory
    assert not train_mem.cache_files
    Pool(train).save(tmp_path / "pool")
    loaded = Pool.load(tmp_path / "pool")
    assert loaded.ds.cache_files and loaded.texts() == list(train["text"])
    view = loaded.text_view(origin="real")
    assert len(view) == len(train) and view[3] == train[3]["text"] and view[:2] == train["text"][:2]


def test_prepare_corpus_holds_far_less_than_the_corpus(tmp_path):
    """Python's own allocations while a 24 MB corpus is read, deduplicated, split and written stay
    a fraction of it (5.6 MB for 26.9 MB here; a list of the texts alone is more than the corpus)."""
    rng = random.Random(0)
    words = [f"{w}{i}" for i, w in enumerate(["alpha", "beta", "gamma", "delta"] * 500)]
    with open(tmp_path / "big.txt", "w") as f:
        for i in range(48000):
            f.write(" ".join(rng.choice(words) for _ in range(60)) + f" {i}.\n\n")
    size = (tmp_path / "big.txt").stat().st_size
    assert size > 20e6
    tracemalloc.start()
    try:
        train, held, stats = prepare_corpus(DataConfig(train=str(tmp_path / "big.txt")), seed=0,
                                            work_dir=tmp_path / "work")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats["train_documents"] + stats["heldout_documents"] == 48000
    assert peak < size / 3, f"peak Python allocation {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB corpus"


def test_packing_streams_to_disk_and_loses_no_token_at_batch_edges(tmp_path):
    texts = make_corpus(120).split("\n\n")
    tok = train_tokenizer(texts, 320)
    in_memory = pack_texts(texts, tok, 32)
    uneven = [texts[:1], texts[1:50], texts[50:51], texts[51:]]  # batch edges fall anywhere
    on_disk = pack_batches(iter(uneven), tok, 32, path=tmp_path / "blocks.arrow")
    assert on_disk.cache_files and on_disk["input_ids"] == in_memory["input_ids"]
    with pytest.raises(SelftrainError, match="shorter than one block"):
        pack_batches(iter([["a few words"]]), tok, 512, path=tmp_path / "small.arrow")


def test_embeddings_stream_into_a_memory_mapped_file():
    texts = make_corpus(60).split("\n\n")
    tok = train_tokenizer(texts, 320)
    model = micro_lm(tok).eval()
    whole = embed_texts(model, tok, texts, max_length=24)
    batches = (texts[i:i + 7] for i in range(0, len(texts), 7))
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        streamed = embed_stream(model, tok, batches, len(texts), Path(folder) / "e.npy", max_length=24)
        assert isinstance(streamed, np.memmap) and streamed.shape == whole.shape
        np.testing.assert_allclose(streamed, whole, atol=1e-5)
    with pytest.raises(ValueError, match="promised 5"):
        embed_stream(model, tok, iter([texts[:3]]), 5, max_length=24)


def test_exact_and_near_duplicates_read_the_texts_once():
    texts = ["The cat sat on the mat.", "a dog barked all night long", "the CAT sat on the mat",
             "The cat sat on the mat!!", "a dog barked all night long."]
    once = iter(texts)  # an iterator: a second pass would see nothing
    assert dedup.exact_duplicates(once) == {2: 0, 3: 0, 4: 1}
    found = dedup.near_duplicates(iter(texts), threshold=0.5, skip={2, 3})
    assert found == {4: 1}


def test_lexical_vectors_fitted_on_a_sample_place_every_text():
    topics = {"space": "rocket orbit planet launch moon", "food": "bread cheese butter oven recipe"}
    texts = [" ".join(random.Random(i).sample(topics[t].split(), 4)) + f" note{i}"
             for i in range(60) for t in (["space"] if i % 2 else ["food"])]
    full = lexical_vectors(texts, dims=2, seed=0)
    sampled = lexical_vectors(texts, dims=2, seed=0, fit_texts=10)  # fitted on 10, applied to 60
    assert sampled.shape == full.shape == (60, 2)
    np.testing.assert_allclose(np.linalg.norm(sampled, axis=1), 1, atol=1e-5)
    same = sampled[0] @ sampled[2]  # two food texts
    other = sampled[0] @ sampled[1]  # food and space
    assert same > other + 0.5


def test_clusters_are_named_from_an_evenly_spaced_sample():
    cluster_of = {i: i % 3 for i in range(100)}
    picked = naming_sample(list(range(100)), cluster_of, per_cluster=10)
    assert picked == sorted(picked)
    per = {c: [i for i in picked if cluster_of[i] == c] for c in range(3)}
    assert all(len(v) == 10 for v in per.values())
    assert per[0][0] == 0 and per[0][-1] == 99  # spread over the whole cluster, ends included
    assert naming_sample(list(range(20)), cluster_of, per_cluster=10) == list(range(20))


def test_a_bad_utf8_byte_is_located_across_chunk_edges(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "READ_BYTES", 5)
    (tmp_path / "edge.txt").write_bytes(b"abcd\xe2\x82Xyz")  # a character begun in one chunk, broken in the next
    with pytest.raises(SelftrainError, match=r"byte 4\)"):
        list(sources.iter_text_file(tmp_path / "edge.txt"))


def test_max_documents_draws_what_earlier_versions_drew(tmp_path):
    paras = [f"Paragraph {i} is about {i * 7 % 13} things." for i in range(120)]
    (tmp_path / "c.txt").write_text("\n\n".join(paras))
    train, held, _ = prepare_corpus(DataConfig(train=str(tmp_path / "c.txt"), max_documents=30), seed=5)
    drawn = random.Random(5).sample(paras, 30)  # the old loader: random.sample of the kept texts
    assert list(train["text"]) + list(held["text"]) != drawn  # held-out rows are taken out...
    assert [t for t in drawn if t not in set(held["text"])] == list(train["text"])  # ...the rest keeps the draw's order
    assert set(held["text"]) <= set(drawn)


def test_texts_cut_before_embedding_tokenise_as_the_whole_text():
    """The pre-cut may never change the first max_length tokens: not for a BERT-style tokenizer,
    which drops whitespace and control characters and makes one [UNK] of a long word, nor for
    byte-level BPE."""
    from tokenizers import (
        Regex,
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    from selftrain.modeling.embeddings import token_ids

    rng = random.Random(0)
    base = [" ".join(rng.choice(["alpha", "beta", "gamma", "delta", "epsilon"]) for _ in range(50)) for _ in range(50)]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    wordpiece.normalizer = normalizers.BertNormalizer()
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(base, trainers.WordPieceTrainer(vocab_size=200, special_tokens=[
        "[UNK]", "[CLS]", "[SEP]", "[PAD]"], show_progress=False))
    wordpiece.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", wordpiece.token_to_id("[CLS]")), ("[SEP]", wordpiece.token_to_id("[SEP]"))])
    bert = PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", pad_token="[PAD]")
    words = " ".join(base)
    texts = ["".join(f"{'col':<40}{i:>40}\n" for i in range(200)),  # a fixed-width table: mostly spaces
             "start" + " " * 4000 + words, " ".join(["x" * 150] * 40) + " " + words, "\x01" * 5000 + " " + words,
             "y" * 6000, words * 3, "short text"]
    llama3 = Tokenizer(models.BPE())  # its split keeps newlines with the punctuation before them: ".\n\n"
    llama3.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    llama3.train_from_iterator(["one two three.\n\nfour five six.\n\nseven eight.\n\n"] * 50, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    llama3 = PreTrainedTokenizerFast(tokenizer_object=llama3)
    texts += [" ".join(["one"] * n) + ".\n\n" + "x" * 3000 for n in range(3, 12)] + ["foo.\x1f bar " * 400]
    for tok in (bert, train_tokenizer(base, 300), llama3):
        for max_length in (8, 32):
            assert token_ids(tok, texts, max_length) == tok(texts, truncation=True, max_length=max_length)["input_ids"]


def test_blocks_carry_the_token_weighted_mean_of_their_texts_values(tmp_path):
    texts = make_corpus(80).split("\n\n")
    tok = train_tokenizer(texts, 320)
    values = [None if i % 7 == 0 else float(i % 5) for i in range(len(texts))]
    uneven = [(0, 1), (1, 30), (30, 31), (31, len(texts))]  # batch edges fall anywhere
    blocks = pack_batches((texts[a:b] for a, b in uneven), tok, 32, path=tmp_path / "blocks.arrow",
                          value_batches=(values[a:b] for a, b in uneven))
    # by hand: every token (and the EOS after each text) carries its text's value
    per_token = [v for t, v in zip(texts, values) for _ in range(len(tok(t, add_special_tokens=False)["input_ids"]) + 1)]
    for b, got in enumerate(blocks["value"]):
        known = [v for v in per_token[b * 32:(b + 1) * 32] if v is not None]
        assert got == (pytest.approx(sum(known) / len(known)) if known else None)
    assert blocks.cache_files and blocks["input_ids"] == pack_texts(texts, tok, 32)["input_ids"]
    assert None in blocks["value"] or all(v is not None for v in values)


def test_a_paced_run_reads_a_memory_mapped_pool_and_draws_what_a_list_draws(tmp_path, monkeypatch):
    """paced_lm_train on the pool's memory-mapped rows (blocks written to a file) trains the same
    blocks in the same steps as on a list of the texts."""
    import datasets

    from selftrain.config import ModelConfig
    from selftrain.data.arrowfile import open_arrow, write_arrow
    from selftrain.data.pacing import PacedSampler, PacingOptions
    from selftrain.modeling.factory import build_initial
    from selftrain.training.curriculum import paced_lm_train
    from selftrain.training.lm import LMOptions
    from tests.conftest import MICRO_ARCH

    texts = make_corpus(80).split("\n\n")
    tok = train_tokenizer(texts, 320)
    difficulty = [None if i % 9 == 0 else float(len(t) % 13) for i, t in enumerate(texts)]
    write_arrow(tmp_path / "rows.arrow", datasets.Features({"text": datasets.Value("string")}), [{"text": texts}])
    rows = open_arrow(tmp_path / "rows.arrow")
    draws: dict[str, list] = {}
    draw = PacedSampler.draw

    def run(name, source, **kw):
        def recording(self, step):
            draws.setdefault(name, []).append((step, draw(self, step)))
            return draws[name][-1][1]
        monkeypatch.setattr(PacedSampler, "draw", recording)
        model = build_initial(ModelConfig(preset="tiny", vocab_size=320, architecture=MICRO_ARCH), texts, 0)[0]
        return paced_lm_train(model, tok, source, difficulty, LMOptions(max_steps=6, batch_size=4, save_steps=1000),
                              PacingOptions(pacing="linear", c0=0.2, ramp=1.0, rescore_every=2), block_size=32,
                              objective="clm", out_dir=tmp_path / name, seed=0, device="cpu", **kw)[1]

    listed = run("list", texts)
    mapped = run("mapped", rows, blocks_path=tmp_path / "blocks.arrow")
    assert rows.cache_files and (tmp_path / "blocks.arrow").is_file()  # the caller removes it
    assert draws["mapped"] == draws["list"] and len(draws["list"]) == 6
    assert mapped["blocks"] == listed["blocks"] and mapped["rescored_at"] == listed["rescored_at"] == [2]
    assert mapped["block_difficulty"] == listed["block_difficulty"]


def test_approval_finds_copies_by_streaming_the_pool_past_the_samples():
    """A sample equal to any pool text, or the beginning of a real one, is a copy; the beginning of
    a synthetic text or a text that only starts like a real one is not."""
    from selftrain.data.pool import make_examples, to_dataset
    from selftrain.stages.adversarial import copies_in_pool

    real = ["The river  runs north\nto the sea in spring.", "Bread rises in a warm oven."]
    synthetic = ["A made-up sentence about clouds."]
    pool = Pool(to_dataset(make_examples(real, origin="real", op="source", stage="data", round=0)
                           + make_examples(synthetic, origin="augment", op="synonym", stage="s", round=1)))
    candidates = {"The river runs north", "Bread rises in a warm oven.", "A made-up sentence about clouds.",
                  "A made-up sentence", "Bread rises in a warm oven. And more", "The river runs south"}
    assert copies_in_pool(candidates, pool) == {"The river runs north", "Bread rises in a warm oven.",
                                                 "A made-up sentence about clouds."}


def test_spin_reads_only_the_texts_it_draws():
    """SPIN finds the long-enough texts in one chunked pass, then reads only its drawn prompts."""
    from types import SimpleNamespace

    from selftrain.stages.selfplay.preference import long_enough, spin_pairs

    class Counted(list):
        reads: list = []

        def __getitem__(self, key):
            if isinstance(key, int):
                self.reads.append(key)
            return super().__getitem__(key)

    texts = Counted(make_corpus(60).split("\n\n"))
    tok = train_tokenizer(texts, 320)
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    need = sorted(lengths)[len(lengths) // 2]
    config = SimpleNamespace(prefix_tokens=8, continuation_tokens=need - 8, num_prompts=3, temperature=1.0,
                             generation_batch_size=4)
    eligible = long_enough(tok, texts, config)
    assert eligible == [i for i, n in enumerate(lengths) if n >= need] and 0 < len(eligible) < len(texts)
    Counted.reads.clear()
    pairs, stats = spin_pairs(micro_lm(tok), tok, texts, eligible, config, seed=0)
    assert stats["prefixes"] == 3 and len(Counted.reads) == 3 and set(Counted.reads) <= set(eligible)


def test_no_stage_reads_the_whole_pool_as_a_list(tmp_path, monkeypatch, pool_lists_refused):
    """curriculum (scoring and paced training), a pretrain paced by it and augment run with the
    pool's list readers refused to any caller inside a stage; their block files are removed after.
    (The adversarial, self_instruct and SPIN run tests use the same guard.)"""
    from selftrain.config import config_from_dict
    from selftrain.runner import Runner
    from selftrain.stages import augment as augment_stage
    from tests.conftest import micro_config, pretrain

    monkeypatch.setattr(augment_stage, "wordnet_dir", lambda: None)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus(120))
    cfg = micro_config(tmp_path / "run", corpus, [
        {"augment": {"ops": ["swap", "delete"], "max_per_source": 1, "filters": {"similarity": None, "perplexity_ratio": None}}},
        {"curriculum": {"difficulty": ["length", "rarity", "self_loss"], "max_steps": 4, "block_size": 32,
                        "batch_size": 4, "rescore_every": 2}},
        pretrain(max_steps=3)], guard={"tolerance": 10.0})
    manifest = Runner(config_from_dict(cfg)).run()
    assert [s["status"] for s in manifest["stages"]] == ["accepted"] * 3, [s.get("reason") for s in manifest["stages"]]
    assert manifest["stages"][2]["stage_metrics"]["order"] == "paced"
    assert not list((tmp_path / "run").rglob("blocks.arrow"))


def test_real_blocks_stop_at_the_text_that_fills_the_limit():
    """The MLE term's blocks: texts read a thousand at a time, but the stream ends with the text
    that crosses ``limit`` blocks, as when every text was tokenised at once (the MLE draws depend on
    how many blocks there are)."""
    from selftrain.stages.adversarial import real_blocks

    texts = make_corpus(1500).split("\n\n")
    tok = train_tokenizer(texts[:200], 320)
    stream: list[int] = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:  # the reference: one text at a time
        stream += ids + [tok.eos_token_id]
        if len(stream) >= 16 * 30:
            break
    expected = [stream[i:i + 16] for i in range(0, len(stream) - 15, 16)]
    assert real_blocks(tok, texts, 16, limit=30) == expected and 30 <= len(expected) < 40
    assert len(real_blocks(tok, texts, 16, limit=10**6)) > 1000  # past the first thousand texts
