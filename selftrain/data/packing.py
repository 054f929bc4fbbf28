"""Tokenise documents and pack them into fixed-length blocks (no padding is wasted), in memory or
streamed to an Arrow file for a corpus larger than memory.

Causal LM: documents joined by EOS, cut into ``block_size`` tokens. Masked LM: cut into
``block_size - 2`` and framed with CLS/SEP, as encoders were pre-trained.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import datasets
import numpy as np
from tqdm.auto import tqdm

from selftrain.data.arrowfile import open_arrow, write_arrow
from selftrain.errors import SelftrainError

BLOCK_FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})


TOKENISE_TEXTS = 1024  # texts per tokenizer call when reading a corpus that may not fit in memory


def token_batches(texts: Sequence[str], tokenizer) -> Iterator[list[list[int]]]:
    """The token ids of ``texts`` (no special tokens), TOKENISE_TEXTS texts per tokenizer call:
    ``texts`` may be a lazy column of a memory-mapped pool, read a slice at a time."""
    for i in range(0, len(texts), TOKENISE_TEXTS):
        yield tokenizer(list(texts[i:i + TOKENISE_TEXTS]), add_special_tokens=False)["input_ids"]


def count_tokens(texts: Sequence[str], tokenizer, at_least: int | None = None) -> int:
    """Tokens in ``texts`` (each followed by a separator); with ``at_least``, stop counting once
    that many were seen (enough to know a corpus fills a block)."""
    n = 0
    for batch in token_batches(texts, tokenizer):
        n += sum(len(ids) + 1 for ids in batch)
        if at_least is not None and n >= at_least:
            break
    return n


def pack_texts(texts: Sequence[str], tokenizer, block_size: int, objective: str = "clm",
               values: Sequence[float | None] | None = None) -> datasets.Dataset:
    """``texts`` packed into blocks, in memory (see ``pack_batches`` for a corpus on disk)."""
    return pack_batches((list(texts[i:i + 2000]) for i in range(0, len(texts), 2000)), tokenizer, block_size,
                        objective, value_batches=None if values is None else
                        (list(values[i:i + 2000]) for i in range(0, len(values), 2000)))


def pack_batches(text_batches: Iterable[list[str]], tokenizer, block_size: int, objective: str = "clm",
                 path: Path | None = None,
                 value_batches: Iterable[list[float | None]] | None = None) -> datasets.Dataset:
    """Tokenise batches of documents and cut one continuous stream into blocks, so no tokens are
    lost at batch edges. With ``path`` the blocks are written there as they are made and come back
    memory-mapped (a corpus larger than memory); without, they are kept in memory.

    ``value_batches`` (a number or None for each text, batched as the texts) adds the column
    ``value``: the token-weighted mean of the values of the texts each block holds (None where
    none has one), as a text's difficulty carries over to the packed rows a curriculum trains."""
    if objective == "mlm":
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise SelftrainError("masked LM packing needs a tokenizer with CLS and SEP tokens")
        body, head, tail = block_size - 2, [tokenizer.cls_token_id], [tokenizer.sep_token_id]
        sep = tokenizer.sep_token_id
    else:
        if tokenizer.eos_token_id is None:
            raise SelftrainError("causal LM packing needs a tokenizer with an EOS token")
        body, head, tail, sep = block_size, [], [], tokenizer.eos_token_id
    seen = 0
    features = BLOCK_FEATURES if value_batches is None else datasets.Features(
        {**BLOCK_FEATURES, "value": datasets.Value("float64")})
    batches = ((texts, None) for texts in text_batches) if value_batches is None else \
        zip(text_batches, value_batches, strict=True)

    def blocks():
        nonlocal seen
        stream: list[int] = []
        token_values: list[float] = []  # each token carries its text's value (NaN: none)
        # large batches: the fast tokenizer parallelises inside each call
        for texts, values in tqdm(batches, desc="packing", unit=" batches", leave=False):
            for k, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
                stream += ids
                stream.append(sep)
                if values is not None:
                    token_values += [math.nan if values[k] is None else float(values[k])] * (len(ids) + 1)
            n = len(stream) // body
            if n:
                batch = {"input_ids": [head + stream[i * body:(i + 1) * body] + tail for i in range(n)]}
                if values is not None:
                    batch["value"] = block_means(np.array(token_values[:n * body], dtype=np.float64).reshape(n, body))
                    token_values = token_values[n * body:]
                yield batch
                seen += n * body
                stream = stream[n * body:]
        seen += len(stream)

    if path is None:
        columns: dict[str, list] = {name: [] for name in features}
        for batch in blocks():
            for name in columns:
                columns[name] += batch[name]
        packed = datasets.Dataset.from_dict(columns, features=features)
    else:
        write_arrow(path, features, blocks())
        packed = open_arrow(path)
    if len(packed) == 0:
        raise SelftrainError(
            f"the training text is shorter than one block of {block_size} tokens "
            f"({seen} tokens): add text or lower block_size"
        )
    return packed


def block_means(token_values: np.ndarray) -> list[float | None]:
    """Each row's mean over its known (not NaN) values; None for a row with none."""
    known = ~np.isnan(token_values)
    sums, counts = np.where(known, token_values, 0.0).sum(1), known.sum(1)
    return [float(s / c) if c else None for s, c in zip(sums, counts)]
