"""Self-supervised stage: the loss falls and held-out perplexity drops far below the untrained model's."""

import json

from selftrain.config import config_from_dict
from selftrain.runner import Runner
from tests.conftest import micro_config, pretrain


def _run(tmp_path, corpus_file, stages, **sections):
    cfg = config_from_dict(micro_config(tmp_path / "run", corpus_file, stages, **sections))
    return Runner(cfg).run()


def test_causal_pretrain_cuts_heldout_perplexity(tmp_path, corpus_file):
    manifest = _run(tmp_path, corpus_file, [pretrain(max_steps=60)])
    (entry,) = manifest["stages"]
    before, after = entry["metrics_before"]["heldout_ppl"], entry["metrics_after"]["heldout_ppl"]
    assert entry["decision"] == "accepted"
    assert after < 0.2 * before, (before, after)  # untrained ~ vocab size; trained knows the grammar
    m = entry["stage_metrics"]
    assert m["objective"] == "clm" and m["last_logged_loss"] < m["first_logged_loss"] - 1.0
    # every training log reached metrics.jsonl
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(x.get("phase") == "train" for x in lines) == 60 // 5


def test_masked_lm_pretrain_on_tiny_bert(tmp_path, corpus_file):
    manifest = _run(tmp_path, corpus_file, [pretrain(max_steps=60, learning_rate=2e-3)],
                    model={"preset": "tiny-bert", "architecture": {"hidden_size": 48, "intermediate_size": 96,
                                                                  "num_hidden_layers": 2, "num_attention_heads": 2,
                                                                  "max_position_embeddings": 128}})
    (entry,) = manifest["stages"]
    assert manifest["model_kind"] == "masked" and entry["stage_metrics"]["objective"] == "mlm"
    assert "distinct_2" not in entry["metrics_after"]  # encoders are not sampled
    assert entry["metrics_after"]["heldout_ppl"] < 0.5 * entry["metrics_before"]["heldout_ppl"]


def test_final_model_loads_in_a_transformers_pipeline(tmp_path, corpus_file):
    from transformers import pipeline

    _run(tmp_path, corpus_file, [pretrain(max_steps=30)])
    generate = pipeline("text-generation", model=str(tmp_path / "run" / "final"))
    out = generate("The cat", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert out.startswith("The cat") and len(out) > len("The cat")
    assert (tmp_path / "run" / "report.md").read_text().count("r1-01-pretrain") >= 1
    assert (tmp_path / "run" / "heldout_ppl.png").stat().st_size > 1000
