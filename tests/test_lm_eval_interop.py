"""Interop: a model directory selftrain writes loads in lm-evaluation-harness, and our score of
an exported task equals lm-eval's score of the same task."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import MICRO_ARCH, make_corpus

from selftrain.config import ModelConfig
from selftrain.evaluation.harness import evaluate_task
from selftrain.evaluation.lm_eval_export import export_lm_eval
from selftrain.modeling.factory import build_initial, save_checkpoint
from selftrain.tasks import load_task

pytest.importorskip("lm_eval", reason="lm-eval is a test dependency: pip install -e '.[dev]'")


def test_lm_eval_scores_a_selftrain_model_like_we_do(tmp_path):
    texts = make_corpus(120).split("\n\n")
    model, tok, _ = build_initial(ModelConfig(preset="tiny", vocab_size=320, architecture=MICRO_ARCH), texts, 0)
    model_dir = save_checkpoint(model, tok, tmp_path / "model")
    task = load_task("cloze").model_copy(update={"name": "selftrain_cloze"})
    docs = task.docs(texts)[:40]
    ours = evaluate_task(model.eval(), tok, task, 0, docs=docs).metrics
    export_lm_eval(task, tmp_path / "tasks", texts=texts, limit=40)

    out = tmp_path / "lm_eval_out"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={model_dir},dtype=float32", "--tasks", "selftrain_cloze",
           "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "8",
           "--output_path", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["selftrain_cloze"]
    assert results["acc,none"] == pytest.approx(ours["acc"], abs=1e-9)
    assert results["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-9)
    assert 0 < ours["acc"] < 1  # a real score, not a degenerate one
