"""Stage `self_instruct` — the model writes its own instruction data (Self-Instruct, Wang et al. 2023).

From a handful of seed tasks in the config, the model proposes new instructions (a numbered list
it continues), answers each, and keeps the pairs that pass the filters: length and format, and
novelty — ROUGE-L against every instruction kept so far (seeds included) and MinHash n-gram
overlap against the pool, so near-copies of the seeds or of the corpus are dropped. Kept pairs
join the pool as SFT data (origin ``self_instruct``) and the model is fine-tuned on them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from typing import Literal

from datasketch import MinHash, MinHashLSH
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from selftrain.data.pool import make_examples
from selftrain.errors import SelftrainError
from selftrain.modeling.chat import render_prompt, use_chat
from selftrain.modeling.factory import save_checkpoint
from selftrain.modeling.generation import SamplingParams, TransformersBackend
from selftrain.stages.base import (
    RunState,
    Stage,
    StageConfig,
    StageResult,
    code_span,
    discriminator_for,
    register,
)
from selftrain.training.adapters import check_adapter
from selftrain.training.sft import SFTOptions, paced_by_curriculum, sft_train

MAX_SEEDS = 8


class SeedTask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instruction: str = Field(..., min_length=1, description="A task, stated as an instruction.")
    response: str = Field(..., min_length=1, description="A good answer to it.")


class SelfInstructConfig(StageConfig):
    seed_tasks: list[SeedTask] = Field(..., description=f"1 to {MAX_SEEDS} hand-written example tasks.")
    num_pairs: int = Field(64, ge=1, description="Stop once this many pairs are accepted.")
    max_batches: int = Field(8, ge=1, description="Generation batches at most (each proposes batch_size instructions).")
    batch_size: int = Field(16, ge=1, description="Instructions proposed per batch.")
    demos_per_prompt: int = Field(3, ge=1, description="Known tasks shown in each proposal prompt.")
    temperature: float = Field(0.9, gt=0, description="Sampling temperature for proposals.")
    response_temperature: float = Field(0.0, ge=0, description="0 answers greedily.")
    max_instruction_tokens: int = Field(48, ge=4, description="Length cap of a proposed instruction.")
    max_response_tokens: int = Field(128, ge=1, description="Length cap of a response; a response cut by it is dropped.")
    min_words: int = Field(3, ge=1, description="Shortest instruction kept, in words.")
    max_words: int = Field(60, ge=1, description="Longest instruction kept, in words.")
    max_rouge_l: float = Field(0.7, gt=0, le=1, description="Drop an instruction this ROUGE-L-similar to a kept one.")
    max_pool_jaccard: float = Field(0.5, gt=0, le=1, description="Drop a pair whose 3-gram Jaccard with a pool text reaches this (MinHash).")
    chat: bool | Literal["auto"] = Field("auto", description="Answer through the chat template where the model has one.")
    min_discriminator_score: float | None = Field(None, ge=0, le=1, description="Drop a pair the run's discriminator (from an accepted adversarial stage) gives P(real) below this; null: off.")
    train: SFTOptions | None = Field(default_factory=SFTOptions, description="Fine-tuning on accepted pairs; null to only add them to the pool.")


# ---------------------------------------------------------------------- filters
def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 between two texts: longest common word subsequence, as Self-Instruct filters."""
    x, y = _words(a), _words(b)
    if not x or not y:
        return 0.0
    prev = [0] * (len(y) + 1)
    for xi in x:
        cur = [0]
        for j, yj in enumerate(y):
            cur.append(prev[j] + 1 if xi == yj else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(x), lcs / len(y)
    return 2 * p * r / (p + r)


def minhash(text: str, num_perm: int = 64) -> MinHash:
    w = _words(text)
    m = MinHash(num_perm=num_perm, seed=1)
    m.update_batch([" ".join(w[i:i + 3]).encode() for i in range(max(1, len(w) - 2))])
    return m


def format_problem(instruction: str, min_words: int, max_words: int) -> str | None:
    """Why an instruction is malformed, or None."""
    words = instruction.split()
    if len(words) < min_words:
        return "too_short"
    if len(words) > max_words:
        return "too_long"
    if re.search(r"(?i)\b(task \d+|instruction|response)\s*:", instruction):
        return "format"  # the model ran on into the next list item or answered inline
    letters = sum(ch.isalpha() for ch in instruction)
    if letters < 0.5 * len(instruction) or not instruction[0].isalnum():
        return "format"
    if max(map(words.count, words)) > max(3, len(words) // 3):
        return "repetitive"
    return None


class NoveltyFilter:
    """Keeps instructions unlike every kept one (ROUGE-L) and pairs unlike any pool text (MinHash)."""

    def __init__(self, known: list[str], pool_texts: Iterable[str], max_rouge_l: float, max_pool_jaccard: float):
        self.known, self.max_rouge_l = list(known), max_rouge_l
        self.lsh = MinHashLSH(threshold=max_pool_jaccard, num_perm=64)
        for i, t in enumerate(pool_texts):
            self.lsh.insert(str(i), minhash(t))

    def check(self, instruction: str, pair_text: str) -> tuple[str | None, float]:
        """(reason to drop or None, highest ROUGE-L against kept instructions)."""
        best = max((rouge_l(instruction, k) for k in self.known), default=0.0)
        if best >= self.max_rouge_l:
            return "similar_instruction", best
        if self.lsh.query(minhash(pair_text)):
            return "similar_to_pool", best
        return None, best

    def accept(self, instruction: str) -> None:
        self.known.append(instruction)


# ---------------------------------------------------------------------- prompts
def proposal_prompt(tasks: list[str]) -> str:
    lines = ["Come up with a new, different task. Tasks:"]
    lines += [f"Task {i}: {t}" for i, t in enumerate(tasks, 1)]
    return "\n".join(lines) + f"\nTask {len(tasks) + 1}:"


def response_prompt(instruction: str, tokenizer, chat: bool) -> str:
    return render_prompt(tokenizer, instruction, chat=chat, plain=f"Instruction: {instruction}\nResponse:")


def pair_text(instruction: str, response: str) -> str:
    return f"Instruction: {instruction}\nResponse: {response}"


@register
class SelfInstructStage(Stage):
    name = "self_instruct"
    Config = SelfInstructConfig
    requires_causal = True  # writes instructions and responses

    def preflight(self, config, *, model, tokenizer, kind, train_texts):
        if len(config.seed_tasks) > MAX_SEEDS:
            raise SelftrainError(f"self_instruct takes at most {MAX_SEEDS} seed tasks (a handful); "
                                 f"got {len(config.seed_tasks)}")
        if not config.seed_tasks:
            raise SelftrainError("self_instruct needs at least one seed task")
        if config.train is not None:
            check_adapter(config.train.adapter, model)
        use_chat(config.chat, tokenizer, what="self_instruct.chat")

    def run(self, state: RunState, config: SelfInstructConfig) -> StageResult:
        model, tokenizer = state.load_model()
        chat = use_chat(config.chat, tokenizer, what="self_instruct.chat")
        rng = random.Random(state.seed)
        backend = TransformersBackend(model, tokenizer, batch_size=config.batch_size)
        seeds = [s.instruction for s in config.seed_tasks]
        novelty = NoveltyFilter(seeds, state.pool.text_view(), config.max_rouge_l, config.max_pool_jaccard)
        console = Console(stderr=True)
        discriminator = discriminator_for(config.min_discriminator_score, state, "self_instruct.min_discriminator_score")
        accepted: list[dict] = []
        dropped: dict[str, int] = {}
        proposed = 0
        for batch in range(config.max_batches):
            if len(accepted) >= config.num_pairs:
                break
            prompts = [proposal_prompt(rng.sample(novelty.known, min(config.demos_per_prompt, len(novelty.known))))
                       for _ in range(config.batch_size)]
            outs = backend.generate(prompts, SamplingParams(max_new_tokens=config.max_instruction_tokens,
                                                            temperature=config.temperature, top_p=0.95,
                                                            seed=state.seed * 1000 + batch, stop=("\n",)))
            candidates = []
            for raw in outs:
                proposed += 1
                instruction = " ".join(raw.split())
                problem = format_problem(instruction, config.min_words, config.max_words)
                if problem:
                    dropped[problem] = dropped.get(problem, 0) + 1
                else:
                    candidates.append(instruction)
            responses = backend.generate(
                [response_prompt(c, tokenizer, chat) for c in candidates],
                SamplingParams(max_new_tokens=config.max_response_tokens, temperature=config.response_temperature,
                               top_p=0.95, seed=state.seed * 1000 + batch, stop=("\n\nInstruction:", "\nTask "))
            ) if candidates else []
            for instruction, response in zip(candidates, responses):
                response = response.strip()
                if not response or _words(response) == _words(instruction):
                    dropped["empty_response"] = dropped.get("empty_response", 0) + 1
                    continue
                if len(tokenizer(response, add_special_tokens=False)["input_ids"]) >= config.max_response_tokens - 1:
                    dropped["truncated_response"] = dropped.get("truncated_response", 0) + 1
                    continue  # cut mid-sentence: training on it (with EOS) would teach stopping mid-thought
                reason, best = novelty.check(instruction, pair_text(instruction, response))
                if not reason and discriminator is not None and \
                        discriminator.p_real([pair_text(instruction, response)])[0] < config.min_discriminator_score:
                    reason = "discriminator"
                if reason:
                    dropped[reason] = dropped.get(reason, 0) + 1
                    continue
                novelty.accept(instruction)
                accepted.append({"instruction": instruction, "response": response, "rouge_l_max": round(best, 3)})
                if len(accepted) >= config.num_pairs:
                    break
            state.log({"stage": state.stage_key, "phase": "self_instruct", "batch": batch + 1,
                       "proposed": proposed, "accepted": len(accepted)})
            console.print(f"  batch {batch + 1}/{config.max_batches}: {proposed} proposed, {len(accepted)} accepted")
        metrics = {"proposed": proposed, "accepted": len(accepted), "dropped": dropped,
                   "acceptance_rate": len(accepted) / proposed if proposed else 0.0,
                   "examples": accepted[:5],
                   "discriminator_filter": None if config.min_discriminator_score is None else discriminator is not None}
        if not accepted:  # nothing passed: the stage changes nothing, and says why in its metrics
            return StageResult(metrics=metrics)
        checkpoint = None
        if config.train is not None:
            prompts = [response_prompt(a["instruction"], tokenizer, chat) for a in accepted]
            completions = [("" if chat else " ") + a["response"] for a in accepted]
            model, train_metrics = sft_train(model, tokenizer, prompts, completions,
                                             paced_by_curriculum(config.train, state.artefacts),
                                             out_dir=state.stage_dir / "sft", seed=state.seed, device=state.device,
                                             log=state.log, stage_key=state.stage_key,
                                             report_to=state.config.run.report_to)
            metrics.update(train_metrics)
            checkpoint = save_checkpoint(model.cpu(), tokenizer, state.stage_dir / "model")
        additions = make_examples([pair_text(a["instruction"], a["response"]) for a in accepted],
                                  origin="self_instruct", op="instruction", stage=state.stage_key,
                                  round=state.round, metas=accepted)
        return StageResult(checkpoint=checkpoint, additions=additions, metrics=metrics)

    def report(self, entry: dict) -> str:
        m = entry["stage_metrics"]
        if "proposed" not in m:
            return ""
        dropped = ", ".join(f"{k} {v}" for k, v in (m.get("dropped") or {}).items()) or "none"
        lines = [f"Self-instruct: {m['proposed']} instructions proposed, {m['accepted']} accepted; dropped: "
                 f"{dropped}.", ""]
        for ex in m.get("examples", [])[:3]:
            lines.append(f"- {code_span(ex['instruction'])} → {code_span(ex['response'], 160)}")
        return "\n".join(lines)
