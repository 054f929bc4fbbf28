"""The zero/few-shot harness: tasks as data, choice scoring, k-shot prompts, bad task input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MICRO_ARCH, make_corpus

from selftrain.config import ModelConfig
from selftrain.errors import SelftrainError
from selftrain.evaluation.harness import evaluate_task
from selftrain.modeling.factory import build_initial
from selftrain.tasks import load_task
from selftrain.tasks.answers import answer_matches
from selftrain.tasks.generators import arithmetic, cloze

TEXTS = make_corpus(120).split("\n\n")


@pytest.fixture(scope="module")
def micro():
    model, tok, _ = build_initial(ModelConfig(preset="tiny", vocab_size=320, architecture=MICRO_ARCH), TEXTS, 0)
    return model.eval(), tok


def write_task(tmp_path, rows, **fields):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": "animals", "output_type": "multiple_choice", "data": {"path": "rows.jsonl"},
            "doc_to_text": "{{text}} Animal:", "doc_to_choice": ["cat", "dog"], "doc_to_target": "label",
            "input_field": "text", **fields}
    path = tmp_path / "task.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


ROWS = [{"text": f"Story {i}: the {'cat' if i % 2 else 'dog'} sleeps.", "label": "cat" if i % 2 else "dog"}
        for i in range(6)]


def prefer(model, token_ids: set[int], amount: float = 30.0):
    """Make the model prefer some tokens everywhere: a bias on its output layer."""
    bias = torch.zeros(model.config.vocab_size)
    bias[list(token_ids)] = amount
    return model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias)


def test_scoring_picks_the_choice_the_model_is_made_to_prefer(micro, tmp_path):
    model, tok = micro
    task = load_task(write_task(tmp_path, ROWS))
    ids = {c: set(tok(" " + c, add_special_tokens=False)["input_ids"]) for c in ("cat", "dog")}
    for preferred, other in (("cat", "dog"), ("dog", "cat")):
        hook = prefer(model, ids[preferred] - ids[other])
        try:
            result = evaluate_task(model, tok, task, 0)
        finally:
            hook.remove()
        assert {r["prediction"] for r in result.records} == {preferred}
        assert result.metrics["acc"] == pytest.approx(0.5)  # half the rows have that gold label
        assert result.metrics["acc_stderr"] > 0


def test_kshot_prompts_never_include_the_evaluated_item(micro, tmp_path):
    model, tok = micro
    task = load_task(write_task(tmp_path, ROWS))
    result = evaluate_task(model, tok, task, 5, seed=3)
    for row, rec in zip(ROWS, result.records):
        assert rec["prompt"].count(row["text"]) == 1 and rec["prompt"].endswith(row["text"] + " Animal:")
        others = [r["text"] for r in ROWS if r is not row]
        assert all(o in rec["prompt"] for o in others)  # k=5 of 5 others: all of them, itself never
    again = evaluate_task(model, tok, task, 5, seed=3)
    assert [r["prompt"] for r in again.records] == [r["prompt"] for r in result.records]  # fixed seed
    with pytest.raises(SelftrainError, match="5 available"):
        evaluate_task(model, tok, task, 6)


def test_demonstrations_come_from_fewshot_data_with_answers(micro, tmp_path):
    model, tok = micro
    task = load_task("arith")
    result = evaluate_task(model, tok, task, 2, limit=5)
    assert result.metrics["n"] == 5
    first = result.records[0]["prompt"]
    assert first.count("Question:") == 3 and first.count("Answer: ") == 2  # two solved demos, then the item
    assert all("output" in r for r in result.records)


def test_arithmetic_rows_are_computed_and_matching_is_numeric():
    rows = arithmetic(n=50, digits=2, ops=("+", "-"), seed=1)
    for r in rows:
        a, op, b = r["question"].split()
        assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    task = load_task("arith")
    match = {"match": task.match, "regex": task.regex}
    assert answer_matches(" 42.", "42", **match) and answer_matches("It is 1,024", "1024", **match)
    assert not answer_matches(" 43", "42", **match) and not answer_matches(" none", "42", **match)


def test_cloze_rows_hide_a_real_word_among_distractors():
    rows = cloze(texts=TEXTS, n=30, distractors=3, seed=0)
    assert len(rows) == 30
    for r in rows:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        hidden = r["choices"][r["answer"]]
        sentence = " ".join(x for x in (r["context"], hidden, r["rest"]) if x).lower()
        assert any(sentence in t.lower() for t in TEXTS)  # the hidden word is the one really there


def test_tasks_can_be_scored_in_a_chat_template_only_if_there_is_one(micro, tmp_path):
    model, tok = micro
    task = load_task(write_task(tmp_path, ROWS))
    with pytest.raises(SelftrainError, match="no chat template"):
        evaluate_task(model, tok, task, 0, chat=True)


@pytest.mark.parametrize("fields, message", [
    ({"doc_to_text": None}, "doc_to_text"),
    ({"doc_to_choice": ["cat"]}, "at least 2"),
    ({"output_type": "classify"}, "output_type"),
    ({"doc_to_text": "{{missing}}"}, "row 1"),
    ({"doc_to_target": "{{text}}"}, "not one of the choices"),
])
def test_bad_task_files_get_clear_errors(micro, tmp_path, fields, message):
    path = write_task(tmp_path, ROWS, **fields)
    spec = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in spec.items() if v is not None}))
    with pytest.raises(SelftrainError, match=message):
        load_task(path).docs()


def test_unknown_task_malformed_yaml_and_bad_rows(tmp_path):
    with pytest.raises(SelftrainError, match="built-in tasks are arith, arith-chat, bbc-topics, cloze"):
        load_task("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SelftrainError, match="not valid YAML"):
        load_task(bad)
    path = write_task(tmp_path, ROWS)
    (tmp_path / "rows.jsonl").write_text('{"text": "a", "label": "cat"}\nnot json\n')
    with pytest.raises(SelftrainError, match="rows.jsonl:2 is not JSON"):
        load_task(path).docs()


def test_choices_longer_than_the_context_are_refused(micro, tmp_path):
    model, tok = micro
    long_choice = " ".join(["the old man sees the river"] * 40)  # far beyond 128 positions
    path = write_task(tmp_path, [{"text": "x", "label": "cat"}], doc_to_choice=["cat", long_choice])
    with pytest.raises(SelftrainError, match="as long as the model's whole context"):
        evaluate_task(model, tok, load_task(path), 0)
