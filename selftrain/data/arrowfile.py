"""Arrow files written batch by batch, read back memory-mapped.

How a corpus larger than memory becomes a ``datasets.Dataset``: rows are produced by a generator,
written to disk one record batch at a time (the Arrow stream format ``datasets`` itself uses), and
opened again as a memory-mapped dataset, so no step holds every row in a Python list.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import datasets
import pyarrow as pa


def write_arrow(path: Path, features: datasets.Features, batches: Iterable[dict[str, list]]) -> int:
    """Write ``batches`` (column name -> values) to ``path`` atomically; return the number of rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    schema = features.arrow_schema
    rows = 0
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            table = pa.Table.from_pydict(batch, schema=schema)
            if table.num_rows:
                writer.write_table(table)
                rows += table.num_rows
    os.replace(tmp, path)
    return rows


def open_arrow(path: Path, *, in_memory: bool = False) -> datasets.Dataset:
    """The dataset ``write_arrow`` wrote: memory-mapped unless ``in_memory``."""
    return datasets.Dataset.from_file(str(path), in_memory=in_memory)


def batches_of(rows: Iterable[dict], size: int = 1000) -> Iterator[dict[str, list]]:
    """Rows (dicts with the same keys) regrouped as column batches of ``size`` rows."""
    batch: dict[str, list] = {}
    n = 0
    for row in rows:
        for key, value in row.items():
            batch.setdefault(key, []).append(value)
        n += 1
        if n == size:
            yield batch
            batch, n = {}, 0
    if n:
        yield batch


def text_batches(ds: datasets.Dataset, column: str = "text", size: int = 1000,
                 max_chars: int | None = None) -> Iterator[list[str]]:
    """``ds[column]`` read ``size`` rows at a time (stopping once ``max_chars`` characters were read)."""
    seen = 0
    for batch in ds.select_columns([column]).iter(batch_size=size):
        texts = batch[column]
        yield texts
        seen += sum(map(len, texts))
        if max_chars is not None and seen >= max_chars:
            return
