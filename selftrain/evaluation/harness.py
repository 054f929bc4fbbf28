"""Zero/k-shot scoring of a task (see ``selftrain.tasks``), after lm-evaluation-harness.

multiple_choice: the log-likelihood of each choice after the prompt; ``acc`` takes the highest
sum, ``acc_norm`` the highest sum per character of the choice. generate: a greedy answer, cut at
the task's stop strings, matched exactly, numerically or by regex. Demonstrations come from
the task's demonstration rows with a seed fixed per item, never the evaluated row itself.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from selftrain import distributed
from selftrain.modeling.chat import render_prompt, use_chat
from selftrain.modeling.generation import SamplingParams, TransformersBackend
from selftrain.modeling.scoring import choice_loglikelihoods
from selftrain.tasks import TaskSpec, sample_demos
from selftrain.tasks.answers import answer_matches

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
        return render_prompt(tokenizer, messages, chat=True)
    parts = [q + task.target_delimiter + a for q, a in demos] + [text]
    prefix = task.description + task.fewshot_delimiter if task.description else ""
    return prefix + task.fewshot_delimiter.join(parts)


def answer_prefix(task: TaskSpec, chat: bool) -> str:
    """What joins prompt and answer: the task's delimiter, or nothing after a chat template's
    assistant header (the answer starts the assistant turn)."""
    return "" if chat else task.target_delimiter


# ---------------------------------------------------------------------- choice scoring
def choice_logprobs(model, tokenizer, task: TaskSpec, prompts: list[str], choices: list[list[str]], *,
                    chat: bool = False, batch_size: int = 8, progress: bool = False) -> list[list[float]]:
    """Log-likelihood of every choice of every prompt after the task's answer prefix (``chat``:
    prompts end in an assistant header); the prompt's KV cache is shared by its choices."""
    return choice_loglikelihoods(model, tokenizer, prompts, choices, prefix=answer_prefix(task, chat),
                                 batch_size=batch_size, progress=progress)


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
    outputs = distributed.sharded(lambda shard: backend.generate(shard, sampling), prompts)
    correct, records = [], []
    for doc, prompt, out in zip(docs, prompts, outputs):
        gold = task.target_text(doc)
        ok = answer_matches(out, gold, match=task.match, regex=task.regex)
        correct.append(float(ok))
        records.append({"prompt": prompt, "output": out, "gold": gold, "correct": ok})
    return {"acc": _mean(correct), "acc_stderr": _stderr(correct), "n": len(docs)}, records


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _stderr(xs: list[float]) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n)), as lm-eval reports it."""
    n = len(xs)
    if n < 2:
        return float("nan")
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)
