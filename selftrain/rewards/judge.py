"""LLM-as-a-judge: the model scores an answer from 1 to 5 (Self-Rewarding Language Models).

Rather than parse a generated verdict (small models rarely follow the format), the score is the
expected value of the judge's next-token distribution over the digits 1-5 after "Score:", one
forward pass per answer (the probability-weighted scoring of G-Eval).
"""

from __future__ import annotations

import torch

from selftrain.errors import SelftrainError
from selftrain.modeling.chat import render_prompt
from selftrain.modeling.scoring import loglikelihoods, split_pair
from selftrain.rewards import completion_text

JUDGE_PROMPT = (
    "Review the question and the answer below. Give the answer a score from 1 (useless, wrong or off-topic) "
    "to 5 (correct, helpful, clear and on-topic).\n\nQuestion: {question}\n\nAnswer: {answer}\n\n"
)


class SelfJudge:
    """``judge(questions, answers) -> scores in [1, 5]``; also a reward function (TRL convention)."""

    __name__ = "judge"

    def __init__(self, model, tokenizer, *, chat: bool, batch_size: int = 8, max_answer_chars: int = 1500):
        self.model, self.tok, self.chat = model, tokenizer, chat
        self.batch_size, self.max_answer_chars = batch_size, max_answer_chars
        # fast path: each score is one token after the prompt, so one forward pass reads all five;
        # otherwise (a tokenizer that splits " 3") each score is scored as a continuation
        probe = self.prompt("q", "a")
        conts = [split_pair(tokenizer, probe, self.delimiter + d)[1] for d in "12345"]
        self.digit_ids = [c[0] for c in conts] if all(len(c) == 1 for c in conts) else None
        if self.digit_ids is not None and len(set(self.digit_ids)) < 5:
            raise SelftrainError("the tokenizer maps the digits 1-5 to the same token; the judge needs them apart")

    @property
    def delimiter(self) -> str:
        return "" if self.chat else " "

    def prompt(self, question: str, answer: str) -> str:
        text = JUDGE_PROMPT.format(question=question.strip(), answer=answer.strip()[:self.max_answer_chars])
        return render_prompt(self.tok, text + "Reply with the score only.", chat=self.chat,
                             plain=text + "Score (1-5):")

    @torch.no_grad()
    def judge(self, questions: list[str], answers: list[str]) -> list[float]:
        prompts = [self.prompt(q, a) for q, a in zip(questions, answers)]
        values = torch.arange(1, 6, dtype=torch.float32)
        if self.digit_ids is None:
            pairs = [(p, self.delimiter + d) for p in prompts for d in "12345"]
            logp = torch.tensor(loglikelihoods(self.model, self.tok, pairs, batch_size=self.batch_size))
            return (torch.softmax(logp.view(-1, 5), dim=-1) * values).sum(-1).tolist()
        was_training = self.model.training
        self.model.eval()
        side, self.tok.padding_side = self.tok.padding_side, "left"  # the last position is the next token
        scores: list[float] = []
        try:
            for i in range(0, len(prompts), self.batch_size):
                enc = self.tok(prompts[i:i + self.batch_size], return_tensors="pt", padding=True,
                               add_special_tokens=False).to(self.model.device)
                logits = self.model(**enc).logits[:, -1, self.digit_ids].float()
                probs = torch.softmax(logits, dim=-1).cpu()
                scores += (probs * values).sum(-1).tolist()
        finally:
            self.tok.padding_side = side
            self.model.train(was_training)
        return scores

    def __call__(self, prompts, completions, question=None, **_) -> list[float | None]:
        if question is None or len(question) != len(completions):
            raise ValueError(f"judge: {len(completions)} completions but "
                             f"{'no' if question is None else len(question)} questions")
        return self.judge(list(question), [completion_text(c) for c in completions])
