"""Zero/k-shot scoring of a task (see ``selftrain.tasks``), after lm-evaluation-harness.

multiple_choice: the log-likelihood of each choice after the prompt; ``acc`` takes the highest
sum, ``acc_norm`` the highest sum per character of the choice. generate: a greedy answer, cut at
the task's stop strings, matched exactly, numerically or by regex. Demonstrations come from
the task's demonstration rows with a seed fixed per item, never the evaluated row itself.
"""

from __future__ import annotations

import inspect
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from selftrain.errors import SelftrainError
from selftrain.modeling.generation import SamplingParams, TransformersBackend
from selftrain.tasks import TaskSpec, sample_demos

Demo = tuple[str, str]  # (prompt text, answer text)


@dataclass
class TaskResult:
    task: str
    shots: int
    metrics: dict[str, float]
    records: list[dict] = field(default_factory=list)  # one per item: prompt, prediction, gold, correct

    def prefixed(self) -> dict[str, float]:
        """Metrics named as the guard and metrics.jsonl see them: ``<task>_<k>shot_<metric>``."""
        return {f"{self.task}_{self.shots}shot_{k}": v for k, v in self.metrics.items()}


# ---------------------------------------------------------------------- prompts
def build_prompt(task: TaskSpec, text: str, demos: list[Demo], tokenizer=None, chat: bool = False) -> str:
    """The context before the answer: description, k solved demonstrations, then the item."""
    if chat:
        messages = [{"role": "system", "content": task.description}] if task.description else []
        for q, a in demos:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": text})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = [q + task.target_delimiter + a for q, a in demos] + [text]
    prefix = task.description + task.fewshot_delimiter if task.description else ""
    return prefix + task.fewshot_delimiter.join(parts)


def answer_prefix(task: TaskSpec, chat: bool) -> str:
    """What joins prompt and answer: the task's delimiter, or nothing after a chat template's
    assistant header (the answer starts the assistant turn)."""
    return "" if chat else task.target_delimiter


def use_chat(chat: bool | str, tokenizer) -> bool:
    if chat == "auto":
        return bool(getattr(tokenizer, "chat_template", None))
    if chat and not getattr(tokenizer, "chat_template", None):
        raise SelftrainError("chat=true, but the tokenizer has no chat template")
    return bool(chat)


# ---------------------------------------------------------------------- log-likelihood
def context_length(model, tokenizer) -> int:
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


def choice_logprobs(model, tokenizer, task: TaskSpec, prompts: list[str], choices: list[list[str]], *,
                    chat: bool = False, batch_size: int = 8, progress: bool = False) -> list[list[float]]:
    """Log-likelihood of every choice of every prompt (``chat``: prompts end in an assistant header).

    The prompt is run once and its KV cache shared by all its choices (a 5-way choice costs
    about one forward pass, not five); the result equals scoring each pair on its own.
    """
    max_length = context_length(model, tokenizer)
    prefix = answer_prefix(task, chat)
    items = []
    for p, cs in zip(prompts, choices):
        split = [split_pair(tokenizer, p, prefix + c) for c in cs]
        if any(ctx != split[0][0] for ctx, _ in split):  # a choice changed how the prompt tokenises
            return _choice_logprobs_unshared(model, tokenizer, prefix, prompts, choices, batch_size, progress)
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


def _choice_logprobs_unshared(model, tokenizer, prefix, prompts, choices, batch_size, progress):
    pairs = [(p, prefix + c) for p, cs in zip(prompts, choices) for c in cs]
    flat = loglikelihoods(model, tokenizer, pairs, batch_size=batch_size, progress=progress)
    out, k = [], 0
    for cs in choices:
        out.append(flat[k:k + len(cs)])
        k += len(cs)
    return out


