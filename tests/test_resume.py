"""Resuming: every option is checked before anything is written, finished stages are kept (and
refused if changed), stages still to run may change, --restart-from redoes a stage and what
follows; the lock is held from set-up on; temp leftovers and torn metric lines are harmless."""

from __future__ import annotations

import copy
import fcntl
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selftrain.cli import app
from selftrain.config import config_from_dict
from selftrain.data.pool import Pool, make_examples
from selftrain.errors import SelftrainError
from selftrain.runner import Runner
from selftrain.stages import REGISTRY, Stage, StageConfig, StageResult
from selftrain.stages.pretrain import PretrainStage
from selftrain.workspace import Workspace
from tests.conftest import make_corpus, micro_config, pretrain, write_config

REPO = Path(__file__).resolve().parents[1]

cli = CliRunner()


def _cli_run(path, *args):
    return cli.invoke(app, ["run", str(path), *map(str, args)], env={"COLUMNS": "300"})


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


# ---------------------------------------------------------------------- mistakes found before the run
def _task_without_input_field(tmp_path):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": f"item {i}", "label": "a"}) + "\n"
                                                 for i in range(6)))
    (tmp_path / "task.yaml").write_text("name: t\noutput_type: multiple_choice\ndata: {path: rows.jsonl}\n"
                                        "doc_to_text: '{{text}}'\ndoc_to_choice: [a, b]\ndoc_to_target: label\n"
                                        "input_field: body\n")
    return str(tmp_path / "task.yaml")


MISTAKES = [  # (stage 2 of 3, words the message must contain)
    (lambda t: {"selfplay": {"env": "dialogue", "reward_weights": {"coherense": 1.0}}},
     ["stages[1].selfplay", "reward_weights", "'coherense'", "Did you mean 'coherence'"]),
    (lambda t: {"selfplay": {"env": "spin", "reward_weights": {"coherence": 1.0}}},
     ["stages[1].selfplay", "reward_weights", "no reward functions"]),
    (lambda t: {"selfplay": {"env": "dialogue", "seeds": "model", "embedding_model": str(t / "no-encoder")}},
     ["stages[1].selfplay", "embedding_model", "no-encoder", "not a directory"]),
    (lambda t: pretrain(trainer_args={"save_total_limt": 1}),
     ["stages[1].pretrain.trainer_args", "'save_total_limt'", "Did you mean 'save_total_limit'"]),
    (lambda t: pretrain(trainer_args={"learning_rate": 1.0}),
     ["stages[1].pretrain.trainer_args", "'learning_rate'", "pretrain.learning_rate"]),
    (lambda t: pretrain(lr_scheduler="cosin"),
     ["stages[1].pretrain.lr_scheduler", "'cosin'", "Did you mean 'cosine'"]),
    (lambda t: pretrain(trainer_args={"optim": "adamw_torhc"}),  # a bad value: preflight builds the arguments
     ["pretrain.trainer_args", "adamw_torhc"]),
    (lambda t: {"fewshot": {"task": _task_without_input_field(t), "inputs": "task"}},
     ["row 1", "'body'", "input_field"]),
]


@pytest.mark.parametrize("make, words", MISTAKES, ids=["reward", "dpo-reward", "embedding_model", "trainer_args",
                                                        "trainer_args-own", "lr_scheduler", "trainer_args-value",
                                                        "input_field"])
def test_a_mistake_in_a_later_stage_is_found_before_anything_is_written(tmp_path, corpus_file, make, words):
    run_dir = tmp_path / "run"
    cfg = micro_config(run_dir, corpus_file, [pretrain(max_steps=5), make(tmp_path), pretrain(max_steps=5)])
    out = _cli_run(write_config(tmp_path / "c.yaml", cfg))
    assert out.exit_code == 2, out.output
    for w in words:
        assert w in out.output, (w, out.output)
    assert "Traceback" not in out.output and not run_dir.exists()


def test_reward_names_match_the_envs():
    """The names the config is checked against are the ones the environments return."""
    from selftrain.stages.selfplay import REWARD_NAMES
    from selftrain.stages.selfplay.dialogue import DialogueEnv
    from selftrain.stages.selfplay.proposer_solver import ProposerSolverEnv
    from selftrain.tasks.families import make_family

    env = ProposerSolverEnv.__new__(ProposerSolverEnv)
    env.family, env.learnability_kind = make_family("arithmetic"), "azr"
    assert tuple(ProposerSolverEnv.rewards(env)) == REWARD_NAMES["tasks"]
    dialogue = DialogueEnv.__new__(DialogueEnv)
    dialogue.coherence = dialogue.relevance = None
    assert tuple(DialogueEnv.rewards(dialogue)) == REWARD_NAMES["dialogue"]


