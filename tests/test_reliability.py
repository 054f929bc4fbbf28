"""Reliability: runs killed at random points in every stage resume whole (tests/fault_harness.py),
a full disk stops a run with one message and nothing lost, the same config and seed give the same
stage results, damaged files are never loaded, pickled weights are never unpickled, and secrets a
model writes are scrubbed before they enter the pool. RELIABILITY.md lists these promises."""

from __future__ import annotations

import ast
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from selftrain.config import config_from_dict
from selftrain.data.pool import make_examples
from selftrain.data.scrub import scrub
from selftrain.errors import SelftrainError
from selftrain.runner import Runner
from selftrain.stages import REGISTRY
from selftrain.stages.base import Stage, StageConfig, StageResult
from selftrain.workspace import Workspace, atomic_write_text
from tests.conftest import micro_config, micro_lm, pretrain

REPO = Path(__file__).resolve().parents[1]
STAGES = ["pretrain", "cluster", "augment", "curriculum", "adversarial", "selfplay", "fewshot", "self_instruct"]


def _harness(work: Path, *args: str, unshare: bool = False) -> dict:
    cmd = [sys.executable, "-m", "tests.fault_harness", "--work", str(work), *args]
    out = subprocess.run(["unshare", "-rm", *cmd] if unshare else cmd, cwd=REPO, capture_output=True, text=True,
                         timeout=1800)
    lines = out.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("{"), out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def cut_runs(tmp_path_factory) -> dict:
    """The quick form: 2 kills per part of the run (set-up, 8 stages, finish) and a full disk in each stage."""
    return _harness(tmp_path_factory.mktemp("faults"), "--kills-per-stage", "2")


def test_killed_at_random_points_in_every_stage_the_run_resumes_whole(cut_runs):
    assert cut_runs["problems"] == [], "\n\n".join(cut_runs["problems"])
    outcomes = cut_runs["outcomes"]
    killed = outcomes.get("killed at the point", 0) + outcomes.get("killed at the part's end", 0)
    assert killed >= 12 and outcomes.get("disk full: clear exit 2", 0) >= 5, outcomes
    assert {"train", "eval", "write", "save"} <= set(cut_runs["kills_by_point"]), cut_runs["kills_by_point"]


@pytest.mark.parametrize("stage", STAGES)
def test_the_same_config_and_seed_give_the_same_stage_results(cut_runs, stage):
    """Two uncut runs, separate processes: each stage's decision, held-out metrics (within 1e-5),
    own metrics, pool rows and annotations are the same."""
    key = f"r1-{STAGES.index(stage) + 1:02d}-{stage}"
    assert cut_runs["determinism"][key] == [], cut_runs["determinism"][key]


@pytest.mark.slow
def test_full_fault_injection(tmp_path):
    result = _harness(tmp_path, "--kills-per-stage", "10", "--seed", "1")
    assert result["problems"] == [] and not any(result["determinism"].values()), result


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="needs user namespaces (unshare -rm) to mount a small tmpfs")
@pytest.mark.parametrize("megabytes", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_a_real_full_disk_stops_the_run_with_one_message_and_it_resumes(tmp_path, megabytes):
    result = _harness(tmp_path, "--real-disk-full", str(megabytes), unshare=True)
    assert result["problems"] == [], "\n\n".join(result["problems"])
    assert "no space left on device" in result["message"] and "run the same command again" in result["message"]


# ---------------------------------------------------------------------------- checksums
@pytest.fixture
def two_stage_run(tmp_path, corpus_file):
    cfg = micro_config(tmp_path / "run", corpus_file, [pretrain(max_steps=4, save_steps=100)])
    Runner(config_from_dict(cfg)).run()
    cfg["stages"].append(pretrain(max_steps=2, save_steps=100))
    return tmp_path / "run", cfg


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != ".lock"}