# ---------------------------------------------------------------------- one task
def evaluate_task(model, tokenizer, task: TaskSpec, shots: int = 0, *, docs: list[dict] | None = None,
                  texts: list[str] | None = None, limit: int | None = None, seed: int = 0,
                  batch_size: int = 8, chat: bool | str = False, progress: bool = False,
                  demos_for: Callable[[int, dict], list[Demo]] | None = None) -> TaskResult:
    """Score ``task`` k-shot. ``demos_for(i, doc)`` replaces the sampled demonstrations (Self-ICL)."""
    docs = docs if docs is not None else task.docs(texts)
    docs = docs[:limit] if limit else docs
    chat = use_chat(chat, tokenizer)
    pool = (task.fewshot_docs(texts) or docs) if shots and demos_for is None else []
    prompts, demo_counts = [], []
    for i, doc in enumerate(docs):
        text = task.text(doc)
        if demos_for is not None:
            demos = demos_for(i, doc)
        else:
            picked = sample_demos(pool, shots, text, task, random.Random(seed * 1_000_003 + i))
            demos = [(task.text(d), task.target_text(d)) for d in picked]
        demo_counts.append(len(demos))
        prompts.append(build_prompt(task, text, demos, tokenizer, chat))
    if task.output_type == "multiple_choice":
        result = _score_choices(model, tokenizer, task, docs, prompts, batch_size, progress, chat)
    else:
        result = _score_generation(model, tokenizer, task, docs, prompts, batch_size)
    for r, n in zip(result[1], demo_counts):
        r["demos"] = n
    return TaskResult(task.name, shots, result[0], result[1])


def _score_choices(model, tokenizer, task, docs, prompts, batch_size, progress, chat):
    choices = [task.choices(d) for d in docs]
    scores = choice_logprobs(model, tokenizer, task, prompts, choices, chat=chat, batch_size=batch_size,
                             progress=progress)
    correct, correct_norm, records = [], [], []
    for doc, prompt, cs, lp in zip(docs, prompts, choices, scores):
        gold = task.target(doc)
        pred = max(range(len(cs)), key=lambda j: lp[j])
        pred_norm = max(range(len(cs)), key=lambda j: lp[j] / max(1, len(answer_prefix(task, chat) + cs[j])))
        correct.append(float(pred == gold))
        correct_norm.append(float(pred_norm == gold))
        records.append({"prompt": prompt, "choices": cs, "logprobs": lp, "prediction": cs[pred],
                        "gold": cs[gold], "correct": pred == gold})
    metrics = {"acc": _mean(correct), "acc_stderr": _stderr(correct), "acc_norm": _mean(correct_norm),
               "acc_norm_stderr": _stderr(correct_norm), "n": len(docs)}
    return metrics, records


def _score_generation(model, tokenizer, task, docs, prompts, batch_size):
    backend = TransformersBackend(model, tokenizer, batch_size=batch_size)
    sampling = SamplingParams(max_new_tokens=task.generation.max_new_tokens, temperature=0,
                              stop=tuple(task.generation.until))
    outputs = backend.generate(prompts, sampling)
    correct, records = [], []
    for doc, prompt, out in zip(docs, prompts, outputs):
        gold = task.target_text(doc)
        ok = answer_matches(task, out, gold)
        correct.append(float(ok))
        records.append({"prompt": prompt, "output": out, "gold": gold, "correct": ok})
    return {"acc": _mean(correct), "acc_stderr": _stderr(correct), "n": len(docs)}, records


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_number(text: str) -> float | None:
    m = _NUMBER.search(text.replace(",", ""))
    return float(m.group()) if m else None


def answer_matches(task: TaskSpec, output: str, gold: str) -> bool:
    if task.match == "numeric":
        got, want = extract_number(output), extract_number(gold)
        return got is not None and want is not None and math.isclose(got, want)
    if task.match == "final_number":
        from selftrain.tasks.families import final_number

        got, want = final_number(output), extract_number(gold)
        return got is not None and want is not None and math.isclose(got, want)
    if task.match == "regex":
        m = re.search(task.regex, output)
        got = (m.group(1) if m.groups() else m.group()) if m else None
        return got is not None and got.strip() == gold.strip()
    return output.strip() == gold.strip()


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _stderr(xs: list[float]) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n)), as lm-eval reports it."""
    n = len(xs)
    if n < 2:
        return float("nan")
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)
