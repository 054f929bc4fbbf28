"""Evaluation run after every stage, on held-out real text: perplexity, sample diversity, and
the zero/few-shot tasks listed in ``eval.tasks`` (see ``selftrain.evaluation.harness``)."""

from __future__ import annotations

import math

import torch

from selftrain import distributed
from selftrain.config import EvalConfig
from selftrain.errors import SelftrainError
from selftrain.evaluation.diversity import diversity_metrics
from selftrain.evaluation.perplexity import heldout_perplexity
from selftrain.modeling.generation import SamplingParams, TransformersBackend

# Which direction is better, for the guard's `mode: auto`. Task accuracies are higher-is-better.
LOWER_IS_BETTER = {"heldout_ppl", "heldout_loss", "repetition_rate", "self_bleu"}


def evaluate(model, tokenizer, heldout_texts: list[str], cfg: EvalConfig, *, kind: str = "causal",
             seed: int = 0, backend=None) -> tuple[dict, list[str]]:
    """Return (metrics, samples). Samples continue held-out prefixes, so they are comparable.

    A diverged model (non-finite weights or perplexity) gets ``heldout_ppl: inf`` and
    ``diverged: True`` with the reason, and nothing else: sampling from NaN logits would raise,
    and scores of such a model mean nothing."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        return diverged("non-finite weights"), []
    context = getattr(model.config, "max_position_embeddings", 512)
    block = cfg.block_size or min(context, 256)
    metrics = heldout_perplexity(model, tokenizer, heldout_texts, kind=kind, block_size=min(block, context),
                                 max_tokens=cfg.max_tokens, batch_size=cfg.batch_size, seed=seed)
    if not math.isfinite(metrics["heldout_loss"]):
        return {**metrics, **diverged("non-finite perplexity")}, []
    samples: list[str] = []
    if kind == "causal" and cfg.samples > 0:
        backend = backend or TransformersBackend(model, tokenizer, batch_size=cfg.batch_size)
        prompts = sample_prompts(heldout_texts, tokenizer, cfg.samples, cfg.prompt_tokens)
        sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                  seed=seed)
        samples = distributed.sharded(lambda shard: backend.generate(shard, sampling), prompts)
        metrics.update(diversity_metrics(samples))
    if cfg.tasks:
        metrics.update(task_metrics(model, tokenizer, heldout_texts, cfg, kind=kind, seed=seed))
    return metrics, samples


def diverged(reason: str) -> dict:
    return {"heldout_ppl": math.inf, "heldout_loss": math.inf, "diverged": True, "diverged_reason": reason}


def task_metrics(model, tokenizer, heldout_texts: list[str], cfg: EvalConfig, *, kind: str, seed: int) -> dict:
    from selftrain.evaluation.harness import evaluate_task
    from selftrain.tasks import load_task

    if kind != "causal":
        raise SelftrainError("eval.tasks score prompts with a causal LM; this run's model is a masked LM")
    metrics = {}
    for spec in cfg.tasks:
        task = load_task(spec.task)
        docs = task.docs(heldout_texts)  # cloze cuts its rows from the held-out text
        for k in spec.shots:
            result = evaluate_task(model, tokenizer, task, k, docs=docs, texts=heldout_texts, limit=spec.limit,
                                   seed=seed, batch_size=cfg.batch_size, chat=spec.chat)
            metrics.update({n: v for n, v in result.prefixed().items() if not n.endswith("_n")})
    return metrics


def sample_prompts(texts: list[str], tokenizer, n: int, prompt_tokens: int) -> list[str]:
    picked = [texts[i * len(texts) // n] for i in range(n)] if len(texts) >= n else [
        texts[i % len(texts)] for i in range(n)]
    ids = tokenizer(picked, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(x[:prompt_tokens]) for x in ids]
