"""The guard: a stage's target must rise, protected metrics stay within their budgets (per stage
and since the run's best), and named collapse detectors roll back a stage whose model repeats
itself, even when its perplexity would pass."""

import math
import re

import pytest
import torch

import selftrain.runner as runner_module
from selftrain.config import GuardConfig, config_from_dict
from selftrain.guard import best_values, judge
from selftrain.runner import Runner
from selftrain.stages import REGISTRY
from tests.conftest import micro_config, weights_stage


def failed(decision) -> set[str]:
    return {c.name for c in decision.checks if not c.ok}


def test_one_metric_rules_when_a_stage_names_no_target():
    g = GuardConfig(tolerance=0.02)
    assert judge(g, {"heldout_ppl": 10.0}, {"heldout_ppl": 10.1}).accepted  # within 2%
    d = judge(g, {"heldout_ppl": 10.0}, {"heldout_ppl": 10.5})
    assert not d.accepted and failed(d) == {"protect heldout_ppl"} and "tolerance 2%" in d.reason
    assert not judge(g, {"heldout_ppl": 10.0}, {"heldout_ppl": math.nan}).accepted
    assert not judge(g, {"heldout_ppl": 10.0}, {"heldout_ppl": math.inf}).accepted
    d = judge(g, {"heldout_ppl": 10.0}, {"heldout_ppl": math.inf, "diverged": True,
                                         "diverged_reason": "non-finite weights"})
    assert not d.accepted and d.reason == "divergence: non-finite weights"
    up = GuardConfig(metric="distinct_2", min_distinct_2=None)  # higher is better for diversity
    assert judge(up, {"distinct_2": 0.5}, {"distinct_2": 0.6}).accepted
    assert not judge(up, {"distinct_2": 0.5}, {"distinct_2": 0.4}).accepted
    d = judge(g, {}, {"heldout_ppl": 5.0})
    assert not d.accepted and "missing" in d.reason


def test_a_stage_that_raised_its_target_may_spend_the_forgetting_budget():
    g = GuardConfig(tolerance=0.02, forgetting_budget=0.15)
    before = {"heldout_ppl": 37.4, "bbc_acc": 0.44}
    after = {"heldout_ppl": 42.7, "bbc_acc": 0.56}  # +12 points on its task, +14% perplexity
    # judged by perplexity alone (no target), it is rolled back ...
    assert not judge(g, before, after).accepted
    # ... named as its target, the task rose, and 14% is inside the 15% forgetting budget
    d = judge(g, before, after, target_metric="bbc_acc")
    assert d.accepted, d.reason
    assert [c.name for c in d.checks][:2] == ["target bbc_acc", "protect heldout_ppl"]
    assert "forgetting budget 15%" in d.checks[1].detail
    # a target that did not rise fails, and then perplexity gets only the plain tolerance
    d = judge(g, before, {**after, "bbc_acc": 0.44}, target_metric="bbc_acc")
    assert failed(d) == {"target bbc_acc", "protect heldout_ppl"}
    # a stage may report its own target (fewshot: accuracy on its set-aside rows)
    own = {"target": {"metric": "set-aside accuracy", "before": 0.44, "after": 0.70, "mode": "max"}}
    assert judge(g, before, after, own).accepted
    # min_target_gain: a rise inside the noise does not count
    noisy = GuardConfig(min_target_gain=0.05)
    assert failed(judge(noisy, before, {**before, "bbc_acc": 0.47}, target_metric="bbc_acc")) == {"target bbc_acc"}
    # further protected metrics: an earlier task must not fall
    g2 = GuardConfig(protect=["arith_acc"], tolerance=0.02)
    d = judge(g2, {"heldout_ppl": 10, "arith_acc": 0.5}, {"heldout_ppl": 9, "arith_acc": 0.4})
    assert failed(d) == {"protect arith_acc"}


def test_the_drift_budget_bounds_regressions_that_each_pass():
    g = GuardConfig(tolerance=0.05, drift_budget=0.08)
    history = [{"heldout_ppl": 100.0}, {"heldout_ppl": 104.0}]  # the start, then an accepted +4%
    best = best_values(g, history)
    assert best == {"heldout_ppl": 100.0}
    d = judge(g, {"heldout_ppl": 104.0}, {"heldout_ppl": 108.3}, best=best)  # +4.1%: within 5% of the last
    assert not d.accepted and failed(d) == {"drift heldout_ppl"} and "drift budget 8%" in d.reason
    assert judge(g, {"heldout_ppl": 104.0}, {"heldout_ppl": 107.0}, best=best).accepted
    assert best_values(g, [{"heldout_ppl": 100.0}, {"heldout_ppl": 90.0}]) == {"heldout_ppl": 90.0}  # the best


@pytest.mark.parametrize("after, detector", [
    ({"distinct_2": 0.01}, "distinct-2 floor"),
    ({"heldout_entropy": 0.001}, "entropy floor"),
    ({"self_bleu": 0.97}, "self-BLEU ceiling"),
    ({"heldout_ppl": 9.0}, "perplexity ceiling"),
])
def test_each_collapse_detector_is_named(after, detector):
    g = GuardConfig(max_heldout_ppl=8.0)
    healthy = {"heldout_ppl": 5.0, "distinct_2": 0.6, "heldout_entropy": 2.0, "self_bleu": 0.2}
    assert judge(g, {"heldout_ppl": 5.0}, healthy).accepted
    d = judge(g, {"heldout_ppl": 10.0}, {**healthy, **after})
    assert not d.accepted and failed(d) == {detector} and detector in d.reason
    d = judge(g, {"heldout_ppl": 10.0}, healthy, {"collapse": "discriminator won"})
    assert failed(d) == {"stage collapse detector"}


