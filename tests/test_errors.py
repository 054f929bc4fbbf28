"""Clear errors everywhere: one message and exit code 2 for bad input, nothing written; a reward
that keeps failing fails its stage only; Ctrl-C leaves a consistent run that resumes (exit 130)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selftrain.cli import app
from selftrain.config import ModelConfig, config_from_dict
from selftrain.modeling.factory import build_initial, save_checkpoint
from selftrain.runner import Runner
from tests.conftest import MICRO_ARCH, make_corpus, micro_config, pretrain, write_config

REPO = Path(__file__).resolve().parents[1]
cli = CliRunner()


def _invoke(*args):
    out = cli.invoke(app, list(map(str, args)), env={"COLUMNS": "300"})
    assert "Traceback" not in out.output, out.output
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m"
    texts = make_corpus(60).split("\n\n")
    model, tok, _ = build_initial(ModelConfig(preset="tiny", vocab_size=300, architecture=MICRO_ARCH), texts, 0)
    save_checkpoint(model, tok, path)
    return path


def test_eval_output_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path):
    (tmp_path / "a-file").write_text("x")
    cases = [(tmp_path, "is a directory"), (tmp_path / "a-file" / "scores.json", "is a file, not a folder")]
    if os.geteuid() != 0:  # root may write anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        cases.append((tmp_path / "ro" / "new" / "scores.json", "no permission"))
    for output, words in cases:
        out = _invoke("eval", tmp_path / "no-such-model", "--output", output)  # the model is never reached
        assert out.exit_code == 2 and words in out.output, out.output
    assert not (tmp_path / "ro" / "new").exists()


def test_inspect_and_report_refuse_what_is_not_a_run(tmp_path):
    (tmp_path / "notes").mkdir()
    for cmd in ("inspect", "report"):
        out = _invoke(cmd, tmp_path / "notes")
        assert out.exit_code == 2 and "not a selftrain run" in out.output
    run = tmp_path / "partial"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"version": 2, "stages": [{"key": "r1-01-pretrain"}]}))
    for cmd in ("inspect", "report"):
        out = _invoke(cmd, run)
        assert out.exit_code == 2 and "not a complete selftrain manifest" in out.output, out.output
        assert "run_name" in out.output and "stages[0]" in out.output
    (run / "manifest.json").write_text("{not json")
    out = _invoke("inspect", run)
    assert out.exit_code == 2 and "cannot read" in out.output
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json"]  # report wrote nothing


def test_task_files_that_are_not_utf8_are_named(tmp_path, model_dir):
    bad_yaml = tmp_path / "latin1.yaml"
    bad_yaml.write_bytes("name: caf\xe9\noutput_type: generate\n".encode("latin-1"))
    out = _invoke("eval", tmp_path / "no-such-model", "--task", bad_yaml)
    assert out.exit_code == 2 and "not UTF-8" in out.output and "latin1.yaml" in out.output
    (tmp_path / "rows.jsonl").write_bytes('{"q": "caf\xe9", "a": "1"}\n'.encode("latin-1"))
    (tmp_path / "task.yaml").write_text("name: t\noutput_type: generate\ndata: {path: rows.jsonl}\n"
                                        "doc_to_text: '{{q}}'\ndoc_to_target: a\n")
    out = _invoke("eval", model_dir, "--task", tmp_path / "task.yaml", "--output", tmp_path / "s.json")
    assert out.exit_code == 2 and "not UTF-8" in out.output and "rows.jsonl" in out.output
    assert not (tmp_path / "s.json").exists()


def test_eval_on_too_little_text_and_a_broken_model_are_clear_errors(tmp_path, model_dir):
    from selftrain.errors import SelftrainError
    from selftrain.evaluation.perplexity import heldout_perplexity
    from selftrain.modeling.factory import load_pretrained

    model, tok = load_pretrained(str(model_dir))
    with pytest.raises(SelftrainError, match="1 token.*at least 2"):  # what the CLI prints, exit 2
        heldout_perplexity(model, tok, ["a"], max_tokens=1)
    (tmp_path / "one.txt").write_text("a")
    out = _invoke("eval", model_dir, "--data", tmp_path / "one.txt", "--max-tokens", "1", "--samples", "-1",
                  "--output", tmp_path / "s.json")
    assert out.exit_code == 2 and "--max-tokens" in out.output and "--samples" in out.output, out.output
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)  # corrupt weights: not an OSError
    out = _invoke("eval", broken, "--output", tmp_path / "s.json")
    assert out.exit_code == 2 and "cannot load model" in out.output, out.output
    assert not (tmp_path / "s.json").exists()


def test_a_reward_that_keeps_failing_fails_its_stage_and_the_run_goes_on(tmp_path, corpus_file, monkeypatch):
    from selftrain.stages.selfplay import proposer_solver

    def broken_rewards(self):
        def solver_correct(prompts, completions, **_):
            raise RuntimeError("verifier offline")

        return {"solver_correct": solver_correct}

    monkeypatch.setattr(proposer_solver.ProposerSolverEnv, "rewards", broken_rewards)
    selfplay = {"selfplay": {"env": "tasks", "problem_source": "generator", "max_steps": 2, "num_generations": 4,
                             "groups_per_step": 2, "precision": "fp32", "max_reward_failures": 1}}
    cfg = micro_config(tmp_path / "run", corpus_file, [selfplay, pretrain(max_steps=5)])
    manifest = Runner(config_from_dict(cfg)).run()
    failed, after = manifest["stages"]
    assert failed["status"] == "failed" and failed["decision"] == "rolled_back", failed
    assert "solver_correct" in failed["reason"] and "verifier offline" in failed["reason"]
    assert after["status"] == "accepted" and manifest["status"] == "finished"


def test_ctrl_c_during_a_run_exits_130_and_the_rerun_finishes(tmp_path, corpus_file):
    run_dir = tmp_path / "run"
    path = write_config(tmp_path / "c.yaml", micro_config(
        run_dir, corpus_file, [pretrain(max_steps=200, save_steps=10), pretrain(max_steps=5)]))
    # SIGINT as a terminal delivers it, even where this suite runs as a background job (which
    # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler)
    proc = subprocess.Popen([sys.executable, "-m", "selftrain", "run", str(path)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    trainer = run_dir / "stages" / "r1-01-pretrain" / "trainer"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list(trainer.glob("checkpoint-*/trainer_state.json")):
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()  # still training
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "interrupted" in out
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"][0]["status"] == "interrupted" and len(manifest["stages"]) == 1

    rerun = subprocess.run([sys.executable, "-m", "selftrain", "run", str(path)], cwd=REPO, text=True,
                           capture_output=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    manifest = json.loads((run_dir / "manifest.json").read_text())
    first = manifest["stages"][0]
    assert first["status"] == "accepted" and first["attempts"] == 2 and first["stage_metrics"]["resumed_from_step"] >= 10
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if r.get("stage") == "r1-01-pretrain" and r.get("phase") == "train"]
    assert steps == list(range(5, 201, 5))  # every logged step once: none lost, none twice
    assert manifest["status"] == "finished"
