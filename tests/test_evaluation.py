"""Evaluation and the generation backend, checked against direct computations."""

import math

import pytest
import torch

from selftrain.evaluation.diversity import distinct_n, diversity_metrics, repetition_rate
from selftrain.evaluation.perplexity import heldout_perplexity
from selftrain.modeling.factory import train_tokenizer
from selftrain.modeling.generation import SamplingParams, TransformersBackend
from tests.conftest import make_corpus
from tests.conftest import micro_lm as build_micro_lm


@pytest.fixture(scope="module")
def micro_lm():
    texts = make_corpus(80).split("\n\n")
    tok = train_tokenizer(texts, 320, "causal")
    model = build_micro_lm(tok)
    return model.eval(), tok, texts


def test_perplexity_is_token_weighted_across_uneven_blocks(micro_lm):
    model, tok, texts = micro_lm
    block = 24
    got = heldout_perplexity(model, tok, texts[:5], block_size=block, max_tokens=10_000, batch_size=3)
    stream = []
    for ids in tok(texts[:5], add_special_tokens=False)["input_ids"]:
        stream += ids + [tok.eos_token_id]
    nll, n = 0.0, 0
    for i in range(0, len(stream), block):
        b = torch.tensor([stream[i:i + block]])
        if b.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = model(input_ids=b, labels=b).loss.item()  # HF's mean over this block
        nll += loss * (b.shape[1] - 1)
        n += b.shape[1] - 1
    assert len(stream) % block != 0  # the last block is shorter: weighting matters
    assert got["heldout_tokens"] == n
    assert got["heldout_loss"] == pytest.approx(nll / n, rel=1e-4)
    assert got["heldout_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert 0 < got["heldout_entropy"] <= math.log(len(tok)) + 1e-3


def test_batched_left_padded_generation_matches_one_by_one(micro_lm):
    model, tok, _ = micro_lm
    prompts = ["The cat", "A small bird sees the river near", "My"]
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    batched = TransformersBackend(model, tok, batch_size=3).generate(prompts, greedy)
    single = [TransformersBackend(model, tok, batch_size=1).generate([p], greedy)[0] for p in prompts]
    assert batched == single
    assert all(batched)
    assert tok.padding_side == "right"  # restored


def test_sampling_is_seeded_and_stop_strings_cut(micro_lm):
    model, tok, _ = micro_lm
    backend = TransformersBackend(model, tok)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    assert backend.generate(["The dog"] * 3, params) == backend.generate(["The dog"] * 3, params)
    cut = backend.generate(["The dog"], SamplingParams(max_new_tokens=10, temperature=0, stop=(" ",)))[0]
    assert " " not in cut


def test_diversity_on_hand_made_samples():
    assert distinct_n(["a b c d"], 1) == 1.0
    assert distinct_n(["a a a a"], 1) == 0.25
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert repetition_rate(["w x y z w x y z"]) == pytest.approx(1 / 5)  # 5 four-grams, 1 repeat
    assert repetition_rate(["one two three four five"]) == 0.0
    m = diversity_metrics(["the cat sat", "the cat ran"])
    assert m["distinct_1"] == pytest.approx(4 / 6) and m["distinct_2"] == pytest.approx(3 / 4)


def test_evaluate_survives_a_diverged_model(micro_lm):
    """NaN weights or overflowing logits: metrics say so, no sampling (it would raise), no crash."""
    import copy

    from selftrain.config import EvalConfig
    from selftrain.evaluation import evaluate

    model, tok, texts = micro_lm
    cfg = EvalConfig(max_tokens=256, samples=2, max_new_tokens=4, block_size=32)
    nan_model = copy.deepcopy(model)
    with torch.no_grad():
        next(nan_model.parameters()).fill_(math.nan)
    metrics, samples = evaluate(nan_model, tok, texts, cfg)
    assert metrics["diverged"] is True and metrics["heldout_ppl"] == math.inf and samples == []
    assert metrics["diverged_reason"] == "non-finite weights"
    huge = copy.deepcopy(model)  # finite weights, but logits overflow float32
    with torch.no_grad():
        huge.lm_head.weight.fill_(3e38)
    metrics, samples = evaluate(huge, tok, texts, cfg)
    assert metrics["diverged_reason"] == "non-finite perplexity" and metrics["heldout_ppl"] == math.inf
    assert samples == []
