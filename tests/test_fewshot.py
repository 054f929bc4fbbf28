"""Stage `fewshot`: pseudo-labels from label names only; gold labels only ever measure."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MICRO_ARCH, make_corpus, micro_config, pretrain

from selftrain.config import ModelConfig, config_from_dict
from selftrain.data.pool import Pool
from selftrain.errors import SelftrainError
from selftrain.modeling.factory import build_initial
from selftrain.runner import Runner
from selftrain.stages.fewshot import (
    FewshotConfig,
    label_task,
    predict,
    select_balanced,
    self_train,
    split_task_rows,
    stop_reason,
)
from selftrain.training.sft import SFTOptions, sft_train
from selftrain.workspace import Workspace

TEXTS = make_corpus(120).split("\n\n")


@pytest.fixture(scope="module")
def micro():
    model, tok, _ = build_initial(ModelConfig(preset="tiny", vocab_size=320, architecture=MICRO_ARCH), TEXTS, 0)
    return model, tok


def animal_task(tmp_path, flip: bool = False, name: str = "animals"):
    rows = []
    for t in TEXTS[:60]:
        label = "cat" if "cat" in t else "dog"
        if flip:  # adversarial labels: if the pseudo-labeller read them, its choices would change
            label = "dog" if label == "cat" else "cat"
        rows.append({"text": t[:120], "label": label})
    folder = tmp_path / ("flipped" if flip else "true")
    folder.mkdir(exist_ok=True)
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": name, "output_type": "multiple_choice", "data": {"path": "rows.jsonl"},
            "doc_to_text": "{{text}}\nAnimal:", "doc_to_choice": ["cat", "dog"], "doc_to_target": "label",
            "input_field": "text"}
    (folder / "task.yaml").write_text(json.dumps(spec))
    return folder / "task.yaml"


def test_select_balanced_takes_the_most_confident_of_each_label():
    pred = [0, 0, 0, 1, 1, 0, 2]
    conf = [0.9, 0.5, 0.8, 0.7, 0.95, 0.3, 0.6]
    assert select_balanced(pred, conf, 3, per_class=2, min_confidence=0.0) == [0, 2, 3, 4, 6]
    assert select_balanced(pred, conf, 3, per_class=2, min_confidence=0.65) == [0, 2, 3, 4]


def test_calibration_removes_a_prior_for_one_label(micro, tmp_path):
    model, tok = micro
    task = label_task(str(animal_task(tmp_path)), None)
    cat_ids = set(tok(" cat", add_special_tokens=False)["input_ids"]) - set(tok(" dog", add_special_tokens=False)["input_ids"])
    bias = torch.zeros(model.config.vocab_size)
    bias[list(cat_ids)] = 8.0  # every prompt now leans towards "cat"
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias)
    try:
        raw, _, _ = predict(model, tok, task, TEXTS[:40], calibrate=False, chat=False, batch_size=8)
        calibrated, conf, probs = predict(model, tok, task, TEXTS[:40], calibrate=True, chat=False, batch_size=8)
    finally:
        hook.remove()
    assert set(raw) == {0}  # uncalibrated: all "cat"
    assert set(calibrated) == {0, 1}  # calibrated: both labels, from the texts themselves
    assert torch.allclose(probs.sum(-1), torch.ones(40), atol=1e-5) and min(conf) >= 0.5


def test_pseudo_labelling_never_reads_gold_labels(micro, tmp_path):
    model, tok = micro
    cfg = FewshotConfig(task="x", inputs="task", rounds=1, per_class=5, eval_fraction=0.3,
                        train=SFTOptions(max_steps=3, learning_rate=1e-3, batch_size=4))
    outcomes = []
    for flip in (False, True):
        task = label_task(str(animal_task(tmp_path, flip)), None)
        unlabelled, measured = split_task_rows(task, cfg.eval_fraction, seed=0)
        m = type(model)(model.config)
        m.load_state_dict(model.state_dict())
        _, selected, history = self_train(m, tok, task, unlabelled, cfg, seed=0, device="cpu",
                                          work_dir=tmp_path / f"w{flip}", measured=measured)
        outcomes.append((selected, history))
    (sel_true, hist_true), (sel_flip, hist_flip) = outcomes
    assert sel_true == sel_flip and len(sel_true) == 10  # same texts, same pseudo-labels, same confidences
    # the gold labels did reach the measurement: flipped labels give the complementary accuracy
    assert hist_true[0]["accuracy"] + hist_flip[0]["accuracy"] == pytest.approx(1.0)


def fewshot_config(tmp_path, corpus_file, **opts):
    stage = {"fewshot": {"task": str(animal_task(tmp_path)), "inputs": "task", "rounds": 2, "per_class": 6,
                         "eval_fraction": 0.3, "train": {"max_steps": 6, "learning_rate": 2e-3, "batch_size": 4},
                         **opts}}
    return micro_config(tmp_path / "run", corpus_file, [pretrain(max_steps=20), stage],
                        guard={"tolerance": 10.0})


def test_fewshot_stage_in_a_run_adds_pseudo_labels_with_confidence(tmp_path, corpus_file, monkeypatch):
    import selftrain.stages.fewshot as fewshot_module

    real, calls = fewshot_module.evaluate_task, []

    def rising(*args, **kw):  # forced: the measured accuracy (the stage's target) rises, so the guard keeps it
        result = real(*args, **kw)
        calls.append(result.metrics["acc"])
        result.metrics["acc"] = 0.1 * len(calls)
        return result

    monkeypatch.setattr(fewshot_module, "evaluate_task", rising)
    cfg = fewshot_config(tmp_path, corpus_file, stop_confidence=None, stop_agreement=None)  # both rounds train
    manifest = Runner(config_from_dict(cfg)).run()
    entry = manifest["stages"][1]
    assert entry["status"] == "accepted", entry["reason"]
    m = entry["stage_metrics"]
    assert [h["round"] for h in m["history"]] == [0, 1, 2] and m["pseudo_labels"] > 0
    assert m["accuracy_before"] is not None and m["accuracy_after"] is not None
    r1 = m["history"][1]
    assert r1["sft_last_loss"] < r1["sft_first_loss"]  # fine-tuning on its own labels lowers its loss
    pool = Pool.load(Workspace(tmp_path / "run").abs(manifest["pool"]))
    rows = pool.rows(origin="fewshot")
    assert len(rows) == m["pseudo_labels"] == entry["pool_added"]
    assert all(r["meta"]["label"] in ("cat", "dog") and 0 < r["meta"]["confidence"] <= 1 for r in rows)
    assert all(r["text"].endswith(" " + r["meta"]["label"]) and r["parent_id"] for r in rows)


@pytest.mark.parametrize("opts, message", [
    ({"labels": ["cat"]}, "fewer than 2 labels"),
    ({"inputs": "EMPTY"}, "empty"),
    ({"task": "arith"}, "multiple_choice"),
])
def test_fewshot_bad_input_is_refused_before_the_run_starts(tmp_path, corpus_file, opts, message):
    if opts.get("inputs") == "EMPTY":
        (tmp_path / "empty.txt").write_text("\n\n")
        opts = {"inputs": str(tmp_path / "empty.txt")}
    cfg = fewshot_config(tmp_path, corpus_file, **opts)
    with pytest.raises(SelftrainError, match=message):
        Runner(config_from_dict(cfg)).run()
    assert not (tmp_path / "run").exists()


def test_sft_refuses_to_train_inside_autocast(micro, tmp_path):
    """Inside an autocast region the forward pass keeps using cached copies of the old weights."""
    model, tok = micro
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="outside"):
        sft_train(model, tok, ["a"], [" b"], SFTOptions(max_steps=1), out_dir=tmp_path, seed=0, device="cpu",
                  log=lambda r: None, stage_key="x")


def test_fewshot_stops_itself_before_a_round_whose_labels_saturate(tmp_path, corpus_file):
    # forced: any confidence counts as saturated, so round 2 stops before it fine-tunes
    cfg = fewshot_config(tmp_path, corpus_file, stop_confidence=1e-9, stop_agreement=None)
    entry = Runner(config_from_dict(cfg)).run()["stages"][1]
    m, history = entry["stage_metrics"], entry["stage_metrics"]["history"]
    assert [h["round"] for h in history] == [0, 1, 2]
    assert "stopped" not in history[1] and "saturated" in history[2]["stopped"] == m["stopped"]
    assert m["accuracy_after"] == history[1]["accuracy"]  # the model after round 1 is the stage's
    assert m["target"]["after"] == history[1]["accuracy"] and m["target"]["before"] == history[0]["accuracy"]
    assert m["pseudo_labels"] == history[1]["selected"]  # round 2 taught nothing
    assert not (tmp_path / "run" / "stages" / entry["key"] / "sft-round2").exists()


def test_fewshot_stop_signals_need_no_labels():
    cfg = FewshotConfig(task="x", stop_confidence=0.99, stop_agreement=0.9)
    assert stop_reason(cfg, 1, 1.0, None) is None  # round 1 always trains
    assert "saturated" in stop_reason(cfg, 2, 0.995, 0.5)
    assert "agree" in stop_reason(cfg, 2, 0.9, 0.95)
    assert stop_reason(cfg, 2, 0.9, 0.8) is None and stop_reason(cfg, 3, 0.9, None) is None
    off = FewshotConfig(task="x", stop_confidence=None, stop_agreement=None)
    assert stop_reason(off, 2, 1.0, 1.0) is None
