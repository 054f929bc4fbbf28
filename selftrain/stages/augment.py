"""Stage `augment` — automated data augmentation: more, varied text from what exists, filtered.

Each source text (the pool's real text by default) gets variants from the chosen operations: the
four of EDA (synonym replacement, random insertion of a synonym, random swap, random deletion, all
of strength ``alpha``), sentence reordering, clause inversion, keyboard typos, and the model-based
ones — contextual substitution by the model being trained, paraphrase by the model through the
generation backend, back-translation through two configured translation models. Synonyms come
from WordNet when it is installed, else from the model's own embedding neighbours.

Every variant then passes the filters (``evaluation.variant_filters``): length bounds, MinHash
duplicates of the originals and of each other, sentence-embedding similarity to its source within
bounds, a perplexity ceiling under the current model, and at most ``max_per_source`` per source;
what each filter rejects is counted. Survivors join the pool beside the real text (origin
``augment``, ``op``, ``parent_id``) under the run's synthetic-fraction cap.

``inputs: labelled`` augments rows that carry their unlabelled input in ``meta.input`` (the
``fewshot`` stage's pseudo-labels): only that span is rewritten, the label stays in ``meta``, and
``train`` fine-tunes the model on the pseudo-labels and their variants together.

Rule-based operations run through ``datasets.map`` (``num_proc`` processes) on counter-based
random numbers, so the same seed gives the same variants for any process count.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import random
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from selftrain.data import augment as ops
from selftrain.data.pool import make_examples
from selftrain.data.wordnet import synonyms as wordnet_synonyms
from selftrain.data.wordnet import wordnet_dir
from selftrain.errors import SelftrainError
from selftrain.evaluation import variant_filters as filters
from selftrain.modeling.chat import render_prompt, use_chat
from selftrain.modeling.embeddings import (
    check_embedder,
    load_encoder,
    neighbour_synonyms,
    resolve_embedder,
)
from selftrain.modeling.factory import save_checkpoint
from selftrain.modeling.generation import (
    SamplingParams,
    Seq2SeqBackend,
    TransformersBackend,
    load_seq2seq,
)
from selftrain.modeling.rewrite import word_candidates
from selftrain.modeling.scoring import context_length
from selftrain.stages.base import (
    RunState,
    Stage,
    StageConfig,
    StageResult,
    discriminator_for,
    fmt,
    register,
)
from selftrain.training.adapters import check_adapter
from selftrain.training.precision import resolve_precision
from selftrain.training.sft import SFTOptions, sft_train
from selftrain.workspace import atomic_write_text

MODEL_OPS = ("contextual", "paraphrase", "backtranslate")
Op = Literal["synonym", "insert", "swap", "delete", "reorder", "invert", "typo", "contextual", "paraphrase",
             "backtranslate"]


class FilterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_words: int = Field(1, ge=1, description="Reject variants with fewer words than this.")
    length_ratio: tuple[float, float] = Field((0.5, 2.0), description="Allowed variant/source word-count ratio.")
    duplicate: float | None = Field(0.95, gt=0, le=1, description="Reject variants whose MinHash Jaccard with an original or an earlier variant reaches this; null: off.")
    similarity: tuple[float, float] | None = Field((0.6, 0.995), description="Allowed cosine between source and variant embeddings; null: off.")
    embedder: str = Field("auto", description="Embeddings for similarity: minilm, model (mean-pooled), a local encoder directory, or auto (minilm when installed).")
    perplexity_ratio: float | None = Field(2.0, gt=0, description="Reject variants whose perplexity under the current model exceeds this multiple of the source's; null: off. Causal models only.")
    max_perplexity: float | None = Field(None, gt=1, description="Reject variants above this perplexity; null: off.")
    max_tokens: int = Field(128, ge=8, description="Tokens of each text scored by the similarity and perplexity filters (MiniLM was trained on 128).")
    discriminator: float | None = Field(None, ge=0, le=1, description="Reject variants the run's discriminator (from an accepted adversarial stage) gives P(real) below this; null: off.")


class ParaphraseOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("Say the same thing in other words.\nText: {text}\nIn other words:",
                        description="Prompt; {text} is the source.")
    chat: bool | Literal["auto"] = Field("auto", description="Wrap the prompt in the tokenizer's chat template.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature (0: greedy).")
    max_new_tokens: int = Field(96, ge=1, description="Longest paraphrase, in tokens.")
    batch_size: int = Field(8, ge=1, description="Prompts per generate call.")


class BackTranslationOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    forward: str = Field(..., description="Translation model directory, source language -> pivot (e.g. a MarianMT en-de).")
    backward: str = Field(..., description="Translation model directory, pivot -> source language.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature of both directions (0: greedy).")
    max_new_tokens: int = Field(256, ge=1, description="Longest translation, in tokens.")
    max_source_tokens: int = Field(512, ge=8, description="Longer sources are skipped (a cut one would lose content).")
    batch_size: int = Field(8, ge=1, description="Texts per generate call.")


class AugmentConfig(StageConfig):
    ops: list[Op] = Field(["synonym", "insert", "swap", "delete"],
                          description="Operations, each making per_op variants of every source ([] with train: "
                                      "fine-tune on the pseudo-labels alone, the ablation).")
    alpha: float = Field(0.1, gt=0, le=1, description="Strength: share of words changed (EDA's alpha).")
    per_op: int = Field(1, ge=1, description="Variants each operation makes of each source.")
    max_per_source: int = Field(4, ge=1, description="Variants kept per source at most, after the filters.")
    inputs: Literal["real", "pool", "labelled"] = Field(
        "real", description="Sources: real (the run's real text), pool (every pool row), or labelled (rows with "
                            "meta.input, e.g. fewshot pseudo-labels: only the input is rewritten, the label kept).")
    max_sources: int | None = Field(2000, ge=1, description="Sources augmented at most (a seeded sample); null: all.")
    synonyms: Literal["auto", "wordnet", "embedding"] = Field(
        "auto", description="Synonym source for synonym/insert: WordNet, the model's embedding neighbours, or auto (WordNet when installed).")
    neighbours: int = Field(5, ge=1, description="embedding synonyms: nearest words kept per word.")
    min_neighbour_similarity: float = Field(0.3, ge=-1, le=1, description="embedding synonyms: least cosine of a neighbour.")
    contextual_top_k: int = Field(5, ge=1, description="contextual: a replacement is drawn from the model's top k whole words.")
    paraphrase: ParaphraseOptions = Field(default_factory=ParaphraseOptions, description="The paraphrase op's prompt and sampling.")
    back_translation: BackTranslationOptions | None = Field(None, description="The two translation models of the backtranslate op.")
    filters: FilterOptions = Field(default_factory=FilterOptions, description="Quality filters applied to every variant.")
    num_proc: int = Field(1, ge=1, description="Processes for the rule-based operations (datasets.map).")
    map_batch_size: int = Field(1000, ge=1, description="Texts per datasets.map batch.")
    train: SFTOptions | None = Field(None, description="inputs=labelled: fine-tune on the pseudo-labels and their kept variants; null: only add them to the pool.")

    @model_validator(mode="after")
    def _consistent(self):
        if "backtranslate" in self.ops and self.back_translation is None:
            raise ValueError("op backtranslate needs back_translation: {forward: DIR, backward: DIR}")
        if self.train is not None and self.inputs != "labelled":
            raise ValueError("train applies to inputs: labelled (pretrain or curriculum train on augmented text)")
        if not self.ops and self.train is None:
            raise ValueError("ops is empty: name at least one operation (an empty list only makes sense with train)")
        if len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops lists an operation twice: {self.ops}")
        if self.filters.similarity is not None and not self.filters.similarity[0] <= self.filters.similarity[1]:
            raise ValueError("filters.similarity must be [low, high] with low <= high")
        return self


def labelled_rows(rows: Iterable[dict], skipped: Counter) -> list[dict]:
    """Rows whose ``meta.input`` occurs exactly once in their text, before their ``meta.completion``
    at its end (the ``fewshot`` stage's pseudo-labels); the others are counted in ``skipped``."""
    out = []
    for r in rows:
        problem = label_problem(r)
        if problem:
            skipped[problem] += 1
        else:
            out.append(r)
    if not out:
        raise SelftrainError(NO_LABELLED_ROWS)
    return out


NO_LABELLED_ROWS = ("augment inputs=labelled: no pool row carries meta.input (once, in its prompt) and "
                    "meta.completion (run a fewshot stage with add_to_pool before it)")


def label_problem(r: dict) -> str | None:
    """Why row ``r`` is not a pseudo-labelled row augment can rewrite, or None."""
    unit, completion = r["meta"].get("input"), r["meta"].get("completion")
    if not isinstance(unit, str) or not isinstance(completion, str):
        return "not_labelled"
    if not unit or r["text"].count(unit) != 1 or not r["text"].endswith(completion) \
            or r["text"].find(unit) + len(unit) > len(r["text"]) - len(completion):
        return "input_not_once_in_prompt"
    return None


def placed(units: list[str], fits: list[int], texts: list[str]) -> list[str | None]:
    """Generated ``texts`` (for the sources at positions ``fits``) back at their sources' places:
    None for a skipped source, an empty output or one that only repeats its source."""
    made: list[str | None] = [None] * len(units)
    for i, t in zip(fits, texts):
        t = t.strip()
        made[i] = t if t and t != units[i] else None
    return made


def _rule_batch(batch: dict, *, op: str, per_op: int, seed: int, alpha: float, synonyms) -> dict:
    """datasets.map function: ``per_op`` variants of each unit (empty string: none)."""
    out = {}
    for v in range(per_op):
        made = ops.apply_op(op, batch["unit"], seed=seed, variant=v, alpha=alpha, synonyms=synonyms)
        out[f"v{v}"] = [m or "" for m in made]
    return out


@register
class AugmentStage(Stage):
    name = "augment"
    Config = AugmentConfig

    def preflight(self, config, *, model, tokenizer, kind, train_texts):
        if any(op in config.ops for op in ("paraphrase",)) and kind != "causal":
            raise SelftrainError("augment op paraphrase generates text: it needs a causal LM")
        if config.synonyms == "wordnet" and wordnet_dir() is None:
            raise SelftrainError("augment.synonyms=wordnet, but WordNet is not installed (apt-get install "
                                 "wordnet-base, or set SELFTRAIN_WORDNET); use synonyms: embedding")
        if config.back_translation is not None:
            for side in ("forward", "backward"):
                path = getattr(config.back_translation, side)
                if not (Path(path) / "config.json").is_file():
                    raise SelftrainError(f"augment.back_translation.{side}: {path!r} is not a model directory "
                                         "with a config.json")
        if config.filters.similarity is not None:
            check_embedder(config.filters.embedder, "augment.filters.embedder")
        if config.train is not None:
            check_adapter(config.train.adapter, model)

    # ------------------------------------------------------------------ sources

    def _sources(self, state: RunState, config: AugmentConfig) -> tuple[list[dict], list[str], Counter]:
        """(rows, the unit of each row that is rewritten, skipped rows by reason). The pool is read
        row batch by row batch; with ``max_sources`` only that many rows (the lowest seeded hashes of
        their ids) are held, so a pool larger than memory can be sampled."""
        skipped: Counter = Counter()
        # (-rank, -position, row, unit): the heap's top is the highest rank, the latest row among equal
        # ranks (fewshot can add one row twice), so the kept rows are those a stable sort by rank keeps
        chosen: list[tuple[int, int, dict, str]] = []
        labelled = 0
        for position, r in enumerate(state.pool.iter_rows(origin="real" if config.inputs == "real" else None)):
            if config.inputs == "labelled":
                problem = label_problem(r)
                if problem:
                    skipped[problem] += 1
                    continue
                labelled += 1
                unit = r["meta"]["input"]
            elif isinstance(r["meta"].get("input"), str):  # a pseudo-labelled row is prompt + label: rewritten
                skipped["labelled_rows (use inputs: labelled)"] += 1  # as plain text its label could move
                continue
            else:
                unit = r["text"]
            if not unit.strip():
                skipped["empty"] += 1
                continue
            rank = int.from_bytes(hashlib.sha1(f"{state.seed}/{r['id']}".encode()).digest(), "big")
            heapq.heappush(chosen, (-rank, -position, r, unit))
            if config.max_sources is not None and len(chosen) > config.max_sources:
                heapq.heappop(chosen)  # the highest rank leaves
        if config.inputs == "labelled" and not labelled:
            raise SelftrainError(NO_LABELLED_ROWS)
        chosen.sort(key=lambda c: -c[1])  # pool order
        return [c[2] for c in chosen], [c[3] for c in chosen], +skipped

    def _cap(self, state: RunState, additions: list[dict]) -> tuple[list[dict], int]:
        """The additions the run's synthetic-fraction cap will take, chosen as the runner would
        (a seeded draw), so that what the stage trains on is what reaches the pool."""
        f = state.config.guard.max_synthetic_fraction
        n_synthetic = state.pool.n_synthetic()
        n_real = len(state.pool) - n_synthetic
        room = len(additions) if f >= 1 else max(0, int(f * n_real / (1 - f)) - n_synthetic)
        if room >= len(additions):
            return additions, 0
        return random.Random(state.seed).sample(additions, room), len(additions) - room

    # ------------------------------------------------------------------ variants

    def _synonym_table(self, config, units, model, tokenizer) -> tuple[dict, str]:
        vocabulary = set().union(*(ops.alpha_words(u) for u in units)) if units else set()
        source = config.synonyms if config.synonyms != "auto" else ("wordnet" if wordnet_dir() else "embedding")
        if source == "wordnet":
            return wordnet_synonyms(vocabulary), source
        return neighbour_synonyms(model, tokenizer, vocabulary, k=config.neighbours,
                                  min_similarity=config.min_neighbour_similarity), source

    def _rule_variants(self, op, units, config, seed, synonyms) -> list[list[str | None]]:
        ds = datasets.Dataset.from_dict({"unit": units})
        fingerprint = hashlib.sha1(json.dumps([op, config.per_op, seed, config.alpha, len(units)]).encode()).hexdigest()
        parallel = config.num_proc > 1 and len(units) >= 2 * config.map_batch_size  # else one process, no pool
        environ, parallelism = os.environ, os.environ.get("TOKENIZERS_PARALLELISM")
        try:
            made = ds.map(_rule_batch, batched=True, batch_size=config.map_batch_size,
                          num_proc=config.num_proc if parallel else None, remove_columns=["unit"],
                          keep_in_memory=True, load_from_cache_file=False, new_fingerprint=fingerprint,
                          fn_kwargs={"op": op, "per_op": config.per_op, "seed": seed, "alpha": config.alpha,
                                     "synonyms": synonyms if op in ops.NEEDS_SYNONYMS else None},
                          desc=f"augment {op}")
        finally:
            # datasets 5.x, mapping with num_proc, sets TOKENIZERS_PARALLELISM=false and then rebinds
            # os.environ to a deep copy: whoever holds the real one (rich's consoles, tests patching
            # the environment) stops seeing changes. Put the real object and its value back.
            os.environ = environ  # noqa: B003 (the object is restored, not the contents)
            if parallelism is None:
                environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                environ["TOKENIZERS_PARALLELISM"] = parallelism
        columns = made[:]  # one batch read: iterating a column would format row by row
        return [[m or None for m in columns[f"v{v}"]] for v in range(config.per_op)]

    def _contextual(self, units, config, seed, model, tokenizer, kind) -> list[list[str | None]]:
        out = []
        for v in range(config.per_op):
            slots = ops.word_slots(units, seed=seed, alpha=config.alpha, variant=v)
            flat = [(i, s) for i, spans in enumerate(slots) for s in spans]
            found = word_candidates(model, tokenizer, kind, [units[i][:s[0]] for i, s in flat],
                                    [units[i][s[1]:] for i, s in flat], [units[i][s[0]:s[1]] for i, s in flat],
                                    top_k=config.contextual_top_k)
            draws = ops.uniforms(ops.row_keys([f"{s}/{units[i]}" for i, s in flat], seed, 31 + v), 1)[:, 0] \
                if flat else np.zeros(0)
            words: dict[int, list[str | None]] = {i: [] for i in range(len(units))}
            for (i, _), cands, d in zip(flat, found, draws.tolist()):
                words[i].append(cands[int(d * len(cands))] if cands else None)
            variants = [ops.fill_slots(u, slots[i], words[i]) if any(words[i]) else None for i, u in enumerate(units)]
            out.append([None if x == u else x for x, u in zip(variants, units)])
        return out

    def _paraphrase(self, units, config, seed, model, tokenizer) -> tuple[list[list[str | None]], int]:
        p = config.paraphrase
        chat = use_chat(p.chat, tokenizer, what="augment.paraphrase.chat")
        prompts = [render_prompt(tokenizer, p.prompt.replace("{text}", u), chat=chat) for u in units]
        room = context_length(model, tokenizer) - p.max_new_tokens
        # a paraphrase is about as long as its source: one that might not fit in max_new_tokens, or a
        # prompt that leaves no room for it, is skipped rather than cut
        fits = [i for i, (pr, u) in enumerate(zip(prompts, units))
                if len(tokenizer(pr, add_special_tokens=False)["input_ids"]) <= room
                and len(tokenizer(u, add_special_tokens=False)["input_ids"]) <= 0.8 * p.max_new_tokens]
        backend = TransformersBackend(model, tokenizer, batch_size=p.batch_size)
        out = []
        for v in range(config.per_op):
            texts = backend.generate([prompts[i] for i in fits], SamplingParams(
                max_new_tokens=p.max_new_tokens, temperature=p.temperature, seed=seed * 1000 + v, stop=("\n\n",)))
            out.append(placed(units, fits, texts))
        return out, len(units) - len(fits)

    def _backtranslate(self, units, config, seed, device) -> tuple[list[list[str | None]], int]:
        bt = config.back_translation
        there, there_tok = load_seq2seq(bt.forward)
        back, back_tok = load_seq2seq(bt.backward)
        limit = min(bt.max_source_tokens, int(0.8 * bt.max_new_tokens))  # a translation may run longer than its source
        fits = [i for i, u in enumerate(units) if len(there_tok(u, add_special_tokens=True)["input_ids"]) <= limit]
        forward = Seq2SeqBackend(there.to(device), there_tok, bt.batch_size, bt.max_source_tokens)
        backward = Seq2SeqBackend(back.to(device), back_tok, bt.batch_size, bt.max_source_tokens)
        out = []
        for v in range(config.per_op):
            sampling = SamplingParams(max_new_tokens=bt.max_new_tokens, temperature=bt.temperature, seed=seed * 1000 + v)
            pivot = forward.generate([units[i] for i in fits], sampling)
            returned = backward.generate(pivot, sampling)
            out.append(placed(units, fits, returned))
        return out, len(units) - len(fits)

    # ------------------------------------------------------------------ the stage

    def run(self, state: RunState, config: AugmentConfig) -> StageResult:
        rows, units, skipped = self._sources(state, config)
        if not units:
            raise SelftrainError(f"augment: no source text to augment (inputs={config.inputs}; skipped {dict(skipped)})")
        scored_perplexity = state.kind == "causal" and (config.filters.perplexity_ratio is not None
                                                         or config.filters.max_perplexity is not None)
        needs_model = (any(op in MODEL_OPS[:2] for op in config.ops) or scored_perplexity or config.train is not None
                       or (any(op in ops.NEEDS_SYNONYMS for op in config.ops)
                           and (config.synonyms == "embedding" or (config.synonyms == "auto" and not wordnet_dir()))))
        model, tokenizer = state.load_model() if needs_model else (None, None)

        synonyms, synonym_source = ({}, None)
        if any(op in ops.NEEDS_SYNONYMS for op in config.ops):
            synonyms, synonym_source = self._synonym_table(config, units, model, tokenizer)

        # 1. variants: (source index, op, text) for every op that changed a source
        candidates: list[tuple[int, str, str]] = []
        per_op: dict[str, dict] = {}
        for op in config.ops:
            started = time.perf_counter()
            too_long = 0
            if op in ops.TEXT_OPS:
                made = self._rule_variants(op, units, config, state.seed, synonyms)
            elif op == "contextual":
                made = self._contextual(units, config, state.seed, model, tokenizer, state.kind)
            elif op == "paraphrase":
                made, too_long = self._paraphrase(units, config, state.seed, model, tokenizer)
            else:
                made, too_long = self._backtranslate(units, config, state.seed, state.device)
            seconds = time.perf_counter() - started
            changed = [(i, op, m) for variant in made for i, m in enumerate(variant) if m]
            candidates += changed
            per_op[op] = {"tried": len(units) * config.per_op, "changed": len(changed), "too_long": too_long,
                          "seconds": round(seconds, 3),
                          "sources_per_s": round(len(units) * config.per_op / seconds, 1) if seconds > 0 else None}

        # 2. filters, cheapest first
        f = config.filters
        parents = [c[0] for c in candidates]
        variant_texts = [c[2] for c in candidates]
        source_texts = [units[i] for i in parents]
        judged = filters.Judged.fresh(len(candidates))
        seen: set[tuple[int, str]] = set()
        for k, (i, _, text) in enumerate(candidates):  # two ops (or variants) that made the same text: one stays
            if (i, text) in seen:
                judged.reject(k, "duplicate")
            seen.add((i, text))
        filters.length_filter(judged, source_texts, variant_texts, min_words=f.min_words, ratio=f.length_ratio)
        references = units if config.inputs == "labelled" else state.pool.text_view()
        reordered = {k for k, c in enumerate(candidates) if c[1] in ("reorder", "invert")}
        filters.duplicate_filter(judged, references, variant_texts, threshold=f.duplicate, seed=state.seed,
                                 exact_only=reordered)
        embedder = None
        if f.similarity is not None and judged.alive():
            embedder = resolve_embedder(f.embedder)
            if embedder == "model" and model is None:
                model, tokenizer = state.load_model()
            encoder, encoder_tok = (model, tokenizer) if embedder == "model" else load_encoder(embedder)
            filters.similarity_filter(judged, encoder.to(state.device), encoder_tok, source_texts, variant_texts,
                                      bounds=f.similarity, max_length=f.max_tokens,
                                      precision=resolve_precision("auto", state.device))
        if scored_perplexity and judged.alive():
            filters.perplexity_filter(judged, model, tokenizer, source_texts, variant_texts,
                                      max_ratio=f.perplexity_ratio, max_perplexity=f.max_perplexity,
                                      max_length=min(f.max_tokens, context_length(model, tokenizer)))
        discriminator = discriminator_for(f.discriminator, state, "augment.filters.discriminator")
        if discriminator is not None:
            filters.discriminator_filter(judged, variant_texts, discriminator, min_score=f.discriminator)
        draws = ops.uniforms(ops.row_keys(variant_texts, state.seed, 97), 1)[:, 0] if candidates else np.zeros(0)
        filters.cap_per_source(judged, parents, config.max_per_source, draws)

        for op in config.ops:
            mine = [k for k, c in enumerate(candidates) if c[1] == op]
            per_op[op]["kept"] = sum(judged.keep[k] for k in mine)
        kept = judged.alive()

        # 3. pool rows with provenance (a labelled row keeps its label, only its input is new)
        texts, metas = [], []
        for k in kept:
            i, op, variant = candidates[k]
            scores = {"op_alpha": config.alpha if op in ("synonym", "insert", "swap", "delete", "typo", "contextual")
                      else None, "similarity": judged.similarity[k], "perplexity_ratio": judged.perplexity_ratio[k],
                      "real_score": judged.real_score[k]}
            if config.inputs == "labelled":
                row = rows[i]
                texts.append(row["text"].replace(units[i], variant, 1))
                metas.append({**row["meta"], "input": variant, **scores})
            else:
                texts.append(variant)
                metas.append(scores)
        additions = []
        for op in config.ops:
            chosen = [n for n, k in enumerate(kept) if candidates[k][1] == op]
            additions += make_examples([texts[n] for n in chosen], origin="augment", op=op, stage=state.stage_key,
                                       round=state.round, parent_ids=[rows[candidates[kept[n]][0]]["id"] for n in chosen],
                                       metas=[metas[n] for n in chosen])

        additions, capped = self._cap(state, additions)

        samples = state.stage_dir / "augment_samples.jsonl"
        shown = [k for op in config.ops for k in [k for k, c in enumerate(candidates) if c[1] == op][:20]]
        atomic_write_text(samples, "".join(json.dumps(
            {"op": candidates[k][1], "source": units[candidates[k][0]], "variant": candidates[k][2],
             "kept": judged.keep[k], "similarity": judged.similarity[k],
             "perplexity_ratio": judged.perplexity_ratio[k]}, ensure_ascii=False) + "\n" for k in shown))

        # 4. labelled: fine-tune on the pseudo-labels and their kept variants together
        checkpoint, train_metrics = None, {}
        if config.train is not None:
            labelled = labelled_rows(state.pool.iter_rows(), Counter())  # every pseudo-label, not only the sampled sources
            pairs = [(r["text"][:len(r["text"]) - len(r["meta"]["completion"])], r["meta"]["completion"])
                     for r in labelled]
            pairs += [(a["text"][:len(a["text"]) - len(json.loads(a["meta"])["completion"])],
                       json.loads(a["meta"])["completion"]) for a in additions]
            model, train_metrics = sft_train(model, tokenizer, [p for p, _ in pairs], [c for _, c in pairs], config.train,
                                             out_dir=state.stage_dir / "sft", seed=state.seed, device=state.device,
                                             log=state.log, stage_key=state.stage_key, append_eos=False,
                                             report_to=state.config.run.report_to)
            checkpoint = save_checkpoint(model.cpu(), tokenizer, state.stage_dir / "model")
            train_metrics = {"trained_pairs": len(pairs), **train_metrics}

        metrics = {"inputs": config.inputs, "sources": len(units), "skipped": dict(skipped), "alpha": config.alpha,
                   "synonym_source": synonym_source, "synonym_words": len(synonyms) if synonym_source else None,
                   "ops": per_op, "candidates": len(candidates), "kept": len(kept), "dropped_by_cap": capped,
                   "rejected": dict(judged.rejected), "embedder": embedder,
                   "perplexity_filter": scored_perplexity,
                   "discriminator_filter": None if f.discriminator is None else discriminator is not None, **train_metrics}
        return StageResult(checkpoint=checkpoint, additions=additions, artefacts={"augment_samples": samples},
                           metrics=metrics)

    def report(self, entry: dict) -> str:
        m = entry["stage_metrics"]
        if "ops" not in m:
            return ""
        lines = [f"Augmented {m['sources']} {m['inputs']} sources (alpha {m['alpha']}"
                 + (f", synonyms from {m['synonym_source']}" if m.get("synonym_source") else "")
                 + f"): {m['candidates']} variants made, {m['kept']} kept by the filters"
                 + (f", {m['dropped_by_cap']} of them over the synthetic cap" if m.get("dropped_by_cap") else "")
                 + ".", "",
                 "| op | tried | changed | kept | sources/s |", "|---|---|---|---|---|"]
        for op, o in m["ops"].items():
            lines.append(f"| {op} | {o['tried']} | {o['changed']} | {o['kept']} | {fmt(o.get('sources_per_s'), 0)} |")
        if m.get("rejected"):
            lines += ["", "Rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(m["rejected"].items())) + "."]
        if m.get("trained_pairs"):
            lines += ["", f"Fine-tuned on {m['trained_pairs']} pseudo-labelled pairs and variants."]
        return "\n".join(lines)
