"""The command line: help that explains, eval on a saved model, exit code 2 for user errors."""

import json

from typer.testing import CliRunner

from selftrain.cli import app
from selftrain.config import ModelConfig
from selftrain.modeling.factory import build_initial, save_checkpoint
from tests.conftest import MICRO_ARCH, make_corpus

runner = CliRunner()


def test_help_lists_commands():
    out = runner.invoke(app, ["--help"])
    assert out.exit_code == 0
    for cmd in ("run", "demo", "inspect", "report", "eval"):
        assert cmd in out.output
    assert "--set" in runner.invoke(app, ["run", "--help"]).output


def test_eval_scores_a_saved_model(tmp_path, corpus_file):
    texts = make_corpus(60).split("\n\n")
    model, tok, _ = build_initial(ModelConfig(preset="tiny", vocab_size=300, architecture=MICRO_ARCH), texts, 0)
    save_checkpoint(model, tok, tmp_path / "m")
    out = runner.invoke(app, ["eval", str(tmp_path / "m"), "--data", str(corpus_file), "--samples", "2",
                              "--max-tokens", "512", "--output", str(tmp_path / "m.json")])
    assert out.exit_code == 0, out.output
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    # 512 tokens in 4 windows of the model's 128 positions: each window predicts 127 of them
    assert metrics["heldout_tokens"] == 512 - 4 and metrics["heldout_ppl"] > 1 and "distinct_2" in metrics


def test_user_errors_exit_2_without_traceback(tmp_path):
    out = runner.invoke(app, ["inspect", str(tmp_path)])
    assert out.exit_code == 2 and "not a selftrain run" in out.output
    out = runner.invoke(app, ["run", str(tmp_path / "missing.yaml")])
    assert out.exit_code == 2 and "config file not found" in out.output
    out = runner.invoke(app, ["eval", "/no/such/model", "--data", str(tmp_path)])
    assert out.exit_code == 2


def test_eval_tasks_prints_a_table_and_writes_json(tmp_path, corpus_file):
    texts = make_corpus(60).split("\n\n")
    model, tok, _ = build_initial(ModelConfig(preset="tiny", vocab_size=300, architecture=MICRO_ARCH), texts, 0)
    save_checkpoint(model, tok, tmp_path / "m")
    out = runner.invoke(app, ["eval", str(tmp_path / "m"), "--task", "arith", "--task", "cloze", "--shots", "0,2",
                              "--limit", "6", "--self-icl", "1", "--data", str(corpus_file), "--log-samples",
                              "--output", str(tmp_path / "tasks.json")], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "arith" in out.output and "cloze" in out.output and "self-icl 1" in out.output
    results = json.loads((tmp_path / "tasks.json").read_text())["results"]
    assert [(r["task"], r["shots"]) for r in results] == [
        ("arith", "0"), ("arith", "2"), ("arith", "self-icl 1"), ("cloze", "0"), ("cloze", "2"), ("cloze", "self-icl 1")]
    for r in results:
        assert r["metrics"]["n"] == 6 and 0 <= r["metrics"]["acc"] <= 1 and len(r["records"]) == 6
    assert all(rec["demos"] == 1 for rec in results[2]["records"])  # one self-written demo per item
    bad = runner.invoke(app, ["eval", str(tmp_path / "m"), "--task", "arith", "--shots", "zero"])
    assert bad.exit_code == 2 and "--shots takes" in bad.output
