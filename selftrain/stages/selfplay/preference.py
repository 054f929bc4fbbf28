"""Environments `self_reward` and `spin`: preference pairs the model makes itself, optimised with
TRL's ``DPOTrainer``, for ``rounds`` generate-then-train iterations (both papers iterate).

- self_reward (Yuan et al. 2024): the model writes questions about the configured topics, answers
  each ``num_generations`` times, and judges every answer (``SelfJudge``); the best and the worst
  answer make a pair when their scores differ by at least ``min_margin``.
- spin (Chen et al. 2024): a real prefix from the corpus; its real continuation is *chosen* and the
  model's own continuation of the same prefix is *rejected*: the model learns to prefer real text
  over its own until it can no longer tell them apart.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from selftrain.data.packing import token_batches
from selftrain.errors import SelftrainError
from selftrain.modeling.chat import render_prompt, use_chat
from selftrain.modeling.generation import SamplingParams, TransformersBackend
from selftrain.rewards.judge import SelfJudge
from selftrain.training.dpo import DPOOptions, dpo_train

QUESTION_ASK = "Write one question that a curious person might ask about {topic}. Write only the question."


def _render(tokenizer, text: str, chat: bool) -> str:
    return render_prompt(tokenizer, text, chat=chat, plain=f"Question: {text}\nAnswer:")


# ---------------------------------------------------------------------- self_reward
def self_reward_pairs(model, tokenizer, config, *, chat: bool, seed: int) -> tuple[list[dict], dict]:
    rng = random.Random(seed)
    backend = TransformersBackend(model, tokenizer, batch_size=config.generation_batch_size)
    topics = [rng.choice(config.topics) for _ in range(config.num_prompts)]
    asks = [_render(tokenizer, QUESTION_ASK.format(topic=t), chat) for t in topics]
    raw = backend.generate(asks, SamplingParams(max_new_tokens=48, temperature=1.0, seed=seed, stop=("\n",)))
    questions = list(dict.fromkeys(q.strip() for q in raw if len(q.strip().split()) >= 3))
    stats = {"questions_written": len(raw), "questions_kept": len(questions)}
    if not questions:
        return [], stats
    g = config.num_generations
    prompts = [_render(tokenizer, q, chat) for q in questions]
    length = config.completion_tokens
    answers = backend.generate([p for p in prompts for _ in range(g)],
                               SamplingParams(max_new_tokens=length, temperature=config.temperature, seed=seed + 1))
    judge = SelfJudge(model, tokenizer, chat=chat)
    scores = judge.judge([q for q in questions for _ in range(g)], answers)
    pairs, gaps = [], []
    for i, (q, prompt) in enumerate(zip(questions, prompts)):
        cand = [(s, a.strip()) for s, a in zip(scores[i * g:(i + 1) * g], answers[i * g:(i + 1) * g]) if a.strip()]
        if len(cand) < 2:
            continue
        best, worst = max(cand), min(cand)
        gaps.append(best[0] - worst[0])
        if best[0] - worst[0] >= config.min_margin and best[1] != worst[1]:
            pairs.append({"prompt": prompt, "chosen": best[1], "rejected": worst[1], "question": q,
                          "chosen_score": best[0], "rejected_score": worst[0]})
    stats.update(pairs=len(pairs), mean_judge_score=sum(scores) / len(scores),
                 mean_best_worst_gap=sum(gaps) / len(gaps) if gaps else 0.0)
    return pairs, stats


# ---------------------------------------------------------------------- spin
def long_enough(tokenizer, texts: Sequence[str], config) -> list[int]:
    """Positions of the texts with at least prefix_tokens + continuation_tokens tokens (a SPIN
    window), tokenised a slice at a time: the texts may be a pool larger than memory."""
    need = config.prefix_tokens + config.continuation_tokens
    lengths = (len(ids) for batch in token_batches(texts, tokenizer) for ids in batch)
    return [i for i, n in enumerate(lengths) if n >= need]


def spin_pairs_possible(tokenizer, texts: Sequence[str], config) -> None:
    if not long_enough(tokenizer, texts[:2000], config):
        raise SelftrainError(f"spin needs corpus texts of at least prefix_tokens + continuation_tokens = "
                             f"{config.prefix_tokens + config.continuation_tokens} tokens; none is that long "
                             "(lower them or use longer texts)")


def spin_pairs(model, tokenizer, texts: Sequence[str], eligible: list[int], config, *,
               seed: int) -> tuple[list[dict], dict]:
    """Pairs (real continuation chosen, the model's own rejected) on ``num_prompts`` seeded windows
    of the ``eligible`` texts (``long_enough``); only the drawn texts are read and tokenised."""
    if not eligible:
        spin_pairs_possible(tokenizer, texts, config)
    drawn = random.Random(seed).sample(eligible, min(config.num_prompts, len(eligible)))
    p, c = config.prefix_tokens, config.continuation_tokens
    windows = [(ids[:p], ids[p:p + c])
               for ids in tokenizer([texts[i] for i in drawn], add_special_tokens=False)["input_ids"]]
    prefixes = [tokenizer.decode(p) for p, _ in windows]
    backend = TransformersBackend(model, tokenizer, batch_size=config.generation_batch_size)
    own = backend.generate(prefixes, SamplingParams(max_new_tokens=config.continuation_tokens,
                                                    temperature=config.temperature, seed=seed))
    pairs = []
    for prefix, (_, real_ids), mine in zip(prefixes, windows, own):
        real = tokenizer.decode(real_ids)
        if mine.strip() and mine != real:
            pairs.append({"prompt": prefix, "chosen": real, "rejected": mine})
    return pairs, {"prefixes": len(windows), "pairs": len(pairs), "identical_or_empty": len(windows) - len(pairs)}


# ---------------------------------------------------------------------- DPO
def dpo_options(config) -> DPOOptions:
    """``DPOOptions`` from a ``SelfplayConfig`` (DPO itself: ``selftrain.training.dpo``)."""
    return DPOOptions(max_steps=config.max_steps, learning_rate=config.learning_rate, batch_size=config.batch_size,
                      beta=config.dpo_beta, lr_scheduler=config.lr_scheduler, warmup_steps=config.warmup_steps,
                      precision=config.precision, adapter=config.adapter)


def dpo_selfplay(model, tokenizer, state, config, console):
    """Rounds of (make pairs, DPO); returns (model, or None if no round made a pair, records, metrics)."""
    chat = use_chat(config.chat, tokenizer)
    texts = state.pool.text_view("real") if config.env == "spin" else []
    eligible = long_enough(tokenizer, texts, config) if config.env == "spin" else []
    records: list[dict] = []
    metrics: dict = {"rounds": []}
    for rnd in range(config.rounds):
        seed = state.seed * 1000 + rnd
        with torch.no_grad():
            if config.env == "self_reward":
                pairs, stats = self_reward_pairs(model, tokenizer, config, chat=chat, seed=seed)
            else:
                pairs, stats = spin_pairs(model, tokenizer, texts, eligible, config, seed=seed)
        console.print(f"selfplay/{config.env} round {rnd + 1}: {stats}")
        if not pairs:
            stats["skipped"] = "no preference pairs"
            metrics["rounds"].append(stats)
            continue
        model, steps = dpo_train(model, tokenizer, pairs, dpo_options(config), out_dir=state.stage_dir / f"dpo-{rnd + 1}",
                                 seed=seed, log=state.log, stage_key=state.stage_key,
                                 report_to=state.config.run.report_to)
        offset = records[-1]["step"] if records else 0
        records += [{**r, "step": r["step"] + offset, "round": rnd + 1} for r in steps]
        last = steps[-1] if steps else {}
        stats.update({k: round(last[k], 4) for k in ("rewards/accuracies", "rewards/margins") if k in last})
        metrics["rounds"].append(stats)
        _save_pairs(state.stage_dir / f"pairs-{rnd + 1}.jsonl", pairs)
    metrics["pairs"] = sum(r.get("pairs", 0) for r in metrics["rounds"])
    return (model if metrics["pairs"] else None), records, metrics


def _save_pairs(path, pairs: list[dict]) -> None:
    import json

    from selftrain.workspace import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(p) + "\n" for p in pairs))
