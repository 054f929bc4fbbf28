"""Rounds that stop by themselves: a plateau of the guard metric, a round that accepts nothing,
max_rounds, and budgets of steps (per run and per round); the reason is recorded, and a resumed
run reaches the same decision or, with a larger budget, goes on."""

import pytest

from selftrain.config import config_from_dict
from selftrain.errors import SelftrainError
from selftrain.progress import StageLog
from selftrain.runner import Runner
from selftrain.stages import REGISTRY
from selftrain.workspace import Workspace
from tests.conftest import micro_config, pretrain
from tests.test_guard import Unchanged, scripted


@pytest.fixture
def unchanged(monkeypatch):
    monkeypatch.setitem(REGISTRY, "unchanged", Unchanged)


def run(tmp_path, corpus_file, stages, **sections):
    return Runner(config_from_dict(micro_config(tmp_path / "run", corpus_file, stages, **sections))).run()


def test_auto_rounds_stop_at_a_plateau(tmp_path, corpus_file, monkeypatch, unchanged):
    # start 100; round 1 -> 80 (-20%), round 2 -> 78 (-2.5%), round 3 -> 77.9 (-0.1%: under min_delta 1%)
    scripted(monkeypatch, [100.0, 90.0, 80.0, 79.0, 78.0, 77.95, 77.9, 70.0, 60.0])
    manifest = run(tmp_path, corpus_file, ["unchanged", "unchanged"], rounds="auto")
    assert [e["key"] for e in manifest["stages"]][-1] == "r3-02-unchanged"  # round 4 never started
    assert manifest["stop"]["reason"].startswith("plateau: heldout_ppl gained +0.13%")
    assert manifest["stop"]["after"] == "r3-02-unchanged" and manifest["stop"]["rounds"] == 3
    assert manifest["status"] == "finished"


def test_auto_rounds_stop_when_a_round_accepts_nothing(tmp_path, corpus_file, monkeypatch, unchanged):
    scripted(monkeypatch, [100.0, 80.0, 95.0])  # round 2's stage regresses past tolerance
    manifest = run(tmp_path, corpus_file, ["unchanged"], rounds="auto", stop={"min_delta": 0.0})
    assert [e["decision"] for e in manifest["stages"]] == ["accepted", "rolled_back"]
    assert manifest["stop"]["reason"] == "round 2 accepted no stage"


def test_auto_rounds_end_at_max_rounds_and_a_fixed_number_runs_in_full(tmp_path, corpus_file, monkeypatch,
                                                                       unchanged):
    scripted(monkeypatch, [100.0, 90.0, 80.0])
    manifest = run(tmp_path / "a", corpus_file, ["unchanged"], rounds="auto", stop={"max_rounds": 2})
    assert len(manifest["stages"]) == 2 and manifest["stop"]["reason"] == "rounds: auto reached stop.max_rounds=2"
    # rounds: 3 with no stop options: a plateau does not cut it short
    scripted(monkeypatch, [100.0, 100.0, 100.0, 100.0])
    manifest = run(tmp_path / "b", corpus_file, ["unchanged"], rounds=3)
    assert len(manifest["stages"]) == 3 and manifest["stop"]["reason"] == "the 3 round(s) configured ran"


def test_step_budgets_end_the_run_or_skip_the_rest_of_a_round(tmp_path, corpus_file):
    stages = [pretrain(max_steps=6, save_steps=100, logging_steps=2), pretrain(max_steps=4, save_steps=100,
                                                                                 logging_steps=2)]
    manifest = run(tmp_path / "a", corpus_file, stages, rounds=3, stop={"max_steps": 15})
    assert [e["steps"] for e in manifest["stages"]] == [6, 4, 6]  # counted from the trainers' logs
    assert manifest["stop"]["reason"] == "budget: 16 of stop.max_steps=15 optimizer steps spent"
    assert manifest["stop"]["steps"] == 16 and manifest["status"] == "finished"
    # a round budget skips the round's later stages; the next round starts afresh
    manifest = run(tmp_path / "b", corpus_file, stages, rounds=2, stop={"round_max_steps": 5})
    assert [(e["key"], e["status"]) for e in manifest["stages"]] == [
        ("r1-01-pretrain", "accepted"), ("r1-02-pretrain", "skipped"),
        ("r2-01-pretrain", "accepted"), ("r2-02-pretrain", "skipped")]
    assert manifest["stages"][1]["reason"] == "round budget: 6 of stop.round_max_steps=5 steps spent"


