import json

import pytest

from selftrain.config import DataConfig
from selftrain.data.pool import Pool, make_examples, prepare_corpus, to_dataset
from selftrain.data.sources import load_documents, python_docstrings
from selftrain.errors import SelftrainError


def test_text_jsonl_csv_parquet_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph here.\n\nSecond paragraph here.\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"row {i}", "n": i}) for i in range(3)))
    (tmp_path / "c.csv").write_text("body,n\nhello world,1\nanother row,2\n")
    import datasets

    datasets.Dataset.from_dict({"body": ["from parquet"]}).to_parquet(str(tmp_path / "d.parquet"))
    docs = [t for _, t in load_documents(str(tmp_path / "a.txt"))]
    assert docs == ["First paragraph here.", "Second paragraph here."]
    assert [t for _, t in load_documents(str(tmp_path / "b.jsonl"), text_column="body")] == ["row 0", "row 1", "row 2"]
    assert len(load_documents(str(tmp_path / "c.csv"), text_column="body")) == 2
    (tmp_path / "a.txt").rename(tmp_path / "a.md")
    all_docs = [t for _, t in load_documents(str(tmp_path), text_column="body")]
    assert "from parquet" in all_docs and "hello world" in all_docs and "Second paragraph here." in all_docs


def test_missing_text_column_lists_columns(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(SelftrainError, match="no column 'text'.*body"):
        load_documents(str(tmp_path / "b.jsonl"))


def test_binary_and_non_utf8_files_are_refused(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\x7fELF\x00\x01\x02" * 100)
    with pytest.raises(SelftrainError, match="binary"):
        load_documents(str(tmp_path / "bin.txt"))
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(SelftrainError, match="not UTF-8"):
        load_documents(str(tmp_path / "latin.txt"))


def test_missing_path_and_hint_for_hub_ids(tmp_path):
    with pytest.raises(SelftrainError, match="data path not found.*hf:"):
        load_documents("someone/some-dataset")


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SelftrainError, match="empty"):
        prepare_corpus(DataConfig(train=str(tmp_path / "empty.txt")), seed=0)
    (tmp_path / "short.txt").write_text("hi\n\nyo\n")
    with pytest.raises(SelftrainError, match="min_chars"):
        prepare_corpus(DataConfig(train=str(tmp_path / "short.txt")), seed=0)


def test_split_is_deterministic_disjoint_and_deduplicated(tmp_path):
    paras = [f"Paragraph number {i} says something." for i in range(200)]
    (tmp_path / "c.txt").write_text("\n\n".join(paras + paras[:50]))  # 50 exact duplicates
    cfg = DataConfig(train=str(tmp_path / "c.txt"), heldout_fraction=0.1)
    train, held, stats = prepare_corpus(cfg, seed=0)
    train2, held2, _ = prepare_corpus(cfg, seed=0)
    assert list(held["text"]) == list(held2["text"]) and list(train["text"]) == list(train2["text"])
    assert set(train["text"]).isdisjoint(held["text"])
    assert len(train) + len(held) == 200 and len(held) == 20
    assert stats["dropped_short_or_duplicate"] == 50
    assert set(train["origin"]) == {"real"} and set(held["origin"]) == {"heldout"}
    _, held_other, _ = prepare_corpus(cfg, seed=1)
    assert set(held_other["text"]) != set(held["text"])  # the seed decides the split


def test_pool_accumulates_with_provenance_and_caps_synthetic(tmp_path):
    real = to_dataset(make_examples([f"real {i}" for i in range(30)], origin="real", op="original",
                                    stage="data", round=0))
    pool = Pool(real)
    parents = real["id"][:20]
    synthetic = make_examples([f"aug {i}" for i in range(20)], origin="augment", op="swap", stage="r1-02-augment",
                              round=1, parent_ids=list(parents))
    new, added, dropped = pool.add(synthetic, max_synthetic_fraction=0.25, seed=0)
    assert (added, dropped) == (10, 10)  # 10 / (30 + 10) = 0.25
    assert len(new.texts(origin="real")) == 30  # real data is never dropped
    row = next(r for r in new.ds if r["origin"] == "augment")
    assert row["parent_id"] in parents and row["stage"] == "r1-02-augment" and row["round"] == 1
    new.save(tmp_path / "pool")
    assert Pool.load(tmp_path / "pool").texts() == new.texts()
    with pytest.raises(ValueError, match="provenance"):
        pool.add([{"text": "x"}], max_synthetic_fraction=1, seed=0)


def test_pydocs_builtin_is_real_english():
    docs = python_docstrings()
    assert len(docs) > 1000 and sum(map(len, docs)) > 500_000
    assert any("Return" in d for d in docs)
