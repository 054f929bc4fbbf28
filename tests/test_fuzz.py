"""Fuzzing what a user hands selftrain, with hypothesis: config files (bytes, text, YAML bombs, a
valid config with values swapped for junk), corpora, task files, model directories, run names
that try to leave the output folder, and a finished run's manifest edited by hand.

Every case must end in one of two ways: success, or exit code 2 with one ``error:`` line and no
traceback. A run directory that did not exist is not left behind; one that did keeps every file
its manifest names intact. The quick form runs in CI (a few hundred cases, derandomised so CI
sees the same ones); ``-m slow`` runs ten times as many.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from selftrain.cli import app
from selftrain.config import config_from_dict
from selftrain.errors import SelftrainError
from tests.conftest import make_corpus, micro_config, micro_lm, pretrain
from tests.fault_harness import check_state, micro_pipeline

SIZES = [pytest.param(1, id="quick"), pytest.param(10, id="full", marks=pytest.mark.slow)]
COUNTS: dict[str, int] = {}  # cases run per fuzz target, for RELIABILITY.md (printed with -s)
cli = CliRunner()


def fuzz(strategy, check, examples: int, name: str) -> None:
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(case):
        COUNTS[name] = COUNTS.get(name, 0) + 1
        check(case)

    run()
    print(f"fuzz {name}: {COUNTS[name]} cases")  # with -s: the counts RELIABILITY.md quotes


def invoke(*args) -> tuple[int, str]:
    """The CLI, in this process. Returns (exit code, everything it printed); fails on a traceback."""
    result = cli.invoke(app, [str(a) for a in args])
    out = result.output
    if result.exit_code not in (0, 2) or (result.exception and not isinstance(result.exception, SystemExit)):
        import traceback

        tb = "".join(traceback.format_exception(result.exception)) if result.exception else ""
        pytest.fail(f"selftrain {' '.join(map(str, args))}: exit {result.exit_code}\n{out[-2000:]}\n{tb[-4000:]}")
    assert "Traceback" not in out, out[-3000:]
    if result.exit_code == 2:
        assert out.count("error:") == 1 or out.count("Error") == 1, out[-3000:]  # ours, or a usage error
    return result.exit_code, out


# ---------------------------------------------------------------------------- config files
@pytest.fixture(scope="module")
def base_config(tmp_path_factory) -> dict:
    return micro_pipeline(tmp_path_factory.mktemp("fuzz-base"))


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(), st.text(max_size=40),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
    st.sampled_from(["../../../etc/passwd", "/", "~", "..", "x\x00y", "1e309", "nan", ".inf", "-1", "",
                     "builtin:nope", "stages", "a" * 5000]))


def _paths(node, at=()):
    yield at
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*at, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*at, i))


@st.composite
def mutated_configs(draw, base: dict) -> str:
    """The valid micro config with 1-3 changes: a value replaced by junk, a key removed, a key added."""
    cfg = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from([p for p in _paths(cfg) if p]))
        parent = cfg
        try:
            for part in path[:-1]:
                parent = parent[part]
            action = draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace":
                parent[path[-1]] = draw(JUNK)
            elif action == "delete":
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[draw(st.text(min_size=1, max_size=12))] = draw(JUNK)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed the path
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)


def yaml_bomb(levels: int, width: int) -> str:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\nrun: {name: bomb}\n"


CONFIG_TEXTS = st.one_of(
    st.binary(max_size=300).map(lambda b: ("bytes", b)),
    st.text(max_size=300).map(lambda t: ("text", t.encode("utf-8", "surrogatepass"))),
    st.tuples(st.integers(4, 9), st.integers(4, 10)).map(lambda lw: ("bomb", yaml_bomb(*lw).encode())),
    st.integers(200, 1200).map(lambda d: ("deep", ("x: " + "[" * d + "]" * d).encode())),
    st.sampled_from([b"x: &x [*x]", b"\xff\xfe\x00r\x00u\x00n", b"", b"---\n---\n", b"run: !!python/object:os.system {}",
                     b"- just\n- a list\n", b"\x00" * 64]).map(lambda b: ("fixed", b)),
)


@pytest.mark.parametrize("size", SIZES)
def test_fuzzed_config_files_fail_with_one_message(tmp_path, size):
    path = tmp_path / "config.yaml"

    def check(case):
        kind, data = case
        path.write_bytes(data)
        code, out = invoke("config", path)
        assert code == 2, (kind, data[:200], out[-500:])  # none of these is a config

    fuzz(CONFIG_TEXTS, check, 60 * size, "config files (bytes, text, bombs, nesting)")


@pytest.mark.parametrize("size", SIZES)
def test_a_valid_config_with_junk_values_is_checked_or_refused_in_one_message(tmp_path, base_config, size):
    path = tmp_path / "config.yaml"

    def check(text):
        path.write_text(text)
        invoke("config", path)  # exit 0 (still valid) or 2 (one message): never a traceback

    fuzz(mutated_configs(base_config), check, 150 * size, "configs with junk values")


NAME_PARTS = st.sampled_from(["..", ".", "/", "a", "~", "\\", "\x00", " ", "runs", "..%2f", "\n", "*"])


@pytest.mark.parametrize("size", SIZES)
def test_a_run_name_never_leads_outside_the_output_folder(tmp_path, corpus_file, size):
    runs = Path("runs").resolve()  # without run.output_dir a run lives in runs/<name>

    def check(parts):
        name = "".join(parts)
        cfg = micro_config(tmp_path / "out", corpus_file, [pretrain()])
        cfg["run"] = {"name": name}
        try:
            run_dir = config_from_dict(cfg).run_dir.resolve()
        except SelftrainError:
            return
        assert run_dir.is_relative_to(runs) and run_dir != runs, name

    fuzz(st.lists(NAME_PARTS, min_size=1, max_size=6), check, 60 * size, "run names")


# ---------------------------------------------------------------------------- corpora
CORPORA = st.one_of(
    st.binary(min_size=0, max_size=2000).map(lambda b: ("binary", b)),
    st.binary(max_size=200).map(lambda b: ("invalid utf-8", b"the cat sat " + b"\xff\xc3(" + b)),
    st.integers(100_000, 3_000_000).map(lambda n: ("one enormous line", (b"cat " * (n // 4))[:n])),
    st.sampled_from([b"", b"   \n\n\t\n", b"cat", b"cat\n\ncat\n\n", b"\x00\x00\x00the cat\n"]).map(lambda b: ("tiny", b)),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=400).map(lambda t: ("text", t.encode())),
)


@pytest.mark.parametrize("size", SIZES)
def test_fuzzed_corpora_train_or_fail_with_one_message_and_leave_nothing(size):
    def check(case):
        kind, data = case
        with tempfile.TemporaryDirectory() as d:
            corpus = Path(d) / "corpus.txt"
            corpus.write_bytes(data)
            cfg = micro_config(Path(d) / "out", corpus, [pretrain(max_steps=2, save_steps=100)],
                               eval={"samples": 0, "max_tokens": 256})
            cfg["run"]["output_dir"] = str(Path(d) / "out")
            (Path(d) / "c.yaml").write_text(yaml.safe_dump(cfg))
            code, out = invoke("run", Path(d) / "c.yaml")
            run_dir = config_from_dict(cfg).run_dir
            if code == 2:
                assert not run_dir.exists(), (kind, out[-500:])  # bad input leaves nothing behind
            else:
                assert json.loads((run_dir / "manifest.json").read_text())["status"] == "finished"

    fuzz(CORPORA, check, 25 * size, "corpora")


# ---------------------------------------------------------------------------- task files
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from selftrain.modeling.factory import train_tokenizer

    folder = tmp_path_factory.mktemp("fuzz-model") / "model"
    tok = train_tokenizer(make_corpus(60).split("\n\n"), 320)
    micro_lm(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


TASK_FIELDS = {"name": "t", "output_type": "multiple_choice", "data": {"path": "rows.jsonl"},
               "doc_to_text": "{{text}}\nAnswer:", "doc_to_choice": ["a", "b"], "doc_to_target": "label"}
ROWS = st.one_of(
    st.just('{"text": "x", "label": "a"}\n{"text": "y", "label": "b"}\n'),
    st.text(max_size=200),
    st.lists(st.dictionaries(st.sampled_from(["text", "label", "x"]), JUNK, max_size=3), max_size=4).map(
        lambda rows: "".join(json.dumps(r) + "\n" for r in rows)),
)


@st.composite
def task_cases(draw):
    spec = copy.deepcopy(TASK_FIELDS)
    for key in draw(st.lists(st.sampled_from(sorted(TASK_FIELDS)), max_size=3, unique=True)):
        if draw(st.booleans()):
            spec[key] = draw(JUNK)
        else:
            del spec[key]
    if draw(st.booleans()):
        spec["data"] = {"path": draw(st.sampled_from(["rows.jsonl", "../../etc/passwd", "/etc/hostname", "missing.jsonl",
                                                      ".", "rows.jsonl/x"]))}
    text = draw(st.one_of(st.just(yaml.safe_dump(spec, allow_unicode=True)), st.text(max_size=100),
                          st.binary(max_size=100).map(lambda b: b.decode("latin-1"))))
    return text, draw(ROWS)


@pytest.mark.parametrize("size", SIZES)
def test_fuzzed_task_files_score_or_fail_with_one_message(model_dir, size):
    def check(case):
        spec, rows = case
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "task.yaml").write_text(spec, encoding="utf-8", errors="surrogateescape")
            (Path(d) / "rows.jsonl").write_text(rows, encoding="utf-8", errors="surrogateescape")
            invoke("eval", model_dir, "--task", Path(d) / "task.yaml", "--limit", "2", "--output", Path(d) / "s.json")

    fuzz(task_cases(), check, 60 * size, "task files")


# ---------------------------------------------------------------------------- model directories
MODEL_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]


@st.composite
def damaged_models(draw):
    removed = draw(st.lists(st.sampled_from(MODEL_FILES), max_size=3, unique=True))
    corrupted = draw(st.lists(st.tuples(st.sampled_from(MODEL_FILES), st.sampled_from(["truncate", "garbage", "empty"])),
                              max_size=2))
    return removed, corrupted


@pytest.mark.parametrize("size", SIZES)
def test_damaged_model_directories_fail_with_one_message(model_dir, corpus_file, size):
    def check(case):
        removed, corrupted = case
        with tempfile.TemporaryDirectory() as d:
            folder = Path(d) / "m"
            shutil.copytree(model_dir, folder)
            for name in removed:
                (folder / name).unlink(missing_ok=True)
            for name, how in corrupted:
                f = folder / name
                if f.exists():
                    data = f.read_bytes()
                    f.write_bytes(data[:len(data) // 3] if how == "truncate" else b"\x93NUMPY\xff" * 9 if how == "garbage"
                                  else b"")
            invoke("eval", folder, "--data", corpus_file, "--max-tokens", "128", "--samples", "0",
                   "--output", Path(d) / "s.json")

    fuzz(damaged_models(), check, 30 * size, "model directories")


# ---------------------------------------------------------------------------- a finished run, edited by hand
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz-run")
    corpus = base / "corpus.txt"
    corpus.write_text(make_corpus())
    cfg = micro_config(base / "run", corpus, [pretrain(max_steps=3, save_steps=100)], eval={"samples": 0})
    path = base / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert invoke("run", path)[0] == 0
    return base / "run", path  # micro_config: run.output_dir is the run directory


@st.composite
def edited_manifests(draw, manifest: dict):
    m = copy.deepcopy(manifest)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from([p for p in _paths(m) if p and p[0] != "checksums"]))
        parent = m
        try:
            for part in path[:-1]:
                parent = parent[part]
            if draw(st.booleans()):
                parent[path[-1]] = draw(st.one_of(JUNK, st.sampled_from(["../../outside", "/etc", "stages/../../x"])))
            else:
                del parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue
    return json.dumps(m)


@pytest.mark.parametrize("size", SIZES)
def test_a_hand_edited_manifest_is_resumed_or_refused_and_its_files_stay_whole(finished_run, size):
    run_dir, config = finished_run
    original = (run_dir / "manifest.json").read_text()

    def check(text):
        with tempfile.TemporaryDirectory() as d:
            copy_dir = Path(d) / "run"
            shutil.copytree(run_dir, copy_dir)
            (copy_dir / "manifest.json").write_text(text)
            cfg = yaml.safe_load(config.read_text())
            cfg["run"]["output_dir"] = str(copy_dir)
            (Path(d) / "c.yaml").write_text(yaml.safe_dump(cfg))
            for command in (["inspect", copy_dir], ["report", copy_dir], ["run", Path(d) / "c.yaml"]):
                invoke(*command)
            (copy_dir / "manifest.json").write_text(original)  # the files the true manifest names: untouched
            assert check_state(copy_dir) == []

    fuzz(edited_manifests(json.loads(original)), check, 40 * size, "hand-edited manifests")