# ---------------------------------------------------------------------- per-stage fingerprints
def test_a_bad_option_fixed_after_stage_1_resumes_without_redoing_it(tmp_path, corpus_file, monkeypatch):
    """A mistake only the stage itself finds (preflight skipped here to let it through) ends the
    run with exit 2; the fixed config resumes: stage 1 is kept, stage 2 retried with the fix."""
    run_dir = tmp_path / "run"
    bad = micro_config(run_dir, corpus_file, [pretrain(max_steps=5), pretrain(max_steps=5, trainer_args={
        "optim": "adamw_torhc"}), pretrain(max_steps=5)])
    monkeypatch.setattr(PretrainStage, "preflight", lambda self, *a, **kw: None)
    with pytest.raises(SelftrainError, match="adamw_torhc"):
        Runner(config_from_dict(bad)).run()
    monkeypatch.undo()
    first = json.loads((run_dir / "manifest.json").read_text())
    assert [e["status"] for e in first["stages"]] == ["accepted", "error"]

    fixed = copy.deepcopy(bad)
    fixed["stages"][1]["pretrain"]["trainer_args"] = {"optim": "adamw_torch"}
    manifest = Runner(config_from_dict(fixed)).run()
    one, two, three = manifest["stages"]
    assert one == first["stages"][0]  # untouched: not redone
    assert two["attempts"] == 2 and two["status"] in ("accepted", "rolled_back") and three["attempts"] == 1
    assert manifest["status"] == "finished"
    assert yaml_options(run_dir)[1]["pretrain"]["trainer_args"] == {"optim": "adamw_torch"}  # the snapshot follows


