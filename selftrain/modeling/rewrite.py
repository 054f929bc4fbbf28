"""Contextual word substitution: what the model itself would put in a word's place.

For a causal LM the candidates are the whole-word tokens the model predicts after the text that
precedes the word; for a masked LM, the whole-word tokens it predicts at a [MASK] put where the
word was, reading both sides (Kobayashi 2018, "contextual augmentation"). Only whole-word tokens
(``whole_word_tokens``) are candidates, so a replacement is always one real word, never a piece.
"""

from __future__ import annotations

import torch

from selftrain.modeling.embeddings import whole_word_tokens
from selftrain.modeling.scoring import context_length


@torch.no_grad()
def word_candidates(model, tokenizer, kind: str, lefts: list[str], rights: list[str], originals: list[str], *,
                    top_k: int = 10, batch_size: int = 16, vocabulary: int = 50000) -> list[list[str]]:
    """For each slot (the text left of a word, the text right of it, the word), the ``top_k`` words
    the model ranks highest there, most likely first, the original word left out. A causal model
    reads only the left side; a slot with nothing on the left gets no candidates from it. Context
    beyond the model's window is cut on the far side."""
    pairs = whole_word_tokens(tokenizer, vocabulary)
    if not pairs or not lefts:
        return [[] for _ in lefts]
    words = [w for w, _ in pairs]
    word_ids = torch.tensor([i for _, i in pairs])
    window = context_length(model, tokenizer)  # RoBERTa-style models have fewer usable positions than embeddings
    rows, where = [], []
    for left, right in zip(lefts, rights):
        left_ids = tokenizer(left.rstrip(), add_special_tokens=False)["input_ids"]
        if kind == "causal":
            if not left_ids:
                rows.append(None)
                where.append(-1)
                continue
            ids = left_ids[-(window - 1):]
            rows.append(ids)
            where.append(len(ids) - 1)
        else:
            right_ids = tokenizer(right, add_special_tokens=False)["input_ids"]
            room = window - 3  # [CLS] ... [MASK] ... [SEP]
            keep_left = left_ids[-max(room // 2, room - len(right_ids)):] if left_ids else []
            keep_right = right_ids[:max(0, room - len(keep_left))]
            head = [tokenizer.cls_token_id] if tokenizer.cls_token_id is not None else []
            tail = [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None else []
            ids = head + keep_left + [tokenizer.mask_token_id] + keep_right + tail
            rows.append(ids)
            where.append(len(head) + len(keep_left))
    out: list[list[str]] = [[] for _ in lefts]
    todo = [i for i, r in enumerate(rows) if r is not None]
    todo.sort(key=lambda i: len(rows[i]))  # similar lengths share a batch
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            width = max(len(rows[i]) for i in batch)
            ids = torch.full((len(batch), width), pad)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                ids[r, :len(rows[i])] = torch.tensor(rows[i])
                mask[r, :len(rows[i])] = 1
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
            at = logits[torch.arange(len(batch)), torch.tensor([where[i] for i in batch])].float().cpu()
            scores = at[:, word_ids]
            best = scores.topk(min(top_k + 1, len(words)), dim=1).indices.tolist()
            for r, i in enumerate(batch):
                original = originals[i].lower()
                out[i] = [words[j] for j in best[r] if words[j] != original][:top_k]
    finally:
        model.train(was_training)
    return out
