"""Stage `self_instruct`: novelty and format filters, provenance, fine-tuning on kept pairs."""

from __future__ import annotations

import pytest
from conftest import micro_config, pretrain

from selftrain.config import config_from_dict
from selftrain.data.pool import Pool
from selftrain.errors import SelftrainError
from selftrain.runner import Runner
from selftrain.stages import self_instruct
from selftrain.stages.self_instruct import NoveltyFilter, format_problem, rouge_l
from selftrain.workspace import Workspace


def test_rouge_l_on_hand_made_pairs():
    assert rouge_l("write a poem about the sea", "Write a poem about the sea.") == pytest.approx(1.0)
    assert rouge_l("a b c d", "a b x d") == pytest.approx(0.75)  # LCS 3 of 4 and 4
    assert rouge_l("list prime numbers", "describe the weather") == 0.0
    assert rouge_l("", "anything") == 0.0


def test_novelty_filter_drops_near_duplicates_of_kept_instructions_and_of_the_pool():
    pool = ["The farmer carries an old book near the house, and the teacher paints the blue door by the lake."]
    f = NoveltyFilter(["Write a short poem about the sea."], pool, max_rouge_l=0.7, max_pool_jaccard=0.5)
    assert f.check("Write a short poem about the sea today.", "x")[0] == "similar_instruction"
    reason, best = f.check("List three prime numbers.", "List three prime numbers. 2, 3, 5")
    assert reason is None and best < 0.3
    f.accept("List three prime numbers.")
    assert f.check("List three prime numbers please.", "y")[0] == "similar_instruction"  # kept ones count too
    copied = "Summarise: " + pool[0]
    assert f.check("Summarise a story about a farmer.", copied)[0] == "similar_to_pool"


@pytest.mark.parametrize("text, problem", [
    ("Hi", "too_short"), ("Explain why the sky is blue.", None), ("Task 4: name a colour", "format"),
    ("1234 5678 9012", "format"), ("red red red red red red red red red", "repetitive"),
])
def test_format_filter(text, problem):
    assert format_problem(text, 3, 60) == problem


class ScriptedBackend:
    """Stands in for the model's sampler: proposals with a near-duplicate, a copy, and new tasks."""

    PROPOSALS = ["Write a short poem about the sea today.", "Name three colours of the rainbow.",
                 "Name three colours of the rainbow please.", "Explain how a bicycle works.", "??"]

    def __init__(self, *_a, **_k):
        pass

    def generate(self, prompts, sampling):
        if prompts[0].startswith("Come up with"):
            return [self.PROPOSALS[i % len(self.PROPOSALS)] for i in range(len(prompts))]
        return [" An answer to: " + p.split("Instruction: ")[-1].split("\n")[0] for p in prompts]


def test_self_instruct_stage_keeps_only_novel_pairs_with_provenance(tmp_path, corpus_file, monkeypatch, pool_lists_refused):
    monkeypatch.setattr(self_instruct, "TransformersBackend", ScriptedBackend)
    stage = {"self_instruct": {"seed_tasks": [{"instruction": "Write a short poem about the sea.",
                                                "response": "Waves fold grey light."}],
                               "num_pairs": 10, "max_batches": 2, "batch_size": 5,
                               "train": {"max_steps": 4, "learning_rate": 1e-3, "batch_size": 2}}}
    cfg = micro_config(tmp_path / "run", corpus_file, [pretrain(max_steps=10), stage], guard={"tolerance": 10.0})
    manifest = Runner(config_from_dict(cfg)).run()
    entry = manifest["stages"][1]
    m = entry["stage_metrics"]
    assert m["proposed"] == 10 and m["accepted"] == 2
    assert m["dropped"]["similar_instruction"] == 6 and m["dropped"]["too_short"] == 2
    rows = Pool.load(Workspace(tmp_path / "run").abs(manifest["pool"])).rows(origin="self_instruct")
    assert sorted(r["meta"]["instruction"] for r in rows) == ["Explain how a bicycle works.",
                                                              "Name three colours of the rainbow."]
    assert all(r["text"].startswith("Instruction: ") and "\nResponse: " in r["text"] for r in rows)
    assert "sft_loss" in m and entry["checkpoint"]


def test_self_instruct_takes_only_a_handful_of_seeds(tmp_path, corpus_file):
    seeds = [{"instruction": f"Task number {i} to do.", "response": "ok"} for i in range(9)]
    cfg = micro_config(tmp_path / "run", corpus_file, [{"self_instruct": {"seed_tasks": seeds}}])
    with pytest.raises(SelftrainError, match="at most 8 seed tasks"):
        Runner(config_from_dict(cfg)).run()