@pytest.mark.parametrize("damage", ["flip a byte of the weights", "truncate a pool shard", "delete the checkpoint"])
def test_a_damaged_file_the_manifest_names_is_refused_by_name_and_nothing_changes(two_stage_run, damage):
    run_dir, cfg = two_stage_run
    manifest = Workspace(run_dir).load_manifest()
    checkpoint = run_dir / manifest["current_checkpoint"]
    if damage == "flip a byte of the weights":
        weights = checkpoint / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit: the file still parses, the model is silently different
        weights.write_bytes(bytes(data))
        expected = "model.safetensors"
    elif damage == "truncate a pool shard":
        shard = next((run_dir / "data" / "pool").glob("*.arrow"))
        shard.write_bytes(shard.read_bytes()[:-100])
        expected = shard.name
    else:
        shutil.rmtree(checkpoint)
        expected = "is missing"
    before = _tree(run_dir)
    with pytest.raises(SelftrainError, match=expected):
        Runner(config_from_dict(cfg)).run()
    assert _tree(run_dir) == before
    from typer.testing import CliRunner

    from selftrain.cli import app

    out = CliRunner().invoke(app, ["inspect", str(run_dir), "--verify"])  # the same finding, for a person
    assert out.exit_code == 2 and expected in out.output and ("damaged" in out.output or "missing" in out.output)


def test_inspect_verify_passes_a_whole_run(two_stage_run):
    from typer.testing import CliRunner

    from selftrain.cli import app

    out = CliRunner().invoke(app, ["inspect", str(two_stage_run[0]), "--verify"])  # pool, held-out, initial, model, final
    assert out.exit_code == 0 and "all 5 recorded paths match their checksums" in out.output, out.output


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    atomic_write_text(path, "old")
    from selftrain import faults

    faults.in_stage("setup")
    monkeypatch.setenv("SELFTRAIN_FAULT", "enospc@setup/write:state.json#1")
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


