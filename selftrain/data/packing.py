"""Tokenise documents and pack them into fixed-length blocks (no padding is wasted).

Causal LM: documents joined by EOS, cut into ``block_size`` tokens. Masked LM: cut into
``block_size - 2`` and framed with CLS/SEP, as encoders were pre-trained.
"""

from __future__ import annotations

import datasets
from tqdm.auto import tqdm

from selftrain.errors import SelftrainError


def count_tokens(texts: list[str], tokenizer) -> int:
    return sum(len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def pack_texts(texts: list[str], tokenizer, block_size: int, objective: str = "clm") -> datasets.Dataset:
    if objective == "mlm":
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise SelftrainError("masked LM packing needs a tokenizer with CLS and SEP tokens")
        body, head, tail = block_size - 2, [tokenizer.cls_token_id], [tokenizer.sep_token_id]
        sep = tokenizer.sep_token_id
    else:
        if tokenizer.eos_token_id is None:
            raise SelftrainError("causal LM packing needs a tokenizer with an EOS token")
        body, head, tail, sep = block_size, [], [], tokenizer.eos_token_id

    # Tokenise in large batches (the fast tokenizer parallelises inside each call) and cut one
    # continuous stream, so no tokens are lost at batch edges.
    stream: list[int] = []
    for i in tqdm(range(0, len(texts), 2000), desc="packing", unit="batch", leave=False):
        for ids in tokenizer(list(texts[i:i + 2000]), add_special_tokens=False)["input_ids"]:
            stream += ids
            stream.append(sep)
    n = len(stream) // body
    packed = datasets.Dataset.from_dict(
        {"input_ids": [head + stream[i * body:(i + 1) * body] + tail for i in range(n)]})
    if len(packed) == 0:
        raise SelftrainError(
            f"the training text is shorter than one block of {block_size} tokens "
            f"({len(stream)} tokens): add text or lower block_size"
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
