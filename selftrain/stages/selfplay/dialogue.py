"""Environment `dialogue`: the model talks with itself.

Conversations start from seed dialogues (``chatterbot-corpus``) or from openers the model writes
about configured topics. Each GRPO slot takes one ongoing conversation; the model writes G
candidate next turns, scored for coherence (frozen start model), relevance (embedding similarity
to the previous turn) and non-repetition. One of the candidates, drawn at random, then becomes the
next turn, so the model answers itself turn after turn until ``max_turns``; then a new seed starts.
"""

from __future__ import annotations

import copy
import importlib.util
import random
from pathlib import Path

import yaml

from selftrain.config import safe_yaml
from selftrain.errors import SelftrainError
from selftrain.modeling.chat import render_prompt
from selftrain.modeling.embeddings import load_encoder
from selftrain.rewards.dialogue import Coherence, Embedder, Relevance, non_repetition
from selftrain.stages.selfplay.env import EnvMetrics

MAX_TURNS = 6


def chatterbot_seeds(limit: int | None = None) -> list[list[str]]:
    """English conversations of the chatterbot-corpus package (about 2,000, 2+ turns each)."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise SelftrainError("selfplay dialogue seeds need chatterbot-corpus: pip install 'selftrain[dialogue]' "
                             "(or chatterbot-corpus==1.3.3), or set seeds: model")
    folder = Path(spec.submodule_search_locations[0]) / "data" / "english"
    out: list[list[str]] = []
    for f in sorted(folder.glob("*.yml")):
        try:
            doc = safe_yaml(f.read_text(encoding="utf-8"), str(f)) or {}
        except yaml.YAMLError:
            continue  # one broken file must not hide the others
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if isinstance(t, (str, int, float)) and str(t).strip()]
            if turns:
                out.append(turns[:1])  # the opener; the model writes every later turn itself
        if limit and len(out) >= limit:
            break
    if not out:
        raise SelftrainError(f"no conversations found under {folder}")
    return out[:limit] if limit else out


def load_embedder(path: str | None, frozen_model, tokenizer) -> Embedder:
    """An explicit encoder directory, else the frozen start model's own hidden states."""
    if not path:
        return Embedder(frozen_model, tokenizer)
    if not Path(path).is_dir():
        raise SelftrainError(f"selfplay.embedding_model {path!r} is not a local model directory")
    return Embedder(*load_encoder(path))


class DialogueEnv(EnvMetrics):
    def __init__(self, tokenizer, seeds: list[list[str]], coherence, relevance, *, chat: bool, turns: int,
                 seed: int = 0, opener_topics: list[str] | None = None, max_turns: int = MAX_TURNS):
        self.tok, self.seeds, self.chat, self.turns, self.max_turns = tokenizer, seeds, chat, turns, max_turns
        self.coherence, self.relevance = coherence, relevance
        self.opener_topics = opener_topics or []
        self.rng = random.Random(seed)
        self.active: list[list[str]] = []
        super().__init__()

    @classmethod
    def build(cls, config, model, tokenizer, *, chat: bool, seed: int):
        frozen = copy.deepcopy(model).eval().requires_grad_(False)  # the judge never moves with the policy
        seeds = chatterbot_seeds() if config.seeds == "chatterbot" else []
        return cls(tokenizer, seeds, Coherence(frozen, tokenizer),
                   Relevance(load_embedder(config.embedding_model, frozen, tokenizer)),
                   chat=chat, turns=config.turns, seed=seed,
                   opener_topics=config.topics if config.seeds == "model" else None)

    # ------------------------------------------------------------------ prompts
    def render(self, turns: list[str]) -> str:
        """The last ``self.turns`` turns; the model speaks next, as the assistant."""
        shown = turns[-self.turns:]
        if self.chat:
            roles = ["user" if (len(shown) - i) % 2 else "assistant" for i in range(len(shown))]
            return render_prompt(self.tok, [{"role": r, "content": t} for r, t in zip(roles, shown)], chat=True)
        speakers = ["A" if (len(shown) - i) % 2 else "B" for i in range(len(shown))]
        return "".join(f"{s}: {t}\n" for s, t in zip(speakers, shown)) + "B:"

    def _openers(self, n: int, backend, sampling) -> list[list[str]]:
        if self.seeds:
            return [list(self.rng.choice(self.seeds)) for _ in range(n)]
        topics = [self.rng.choice(self.opener_topics) for _ in range(n)]
        asks = [self.render([f"Start a conversation about {t}. Write only your first message."]) for t in topics]
        texts = backend.generate(asks, sampling)
        self.counts["model_openers"] += n
        return [[t.strip() or f"Let's talk about {topic}."] for t, topic in zip(texts, topics)]

    # ------------------------------------------------------------------ one step
    def rollout(self, groups: int, g: int, backend, sampling) -> dict:
        while len(self.active) < groups:
            new = self._openers(groups - len(self.active), backend, sampling)
            self.active += new
            self.counts["conversations_started"] += len(new)
        convs = self.active[:groups]
        prompts = [self.render(c) for c in convs for _ in range(g)]
        previous = [c[-1] for c in convs for _ in range(g)]
        ids_in, ids_out = backend.generate_ids(prompts, sampling)
        if not self.chat:  # a plain LM writes the other speaker's lines too: a turn ends at its line's end
            ids_out = [_first_line(self.tok, ids) for ids in ids_out]
        texts = [t.strip() for t in self.tok.batch_decode(ids_out, skip_special_tokens=True)]
        for k, conv in enumerate(convs):
            candidates = [t for t in texts[k * g:(k + 1) * g] if t]
            self.counts["empty_responses"] += g - len(candidates)
            if candidates:
                conv.append(self.rng.choice(candidates))  # the conversation goes on with one of its own turns
                self.counts["turns_added"] += 1
        self.active = [c for c in self.active if len(c) < self.max_turns]  # finished ones retire
        self.counts["conversations_finished"] = self.counts["conversations_started"] - len(self.active)
        self.note("response_words", sum(len(t.split()) for t in texts) / len(texts))
        self.counts["steps"] += 1
        return {"prompt_ids": ids_in, "completion_ids": ids_out, "context": prompts,
                "previous_turn": previous}

    def rewards(self):
        return {"coherence": self.coherence, "relevance": self.relevance, "non_repetition": non_repetition}


def _first_line(tokenizer, ids: list[int]) -> list[int]:
    """The completion's tokens up to the one that starts a new line (kept, so the turn is ended)."""
    for j in range(1, len(ids) + 1):
        if "\n" in tokenizer.decode(ids[:j], skip_special_tokens=True).lstrip("\n"):
            return ids[:j]
    return ids
