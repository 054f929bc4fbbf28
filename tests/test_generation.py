"""The fast decoding engine: the same greedy text as ``model.generate``, rows that stop at their
stop strings and leave the batch, shared prompt prefixes computed once, and sampling from the
same distribution."""

from __future__ import annotations

import functools

import pytest
import torch

from selftrain.errors import SelftrainError
from selftrain.modeling import decoding
from selftrain.modeling.factory import train_tokenizer
from selftrain.modeling.generation import SamplingParams, TransformersBackend
from tests.conftest import make_corpus
from tests.conftest import micro_lm as build_micro_lm


@pytest.fixture(scope="module")
def lm():
    texts = make_corpus(120).split("\n\n")
    tok = train_tokenizer(texts, 320, "causal")
    model = build_micro_lm(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)  # a little training: an untrained model only babbles
    ids = tok("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    for step in range(60):
        batch = torch.tensor([ids[i:i + 48] for i in range(step * 40 % 2000, step * 40 % 2000 + 8 * 48, 48)])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), tok, texts


def prompts_of(texts, n=24):
    # different lengths, a shared beginning on some, and copies (a GRPO group)
    out = [t[: 12 + 5 * (i % 7)] for i, t in enumerate(texts[:n])]
    return out + ["The cat sees the red ball"] * 4 + ["The cat sees a"] * 3 + [""]


def test_greedy_text_is_what_generate_writes(lm):
    model, tok, texts = lm
    prompts = prompts_of(texts)
    for stop in [(), (".",), (" the", "ball")]:
        sampling = SamplingParams(max_new_tokens=20, temperature=0, stop=stop)
        plain = TransformersBackend(model, tok, batch_size=8, engine="generate").generate(prompts, sampling)
        fast = TransformersBackend(model, tok, batch_size=8, engine="fast").generate(prompts, sampling)
        assert fast == plain
        if stop:
            assert all(not any(s in t for s in stop) for t in fast)


def test_rows_stop_at_their_stop_string_and_leave_the_batch(lm, monkeypatch):
    model, tok, texts = lm
    widths = []
    forward = model.forward

    @functools.wraps(forward)  # keeps the signature: the engine asks it whether logits_to_keep is taken
    def spy(*args, **kw):
        if "logits_to_keep" not in kw:  # a decoding step (prefill asks for the last position only)
            widths.append(kw["input_ids"].shape[0])
        return forward(*args, **kw)

    monkeypatch.setattr(model, "forward", spy)
    prompts = [t[:20 + i] for i, t in enumerate(texts[:8])]  # eight different prompts
    sampling = SamplingParams(max_new_tokens=30, temperature=0, stop=(".",))
    _, completions = TransformersBackend(model, tok, batch_size=8).generate_ids(prompts, sampling)
    texts_out = tok.batch_decode(completions, skip_special_tokens=True)
    # a completion ends with the token that completed the stop string, not 30 tokens later
    assert all(len(c) < 30 for c in completions) and all("." in t for t in texts_out)
    assert all("." not in tok.decode(c[:-1], skip_special_tokens=True) for c in completions)
    assert widths[0] == 8 and widths[-1] < 8  # rows that finished left the batch
    assert len(widths) == max(map(len, completions)) - 1  # decoding stopped with the last row


def test_shared_prefix_and_copies_are_computed_once(lm, monkeypatch):
    model, tok, _ = lm
    seen = []
    forward = model.forward

    @functools.wraps(forward)
    def spy(*args, **kw):
        seen.append(tuple(kw["input_ids"].shape))
        return forward(*args, **kw)

    monkeypatch.setattr(model, "forward", spy)
    shared = "The old man finds an old book by the lake. The teacher paints"
    prompts = [shared + end for end in (" the river", " a tall tree", " the blue door") for _ in range(4)]
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    cache, mask, logits, _ = decoding.prefill(model, ids, tok.pad_token_id)
    common = decoding._common_prefix([tuple(i) for i in ids])
    assert seen[0] == (1, common)  # the shared prefix, once
    assert seen[1][0] == 3 and seen[1][1] == max(map(len, ids)) - common  # three distinct prompts
    assert logits.shape[0] == 12 and mask.shape[0] == 12
    # the same next-token scores as a plain forward over each whole prompt
    for i in (0, 5, 11):
        whole = forward(input_ids=torch.tensor([ids[i]])).logits[0, -1]
        assert torch.allclose(logits[i], whole, atol=1e-4)


def test_sampling_draws_from_the_softmax():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7, 1e-9]])).repeat(40_000, 1)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(decoding.pick_tokens(logits, 1.0, 0, 1.0, g), minlength=4).float() / 40_000
    assert torch.allclose(counts, torch.tensor([0.1, 0.2, 0.7, 0.0]), atol=0.01)
    top = torch.bincount(decoding.pick_tokens(logits, 1.0, 2, 1.0, g), minlength=4).float() / 40_000
    assert top[0] == 0 and abs(top[2] - 0.7 / 0.9) < 0.01  # top-k 2 keeps the two likeliest
    nucleus = torch.bincount(decoding.pick_tokens(logits, 1.0, 0, 0.6, g), minlength=4)
    assert nucleus[2] == 40_000  # top-p 0.6: 0.7 alone reaches it
    hot = torch.bincount(decoding.pick_tokens(logits, 100.0, 0, 1.0, g), minlength=4).float() / 40_000
    assert hot.min() > 0.2  # a high temperature flattens


def test_sampling_is_seeded_and_an_unknown_engine_is_refused(lm):
    model, tok, texts = lm
    backend = TransformersBackend(model, tok, batch_size=8)
    sampling = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3)
    prompts = [t[:15] for t in texts[:6]]
    assert backend.generate(prompts, sampling) == backend.generate(prompts, sampling)
    with pytest.raises(SelftrainError, match="engine"):
        TransformersBackend(model, tok, engine="vllm-on-cpu")


def test_a_zero_uniform_never_picks_a_token_of_probability_zero(monkeypatch):
    logits = torch.tensor([[float("-inf"), 0.0, 1.0, float("-inf")]])
    monkeypatch.setattr(decoding.torch, "rand", lambda *a, **kw: torch.zeros(1, 1))  # the draw torch.rand can return
    assert decoding.pick_tokens(logits, 1.0, 0, 1.0, None).item() == 2


def test_sliding_window_models_prefill_whole_prompts():
    from transformers import LlamaConfig, MistralConfig

    assert decoding._sliding_window(MistralConfig(sliding_window=16))
    assert not decoding._sliding_window(LlamaConfig())
