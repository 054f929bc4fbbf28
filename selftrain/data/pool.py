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
from pathlib import Path
from typing import Any

import datasets
from pyarrow.lib import ArrowException

from selftrain.config import DataConfig
from selftrain.data.sources import load_documents
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


def prepare_corpus(cfg: DataConfig, seed: int) -> tuple[datasets.Dataset, datasets.Dataset, dict]:
    """Load sources, clean, de-duplicate, and split into (train pool, held-out) deterministically.

    The split is by a seeded hash of each document, so it does not depend on load order, and
    exact duplicates are removed first so no text sits on both sides of the split.
    """
    kw = dict(text_column=cfg.text_column, hf_split=cfg.hf_split, paragraphs=cfg.paragraphs)
    raw = load_documents(cfg.train, **kw)
    train_texts, stats = _clean([t for _, t in raw], cfg.min_chars, cfg.max_documents, seed)
    if cfg.heldout is not None:
        heldout_texts, _ = _clean([t for _, t in load_documents(cfg.heldout, **kw)], cfg.min_chars, None, seed)
        heldout_set = set(heldout_texts)
        train_texts = [t for t in train_texts if t not in heldout_set]
    else:
        if len(train_texts) < 2:
            raise SelftrainError(
                f"the corpus has {len(train_texts)} usable document(s) (min_chars={cfg.min_chars}); "
                "at least 2 are needed to hold one out. Add text, or set data.heldout."
            )
        ranked = sorted(train_texts, key=lambda t: example_id(t, f"split-{seed}"))
        n_held = max(1, round(cfg.heldout_fraction * len(ranked)))
        heldout_set = set(ranked[:n_held])
        heldout_texts = [t for t in train_texts if t in heldout_set]
        train_texts = [t for t in train_texts if t not in heldout_set]
    if not train_texts or not heldout_texts:
        raise SelftrainError("after the held-out split, the train or held-out side is empty; add text")
    stats.update(train_documents=len(train_texts), heldout_documents=len(heldout_texts),
                 train_chars=sum(map(len, train_texts)), heldout_chars=sum(map(len, heldout_texts)))
    train = to_dataset(make_examples(train_texts, origin="real", op="original", stage="data", round=0))
    heldout = to_dataset(make_examples(heldout_texts, origin="heldout", op="original", stage="data", round=0))
    return train, heldout, stats


def _clean(texts: list[str], min_chars: int, max_documents: int | None, seed: int):
    total = len(texts)
    if total == 0:
        raise SelftrainError("the corpus is empty: no documents were found in data.train")
    seen, out = set(), []
    for t in texts:
        t = t.strip()
        if len(t) >= min_chars and t not in seen:
            seen.add(t)
            out.append(t)
    if not out:
        raise SelftrainError(
            f"the corpus has no document of at least {min_chars} characters (data.min_chars); "
            "is the file empty?"
        )
    dropped = total - len(out)
    if max_documents and len(out) > max_documents:
        out = random.Random(seed).sample(out, max_documents)
    return out, {"documents_loaded": total, "documents_kept": len(out), "dropped_short_or_duplicate": dropped}


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

    def rows(self, origin: str | None = None) -> list[dict]:
        """Rows as dicts with ``meta`` decoded."""
        return [{**r, "meta": json.loads(r["meta"] or "{}")} for r in self.ds
                if origin is None or r["origin"] == origin]

    def n_synthetic(self) -> int:
        return sum(1 for o in self.ds["origin"] if o != "real")

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
        ds, ids = self.ds, self.ds["id"]
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
        keep = [i for i, d in enumerate(self.ds["duplicate_of"]) if d is None]
        return self if len(keep) == len(self.ds) else Pool(self.ds.select(keep))

    def check_annotations(self, annotations: dict[str, dict[str, Any]]) -> dict[str, int]:
        """Raise ValueError unless every column is a new, plain name and every id is a row of this
        pool; return the number of rows annotated per column."""
        ids = set(self.ds["id"])
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
        recover_dir(Path(path))
        # keep_in_memory: the file may be replaced by the next save while we still read it
        return cls(datasets.load_from_disk(str(path), keep_in_memory=True))
