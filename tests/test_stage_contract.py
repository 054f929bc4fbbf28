"""Stage contract v2, through the runner: a stage from one new file (tests/example_stage.py) adds an
annotation column, an artefact and a report section that later stages and the report see; bad
outputs fail the stage alone; capability flags and options are checked before anything is written;
the schema and `selftrain stages` describe every stage."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from selftrain import cli
from selftrain.cli import app
from selftrain.config import config_from_dict
from selftrain.data.pool import Pool
from selftrain.errors import SelftrainError
from selftrain.modeling.factory import load_checkpoint, save_checkpoint
from selftrain.runner import Runner
from selftrain.stages import REGISTRY, Stage, StageConfig, StageResult
from selftrain.stages.schema import config_schema
from tests.conftest import micro_config
from tests.example_stage import LengthClassesStage

REPO = Path(__file__).resolve().parents[1]
KEY1, KEY2 = "r1-01-example_lengths", "r2-01-example_lengths"


def test_a_new_stage_adds_a_column_an_artefact_and_a_report_section(tmp_path, corpus_file):
    run_dir = tmp_path / "run"
    cfg = config_from_dict(micro_config(run_dir, corpus_file, ["example_lengths"], rounds=2))
    manifest = Runner(cfg).run()
    first, second = manifest["stages"]
    assert first["decision"] == second["decision"] == "accepted"
    rows = first["stage_metrics"]["rows"]
    assert first["annotations"] == {"path": f"stages/{KEY1}/annotations.json", "rows": {"length_class": rows}}
    assert first["artefacts"] == {"lengths": f"stages/{KEY1}/lengths.txt"}
    # round 2 saw round 1's outputs: every row annotated, the artefact at its path
    assert first["stage_metrics"]["annotated_before"] == 0
    assert second["stage_metrics"]["annotated_before"] == rows
    assert second["stage_metrics"]["artefact_before"] == str((run_dir / first["artefacts"]["lengths"]).resolve())
    # the rows on disk are untouched; the annotation is laid over them by id
    pool = Pool.load(run_dir / manifest["pool"])
    assert "length_class" not in pool.ds.column_names
    layer = json.loads((run_dir / first["annotations"]["path"]).read_text())
    view = pool.annotated([layer]).ds
    by_class = {}
    for text, c in zip(view["text"], view["length_class"]):
        by_class.setdefault(c, []).append(len(text))
    assert sorted(by_class) == [0, 1, 2]
    assert max(by_class[0]) <= min(by_class[1]) and max(by_class[1]) <= min(by_class[2])  # classes by length
    report = (run_dir / "report.md").read_text()
    assert f"## {KEY1}" in report and f"Length classes of {rows} texts" in report


def test_restart_drops_the_annotations_of_redone_stages(tmp_path, corpus_file):
    run_dir = tmp_path / "run"
    cfg = config_from_dict(micro_config(run_dir, corpus_file, ["example_lengths"], rounds=2))
    rows = Runner(cfg).run()["stages"][0]["stage_metrics"]["rows"]
    first, second = Runner(cfg, restart_from=KEY2).run()["stages"]
    assert second["stage_metrics"]["annotated_before"] == rows  # round 1 kept, with its column
    first, second = Runner(cfg, restart_from=KEY1).run()["stages"]
    assert first["stage_metrics"]["annotated_before"] == 0  # nothing left from the dropped stages
    assert second["stage_metrics"]["annotated_before"] == rows


@pytest.mark.parametrize("option, message", [("bad_id", "not in the pool"),
                                             ("artefact_outside", "outside the stage directory")])
def test_a_stage_with_bad_outputs_fails_alone(tmp_path, corpus_file, option, message):
    run_dir = tmp_path / "run"
    stages = [{"example_lengths": {option: True}}, "example_lengths"]
    manifest = Runner(config_from_dict(micro_config(run_dir, corpus_file, stages))).run()
    bad, good = manifest["stages"]
    assert bad["status"] == "failed" and message in bad["reason"], bad["reason"]
    assert "annotations" not in bad and (run_dir / "stages" / bad["key"] / "error.txt").is_file()
    assert good["decision"] == "accepted" and good["stage_metrics"]["annotated_before"] == 0


def test_capability_flags_are_checked_before_anything_is_written(tmp_path, corpus_file, monkeypatch):
    monkeypatch.setattr(LengthClassesStage, "requires_causal", True)
    run_dir = tmp_path / "run"
    cfg = micro_config(run_dir, corpus_file, ["example_lengths"],
                       model={"preset": "tiny-bert", "architecture": {"hidden_size": 48, "intermediate_size": 96,
                                                                      "num_hidden_layers": 2,
                                                                      "num_attention_heads": 2}})
    with pytest.raises(SelftrainError, match="example_lengths generates or scores continuations with a causal LM"):
        Runner(config_from_dict(cfg)).run()
    assert not (run_dir / "manifest.json").exists()


def test_stage_options_are_validated_in_stages_not_in_config(tmp_path, corpus_file):
    raw = micro_config(tmp_path / "run", corpus_file, [{"example_lengths": {"binz": 4}}])
    cfg = config_from_dict(raw)  # the run-level schema knows no stage
    with pytest.raises(SelftrainError, match="unknown key 'binz'. Did you mean 'bins'"):
        Runner(cfg)
    with pytest.raises(SelftrainError, match="unknown stage 'example_length'. Did you mean 'example_lengths'"):
        Runner(config_from_dict({**raw, "stages": ["example_length"]}))


def test_json_schema_validates_every_shipped_config_and_catches_a_typo():
    schema = config_schema()
    for path in sorted((REPO / "configs").glob("*.yaml")):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    bad = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    bad["stages"][0] = {"pretrain": {"max_stepz": 3}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    assert set(REGISTRY) <= set(json.dumps(schema["properties"]["stages"]).split('"'))


def test_stages_command_lists_stages_and_prints_options(monkeypatch):
    monkeypatch.setattr(cli.console, "width", 200)  # one table row per option
    runner = CliRunner()
    listing = runner.invoke(app, ["stages"])
    assert listing.exit_code == 0 and all(name in listing.output for name in REGISTRY)
    one = runner.invoke(app, ["stages", "example_lengths"])
    assert one.exit_code == 0, one.output
    assert "bins" in one.output and "Number of length classes (equal-count bins)." in one.output
    typo = runner.invoke(app, ["stages", "pretrian"])
    assert typo.exit_code == 2 and "Did you mean 'pretrain'" in typo.output


class Critic(Stage):
    """Test-only stage: saves a copy of the model as the auxiliary model ``critic``; a second run of
    it records whether it was handed the first one's. ``reject`` returns a result the runner refuses."""

    name = "critic"

    class Config(StageConfig):
        reject: bool = False

    def run(self, state, config):
        model, tok = state.load_model()
        critic = save_checkpoint(model.cpu(), tok, state.stage_dir / "critic")
        seen = state.auxiliary.get("critic")
        return StageResult(auxiliary={"critic": critic}, annotations={"x": {"no-such-row": 1}} if config.reject else {},
                           metrics={"critic_before": str(seen) if seen else "", "critic_loads": bool(
                               seen and load_checkpoint(seen, state.kind)[0] is not None)})


