"""The example pool: an Arrow dataset in which every example carries its provenance.

Columns: ``id, text, origin, op, parent_id, stage, round, meta``; ``meta`` is a JSON object
of whatever else the stage knows about the row (a pseudo-label and its confidence, say). Real text has origin ``real``;
anything a stage makes is added *beside* it (never replacing it), capped by
``guard.max_synthetic_fraction``, and keeps the id of the example it came from.

Stages may also *annotate* rows (``cluster``, ``duplicate_of``, ``difficulty``, ``weight``): the
runner keeps each accepted stage's annotations beside the pool and lays them over it, in stage
order, as extra columns (``Pool.annotated``); a row no stage annotated reads None. A row marked
``duplicate_of`` is kept in the pool but hidden from every later stage (``Pool.without_duplicates``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from pyarrow.lib import ArrowException
from tqdm.auto import tqdm

from selftrain import faults
from selftrain.config import DataConfig
from selftrain.data.arrowfile import batches_of, open_arrow, write_arrow
from selftrain.data.sources import iter_documents
from selftrain.errors import SelftrainError
from selftrain.workspace import recover_dir, replace_dir

COLUMNS = ("id", "text", "origin", "op", "parent_id", "stage", "round", "meta")
FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "text": datasets.Value("string"),
        "origin": datasets.Value("string"),
        "op": datasets.Value("string"),
        "parent_id": datasets.Value("string"),
        "stage": datasets.Value("string"),
        "round": datasets.Value("int32"),
        "meta": datasets.Value("string"),
    }
)


def example_id(text: str, salt: str = "") -> str:
    return hashlib.sha1((salt + "\x00" + text).encode("utf-8")).hexdigest()[:16]


def make_examples(texts, *, origin: str, op: str, stage: str, round: int, parent_ids=None,
                  metas: list[dict] | None = None) -> list[dict]:
    parent_ids = parent_ids or [None] * len(texts)
    metas = metas or [{}] * len(texts)
    return [
        {"id": example_id(t, f"{origin}/{op}/{stage}/{round}/{p}"), "text": t, "origin": origin, "op": op,
         "parent_id": p, "stage": stage, "round": round, "meta": json.dumps(m, sort_keys=True)}
        for t, p, m in zip(texts, parent_ids, metas)
    ]


def to_dataset(examples: list[dict]) -> datasets.Dataset:
    if not examples:
        return datasets.Dataset.from_dict({c: [] for c in COLUMNS}, features=FEATURES)
    return datasets.Dataset.from_list(examples, features=FEATURES)


def prepare_corpus(cfg: DataConfig, seed: int, work_dir: Path | None = None
                   ) -> tuple[datasets.Dataset, datasets.Dataset, dict]:
    """Load sources, clean, de-duplicate, and split into (train pool, held-out) deterministically.

    Streaming, for corpora larger than memory: documents are written to Arrow files under
    ``work_dir`` as they are read, duplicates and the split are decided on 64-bit hashes held in
    numpy arrays (16 bytes a document), and the two sides are written out row batch by row batch
    and returned memory-mapped. Without ``work_dir`` (tests, small corpora) they are read into
    memory and nothing stays on disk.

    The split is by a seeded hash of each document, so it does not depend on load order, and
    exact duplicates are removed first (the first copy is kept) so no text sits on both sides.
    """
    with tempfile.TemporaryDirectory() if work_dir is None else _made(work_dir) as folder:
        folder = Path(folder)
        kw = dict(text_column=cfg.text_column, hf_split=cfg.hf_split, paragraphs=cfg.paragraphs)
        docs, loaded = _write_documents(iter_documents(cfg.train, **kw), cfg.min_chars, seed, folder / "train-docs.arrow")
        if loaded == 0:
            raise SelftrainError("the corpus is empty: no documents were found in data.train")
        keys = _column(docs, "key")
        kept = _first_copies(keys)
        if len(kept) == 0:
            raise SelftrainError(f"the corpus has no document of at least {cfg.min_chars} characters "
                                 "(data.min_chars); is the file empty?")
        stats = {"documents_loaded": loaded, "documents_kept": len(kept), "dropped_short_or_duplicate": loaded - len(kept)}
        if cfg.max_documents and len(kept) > cfg.max_documents:
            # the draw (and order) of earlier versions: random.sample looks only at the length
            kept = kept[np.asarray(random.Random(seed).sample(range(len(kept)), cfg.max_documents))]
            stats["documents_kept"] = len(kept)
        if cfg.heldout is not None:
            held_docs, _ = _write_documents(iter_documents(cfg.heldout, **kw), cfg.min_chars, seed,
                                            folder / "heldout-docs.arrow")
            held_keys = _column(held_docs, "key")
            held_rows = _first_copies(held_keys)
            train_rows = kept[~np.isin(keys[kept], held_keys[held_rows])]
            held_source = held_docs
        else:
            if len(kept) < 2:
                raise SelftrainError(
                    f"the corpus has {len(kept)} usable document(s) (min_chars={cfg.min_chars}); "
                    "at least 2 are needed to hold one out. Add text, or set data.heldout."
                )
            n_held = max(1, round(cfg.heldout_fraction * len(kept)))
            ranks = _column(docs, "split_key")[kept]
            lowest = np.argpartition(ranks, n_held - 1)[:n_held] if n_held < len(kept) else np.arange(len(kept))
            is_held = np.zeros(len(kept), dtype=bool)
            is_held[lowest] = True
            held_rows, train_rows, held_source = kept[is_held], kept[~is_held], docs
        if len(train_rows) == 0 or len(held_rows) == 0:
            raise SelftrainError("after the held-out split, the train or held-out side is empty; add text")
        in_memory = work_dir is None
        train, train_chars = _write_side(docs, train_rows, "real", folder / "train.arrow", in_memory)
        heldout, held_chars = _write_side(held_source, held_rows, "heldout", folder / "heldout.arrow", in_memory)
    stats.update(train_documents=len(train), heldout_documents=len(heldout), train_chars=train_chars,
                 heldout_chars=held_chars)
    return train, heldout, stats


DOCUMENT_FEATURES = datasets.Features({"text": datasets.Value("string"), "key": datasets.Value("uint64"),
                                       "split_key": datasets.Value("uint64")})


def _hash64(text: str, salt: str) -> int:
    """The first 8 bytes of the sha1 ``example_id`` uses, as an integer (so it sorts as the ids do)."""
    return int.from_bytes(hashlib.sha1((salt + "\x00" + text).encode("utf-8")).digest()[:8], "big")


def _write_documents(documents, min_chars: int, seed: int, path: Path) -> tuple[datasets.Dataset, int]:
    """Write every stripped document of at least ``min_chars`` with its duplicate key and split key;
    return (the memory-mapped documents, how many were read in all)."""
    loaded = 0

    def rows():
        nonlocal loaded
        for _, text in tqdm(documents, desc="reading", unit=" docs", leave=False, mininterval=2):
            loaded += 1
            if loaded % 256 == 1:
                faults.point("data")
            text = text.strip()
            if len(text) >= min_chars:
                yield {"text": text, "key": _hash64(text, "dedup"), "split_key": _hash64(text, f"split-{seed}")}

    write_arrow(path, DOCUMENT_FEATURES, batches_of(rows()))
    return open_arrow(path), loaded


def _column(ds: datasets.Dataset, name: str) -> np.ndarray:
    return ds.data.column(name).to_numpy()


def _first_copies(keys: np.ndarray) -> np.ndarray:
    """Positions of the first document of each distinct key, in corpus order."""
    _, first = np.unique(keys, return_index=True)
    return np.sort(first)


def _write_side(docs: datasets.Dataset, rows: np.ndarray, origin: str, path: Path, in_memory: bool):
    """The pool rows (with provenance) of ``docs[rows]``; returns (dataset, characters)."""
    chars = 0
    texts_of = docs.select_columns(["text"])

    def batches():
        nonlocal chars
        for i in range(0, len(rows), 1000):
            texts = texts_of[rows[i:i + 1000].tolist()]["text"]
            chars += sum(map(len, texts))
            yield from batches_of(make_examples(texts, origin=origin, op="original", stage="data", round=0))

    write_arrow(path, FEATURES, batches())
    return open_arrow(path, in_memory=in_memory), chars


@contextmanager
def _made(folder: Path):
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)  # left by a set-up that was killed
    folder.mkdir(parents=True)
    yield folder


def plain_annotations(annotations: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Annotations with numpy / torch scalars turned into Python ones (a k-means label is an
    ``np.int32``), so they are stored as what they are."""
    return {column: {i: v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v
                     for i, v in values.items()} for column, values in annotations.items()}


