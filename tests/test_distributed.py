"""Many processes: ``torchrun --nproc_per_node=2 -m selftrain run`` on CPU (gloo) trains like one
process at the same global batch, and only rank 0 writes the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selftrain import distributed
from tests.conftest import make_corpus, micro_config, pretrain, write_config

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r and r.get("phase") != "eval"]


def test_two_processes_train_like_one_and_only_rank_zero_writes(tmp_path):
    (tmp_path / "corpus.txt").write_text(make_corpus())
    stages = [pretrain(max_steps=20, logging_steps=2, save_steps=10)]  # batch 8: 4 per rank under two
    for name in ("one", "two"):
        write_config(tmp_path / f"{name}.yaml", micro_config(tmp_path / name, tmp_path / "corpus.txt", stages,
                                                             eval={"samples": 4}))
    single = run([sys.executable, "-m", "selftrain", "run", "one.yaml"], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    double = run([*TORCHRUN, "-m", "selftrain", "run", "two.yaml"], tmp_path)
    assert double.returncode == 0, double.stderr[-3000:]

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(2, 21, 2))  # each step logged once
    assert one[0][1] - one[-1][1] > 1.0  # it learned
    for (_, a), (_, b) in zip(one, two):  # DDP averages the two half batches: the same gradient
        assert abs(a - b) <= 1e-3 * abs(a), (one, two)
    m1 = json.loads((tmp_path / "one" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert m2["status"] == "finished" and [e["decision"] for e in m2["stages"]] == ["accepted"]
    # held-out perplexity: each rank scored half the blocks, the sums were added up
    assert m2["final_metrics"]["heldout_ppl"] == pytest.approx(m1["final_metrics"]["heldout_ppl"], rel=1e-4)
    assert m2["final_metrics"]["heldout_tokens"] == m1["final_metrics"]["heldout_tokens"]
    assert not (tmp_path / "two" / ".ranks").exists()  # rank 1's scratch is gone
    assert (tmp_path / "two" / "report.md").is_file() and (tmp_path / "two" / "final" / "config.json").is_file()
    assert double.stderr.count("accepted: protect heldout_ppl") == 1  # rank 0 speaks for the run


def test_bad_input_on_rank_zero_stops_every_rank_with_one_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    write_config(tmp_path / "bad.yaml", micro_config(tmp_path / "run", tmp_path / "empty.txt", [pretrain()]))
    out = run([*TORCHRUN, "-m", "selftrain", "run", "bad.yaml"], tmp_path)
    assert out.returncode != 0
    ours = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(ours) == 1 and "empty" in ours[0], out.stderr  # said once, by rank 0
    assert "/selftrain/" not in out.stderr  # no traceback from our processes (torchrun prints its own summary)
    assert not (tmp_path / "run").exists()  # nothing left behind, not even the lock


def test_sharded_is_the_plain_call_in_one_process():
    assert distributed.world_size() == 1 and not distributed.active()
    assert distributed.sharded(lambda xs: [x * 2 for x in xs], [1, 2, 3]) == [2, 4, 6]
    assert distributed.all_sum([1.0, 2.0]) == [1.0, 2.0]
    assert distributed.main_path(Path("/r/.ranks/0/stages/k/model")) == Path("/r/stages/k/model")


def test_fsdp_and_deepspeed_launches_are_refused_clearly(tmp_path, monkeypatch):
    from selftrain.config import config_from_dict
    from selftrain.errors import SelftrainError
    from selftrain.runner import Runner

    (tmp_path / "corpus.txt").write_text(make_corpus())
    cfg = config_from_dict(micro_config(tmp_path / "run", tmp_path / "corpus.txt", [pretrain()]))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(SelftrainError, match="FSDP and DeepSpeed"):
        Runner(cfg).run()
    assert not (tmp_path / "run").exists()