def test_auxiliary_models_reach_later_stages_and_go_with_a_failed_attempt(tmp_path, corpus_file, monkeypatch):
    monkeypatch.setitem(REGISTRY, "critic", Critic)
    run_dir = tmp_path / "run"
    stages = ["critic", {"critic": {"reject": True}}, "critic"]
    first, failed, last = Runner(config_from_dict(micro_config(run_dir, corpus_file, stages))).run()["stages"]
    assert first["auxiliary"] == {"critic": f"stages/{first['key']}/critic"}
    assert failed["status"] == "failed" and "no-such-row" in failed["reason"] and failed["auxiliary_deleted"]
    assert not (run_dir / "stages" / failed["key"] / "critic").exists()  # its weights do not linger
    assert last["stage_metrics"]["critic_before"] == str((run_dir / first["auxiliary"]["critic"]).resolve())
    assert last["stage_metrics"]["critic_loads"] is True


class Relabel(Stage):
    """Test-only stage: writes the column `length_class` as strings (the example stage writes ints)."""

    name = "relabel"

    class Config(StageConfig):
        pass

    def run(self, state, config):
        return StageResult(annotations={"length_class": {state.pool.ds["id"][0]: "long"}})


def test_a_column_of_mixed_types_fails_that_stage_only(tmp_path, corpus_file, monkeypatch):
    monkeypatch.setitem(REGISTRY, "relabel", Relabel)
    run_dir = tmp_path / "run"
    stages = ["example_lengths", "relabel", "example_lengths"]
    first, bad, last = Runner(config_from_dict(micro_config(run_dir, corpus_file, stages))).run()["stages"]
    assert bad["status"] == "failed" and "mixes value types" in bad["reason"], bad["reason"]
    assert last["decision"] == "accepted" and last["stage_metrics"]["annotated_before"] == first["stage_metrics"]["rows"]


def test_a_missing_tracker_is_refused_before_anything_is_written(tmp_path, corpus_file):
    run_dir = tmp_path / "run"
    cfg = micro_config(run_dir, corpus_file, ["example_lengths"], run={"report_to": "wandb"})
    with pytest.raises(SelftrainError, match="run.report_to=wandb needs the wandb package"):
        Runner(config_from_dict(cfg)).run()
    assert not (run_dir / "manifest.json").exists()


def test_config_command_resolves_a_config_and_lists_run_options(tmp_path, corpus_file, monkeypatch):
    monkeypatch.setattr(cli.console, "width", 200)
    runner = CliRunner()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(micro_config(tmp_path / "run", corpus_file, ["example_lengths"])))
    out = runner.invoke(app, ["config", str(path), "--set", "stages.0.example_lengths.bins=4"])
    assert out.exit_code == 0, out.output
    resolved = yaml.safe_load(out.output)
    assert resolved["stages"] == [{"example_lengths": {"target": None, "bins": 4, "bad_id": False,
                                                       "artefact_outside": False}}]
    assert resolved["guard"]["tolerance"] == 0.02  # defaults filled in
    bad = runner.invoke(app, ["config", str(path), "--set", "stages.0.example_lengths.binz=4"])
    assert bad.exit_code == 2 and "Did you mean 'bins'" in bad.output
    options = runner.invoke(app, ["config", "--options"])
    assert options.exit_code == 0 and "run.report_to" in options.output and "guard.tolerance" in options.output
    assert runner.invoke(app, ["config", str(path), "--schema"]).exit_code == 2
