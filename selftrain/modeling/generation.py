"""The generation backend: one interface, ``generate(prompts, sampling) -> texts``, that every
stage which samples goes through. ``TransformersBackend`` works everywhere (batched, left
padding, KV cache, rows that stop at their stop strings); other engines plug in behind the same
call (any object with that ``generate`` method will do).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from selftrain import faults
from selftrain.errors import SelftrainError
from selftrain.modeling.decoding import decode_batch
from selftrain.modeling.weights import safetensors_only


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = 0
    stop: tuple[str, ...] = ()  # completions are cut at the first stop string


ENGINES = ("fast", "generate")


class TransformersBackend:
    """Batched decoding over a transformers causal LM, prompts left-padded so every row continues
    from its end. ``engine="fast"`` (the default) runs ``decoding.decode_batch``: rows stop at EOS
    or a stop string and leave the batch, prompts are bucketed by length (batches of similar
    lengths waste no compute on padding). ``engine="generate"`` is plain ``model.generate``, the
    baseline ``bench/rollout.py`` measures against."""

    def __init__(self, model, tokenizer, batch_size: int = 16, engine: str = "fast"):
        if engine not in ENGINES:
            raise SelftrainError(f"generation engine {engine!r}: expected one of {', '.join(ENGINES)}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.engine = engine

    def generate(self, prompts: list[str], sampling: SamplingParams) -> list[str]:
        _, completions = self.generate_ids(prompts, sampling)
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return [_cut(t, sampling.stop) for t in texts]

    @torch.no_grad()
    def generate_ids(self, prompts: list[str], sampling: SamplingParams) -> tuple[list[list[int]], list[list[int]]]:
        """(prompt token ids, completion token ids) per prompt, in the prompts' order; a completion
        keeps the token that ended it (EOS, or the one completing a stop string: the fast engine
        stops there, ``generate`` only decodes on) and is ``max_new_tokens`` long when none did.
        ``generate`` cuts stop strings from the decoded text, so both give the same texts."""
        tok, model = self.tokenizer, self.model
        if not prompts:
            return [], []
        generator = None
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
            generator = torch.Generator(model.device).manual_seed(sampling.seed)
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        # an empty prompt starts from BOS (or EOS): there is nothing else to continue from
        prompt_ids = [ids or [start] for ids in tok(prompts, add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompt_ids[i])) if self.engine == "fast" \
            else list(range(len(prompts)))
        completions: list[list[int]] = [[] for _ in prompts]
        was_training = model.training
        model.eval()
        try:
            for b in range(0, len(order), self.batch_size):
                faults.point("generate")
                batch = order[b:b + self.batch_size]
                rows = [prompt_ids[i] for i in batch]
                new = self._room(max(len(r) for r in rows), sampling.max_new_tokens)
                outs = self._fast(rows, new, sampling, generator) if self.engine == "fast" \
                    else self._plain(rows, new, sampling)
                for i, ids in zip(batch, outs):
                    completions[i] = ids
        finally:
            model.train(was_training)
        return prompt_ids, completions

    def _room(self, prompt_len: int, wanted: int) -> int:
        """Never ask for positions the model does not have."""
        max_len = getattr(self.model.config, "max_position_embeddings", None)
        return max(1, min(wanted, max_len - prompt_len)) if max_len else wanted

    def _eos_ids(self) -> set[int]:
        eos = self.tokenizer.eos_token_id
        return set(eos if isinstance(eos, list) else [eos]) - {None}

    def _fast(self, rows, new, sampling, generator):
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return decode_batch(self.model, self.tokenizer, rows, max_new_tokens=new, temperature=sampling.temperature,
                            top_k=sampling.top_k, top_p=sampling.top_p, stop=tuple(sampling.stop),
                            eos_ids=self._eos_ids(), pad_id=pad or 0, generator=generator)

    def _plain(self, rows, new, sampling):
        tok, model = self.tokenizer, self.model
        side, tok.padding_side = tok.padding_side, "left"
        try:
            enc = tok.pad({"input_ids": rows}, return_tensors="pt").to(model.device)
        finally:
            tok.padding_side = side
        greedy = sampling.temperature <= 0
        ids = model.generate(
            **enc, max_new_tokens=new, do_sample=not greedy, use_cache=True,
            temperature=None if greedy else sampling.temperature,
            # top_k 0 must reach generate as 0: None falls back to generation_config's top_k of 50
            top_p=None if greedy else sampling.top_p, top_k=None if greedy else sampling.top_k,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
        width = enc["input_ids"].shape[1]
        return [_until_eos(row[width:], tok.eos_token_id) for row in ids.tolist()]


def _until_eos(ids: list[int], eos) -> list[int]:
    """Generated ids up to and including the first EOS (what follows is padding)."""
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    for j, t in enumerate(ids):
        if t in eos_ids:
            return ids[:j + 1]
    return ids


def _cut(text: str, stops: tuple[str, ...]) -> str:
    for s in stops:
        j = text.find(s)
        if j >= 0:
            text = text[:j]
    return text


class Seq2SeqBackend:
    """The same interface for an encoder-decoder (a translation model): each prompt is the source
    text, each output its translation. Sources longer than the encoder takes are cut by the
    tokenizer (``max_source_tokens``)."""

    def __init__(self, model, tokenizer, batch_size: int = 16, max_source_tokens: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_source_tokens = max_source_tokens

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: SamplingParams) -> list[str]:
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        self.model.eval()
        greedy = sampling.temperature <= 0
        out: list[str] = []
        for i in range(0, len(prompts), self.batch_size):
            enc = self.tokenizer(prompts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_source_tokens).to(self.model.device)
            ids = self.model.generate(**enc, max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
                                      temperature=None if greedy else sampling.temperature,
                                      top_p=None if greedy else sampling.top_p, top_k=None if greedy else sampling.top_k)
            out += [_cut(t, sampling.stop) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return out


def load_seq2seq(path: str, *, trust_remote_code: bool = False):
    """(model, tokenizer) of a local encoder-decoder directory (a MarianMT translator, say)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    if not (Path(path) / "config.json").is_file():
        raise SelftrainError(f"translation model {path!r}: not a model directory with a config.json")
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                      **safetensors_only(path, "translation model"))
        return model.eval(), AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SelftrainError(f"could not load the translation model {path}: {e}") from None
