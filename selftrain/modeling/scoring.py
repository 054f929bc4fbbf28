"""Log-likelihood scoring of continuations under a causal LM, after lm-evaluation-harness.

``loglikelihoods`` scores (context, continuation) pairs one by one in batches;
``choice_loglikelihoods`` scores several continuations of one prompt, running the prompt once and
sharing its KV cache across the continuations (same numbers, about one forward pass per prompt).
``split_pair`` / ``encode_pair`` tokenise a pair so its boundary is the one the model sees.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from selftrain.errors import SelftrainError


def context_length(model, tokenizer) -> int:
    """The longest input the model and tokenizer both accept (2048 when neither says)."""
    n = getattr(model.config, "max_position_embeddings", None) or 2048
    tok_max = getattr(tokenizer, "model_max_length", None)
    return min(n, tok_max) if tok_max and tok_max < 10**6 else n


def split_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), tokenised together so the boundary is the one the model sees.

    Trailing spaces of the context move to the continuation, as lm-eval does, so " sport" is
    one token rather than " " + "sport".
    """
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    if whole[:len(ctx)] == ctx:
        cont = whole[len(ctx):]
    else:  # the tokenizer merged across the boundary: score the continuation on its own
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not cont:
        raise SelftrainError(f"the answer {continuation!r} has no tokens to score")
    if not ctx:  # nothing to condition on: start from the BOS/EOS token
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ctx = [start] if start is not None else []
    return ctx, cont


def _check_fits(cont: list[int], max_length: int) -> None:
    if len(cont) >= max_length:
        raise SelftrainError(f"a choice is {len(cont)} tokens long, as long as the model's whole context "
                             f"({max_length}); shorten the choices")


def encode_pair(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], list[int]]:
    """(model input ids, continuation ids): the input is context+continuation minus its last token,
    cut from the left to fit, so its last ``len(continuation)`` positions predict the continuation."""
    ctx, cont = split_pair(tokenizer, context, continuation)
    _check_fits(cont, max_length)
    return (ctx + cont)[-(max_length + 1):][:-1], cont


@torch.no_grad()
def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], *, batch_size: int = 8,
                   progress: bool = False) -> list[float]:
    """Sum of log p(continuation | context) for each (context, continuation) pair, batched."""
    max_length = context_length(model, tokenizer)
    encoded = [encode_pair(tokenizer, ctx, cont, max_length) for ctx, cont in pairs]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))  # similar lengths batch together
    out = [0.0] * len(encoded)
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="scoring", disable=not progress, leave=False):
            idx = order[start:start + batch_size]
            width = len(encoded[idx[0]][0])
            batch = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids = encoded[i][0]
                batch[row, :len(ids)] = torch.tensor(ids)
                mask[row, :len(ids)] = 1
            logits = model(input_ids=batch.to(model.device), attention_mask=mask.to(model.device)).logits
            for row, i in enumerate(idx):
                ids, cont = encoded[i]
                logprobs = F.log_softmax(logits[row, len(ids) - len(cont):len(ids)].float(), dim=-1)
                out[i] = float(logprobs.gather(1, torch.tensor(cont, device=logprobs.device)[:, None]).sum())
    finally:
        model.train(was_training)
    return out