def test_a_stopped_run_resumes_to_the_same_stop_and_goes_on_with_a_larger_budget(tmp_path, corpus_file):
    stages = [pretrain(max_steps=4, save_steps=100, logging_steps=2)]
    cfg = micro_config(tmp_path / "run", corpus_file, stages, rounds=4, stop={"max_steps": 8})
    Runner(config_from_dict(cfg)).run()
    first = Workspace(tmp_path / "run").load_manifest()
    assert len(first["stages"]) == 2 and "budget" in first["stop"]["reason"]
    Runner(config_from_dict(cfg)).run()  # nothing to do: the same decision, from the record
    again = Workspace(tmp_path / "run").load_manifest()
    assert again["stages"] == first["stages"] and again["stop"] == first["stop"]
    cfg["stop"] = {"max_steps": 12}
    Runner(config_from_dict(cfg)).run()
    more = Workspace(tmp_path / "run").load_manifest()
    assert [e["key"] for e in more["stages"]] == ["r1-01-pretrain", "r2-01-pretrain", "r3-01-pretrain"]
    assert more["stages"][:2] == first["stages"] and "12" in more["stop"]["reason"]


def test_stage_log_counts_the_steps_of_every_trainer_of_a_stage():
    seen = []
    count = StageLog(seen.append, "r1-01-x")
    count({"phase": "progress", "start": True, "step": 0, "max_steps": 30})
    for step in (5, 10, 30):  # one trainer to 30
        count({"phase": "progress", "step": step, "max_steps": 30})
    count({"phase": "progress", "start": True, "step": 0, "max_steps": 1})
    count({"phase": "progress", "step": 1, "max_steps": 1})  # a second, of one step
    count({"phase": "progress", "start": True, "step": 20, "max_steps": 40})  # a third, resumed at 20
    count({"phase": "progress", "step": 40, "max_steps": 40})
    count({"stage": "r1-01-x", "phase": "adversarial", "event": "weakened", "step": 99})  # logged, not counted
    count({"phase": "train", "step": 5, "loss": 1.0})
    assert count.total == 30 + 1 + 40 and len(seen) == 2  # progress records move the line only: not logged


def test_rounds_auto_and_stop_options_are_validated(tmp_path, corpus_file):
    with pytest.raises(SelftrainError, match="rounds"):
        config_from_dict(micro_config(tmp_path, corpus_file, ["pretrain"], rounds="forever"))
    with pytest.raises(SelftrainError, match="stop.patience"):
        config_from_dict(micro_config(tmp_path, corpus_file, ["pretrain"], stop={"patience": 0}))
    with pytest.raises(SelftrainError, match="unknown key 'max_minute'"):
        config_from_dict(micro_config(tmp_path, corpus_file, ["pretrain"], stop={"max_minute": 3}))


def test_a_skipped_stage_can_be_redone_with_restart_from(tmp_path, corpus_file):
    stages = [pretrain(max_steps=4, save_steps=100, logging_steps=2), pretrain(max_steps=2, save_steps=100)]
    cfg = micro_config(tmp_path / "run", corpus_file, stages, stop={"round_max_steps": 3})
    manifest = Runner(config_from_dict(cfg)).run()
    assert [e["status"] for e in manifest["stages"]] == ["accepted", "skipped"]
    cfg["stop"] = {}
    again = Runner(config_from_dict(cfg), restart_from="r1-02-pretrain").run()
    assert [e["status"] for e in again["stages"]] == ["accepted", "accepted"] and again["stages"][1]["steps"] == 2
