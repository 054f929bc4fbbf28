"""A decoding loop for causal LMs that does only the work whose output is kept.

``model.generate`` decodes every row of a batch until the last one ends, cuts stop strings only
afterwards, and draws each sample with ``torch.multinomial``, whose CPU kernel costs about 40 ns per
vocabulary entry (0.12 s a step at batch 64 over SmolLM2's 49k tokens, more than the forward pass).
This loop, measured in ``bench/rollout.py``:

- stops a row at EOS *or* at the first stop string, checked on its decoded text every step;
- drops finished rows from the batch, KV cache included (``Cache.batch_select_indices``);
- samples by inverse transform (softmax, cumulative sum, one uniform per row): the same
  distribution as ``multinomial`` for a tenth of the time;
- prefills each distinct prompt once (a GRPO group's G copies share it) and the prefix all
  prompts share (a system prompt, demonstrations) once, computing logits for the last position
  only (``logits_to_keep=1``); greedy copies of a prompt are decoded once.

Greedy decoding returns what ``model.generate`` returns (checked in the tests); sampling draws from
the same distribution with different random numbers.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache


def pick_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row: argmax when ``temperature <= 0``, else a sample after temperature, top-k
    and top-p (in that order, as ``generate`` applies them)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    cdf = logits.softmax(-1).cumsum_(-1)
    # u in (0, total]: never 0, which would pick index 0 even where its probability is 0
    u = (1.0 - torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device)) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def _accepts_logits_to_keep(model) -> bool:
    # a PEFT wrapper's forward takes **kwargs and hands them to the base model's
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _sliding_window(config) -> bool:
    """Sliding-window layers count the cache's slots, not positions: the gap of padding between a
    shared prefix and the suffixes would shift their window, so such models prefill whole prompts."""
    return bool(getattr(config, "sliding_window", None)) or any(
        "sliding" in str(t) for t in (getattr(config, "layer_types", None) or []))


MIN_SHARED_PREFIX = 4  # tokens; below this a separate prefix pass costs more than it saves


def _common_prefix(rows: list[tuple[int, ...]]) -> int:
    first, n = rows[0], min(len(r) for r in rows)
    for j in range(n):
        if any(r[j] != first[j] for r in rows):
            return j
    return n


def prefill(model, prompts: list[list[int]], pad_id: int):
    """Run the prompts through the model once each: identical prompts (a GRPO group's G copies)
    share one row, and the prefix every prompt shares (a system prompt, few-shot demonstrations)
    is computed once. Returns (cache, attention mask, last-position logits, next position), one
    row per prompt. Suffixes are left-padded after the shared prefix; explicit positions and the
    mask make that the same computation as left-padding whole prompts."""
    device = model.device
    unique = list(dict.fromkeys(tuple(p) for p in prompts))
    slot = {p: i for i, p in enumerate(unique)}
    shared = min(_common_prefix(unique), min(len(p) for p in unique) - 1)  # every row keeps a token to predict from
    if _sliding_window(model.config):
        shared = 0
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    cache = DynamicCache(config=model.config)
    if shared >= MIN_SHARED_PREFIX:
        model(input_ids=torch.tensor([unique[0][:shared]], device=device),
              position_ids=torch.arange(shared, device=device)[None], past_key_values=cache, use_cache=True, **extra)
        cache.batch_repeat_interleave(len(unique))
    else:
        shared = 0
    width = max(len(p) for p in unique) - shared
    input_ids = torch.full((len(unique), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(unique), shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    for i, p in enumerate(unique):
        input_ids[i, width - len(p) + shared:] = torch.tensor(p[shared:])
        mask[i, shared + width - len(p) + shared:] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = shared + (mask[:, shared:].cumsum(-1) - 1).clamp_(min=0)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=True, **extra).logits[:, -1, :]
    if len(unique) < len(prompts):  # copies get their own cache rows: sampled, they go different ways
        index = torch.tensor([slot[tuple(p)] for p in prompts], device=device)
        cache.batch_select_indices(index)
        logits, mask, positions = logits[index], mask[index], positions[index]
    return cache, mask, logits, positions[:, -1:] + 1


@torch.no_grad()
def decode_batch(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, stop: tuple[str, ...] = (), eos_ids: set[int] = frozenset(),
                 pad_id: int = 0, generator: torch.Generator | None = None) -> list[list[int]]:
    """Completion ids per prompt (non-empty lists of prompt ids): up to and including the token
    that ended it (EOS or the one completing a stop string), else ``max_new_tokens`` long."""
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, stop=stop,
              eos_ids=eos_ids, pad_id=pad_id, generator=generator)
    if temperature <= 0 and len({tuple(p) for p in prompts}) < len(prompts):
        # greedy copies of one prompt decode to one completion: decode it once
        unique = list(dict.fromkeys(tuple(p) for p in prompts))
        done = dict(zip(unique, decode_batch(model, tokenizer, [list(p) for p in unique], **kw)))
        return [list(done[tuple(p)]) for p in prompts]
    device = model.device
    cache, mask, logits, next_position = prefill(model, prompts, pad_id)
    rows = list(range(len(prompts)))  # which prompt each batch row decodes
    out: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        tokens = pick_tokens(logits, temperature, top_k, top_p, generator)
        for row, t in zip(rows, tokens.tolist()):
            out[row].append(t)
        keep = [j for j, row in enumerate(rows) if out[row][-1] not in eos_ids]
        if stop and keep:  # a stop string can only end in the text a row has written so far
            texts = tokenizer.batch_decode([out[rows[j]] for j in keep], skip_special_tokens=True)
            keep = [j for j, text in zip(keep, texts) if not any(s in text for s in stop)]
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(rows):  # finished rows leave the batch, and their cache with them
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            tokens, mask, next_position = tokens[index], mask[index], next_position[index]
            rows = [rows[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position,
                       past_key_values=cache, use_cache=True).logits[:, -1, :]
        next_position = next_position + 1
    return out
