"""Log-likelihood scoring (``selftrain.modeling.scoring``) and chat prompts (``selftrain.modeling.chat``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import MICRO_ARCH, make_corpus

from selftrain.config import ModelConfig
from selftrain.errors import SelftrainError
from selftrain.modeling.chat import render_prompt, use_chat
from selftrain.modeling.factory import build_initial
from selftrain.modeling.scoring import (
    choice_loglikelihoods,
    encode_pair,
    loglikelihoods,
    split_pair,
    unshared_choice_loglikelihoods,
)

TEXTS = make_corpus(120).split("\n\n")
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def micro():
    model, tok, _ = build_initial(ModelConfig(preset="tiny", vocab_size=320, architecture=MICRO_ARCH), TEXTS, 0)
    return model.eval(), tok


# ---------------------------------------------------------------------- scoring
def test_shared_prompt_scoring_equals_scoring_each_pair(micro):
    """The KV-cache-sharing path must give the plain per-pair log-likelihoods."""
    model, tok = micro
    prompts = ["The cat", "A small bird finds the river near the house. The old", "x"]
    choices = [["sees the red ball", "dog"], ["man", "teacher paints a tall tree", "river"], ["cat", "a"]]
    shared = choice_loglikelihoods(model, tok, prompts, choices, prefix=" ", batch_size=2)
    plain = unshared_choice_loglikelihoods(model, tok, prompts, choices, prefix=" ", batch_size=1)
    for a, b in zip(shared, plain):
        assert a == pytest.approx(b, abs=1e-4)


def test_loglikelihood_is_the_sum_of_the_continuations_token_logprobs(micro):
    model, tok = micro
    ctx, cont = split_pair(tok, "The cat sees", " the river")
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    want = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
    got = loglikelihoods(model, tok, [("The cat sees", " the river"), ("x", " y")], batch_size=2)[0]
    assert got == pytest.approx(want, abs=1e-4)


def test_split_pair_moves_trailing_spaces_to_the_continuation(micro):
    _, tok = micro
    assert split_pair(tok, "The cat ", "sees") == split_pair(tok, "The cat", " sees")
    ctx, cont = split_pair(tok, "", "cat")  # nothing to condition on: the BOS/EOS token
    assert len(ctx) == 1 and tok.decode(cont) == "cat"
    with pytest.raises(SelftrainError, match="no tokens"):
        split_pair(tok, "The cat", "")
    ids, cont = encode_pair(tok, "The cat sees the river " * 20, "dog", max_length=16)
    assert len(ids) == 16 and (ids + cont[-1:])[-len(cont):] == cont  # cut from the left; its last token predicted


# ---------------------------------------------------------------------- chat
def test_render_prompt_uses_the_template_only_when_chat_is_on(micro):
    _, tok = micro
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = TEMPLATE
    assert render_prompt(chat_tok, "Hi", chat=True) == "<user>Hi</user><assistant>"
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert render_prompt(chat_tok, turns, chat=True) == "<user>a</user><assistant>b</assistant><user>c</user><assistant>"
    assert render_prompt(chat_tok, "Hi", chat=False) == "Hi"
    assert render_prompt(chat_tok, "Hi", chat=False, plain="Q: Hi\nA:") == "Q: Hi\nA:"
    with pytest.raises(ValueError, match="needs `plain`"):
        render_prompt(chat_tok, turns, chat=False)


def test_use_chat_resolves_auto_and_refuses_a_missing_template(micro):
    _, tok = micro
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = TEMPLATE
    assert use_chat("auto", chat_tok) is True and use_chat("auto", tok) is False
    assert use_chat(True, chat_tok) is True and use_chat(False, chat_tok) is False
    with pytest.raises(SelftrainError, match="judge.chat=true, but the tokenizer has no chat template"):
        use_chat(True, tok, what="judge.chat")
