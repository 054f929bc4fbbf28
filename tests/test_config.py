import pytest
import yaml

from selftrain.config import apply_override, config_from_dict, load_config
from selftrain.errors import SelftrainError
from selftrain.stages import stage_specs
from tests.conftest import micro_config, pretrain, write_config


def test_valid_config_round_trips(tmp_path, corpus_file):
    cfg = config_from_dict(micro_config(tmp_path / "run", corpus_file, [pretrain()]))
    (spec,) = stage_specs(cfg)
    assert spec.name == "pretrain" and spec.config.max_steps == 40
    assert cfg.model.trust_remote_code is False  # off unless the user turns it on


def test_unknown_top_level_key_names_key_and_valid_ones(tmp_path, corpus_file):
    raw = micro_config(tmp_path / "run", corpus_file, [pretrain()])
    raw["modle"] = {}
    with pytest.raises(SelftrainError) as e:
        config_from_dict(raw)
    msg = str(e.value)
    assert "'modle'" in msg and "Did you mean 'model'" in msg and "stages" in msg


def test_unknown_nested_key_lists_section_keys(tmp_path, corpus_file):
    raw = micro_config(tmp_path / "run", corpus_file, [pretrain()])
    raw["data"]["heldout_fractoin"] = 0.1
    with pytest.raises(SelftrainError) as e:
        config_from_dict(raw)
    assert "data.heldout_fractoin" in str(e.value) and "heldout_fraction" in str(e.value)


def test_unknown_stage_option_and_stage_name(tmp_path, corpus_file):
    raw = micro_config(tmp_path / "run", corpus_file, [{"pretrain": {"max_stepz": 3}}])
    with pytest.raises(SelftrainError) as e:
        stage_specs(config_from_dict(raw))
    assert "stages[0].pretrain.max_stepz" in str(e.value) and "max_steps" in str(e.value)
    raw = micro_config(tmp_path / "run", corpus_file, [{"pretrian": {}}])
    with pytest.raises(SelftrainError, match="Did you mean 'pretrain'"):
        stage_specs(config_from_dict(raw))


def test_overrides_parse_yaml_values_and_address_stages(tmp_path, corpus_file):
    raw = micro_config(tmp_path / "run", corpus_file, [pretrain(), pretrain()])
    cfg = config_from_dict(raw, ["stages.pretrain.max_steps=7", "stages.1.pretrain.learning_rate=0.5",
                                 "run.seed=3", "guard.min_entropy=null"])
    a, b = stage_specs(cfg)
    assert (a.config.max_steps, b.config.max_steps, b.config.learning_rate) == (7, 7, 0.5)
    assert cfg.run.seed == 3 and cfg.guard.min_entropy is None
    with pytest.raises(SelftrainError, match="no stage named"):
        apply_override(raw, "stages.augment.x=1")
    with pytest.raises(SelftrainError, match="key.path=value"):
        apply_override(raw, "run.seed")


def test_malformed_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {name: x\nstages: [")
    with pytest.raises(SelftrainError, match="malformed YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(SelftrainError, match="mapping"):
        load_config(bad)


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("run: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SelftrainError, match="malformed YAML"):
        load_config(evil)


def test_model_needs_exactly_one_source(tmp_path, corpus_file):
    raw = micro_config(tmp_path / "run", corpus_file, [pretrain()])
    raw["model"]["pretrained"] = "some/model"
    with pytest.raises(SelftrainError, match="exactly one of model.preset or model.pretrained"):
        config_from_dict(raw)


def test_run_name_cannot_escape(tmp_path, corpus_file):
    raw = micro_config(tmp_path / "run", corpus_file, [pretrain()])
    raw["run"]["name"] = "../../etc"
    with pytest.raises(SelftrainError, match="run.name"):
        config_from_dict(raw)


def test_config_file_written_and_loaded(tmp_path, corpus_file):
    path = write_config(tmp_path / "c.yaml", micro_config(tmp_path / "run", corpus_file, [pretrain()]))
    cfg = load_config(path, ["stages.0.pretrain.max_steps=5"])
    assert stage_specs(cfg)[0].config.max_steps == 5
    assert yaml.safe_load(path.read_text())["stages"][0]["pretrain"]["max_steps"] == 40  # file untouched


def test_every_shipped_config_validates():
    from pathlib import Path

    from selftrain.config import load_config

    configs = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
    assert configs
    for path in configs:
        stage_specs(load_config(path, []))