# ---------------------------------------------------------------------------- in a run


def _collapse(model, tok):
    """A constant direction in the residual stream that only " the" reads out: whatever the prompt,
    the model writes " the" (the end state of training on its own near-zero-temperature, repeated text)."""
    token = tok.convert_tokens_to_ids(tok.tokenize(" the")[0])
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())
    model.model.embed_tokens.weight[:, 0] = 30.0
    model.lm_head.weight[:, 0] = 0.0
    model.lm_head.weight[token, 0] = 3.0  # its logit ~20 above the rest after the final norm


Repeat = weights_stage("repeat", _collapse, "Test-only stage: the model is forced to collapse.")
Unchanged = weights_stage("unchanged", lambda model, tok: None, "Test-only stage: a new checkpoint (the accepted "
                          "weights, saved again), so the runner evaluates it.")


def scripted(monkeypatch, values: list[float]):
    """Make the runner's evaluations return these perplexities, in order (the start's first)."""
    queue = list(values)

    def evaluate(*_args, **_kw):
        return {"heldout_ppl": queue.pop(0), "heldout_loss": 1.0}, []

    monkeypatch.setattr(runner_module, "evaluate", evaluate)
    return queue


def test_a_collapsed_stage_is_caught_by_the_diversity_detectors(tmp_path, corpus_file, monkeypatch):
    monkeypatch.setitem(REGISTRY, "repeat", Repeat)
    cfg = micro_config(tmp_path / "run", corpus_file, ["repeat"], guard={"tolerance": 1e12, "drift_budget": None},
                       eval={"samples": 8, "max_new_tokens": 12})
    entry = Runner(config_from_dict(cfg)).run()["stages"][0]
    assert entry["decision"] == "rolled_back"
    names = {c["name"] for c in entry["checks"] if not c["ok"]}
    # perplexity passed (tolerance 1e12): the model was rolled back for repeating itself
    assert "protect heldout_ppl" not in names
    assert {"distinct-2 floor", "self-BLEU ceiling"} <= names, entry["checks"]
    assert entry["metrics_after"]["self_bleu"] > 0.9 and entry["metrics_after"]["distinct_2"] < 0.05
    assert "distinct-2 floor" in entry["reason"]


def test_a_run_stops_accepting_once_the_drift_budget_is_spent(tmp_path, corpus_file, monkeypatch):
    monkeypatch.setitem(REGISTRY, "unchanged", Unchanged)
    # start 100; each stage is within 5% of the last accepted one
    scripted(monkeypatch, [100.0, 104.0, 108.3, 106.0, 110.0])
    cfg = micro_config(tmp_path / "run", corpus_file, ["unchanged"] * 4,
                       guard={"tolerance": 0.05, "drift_budget": 0.08})
    stages = Runner(config_from_dict(cfg)).run()["stages"]
    assert [e["decision"] for e in stages] == ["accepted", "rolled_back", "accepted", "rolled_back"]
    assert [c["name"] for c in stages[1]["checks"] if not c["ok"]] == ["drift heldout_ppl"]
    assert [c["name"] for c in stages[3]["checks"] if not c["ok"]] == ["drift heldout_ppl"]  # 110 vs 104: +5.8%
    assert all(c["ok"] for c in stages[1]["checks"] if c["name"] == "protect heldout_ppl")  # each step passed


def test_at_zero_the_tolerance_is_an_absolute_amount():
    g = GuardConfig(metric="repetition_rate", tolerance=0.02, drift_budget=0.05, min_distinct_2=None)
    best = best_values(g, [{"repetition_rate": 0.0}])
    assert judge(g, {"repetition_rate": 0.0}, {"repetition_rate": 0.01}, best=best).accepted
    assert not judge(g, {"repetition_rate": 0.0}, {"repetition_rate": 0.03}, best=best).accepted


@pytest.mark.parametrize("where, sections, stages", [
    ("stages[0].unchanged.target", {}, [{"unchanged": {"target": "arith_0shot_acc"}}]),  # no such task scored
    ("guard.protect", {"guard": {"protect": ["heldout_pplx"]}}, ["unchanged"]),
])
def test_a_metric_name_the_evaluation_lacks_is_refused_before_anything_is_written(tmp_path, corpus_file,
                                                                                  monkeypatch, where, sections,
                                                                                  stages):
    from selftrain.errors import SelftrainError

    monkeypatch.setitem(REGISTRY, "unchanged", Unchanged)
    cfg = micro_config(tmp_path / "run", corpus_file, stages, **sections)
    with pytest.raises(SelftrainError, match=rf"{re.escape(where)} .* is not a metric the evaluation computes"):
        Runner(config_from_dict(cfg)).run()
    assert not (tmp_path / "run" / "manifest.json").exists()
