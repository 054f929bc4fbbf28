"""The generation backend: one interface, ``generate(prompts, sampling) -> texts``, that every
stage which samples goes through. ``TransformersBackend`` works everywhere (batched, left
padding, KV cache); faster backends (vLLM) plug in behind the same call (any object with that
``generate`` method will do).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from selftrain.errors import SelftrainError


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = 0
    stop: tuple[str, ...] = ()  # completions are cut at the first stop string


class TransformersBackend:
    """``model.generate`` in batches, prompts left-padded so every row continues from its end."""

    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def generate(self, prompts: list[str], sampling: SamplingParams) -> list[str]:
        _, completions = self.generate_ids(prompts, sampling)
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return [_cut(t, sampling.stop) for t in texts]

    @torch.no_grad()
    def generate_ids(self, prompts: list[str], sampling: SamplingParams) -> tuple[list[list[int]], list[list[int]]]:
        """(prompt token ids, completion token ids) per prompt, padding removed; a completion
        keeps its EOS when it stopped, and is ``max_new_tokens`` long when it never did.
        Stop strings are not applied here (they are cut from decoded text by ``generate``)."""
        tok, model = self.tokenizer, self.model
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        was_training = model.training
        model.eval()
        side, tok.padding_side = tok.padding_side, "left"
        prompt_out: list[list[int]] = []
        completion_out: list[list[int]] = []
        max_len = getattr(model.config, "max_position_embeddings", None)
        try:
            for i in range(0, len(prompts), self.batch_size):
                batch = prompts[i:i + self.batch_size]
                enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
                if enc["input_ids"].shape[1] == 0:  # all prompts empty: start from BOS/EOS
                    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
                    enc = {"input_ids": torch.full((len(batch), 1), start),
                           "attention_mask": torch.ones(len(batch), 1, dtype=torch.long)}
                enc = {k: v.to(model.device) for k, v in enc.items()}
                new = sampling.max_new_tokens
                if max_len:  # never ask for positions the model does not have
                    new = max(1, min(new, max_len - enc["input_ids"].shape[1]))
                greedy = sampling.temperature <= 0
                ids = model.generate(
                    **enc, max_new_tokens=new, do_sample=not greedy, use_cache=True,
                    temperature=None if greedy else sampling.temperature,
                    top_p=None if greedy else sampling.top_p, top_k=sampling.top_k or None,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                )
                width = enc["input_ids"].shape[1]
                for row, mask in zip(ids.tolist(), enc["attention_mask"].tolist()):
                    prompt_out.append([t for t, m in zip(row[:width], mask) if m])
                    completion_out.append(_until_eos(row[width:], tok.eos_token_id))
        finally:
            tok.padding_side = side
            model.train(was_training)
        return prompt_out, completion_out


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
                                      top_p=None if greedy else sampling.top_p, top_k=sampling.top_k or None)
            out += [_cut(t, sampling.stop) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return out


def load_seq2seq(path: str, *, trust_remote_code: bool = False):
    """(model, tokenizer) of a local encoder-decoder directory (a MarianMT translator, say)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    if not (Path(path) / "config.json").is_file():
        raise SelftrainError(f"translation model {path!r}: not a model directory with a config.json")
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=trust_remote_code)
        return model.eval(), AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SelftrainError(f"could not load the translation model {path}: {e}") from None
