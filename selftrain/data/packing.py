"""Tokenise documents and pack them into fixed-length blocks (no padding is wasted).

Causal LM: documents joined by EOS, cut into ``block_size`` tokens. Masked LM: cut into
``block_size - 2`` and framed with CLS/SEP, as encoders were pre-trained.
"""

from __future__ import annotations

import datasets

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

    def tokenize_and_pack(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        stream = [tok for doc in ids for tok in (*doc, sep)]
        n = len(stream) // body
        return {"input_ids": [head + stream[i * body:(i + 1) * body] + tail for i in range(n)]}

    ds = datasets.Dataset.from_dict({"text": list(texts)})
    # Large batches keep the remainder dropped at each batch edge small (< 1 block per 2k docs).
    packed = ds.map(tokenize_and_pack, batched=True, batch_size=2000, remove_columns=["text"],
                    desc="packing", load_from_cache_file=False)
    if len(packed) == 0:
        raise SelftrainError(
            f"the training text is shorter than one block of {block_size} tokens "
            f"({count_tokens(list(texts), tokenizer)} tokens): add text or lower block_size"
        )
    return packed