# ---------------------------------------------------------------------------- weights
class _Payload:
    """A pickle that runs code when loaded: it writes a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def _model_dir(tmp_path: Path, vocab: int | None = None) -> Path:
    from selftrain.modeling.factory import train_tokenizer
    from tests.conftest import make_corpus

    tok = train_tokenizer(make_corpus(60).split("\n\n"), 320)
    folder = tmp_path / "model"
    model = micro_lm(tok)
    if vocab:
        model.resize_token_embeddings(vocab)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_pickled_weights_are_never_unpickled(tmp_path):
    from selftrain.modeling.factory import load_pretrained

    folder = _model_dir(tmp_path)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"weights": _Payload(marker)}, f)
    with pytest.raises(SelftrainError, match="pickled weights .*pytorch_model.bin.* safetensors only"):
        load_pretrained(str(folder))
    assert not marker.exists()  # checked from outside: the payload never ran
    # the CLI says the same in one line
    out = subprocess.run([sys.executable, "-m", "selftrain", "eval", str(folder), "--data", str(folder)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "safetensors only" in out.stderr, out.stderr
    assert not marker.exists()


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(tmp_path):
    from selftrain.modeling.factory import load_pretrained

    folder = _model_dir(tmp_path, vocab=100)  # the embedding table has 100 rows; the tokenizer 320 tokens
    with pytest.raises(SelftrainError, match="320 tokens but the model's embedding table has 100 rows"):
        load_pretrained(str(folder))


def _calls(tree: ast.AST, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            called = f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else \
                getattr(f, "id", None)  # module.function or a bare builtin (model.eval() is neither)
            if called == name:
                yield node


def test_the_source_loads_nothing_unsafely():
    """torch.load only with weights_only=True; YAML only through safe_load; pickle never; remote
    code never switched on in the source (only by the user's model.trust_remote_code)."""
    found = []
    for path in sorted((REPO / "selftrain").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree, "torch.load"):
            kw = {k.arg: k.value for k in call.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                found.append(f"{path.name}:{call.lineno} torch.load without weights_only=True")
        for bad in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "pickle.load", "pickle.loads", "eval", "exec"):
            if bad == "exec" and path.name == "sandbox_inside.py":  # its job, inside the kernel-isolated child
                continue
            found += [f"{path.name}:{c.lineno} {bad}" for c in _calls(tree, bad)]
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and \
                    isinstance(node.value, ast.Constant) and node.value.value is True:
                found.append(f"{path.name}:{node.value.lineno} trust_remote_code=True")
    assert found == []


# ---------------------------------------------------------------------------- scrubbing
SECRETS = ("Write to jane.roe@example.org or call +1 (415) 555-0132. The key is AKIAIOSFODNN7EXAMPLE "
           "and api_key = 'q8w7e6r5t4y3u2i1'.")


def test_scrub_finds_addresses_phones_and_keys_and_leaves_numbers_alone():
    text, found = scrub(SECRETS)
    assert dict(found) == {"email": 1, "phone": 1, "key": 2}
    assert "jane" not in text and "555" not in text and "AKIA" not in text and "q8w7" not in text
    plain = ("On 2024-01-15 at 12:30, 1,000,000 people paid 3.50 each; version 3.11.4; call it 123 456 789; "
             "Decimal('+35236450.6'); token = tokens[0]; https://example.org/recipes/577452-a-memoize-decorator-for-methods")
    assert scrub(plain) == (plain, {})
    assert scrub(SECRETS, kinds=["email"])[1] == {"email": 1}


class LeakConfig(StageConfig):
    pass


class LeakStage(Stage):
    """Adds synthetic text that carries an e-mail address, a phone number and keys."""

    name = "leak"
    Config = LeakConfig

    def run(self, state, config):
        parent = state.pool.ds["id"][0]
        return StageResult(additions=make_examples([SECRETS, "A clean sentence about the cat."], origin="synthetic",
                                                   op="leak", stage=state.stage_key, round=state.round,
                                                   parent_ids=[parent, parent],
                                                   metas=[{"input": SECRETS, "completion": "ok"}, {}]))


@pytest.mark.parametrize("kinds", [None, []])
def test_secrets_in_synthetic_text_are_scrubbed_before_the_pool(tmp_path, corpus_file, kinds):
    REGISTRY["leak"] = LeakStage
    try:
        cfg = micro_config(tmp_path / "run", corpus_file, ["leak"], **({"guard": {"scrub": kinds}} if kinds is not None else {}))
        manifest = Runner(config_from_dict(cfg)).run()
    finally:
        REGISTRY.pop("leak")
    import datasets

    pool = datasets.load_from_disk(str(tmp_path / "run" / manifest["pool"]))
    synthetic = [t for t, o in zip(pool["text"], pool["origin"]) if o == "synthetic"]
    assert len(synthetic) == 2 and "A clean sentence about the cat." in synthetic
    entry = manifest["stages"][0]
    metas = [m for m, o in zip(pool["meta"], pool["origin"]) if o == "synthetic"]
    if kinds is None:  # the default: all three kinds, in the text and in the meta later stages train on
        assert not any("jane" in t or "AKIA" in t for t in synthetic + metas)
        assert any('"input": "Write to <email>' in m for m in metas)
        assert entry["scrubbed"] == {"email": 1, "phone": 1, "key": 2}
        assert any(c["name"] == "scrub" for c in entry["checks"])
    else:  # switched off: the text as written
        assert SECRETS in synthetic and "scrubbed" not in entry



def test_a_trainer_checkpoint_cut_while_its_state_was_written_is_skipped(tmp_path):
    from selftrain.training.lm import last_complete_checkpoint

    for step, state in ((4, '{"global_step": 4, "log_history": []}'), (8, '{"global_step": 8, "log_hi'),
                        (12, None)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"  # 8: cut short; 12: not yet written


def test_a_damaged_annotation_layer_is_refused_before_the_next_stage_writes_anything(tmp_path, corpus_file):
    from tests.example_stage import LengthClassesStage  # noqa: F401  (registers example_lengths)

    cfg = micro_config(tmp_path / "run", corpus_file, ["example_lengths"])
    manifest = Runner(config_from_dict(cfg)).run()
    layer = tmp_path / "run" / manifest["stages"][0]["annotations"]["path"]
    layer.write_text(layer.read_text().replace(": 0", ": 2", 1))  # still valid JSON, one class changed
    cfg["stages"].append(pretrain(max_steps=2, save_steps=100))
    before = _tree(tmp_path / "run")
    with pytest.raises(SelftrainError, match="annotations of r1-01-example_lengths .*annotations.json is damaged: its contents differ"):
        Runner(config_from_dict(cfg)).run()
    assert _tree(tmp_path / "run") == before


def test_restart_forgets_the_checksums_of_what_it_drops(tmp_path, corpus_file):
    from typer.testing import CliRunner

    from selftrain.cli import app

    REGISTRY["leak"] = LeakStage
    try:
        cfg = micro_config(tmp_path / "run", corpus_file, [pretrain(max_steps=2, save_steps=100), "leak"])
        first = Runner(config_from_dict(cfg)).run()
        assert first["pool"] == "data/pool-r1-02-leak" and "stages/r1-01-pretrain/model" in first["checksums"]
        # the redone stages write anew; nothing recorded for the dropped ones may be left to fail --verify
        Runner(config_from_dict(cfg), restart_from="r1-01-pretrain").run()
    finally:
        REGISTRY.pop("leak")
    out = CliRunner().invoke(app, ["inspect", str(tmp_path / "run"), "--verify"])
    assert out.exit_code == 0 and "match their checksums" in out.output, out.output


def test_an_error_message_is_printed_as_written(tmp_path):
    """Messages quote paths and library errors ("[enforce fail at ...]", "stages[0]"): they are text,
    never console markup that would swallow them."""
    from typer.testing import CliRunner

    from selftrain.cli import app

    path = tmp_path / "[bold]run[/bold] [enforce fail at x.cc:1].yaml"
    out = CliRunner().invoke(app, ["run", str(path)])
    assert out.exit_code == 2 and str(path) in out.output.replace("\n", ""), out.output


def test_an_interrupted_stage_skipped_by_a_smaller_budget_is_skipped_in_its_place(tmp_path, corpus_file, monkeypatch):
    """Ctrl-C in stage 2, then a resume whose round budget is already spent: stage 2 is recorded as
    skipped where its interrupted attempt stood (not a second entry with the same key)."""
    from selftrain.training import callbacks

    cfg = micro_config(tmp_path / "run", corpus_file, [pretrain(max_steps=4, save_steps=100),
                                                      pretrain(max_steps=40, save_steps=100)])
    step_end = callbacks.ProgressReporter.on_step_end

    def ctrl_c_in_stage_two(self, args, state, control, **kw):
        if self.stage_key == "r1-02-pretrain" and state.global_step >= 2:
            raise KeyboardInterrupt
        return step_end(self, args, state, control, **kw)

    monkeypatch.setattr(callbacks.ProgressReporter, "on_step_end", ctrl_c_in_stage_two)
    with pytest.raises(KeyboardInterrupt):
        Runner(config_from_dict(cfg)).run()
    monkeypatch.setattr(callbacks.ProgressReporter, "on_step_end", step_end)
    assert [e["status"] for e in Workspace(tmp_path / "run").load_manifest()["stages"]] == ["accepted", "interrupted"]
    cfg["stop"] = {"round_max_steps": 3}  # stage 1 took 4: the round's budget is spent
    manifest = Runner(config_from_dict(cfg)).run()
    assert [(e["key"], e["status"]) for e in manifest["stages"]] == [("r1-01-pretrain", "accepted"),
                                                                     ("r1-02-pretrain", "skipped")]
    assert Workspace(tmp_path / "run").load_manifest()["status"] == "finished"  # and it loads


def test_restart_from_redoes_a_stage_whose_output_was_damaged(tmp_path, corpus_file):
    """The way out the message names works: --restart-from the stage that wrote the damaged file."""
    cfg = micro_config(tmp_path / "run", corpus_file, [pretrain(max_steps=2, save_steps=100),
                                                      pretrain(max_steps=2, save_steps=100)])
    manifest = Runner(config_from_dict(cfg)).run()
    weights = tmp_path / "run" / manifest["current_checkpoint"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    cfg["rounds"] = 2  # more work: a plain resume must read the damaged model, and refuses
    with pytest.raises(SelftrainError, match="r1-02-pretrain/model .*is damaged"):
        Runner(config_from_dict(cfg)).run()
    done = Runner(config_from_dict(cfg), restart_from="r1-02-pretrain").run()
    assert done["status"] == "finished" and [e["key"] for e in done["stages"]] == [
        "r1-01-pretrain", "r1-02-pretrain", "r2-01-pretrain", "r2-02-pretrain"]
