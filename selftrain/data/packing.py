"""Tokenise documents and pack them into fixed-length blocks (no padding is wasted), in memory or
streamed to an Arrow file for a corpus larger than memory.

Causal LM: documents joined by EOS, cut into ``block_size`` tokens. Masked LM: cut into
``block_size - 2`` and framed with CLS/SEP, as encoders were pre-trained.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import datasets
from tqdm.auto import tqdm

from selftrain.data.arrowfile import open_arrow, write_arrow
from selftrain.errors import SelftrainError

BLOCK_FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})


def count_tokens(texts: Sequence[str], tokenizer, at_least: int | None = None) -> int:
    """Tokens in ``texts`` (each followed by a separator), counted 1,000 texts at a time; with
    ``at_least``, stop counting once that many were seen (enough to know a corpus fills a block)."""
    n = 0
    for i in range(0, len(texts), 1000):
        n += sum(len(ids) + 1 for ids in tokenizer(list(texts[i:i + 1000]), add_special_tokens=False)["input_ids"])
        if at_least is not None and n >= at_least:
            break
    return n


def pack_texts(texts: Sequence[str], tokenizer, block_size: int, objective: str = "clm") -> datasets.Dataset:
    """``texts`` packed into blocks, in memory (see ``pack_batches`` for a corpus on disk)."""
    return pack_batches((list(texts[i:i + 2000]) for i in range(0, len(texts), 2000)), tokenizer, block_size,
                        objective)


def pack_batches(text_batches: Iterable[list[str]], tokenizer, block_size: int, objective: str = "clm",
                 path: Path | None = None) -> datasets.Dataset:
    """Tokenise batches of documents and cut one continuous stream into blocks, so no tokens are
    lost at batch edges. With ``path`` the blocks are written there as they are made and come back
    memory-mapped (a corpus larger than memory); without, they are kept in memory."""
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

    def blocks():
        nonlocal seen
        stream: list[int] = []
        # large batches: the fast tokenizer parallelises inside each call
        for texts in tqdm(text_batches, desc="packing", unit=" batches", leave=False):
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
                stream += ids
                stream.append(sep)
            n = len(stream) // body
            if n:
                yield {"input_ids": [head + stream[i * body:(i + 1) * body] + tail for i in range(n)]}
                seen += n * body
                stream = stream[n * body:]
        seen += len(stream)

    if path is None:
        rows = [ids for batch in blocks() for ids in batch["input_ids"]]
        packed = datasets.Dataset.from_dict({"input_ids": rows}, features=BLOCK_FEATURES)
    else:
        write_arrow(path, BLOCK_FEATURES, blocks())
        packed = open_arrow(path)
    if len(packed) == 0:
        raise SelftrainError(
            f"the training text is shorter than one block of {block_size} tokens "
            f"({seen} tokens): add text or lower block_size"
        )
    return packed


def block_values(texts: list[str], values: list[float | None], tokenizer, block_size: int,
                 objective: str = "clm") -> list[float | None]:
    """For the blocks ``pack_texts(texts, ...)`` makes, the token-weighted mean of the ``values`` of
    the texts each block holds (None where no text in the block has a value): a text's difficulty
    carried to the packed rows a curriculum actually trains."""
    import numpy as np

    body = block_size - 2 if objective == "mlm" else block_size
    lengths = [len(ids) + 1 for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    per_token = np.repeat(np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64), lengths)
    n = len(per_token) // body
    if n == 0:
        return []
    blocks = per_token[:n * body].reshape(n, body)
    known = ~np.isnan(blocks)
    sums, counts = np.where(known, blocks, 0.0).sum(1), known.sum(1)
    return [float(s / c) if c else None for s, c in zip(sums, counts)]