class Pool:
    """The accumulating training set. Real rows are fixed at run start and never dropped."""

    def __init__(self, ds: datasets.Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def texts(self, origin: str | None = None) -> list[str]:
        if origin is None:
            return list(self.ds["text"])
        return [t for t, o in zip(self.ds["text"], self.ds["origin"]) if o == origin]

    def ids(self) -> list[str]:
        """Every row's id, read as one Arrow column (16 characters a row, not the texts)."""
        return self.ds.with_format("arrow")["id"].to_pylist()

    def spread_texts(self, n: int) -> list[str]:
        """At most ``n`` texts, evenly spaced over the pool, in pool order: the whole of a small pool."""
        if len(self) <= n:
            return self.texts()
        return self.ds.select_columns(["text"])[np.linspace(0, len(self) - 1, n).round().astype(int).tolist()]["text"]

    def rows(self, origin: str | None = None) -> list[dict]:
        """Rows as dicts with ``meta`` decoded."""
        return list(self.iter_rows(origin))

    def iter_rows(self, origin: str | None = None, batch_size: int = 1000):
        """``rows`` one at a time, read from the (memory-mapped) dataset in batches."""
        for batch in self.ds.iter(batch_size=batch_size):
            for values in zip(*batch.values()):
                r = dict(zip(batch.keys(), values))
                if origin is None or r["origin"] == origin:
                    yield {**r, "meta": json.loads(r["meta"] or "{}")}

    def positions(self, origin: str) -> np.ndarray:
        """Row positions of one origin, found on the Arrow column (no row is read as Python)."""
        origins = self.ds.with_format("arrow")["origin"]
        return np.flatnonzero(pc.equal(origins, origin).to_numpy(zero_copy_only=False))

    def text_view(self, origin: str | None = None) -> Sequence[str]:
        """The texts (of one origin) as a lazy sequence: index, slice, sample or iterate it; it is
        read from the memory-mapped pool as needed, never copied whole."""
        return self.ds["text"] if origin is None else self.ds.select(self.positions(origin))["text"]

    def n_synthetic(self) -> int:
        return int(pc.sum(pc.not_equal(self.ds.with_format("arrow")["origin"], "real")).as_py() or 0)

    def add(self, examples: list[dict], *, max_synthetic_fraction: float, seed: int) -> tuple[Pool, int, int]:
        """Return (new pool, added, dropped). Synthetic rows beyond the cap are dropped by a seeded draw."""
        if not examples:
            return self, 0, 0
        for ex in examples:
            missing = set(COLUMNS) - set(ex)
            if missing:
                raise ValueError(f"pool example lacks provenance columns {sorted(missing)}")
            if ex["origin"] == "real":
                raise ValueError("stages may not add rows with origin 'real'")
        n_synthetic = self.n_synthetic()
        n_real = len(self) - n_synthetic
        f = max_synthetic_fraction
        # synthetic / (real + synthetic) <= f  <=>  synthetic <= f * real / (1 - f)
        cap = len(examples) if f >= 1 else int(f * n_real / (1 - f)) - n_synthetic
        keep = max(0, min(len(examples), cap))
        chosen = examples if keep == len(examples) else random.Random(seed).sample(examples, keep)
        if not chosen:
            return self, 0, len(examples)
        merged = datasets.concatenate_datasets([self.ds, to_dataset(chosen)])
        return Pool(merged), len(chosen), len(examples) - len(chosen)

    def annotated(self, layers: list[dict[str, dict[str, Any]]]) -> Pool:
        """This pool with annotation columns laid over it: each layer is ``{column: {row id: value}}``
        and a later layer's value for a row replaces an earlier one's."""
        merged: dict[str, dict[str, Any]] = {}
        for layer in layers:
            for column, values in layer.items():
                merged.setdefault(column, {}).update(values)
        ds, ids = self.ds, self.ids()
        for column, values in merged.items():
            try:
                ds = ds.add_column(column, [values.get(i) for i in ids])
            except (TypeError, ValueError, ArrowException) as e:  # e.g. ints from one stage, strings from another
                raise ValueError(f"annotation column {column!r} mixes value types: {e}") from None
        return Pool(ds)

    def without_duplicates(self) -> Pool:
        """The rows no accepted stage marked ``duplicate_of``: what later stages see and train on (the
        marked rows stay in the pool file, so a restart or a reader of the pool still has them)."""
        if "duplicate_of" not in self.ds.column_names:
            return self
        marked = self.ds.with_format("arrow")["duplicate_of"]
        keep = np.flatnonzero(pc.is_null(marked).to_numpy(zero_copy_only=False))
        return self if len(keep) == len(self.ds) else Pool(self.ds.select(keep))

    def check_annotations(self, annotations: dict[str, dict[str, Any]]) -> dict[str, int]:
        """Raise ValueError unless every column is a new, plain name and every id is a row of this
        pool; return the number of rows annotated per column."""
        ids = set(self.ids())
        for column, values in annotations.items():
            if not isinstance(column, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", column) or column in COLUMNS:
                raise ValueError(f"annotation column {column!r}: use a lower-case name that is not a provenance "
                                 f"column ({', '.join(COLUMNS)})")
            unknown = [i for i in values if i not in ids]
            if unknown:
                raise ValueError(f"annotation {column!r} names {len(unknown)} row id(s) not in the pool, "
                                 f"e.g. {unknown[0]!r}")
            bad = [v for v in values.values() if not isinstance(v, (str, int, float, bool, type(None)))
                   or (isinstance(v, float) and not math.isfinite(v))]
            if bad:
                raise ValueError(f"annotation {column!r} holds {bad[0]!r}; values are finite numbers, strings, "
                                 "booleans or None")
        return {column: len(values) for column, values in annotations.items()}

    def save(self, path: Path) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        self.ds.save_to_disk(str(tmp))
        replace_dir(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Pool:
        faults.point("data")
        recover_dir(Path(path))
        # memory-mapped: a pool may be larger than memory. The next save replaces the folder by a
        # rename, and on Linux a mapped file stays readable after it is unlinked. (A pickled
        # dataset would re-open its file by path and read the new pool: never pickle one across a save.)
        return cls(datasets.load_from_disk(str(path)))