def choice_loglikelihoods(model, tokenizer, prompts: list[str], choices: list[list[str]], *, prefix: str = "",
                          batch_size: int = 8, progress: bool = False) -> list[list[float]]:
    """log p(prefix + choice | prompt) for every choice of every prompt.

    The prompt is run once and its KV cache shared by all its choices (a 5-way choice costs
    about one forward pass, not five); the result equals ``unshared_choice_loglikelihoods``.
    """
    max_length = context_length(model, tokenizer)
    items = []
    for p, cs in zip(prompts, choices):
        split = [split_pair(tokenizer, p, prefix + c) for c in cs]
        if any(ctx != split[0][0] for ctx, _ in split):  # a choice changed how the prompt tokenises
            return unshared_choice_loglikelihoods(model, tokenizer, prompts, choices, prefix=prefix,
                                                  batch_size=batch_size, progress=progress)
        conts = [cont for _, cont in split]
        longest = max(conts, key=len)
        _check_fits(longest, max_length)
        items.append((split[0][0][-(max_length - len(longest) + 1):], conts))
    out: list[list[float]] = [[] for _ in items]
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="scoring", disable=not progress, leave=False):
            idx = order[start:start + batch_size]
            for i, scores in zip(idx, _score_shared(model, tokenizer, [items[i] for i in idx])):
                out[i] = scores
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def _score_shared(model, tokenizer, batch: list[tuple[list[int], list[list[int]]]]) -> list[list[float]]:
    device, pad = model.device, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lengths = [len(ctx) for ctx, _ in batch]
    width = max(lengths)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, (ctx, _) in enumerate(batch):
        ids[r, :len(ctx)] = torch.tensor(ctx)
        mask[r, :len(ctx)] = 1
    first = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True)
    last = F.log_softmax(first.logits[torch.arange(len(batch)), torch.tensor(lengths) - 1].float(), dim=-1)
    rows = [(r, cont) for r, (_, conts) in enumerate(batch) for cont in conts]
    scores = [float(last[r, cont[0]]) for r, cont in rows]  # each choice's first token
    tail = max(len(cont) for _, cont in rows) - 1
    if tail > 0:  # later tokens: one pass over all choices, attending to their prompt's cache
        cache = getattr(first, "cache", None) or first.past_key_values  # renamed in transformers 5.x
        select = torch.tensor([r for r, _ in rows], device=device)
        cache.batch_select_indices(select)
        cont_ids = torch.full((len(rows), tail), pad, dtype=torch.long)
        cont_mask = torch.zeros((len(rows), tail), dtype=torch.long)
        for j, (_, cont) in enumerate(rows):
            cont_ids[j, :len(cont) - 1] = torch.tensor(cont[:-1])
            cont_mask[j, :len(cont) - 1] = 1
        positions = torch.tensor([lengths[r] for r, _ in rows])[:, None] + torch.arange(tail)[None, :]
        logits = model(input_ids=cont_ids.to(device), position_ids=positions.to(device), **_cache_kwarg(model, cache),
                       attention_mask=torch.cat([mask[select.cpu()], cont_mask], 1).to(device)).logits
        logprobs = F.log_softmax(logits.float(), dim=-1)
        for j, (_, cont) in enumerate(rows):
            if len(cont) > 1:
                targets = torch.tensor(cont[1:], device=device)[:, None]
                scores[j] += float(logprobs[j, :len(cont) - 1].gather(1, targets).sum())
    out, k = [], 0
    for _, conts in batch:
        out.append(scores[k:k + len(conts)])
        k += len(conts)
    return out


def _cache_kwarg(model, cache) -> dict:
    """transformers 5.x names the KV-cache argument ``cache``; older versions ``past_key_values``."""
    return {"cache": cache} if "cache" in inspect.signature(model.forward).parameters else {"past_key_values": cache}


def unshared_choice_loglikelihoods(model, tokenizer, prompts: list[str], choices: list[list[str]], *,
                                   prefix: str = "", batch_size: int = 8, progress: bool = False) -> list[list[float]]:
    """``choice_loglikelihoods`` without the shared cache: every (prompt, choice) pair on its own.
    The fallback when a choice changes how its prompt tokenises, and the reference the shared path
    is checked (tests) and timed (bench/choice_scoring.py) against."""
    pairs = [(p, prefix + c) for p, cs in zip(prompts, choices) for c in cs]
    flat = loglikelihoods(model, tokenizer, pairs, batch_size=batch_size, progress=progress)
    out, k = [], 0
    for cs in choices:
        out.append(flat[k:k + len(cs)])
        k += len(cs)
    return out


@torch.no_grad()
def sequence_losses(model, rows: list[list[int]], *, batch_size: int = 16, pad_id: int = 0) -> list[float]:
    """Mean next-token negative log-likelihood of each row of token ids under a causal LM (nats per
    predicted token; a row of fewer than 2 tokens predicts nothing and scores 0.0). Rows are
    batched by length, so padding is rare; the model's train/eval mode is restored after."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out = [0.0] * len(rows)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = [i for i in order[start:start + batch_size] if len(rows[i]) >= 2]
            if not idx:
                continue
            width = len(rows[idx[0]])
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, :len(rows[i])] = torch.tensor(rows[i])
                mask[r, :len(rows[i])] = 1
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:].to(logits.device),
                                  reduction="none").cpu() * mask[:, 1:]
            for r, i in enumerate(idx):
                out[i] = float(nll[r].sum() / mask[r, 1:].sum())
    finally:
        model.train(was_training)
    return out