def yaml_options(run_dir):
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["stages"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run of two pretrain stages; each test works on its own copy."""
    base = tmp_path_factory.mktemp("finished")
    corpus = base / "corpus.txt"
    corpus.write_text(make_corpus())
    cfg = micro_config(base / "run", corpus, [pretrain(max_steps=5), pretrain(max_steps=5)])
    Runner(config_from_dict(cfg)).run()
    return base / "run", cfg


def _copy(finished, tmp_path):
    src, cfg = finished
    shutil.copytree(src, tmp_path / "run")
    cfg = copy.deepcopy(cfg)
    cfg["run"]["output_dir"] = str(tmp_path / "run")
    return tmp_path / "run", cfg


def test_changing_a_finished_stage_is_refused_with_its_key(finished, tmp_path):
    run_dir, cfg = _copy(finished, tmp_path)
    before = _snapshot(run_dir)
    cfg["stages"][1]["pretrain"]["max_steps"] = 6
    path = write_config(tmp_path / "c.yaml", cfg)
    out = _cli_run(path)
    assert out.exit_code == 2 and "r1-02-pretrain" in out.output, out.output
    assert f"selftrain run {path} --restart-from r1-02-pretrain" in out.output.replace("\n", "")
    cfg["model"]["vocab_size"] = 330  # a run-level section: no stage can be redone under another model
    out = _cli_run(write_config(tmp_path / "c.yaml", cfg))
    assert out.exit_code == 2 and "model changed" in out.output, out.output
    assert _snapshot(run_dir) == before


def test_restart_from_redoes_that_stage_and_every_later_one(tmp_path, corpus_file, monkeypatch):
    monkeypatch.setitem(REGISTRY, "adder", Adder)
    run_dir = tmp_path / "run"
    cfg = micro_config(run_dir, corpus_file, [pretrain(max_steps=5), {"adder": {}}, pretrain(max_steps=5)])
    first = Runner(config_from_dict(cfg)).run()
    assert first["stages"][1]["pool_added"] == 3 and first["pool"] == "data/pool-r1-02-adder"
    cfg["stages"][2]["pretrain"]["max_steps"] = 10
    with pytest.raises(SelftrainError, match="--restart-from r1-03-pretrain"):
        Runner(config_from_dict(cfg)).run()
    out = _cli_run(write_config(tmp_path / "c.yaml", cfg), "--restart-from", "r1-02-adder")
    assert out.exit_code == 0, out.output
    manifest = json.loads((run_dir / "manifest.json").read_text())
    one, two, three = manifest["stages"]
    assert one["finished"] == first["stages"][0]["finished"] and one["attempts"] == 1  # kept as it ran
    assert two["start_checkpoint"] == one["checkpoint"] and two["attempts"] == 1  # redone from its old start
    assert three["stage_metrics"]["loss_curve"][-1][0] == 10  # with the new options
    pool = Pool.load(run_dir / manifest["pool"])
    assert sum(o == "adder" for o in pool.ds["origin"]) == 3  # the pool went back: no rows twice
    evals = [r["stage"] for r in Workspace(run_dir).read_metrics() if r.get("phase") == "eval"]
    assert evals == ["initial", "r1-01-pretrain", "r1-02-adder", "r1-03-pretrain"]  # each logged once
    assert sorted(p.name for p in (run_dir / "data").iterdir()) == ["heldout", "pool", "pool-r1-02-adder"]
    bad = _cli_run(write_config(tmp_path / "c.yaml", cfg), "--restart-from", "r9-01-pretrain")
    assert bad.exit_code == 2 and "no such stage" in bad.output


class Adder(Stage):
    """Test-only stage: adds three synthetic rows to the pool, leaves the model as it is."""

    name = "adder"

    class Config(StageConfig):
        pass

    def run(self, state, config):
        texts = [f"A synthetic sentence number {i} about the red ball." for i in range(3)]
        return StageResult(additions=make_examples(texts, origin="adder", op="copy", stage=state.stage_key,
                                                   round=state.round))


def test_ctrl_c_while_a_stage_is_committed_leaves_the_manifest_as_before_it(tmp_path, corpus_file, monkeypatch):
    """Ctrl-C between accepting a stage and switching to its new pool: the saved manifest is the
    one from before the stage (its checkpoint, metrics and pool), so the retry starts where it did."""
    monkeypatch.setitem(REGISTRY, "adder", Adder)
    run_dir = tmp_path / "run"
    cfg = micro_config(run_dir, corpus_file, [pretrain(max_steps=5), {"adder": {}}])
    save = Pool.save

    def interrupted_save(self, path):
        if "pool-" in str(path):
            raise KeyboardInterrupt
        return save(self, path)

    monkeypatch.setattr(Pool, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        Runner(config_from_dict(cfg)).run()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    one, two = manifest["stages"]
    assert two["status"] == "interrupted" and "decision" not in two
    assert manifest["current_checkpoint"] == one["checkpoint"] == two["start_checkpoint"]
    assert manifest["pool"] == "data/pool" and manifest["accepted_metrics"] == one["metrics_after"]
    monkeypatch.setattr(Pool, "save", save)
    done = Runner(config_from_dict(cfg)).run()
    assert done["stages"][1]["attempts"] == 2 and done["stages"][1]["start_checkpoint"] == one["checkpoint"]
    assert done["pool"] == "data/pool-r1-02-adder" and done["status"] == "finished"


def test_adding_rounds_or_stages_runs_just_the_new_ones(finished, tmp_path):
    run_dir, cfg = _copy(finished, tmp_path)
    old = json.loads((run_dir / "manifest.json").read_text())["stages"]
    cfg["stages"].append(pretrain(max_steps=5, learning_rate=1e-3))
    manifest = Runner(config_from_dict(cfg)).run()
    assert manifest["stages"][:2] == old and manifest["stages"][2]["key"] == "r1-03-pretrain"
    cfg["rounds"] = 2
    manifest = Runner(config_from_dict(cfg)).run()
    assert manifest["stages"][:2] == old
    assert [e["key"] for e in manifest["stages"]] == ["r1-01-pretrain", "r1-02-pretrain", "r1-03-pretrain",
                                                       "r2-01-pretrain", "r2-02-pretrain", "r2-03-pretrain"]
    assert all(e["attempts"] == 1 for e in manifest["stages"]) and manifest["status"] == "finished"
    cfg["stages"].append(pretrain(max_steps=5))  # r1-04 would run after the finished round 2: refused
    with pytest.raises(SelftrainError, match="r1-04-pretrain is new but comes before finished stage "
                                             "r2-01-pretrain.*--restart-from r2-01-pretrain"):
        Runner(config_from_dict(cfg)).run()


DEMO_BEFORE_VERSION_2 = """\
run: {name: demo, seed: 0}
model:
  preset: tiny
  vocab_size: 4096
data: {train: "builtin:pydocs", heldout_fraction: 0.05}
guard: {metric: heldout_ppl, tolerance: 0.02}
eval: {max_tokens: 16384, samples: 16, max_new_tokens: 40}
rounds: 1
stages:
  - pretrain: {objective: clm, max_steps: 600, block_size: 128, batch_size: 16, learning_rate: 2.0e-3}
"""


def test_the_version_1_fingerprint_is_what_the_previous_release_computed(tmp_path):
    """Pinned from the release before per-stage fingerprints (commit 4974588), on its configs/demo.yaml:
    sections and options added since (sandbox, stop, the guard's budgets) must not change it, or no
    older run could resume."""
    from selftrain.config import load_config

    (tmp_path / "demo.yaml").write_text(DEMO_BEFORE_VERSION_2)
    assert load_config(tmp_path / "demo.yaml").fingerprint() == "85b2bcc3cc3fd44d"


def test_a_version_1_manifest_resumes_with_the_same_config_only(finished, tmp_path):
    run_dir, cfg = _copy(finished, tmp_path)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    del manifest["run_fingerprints"]
    for e in manifest["stages"]:
        del e["fingerprint"]
    manifest.update(version=1, config_fingerprint=config_from_dict(cfg).fingerprint())
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    changed = copy.deepcopy(cfg)
    changed["stages"][0]["pretrain"]["max_steps"] = 6
    with pytest.raises(SelftrainError, match="older selftrain"):
        Runner(config_from_dict(changed)).run()
    upgraded = Runner(config_from_dict(cfg)).run()
    assert upgraded["version"] == 2 and "config_fingerprint" not in upgraded
    assert all(e["fingerprint"] for e in upgraded["stages"]) and upgraded["status"] == "finished"


# ---------------------------------------------------------------------- lock, temp leftovers, torn lines
def _hold_lock(root):
    root.mkdir(parents=True, exist_ok=True)
    f = open(root / ".lock", "a")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


def test_a_second_run_is_refused_while_another_holds_the_lock(tmp_path, corpus_file):
    run_dir = tmp_path / "run"
    cfg = config_from_dict(micro_config(run_dir, corpus_file, [pretrain(max_steps=5)]))
    held = _hold_lock(run_dir)  # another process setting up (flock conflicts across open files)
    with pytest.raises(SelftrainError, match="another selftrain process is running"):
        Runner(cfg).run()
    assert [p.name for p in run_dir.iterdir()] == [".lock"]  # nothing written
    held.close()


def test_the_lock_is_taken_before_set_up_and_released_after_a_crash(tmp_path, corpus_file, monkeypatch):
    import selftrain.runner as runner_module

    run_dir = tmp_path / "run"
    cfg = config_from_dict(micro_config(run_dir, corpus_file, [pretrain(max_steps=5)]))
    seen = []

    def prepare_corpus(*args, **kw):  # inside set-up: a second run must be refused now
        with pytest.raises(SelftrainError, match="another selftrain process is running"):
            Runner(cfg).run()
        seen.append(True)
        raise RuntimeError("crash during set-up")

    monkeypatch.setattr(runner_module, "prepare_corpus", prepare_corpus)
    with pytest.raises(RuntimeError, match="crash during set-up"):
        Runner(cfg).run()
    assert seen and not run_dir.exists()  # lock released, and the directory it made is gone
    monkeypatch.undo()
    assert Runner(cfg).run()["status"] == "finished"


def test_temp_leftovers_from_a_crash_do_not_block_the_run(finished, tmp_path, corpus_file):
    fresh = tmp_path / "fresh"  # a set-up killed mid-write
    fresh.mkdir()
    (fresh / ".config.yaml.tmp-4242").write_text("run: {na")
    (fresh / "metrics.jsonl").write_text('{"stage": "initial", "phase": "ev')
    (fresh / "checkpoints" / ".initial.tmp").mkdir(parents=True)
    manifest = Runner(config_from_dict(micro_config(fresh, corpus_file, [pretrain(max_steps=5)]))).run()
    assert manifest["status"] == "finished" and not list(fresh.rglob(".*.tmp*"))
    assert [r["stage"] for r in Workspace(fresh).read_metrics() if r.get("phase") == "eval"] == [
        "initial", "r1-01-pretrain"]

    run_dir, cfg = _copy(finished, tmp_path)  # a finished run killed mid-write
    (run_dir / ".manifest.json.tmp-4242").write_text("{")
    (run_dir / "stages" / "r1-01-pretrain" / ".model.tmp").mkdir()
    (run_dir / "final").rename(run_dir / ".final.old")  # killed between replace_dir's two renames
    manifest = Runner(config_from_dict(cfg)).run()
    assert manifest["status"] == "finished" and (run_dir / "final" / "model.safetensors").exists()
    assert not list(run_dir.rglob(".*.tmp*")) and not list(run_dir.rglob(".*.old"))


def test_a_torn_metrics_line_stays_alone(tmp_path):
    ws = Workspace(tmp_path)
    ws.log_metrics({"stage": "a", "loss": 1.0})
    with open(ws.metrics_path, "a") as f:
        f.write('{"stage": "a", "lo')  # a kill mid-line
    ws.log_metrics({"stage": "b", "loss": float("inf")})
    lines = ws.metrics_path.read_text().splitlines()
    assert len(lines) == 3 and lines[1] == '{"stage": "a", "lo'
    records = ws.read_metrics()
    assert [(r["stage"], r["loss"]) for r in records] == [("a", 1.0), ("b", float("inf"))]
    assert '"loss": "inf"' in lines[2]  # valid JSON on disk
