"""Runner: a diverged stage is rolled back, a stage whose evaluation crashes fails alone, a
SIGKILLed run resumes, bad input damages nothing (the guard's own checks: test_guard.py)."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selftrain.cli import app
from selftrain.config import config_from_dict
from selftrain.runner import Runner
from selftrain.stages import REGISTRY
from tests.conftest import micro_config, pretrain, weights_stage, write_config

REPO = Path(__file__).resolve().parents[1]


NanWeights = weights_stage("nan_weights", lambda model, _tok: next(model.parameters()).fill_(math.nan),
                           "Test-only stage: the accepted model with NaN written into its weights (a diverged update).")


def _no_bare_nan(text: str) -> dict:
    def refuse(token):
        raise AssertionError(f"bare {token} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_diverged_stage_is_rolled_back_and_next_starts_from_last_accepted(tmp_path, corpus_file, monkeypatch):
    monkeypatch.setitem(REGISTRY, "nan_weights", NanWeights)
    stages = [pretrain(max_steps=10), {"nan_weights": {}}, pretrain(max_steps=5)]
    manifest = Runner(config_from_dict(micro_config(tmp_path / "run", corpus_file, stages))).run()
    good, bad, after = manifest["stages"]
    assert good["decision"] == "accepted"
    assert bad["status"] == bad["decision"] == "rolled_back", bad
    assert bad["reason"] == "divergence: non-finite weights"
    assert bad["metrics_after"]["diverged"] is True and bad["metrics_after"]["heldout_ppl"] == math.inf
    assert bad["checkpoint_deleted"] and not (tmp_path / "run" / bad["checkpoint"]).exists()
    assert after["start_checkpoint"] == good["checkpoint"]  # not the rejected one
    assert after["metrics_before"] == good["metrics_after"]
    assert manifest["current_checkpoint"] == after["checkpoint"] and manifest["status"] == "finished"
    # valid JSON for any tool: inf is stored as the string "inf", never as a bare Infinity token
    on_disk = _no_bare_nan((tmp_path / "run" / "manifest.json").read_text())
    assert on_disk["stages"][1]["metrics_after"]["heldout_ppl"] == "inf"
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        _no_bare_nan(line)
    table = CliRunner().invoke(app, ["inspect", str(tmp_path / "run")], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "rolled_back" in table.output and "divergence: non-finite" in table.output
    assert "inf" in table.output
    report = CliRunner().invoke(app, ["report", str(tmp_path / "run")])
    assert report.exit_code == 0 and "diverged" in (tmp_path / "run" / "report.md").read_text()


def test_a_stage_whose_evaluation_raises_fails_alone_and_the_run_goes_on(tmp_path, corpus_file, monkeypatch):
    import selftrain.runner as runner_module

    real, calls = runner_module.evaluate, []

    def evaluate(*args, **kw):  # the baseline, then the first stage's evaluation breaks
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(*args, **kw)

    monkeypatch.setattr(runner_module, "evaluate", evaluate)
    cfg = micro_config(tmp_path / "run", corpus_file, [pretrain(max_steps=5), pretrain(max_steps=5)])
    manifest = Runner(config_from_dict(cfg)).run()
    broken, after = manifest["stages"]
    assert broken["status"] == "failed" and broken["decision"] == "rolled_back"
    assert "probability tensor" in broken["reason"]
    assert "RuntimeError" in (tmp_path / "run" / "stages" / broken["key"] / "error.txt").read_text()
    assert broken["checkpoint_deleted"] and not (tmp_path / "run" / broken["checkpoint"]).exists()
    assert after["status"] == "accepted" and after["start_checkpoint"] == "checkpoints/initial"
    assert manifest["status"] == "finished" and (tmp_path / "run" / "final" / "model.safetensors").exists()


def _cli(*args, cwd=REPO, **kw):
    return subprocess.Popen([sys.executable, "-m", "selftrain", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_sigkill_during_pretrain_then_rerun_resumes(tmp_path, corpus_file):
    run_dir = tmp_path / "run"
    cfg = micro_config(run_dir, corpus_file, [pretrain(max_steps=400, save_steps=20), pretrain(max_steps=10)])
    path = write_config(tmp_path / "c.yaml", cfg)
    proc = _cli("run", path)
    trainer_dir = run_dir / "stages" / "r1-01-pretrain" / "trainer"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if list(trainer_dir.glob("checkpoint-*/trainer_state.json")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()  # still training when we kill it
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = json.loads((run_dir / "manifest.json").read_text())
    assert killed["status"] == "running" and killed["stages"][0]["status"] == "running"

    rerun = _cli("run", path)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    assert "resuming" in out
    manifest = json.loads((run_dir / "manifest.json").read_text())
    keys = [e["key"] for e in manifest["stages"]]
    assert keys == ["r1-01-pretrain", "r1-02-pretrain"]  # each stage recorded exactly once
    first = manifest["stages"][0]
    assert first["attempts"] == 2 and first["status"] == "accepted"
    assert first["stage_metrics"]["resumed_from_step"] >= 20  # continued from the Trainer checkpoint
    assert manifest["stages"][1]["attempts"] == 1 and manifest["status"] == "finished"
    assert (run_dir / "final" / "model.safetensors").exists()


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from tests.conftest import make_corpus

    base = tmp_path_factory.mktemp("existing")
    corpus = base / "corpus.txt"
    corpus.write_text(make_corpus())
    cfg = micro_config(base / "runs" / "good", corpus, [pretrain(max_steps=5)])
    Runner(config_from_dict(cfg)).run()
    return base, corpus, cfg


def _bad_inputs(base: Path, corpus: Path, cfg: dict):
    """(name, config text, expected message) for each kind of bad input."""
    import copy

    import yaml

    def variant(**changes):
        c = copy.deepcopy(cfg)
        c["run"]["output_dir"] = str(base / "runs" / "new")
        for dotted, value in changes.items():
            node = c
            *head, last = dotted.split("__")
            for h in head:
                node = node[h]
            node[last] = value
        return yaml.safe_dump(c)

    (base / "empty.txt").write_text("")
    (base / "binary.bin").write_bytes(os.urandom(4096) + b"\x00")
    (base / "tiny.txt").write_text("Just one short line of text.\n")
    return [
        ("malformed_yaml", "run: {name: x\nstages: [", "malformed YAML"),
        ("unknown_key", variant(model__presset="tiny"), "unknown key 'presset'"),
        ("missing_data", variant(data__train=str(base / "nope.txt")), "data path not found"),
        ("empty_corpus", variant(data__train=str(base / "empty.txt")), "empty"),
        ("binary_corpus", variant(data__train=str(base / "binary.bin")), "binary"),
        ("shorter_than_block", variant(data__train=str(base / "tiny.txt"), data__heldout=str(corpus),
                                       stages=[pretrain(block_size=64)]),
         "shorter than one block"),
        ("wrong_model_path", variant(model={"pretrained": str(base / "no-such-model")}), "model path not found"),
        ("changed_config_on_existing_run", yaml.safe_dump({**cfg, "model": {**cfg["model"], "vocab_size": 330}}),
         "different config: model changed"),
    ]


def test_bad_input_exits_2_with_message_and_damages_nothing(finished_run):
    base, corpus, cfg = finished_run
    existing = base / "runs" / "good"
    before = _snapshot(existing)
    for name, text, expected in _bad_inputs(base, corpus, cfg):
        path = base / f"{name}.yaml"
        path.write_text(text)
        proc = _cli("run", path)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, out)
        assert expected in out, (name, out)
        assert "Traceback" not in out, (name, out)
        assert not (base / "runs" / "new").exists(), name  # nothing half-made either
    assert _snapshot(existing) == before


def test_guard_can_use_a_task_accuracy(tmp_path, corpus_file):
    """eval.tasks are scored at the start and after every stage; the guard may decide on one."""
    cfg = micro_config(tmp_path / "run", corpus_file, [pretrain(max_steps=10)],
                       eval={"tasks": ["arith", {"task": "cloze", "shots": [0, 1], "limit": 20}]},
                       guard={"metric": "cloze_1shot_acc", "tolerance": 1.0})
    manifest = Runner(config_from_dict(cfg)).run()
    base, after = manifest["baseline_metrics"], manifest["stages"][0]["metrics_after"]
    for name in ("arith_0shot_acc", "cloze_0shot_acc", "cloze_1shot_acc", "cloze_1shot_acc_norm"):
        assert 0 <= base[name] <= 1 and 0 <= after[name] <= 1
    assert "cloze_1shot_acc" in manifest["stages"][0]["reason"]
