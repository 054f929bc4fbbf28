"""Self-generated demonstrations (Self-ICL, Chen et al. 2023) for a zero-shot task.

For each evaluated item the model writes ``k`` new inputs of the same kind, answers them itself
zero-shot, and those (pseudo-input, own answer) pairs become its demonstrations. No demonstration
row and no label is read: only the evaluated item's input text and the task's label names.
"""

from __future__ import annotations

from selftrain.errors import SelftrainError
from selftrain.evaluation.harness import Demo, build_prompt, choice_logprobs
from selftrain.modeling.chat import render_prompt, use_chat
from selftrain.modeling.generation import SamplingParams, TransformersBackend
from selftrain.tasks import TaskSpec

INSTRUCTION = ("Here is an example input for a task:\n\n{example}\n\n"
               "Write one new input for the same task, on a different subject. Reply with the new input only.")
PLAIN = "Example input:\n{example}\n\nAnother example input, on a different subject:\n"


def pseudo_input_prompt(example: str, tokenizer) -> str:
    return render_prompt(tokenizer, INSTRUCTION.format(example=example), chat=use_chat("auto", tokenizer),
                         plain=PLAIN.format(example=example))


def self_icl_demos(model, tokenizer, task: TaskSpec, docs: list[dict], k: int, *, seed: int = 0,
                   batch_size: int = 8, chat: bool | str = False, temperature: float = 0.8,
                   max_new_tokens: int | None = None) -> tuple[list[list[Demo]], dict]:
    """Demonstrations for every doc, and counts (pseudo-inputs written, kept)."""
    if not task.input_field:
        raise SelftrainError(f"task {task.name} names no input_field, so Self-ICL does not know what to imitate")
    if k < 1:
        raise SelftrainError("Self-ICL needs k >= 1 demonstrations")
    inputs = [str(d[task.input_field]) for d in docs]
    if max_new_tokens is None:  # about as long as the inputs being imitated
        lengths = [len(ids) for ids in tokenizer(inputs, add_special_tokens=False)["input_ids"]]
        max_new_tokens = max(8, min(192, int(1.2 * max(lengths))))
    prompts = [pseudo_input_prompt(x, tokenizer) for x in inputs for _ in range(k)]
    backend = TransformersBackend(model, tokenizer, batch_size=batch_size)
    written = backend.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                       top_p=0.95, seed=seed))
    pseudo_docs = []
    for j, text in enumerate(written):
        text = text.strip()
        pseudo_docs.append({**docs[j // k], task.input_field: text} if text else None)
    answers = _answer_zero_shot(model, tokenizer, task, [d for d in pseudo_docs if d], batch_size,
                                use_chat(chat, tokenizer))
    answers_iter = iter(answers)
    demos: list[list[Demo]] = [[] for _ in docs]
    for j, pdoc in enumerate(pseudo_docs):
        if pdoc is not None:
            demos[j // k].append((task.text(pdoc), next(answers_iter)))
    kept = sum(map(len, demos))
    return demos, {"pseudo_inputs_written": len(written), "pseudo_inputs_kept": kept}


def _answer_zero_shot(model, tokenizer, task: TaskSpec, docs: list[dict], batch_size: int, chat: bool) -> list[str]:
    prompts = [build_prompt(task, task.text(d), [], tokenizer, chat) for d in docs]
    if task.output_type == "multiple_choice":
        choices = [task.choices(d) for d in docs]
        scores = choice_logprobs(model, tokenizer, task, prompts, choices, chat=chat, batch_size=batch_size)
        return [cs[max(range(len(cs)), key=lambda i: lp[i])] for cs, lp in zip(choices, scores)]
    backend = TransformersBackend(model, tokenizer, batch_size=batch_size)
    outs = backend.generate(prompts, SamplingParams(max_new_tokens=task.generation.max_new_tokens, temperature=0,
                                                    stop=tuple(task.generation.until)))
    return [o.strip() for o in outs]
