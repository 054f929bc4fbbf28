"""Token-weighted held-out perplexity: total negative log-likelihood over every scored token,
divided by the number of tokens (not a mean of per-block means, which over-weights short blocks).

Causal models score each next token; masked models score a fixed, seeded 15% of positions
("masked-token perplexity"), so the number is comparable between stages of one run. In a
multi-process run each rank scores every n-th block and the sums are added up.
"""

from __future__ import annotations

import math

import torch

from selftrain import distributed, faults
from selftrain.errors import SelftrainError


def _stream(texts: list[str], tokenizer, max_tokens: int) -> list[int]:
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    out: list[int] = []
    for i in range(0, len(texts), 256):  # tokenise only as much as is scored
        for ids in tokenizer(list(texts[i:i + 256]), add_special_tokens=False)["input_ids"]:
            out += ids + ([sep] if sep is not None else [])
            if len(out) >= max_tokens:
                return out[:max_tokens]
    return out


@torch.no_grad()
def heldout_perplexity(model, tokenizer, texts: list[str], *, kind: str = "causal", block_size: int = 256,
                       max_tokens: int = 32768, batch_size: int = 8, seed: int = 0) -> dict:
    stream = _stream(texts, tokenizer, max_tokens)
    if len(stream) < 2:
        raise SelftrainError(f"the text to score has {len(stream)} token(s); perplexity needs at least 2: give more text")
    blocks = [stream[i:i + block_size] for i in range(0, len(stream), block_size)]
    blocks = [b for b in blocks if len(b) >= 2]
    gen = torch.Generator().manual_seed(seed)
    # masked LMs: the scored positions of every block, drawn before sharding so any split scores the same ones
    masks = [torch.rand(len(b), generator=gen) < 0.15 for b in blocks] if kind == "masked" else [None] * len(blocks)
    if distributed.active():  # each rank scores every n-th block; the sums are added up below
        blocks, masks = blocks[distributed.rank()::distributed.world_size()], masks[distributed.rank()::distributed.world_size()]
    was_training = model.training
    model.eval()
    total_nll, total_entropy, total_tokens = 0.0, 0.0, 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        for i in range(0, len(blocks), batch_size):
            faults.point("eval")
            batch = blocks[i:i + batch_size]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for r, b in enumerate(batch):
                ids[r, :len(b)] = torch.tensor(b)
                attn[r, :len(b)] = 1
            if kind == "masked":
                scored = torch.zeros_like(ids, dtype=torch.bool)
                for r, m in enumerate(masks[i:i + batch_size]):
                    scored[r, :len(m)] = m
                inputs = ids.masked_fill(scored, tokenizer.mask_token_id)
                logits = model(input_ids=inputs.to(model.device), attention_mask=attn.to(model.device)).logits
                targets, logits = ids, logits.float().cpu()
            else:
                logits = model(input_ids=ids.to(model.device), attention_mask=attn.to(model.device)).logits
                logits, targets = logits[:, :-1].float().cpu(), ids[:, 1:]
                scored = attn[:, 1:].bool()
            logp = torch.log_softmax(logits, dim=-1)
            nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            entropy = -(logp.exp() * logp).sum(-1)
            total_nll += nll[scored].sum().item()
            total_entropy += entropy[scored].sum().item()
            total_tokens += int(scored.sum())
    finally:
        model.train(was_training)
    total_nll, total_entropy, total_tokens = distributed.all_sum([total_nll, total_entropy, total_tokens])
    total_tokens = int(total_tokens)
    if total_tokens == 0:
        raise SelftrainError("no token of the text was scored (too short for masked-token scoring?): give more text")
    loss = total_nll / total_tokens
    return {"heldout_loss": loss, "heldout_ppl": math.exp(min(loss, 700.0)),
            "heldout_entropy": total_entropy / total_tokens, "heldout_tokens": total_tokens}
