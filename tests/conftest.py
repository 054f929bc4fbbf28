"""Shared fixtures: a small English-like corpus written by the test, and a micro Llama config
(a few hundred thousand parameters) so every pipeline test runs in seconds on 2 CPU cores."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the teacher", "a small bird", "the farmer"]
VERBS = ["sees", "likes", "carries", "finds", "watches", "follows", "paints"]
OBJECTS = ["the red ball", "a green apple", "the river", "an old book", "the blue door", "a tall tree"]
PLACES = ["in the garden", "near the house", "at the market", "by the lake", "on the hill"]

MICRO_ARCH = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "max_position_embeddings": 128}


def make_corpus(n_paragraphs: int = 240, seed: int = 0) -> str:
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(n_paragraphs):
        sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
                     for _ in range(rng.randint(2, 4))]
        paragraphs.append(" ".join(s.capitalize() for s in sentences))
    return "\n\n".join(paragraphs) + "\n"


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(make_corpus())
    return path


def micro_lm(tok, seed: int = 0):
    """An untrained micro Llama over ``tok``'s vocabulary, same weights for the same seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **MICRO_ARCH))


def micro_config(run_dir: Path, corpus: Path, stages: list, **sections) -> dict:
    cfg = {
        "run": {"name": "t", "output_dir": str(run_dir), "seed": 0},
        "model": {"preset": "tiny", "vocab_size": 320, "architecture": dict(MICRO_ARCH)},
        "data": {"train": str(corpus), "heldout_fraction": 0.1},
        "eval": {"max_tokens": 2048, "samples": 4, "max_new_tokens": 12, "block_size": 64},
        "stages": stages,
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def pretrain(**kw) -> dict:
    opts = {"max_steps": 40, "block_size": 32, "batch_size": 8, "learning_rate": 3e-3, "logging_steps": 5,
            "save_steps": 20}
    return {"pretrain": {**opts, **kw}}


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def pool_lists_refused(monkeypatch):
    """``Pool.texts`` and ``Pool.rows`` (every row as a Python list) raise when a stage calls them:
    stages stream the memory-mapped pool, so a corpus larger than memory fits through them. The
    runner may still call them (a small held-out set)."""
    import inspect

    from selftrain.data.pool import Pool

    def refused(reader):
        def guarded(self, *args, **kwargs):
            if any("/selftrain/stages/" in frame.filename for frame in inspect.stack()):
                raise AssertionError(f"a stage read the whole pool with Pool.{reader.__name__}")
            return reader(self, *args, **kwargs)
        return guarded

    for reader in (Pool.texts, Pool.rows):
        monkeypatch.setattr(Pool, reader.__name__, refused(reader))


def weights_stage(name: str, edit, doc: str):
    """A test-only stage that saves the accepted model as a new checkpoint after ``edit(model, tokenizer)``
    (under no_grad): the way a test forces what a stage does to the weights."""
    import torch

    from selftrain.modeling.factory import save_checkpoint
    from selftrain.stages import Stage, StageConfig, StageResult

    class Config(StageConfig):
        pass

    def run(self, state, config):
        model, tok = state.load_model()
        with torch.no_grad():
            edit(model, tok)
        return StageResult(checkpoint=save_checkpoint(model.cpu(), tok, state.stage_dir / "model"))

    return type(name, (Stage,), {"__doc__": doc, "name": name, "Config": Config, "run": run})
