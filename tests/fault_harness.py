"""Fault injection: kill a run at random points inside every stage, resume it, and check that
nothing is lost or half-read. Also fills the disk (simulated) once per stage.

    python -m tests.fault_harness --kills-per-stage 2          # the quick form (CI)
    python -m tests.fault_harness --kills-per-stage 10 --seed 1  # the full form (-m slow)
    unshare -rm python -m tests.fault_harness --real-disk-full 3  # a real full disk (a 3 MB tmpfs)

1. A census run of a micro config with all eight stages lists every fault point it passes
   (``selftrain.faults``): training steps, evaluation and generation batches, each file written
   but not yet renamed, each directory between its two renames, pool loads.
2. A second run of the same config is then cut again and again: for every part of the run
   (set-up, each stage, the finish) N random points get a SIGKILL, each launch resuming the
   last, and one write inside each stage fails with "No space left on device".
3. After every cut, from outside: the manifest loads, everything it names verifies against its
   checksums; after a full disk also: exit code 2, one message, no traceback.
4. Finally a clean launch finishes the run: every stage once, the final model loads, no temp
   file is left, and its decisions match the uncut census run.

This process imports selftrain once and forks each launch (a fresh import costs ~10 s here);
nothing has run in it before the forks, so no thread is copied into a child. The last line of
output is a JSON summary (its counts go into RELIABILITY.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402

import selftrain.cli  # noqa: E402,F401  (imported once, before the forks)
import selftrain.runner  # noqa: E402,F401
from selftrain import integrity  # noqa: E402
from selftrain.workspace import TEMP_NAME, Workspace  # noqa: E402
from tests.conftest import MICRO_ARCH, make_corpus  # noqa: E402

DONE = ("accepted", "rolled_back", "failed", "skipped")
# speeds, durations, and where a resumed stage picked up: facts of one launch, not of the result
TIMING = re.compile(r"seconds|per_s$|resumed_from")
REL_TOL = 1e-5  # metrics of two runs of one config on one CPU: the promise (measured: equal to the last bit)


def micro_pipeline(base: Path) -> dict:
    """All eight stages, each cut down to seconds on a micro Llama."""
    (base / "corpus.txt").write_text(make_corpus(240))
    rows = [{"text": t, "label": "cat" if "cat" in t else "other"} for t in make_corpus(60, seed=1).split("\n\n")]
    (base / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (base / "task.yaml").write_text(json.dumps({
        "name": "cats", "output_type": "multiple_choice", "data": {"path": "rows.jsonl"},
        "doc_to_text": "{{text}}\nAbout a cat:", "doc_to_choice": ["cat", "other"], "doc_to_target": "label",
        "input_field": "text"}))
    return {
        "run": {"name": "faults", "output_dir": str(base / "run"), "seed": 0},
        "model": {"preset": "tiny", "vocab_size": 320, "architecture": dict(MICRO_ARCH)},
        "data": {"train": str(base / "corpus.txt"), "heldout_fraction": 0.1},
        "eval": {"max_tokens": 1024, "samples": 4, "max_new_tokens": 8, "block_size": 64},
        "guard": {"tolerance": 0.5},
        "stages": [
            {"pretrain": {"max_steps": 12, "block_size": 32, "batch_size": 8, "learning_rate": 3e-3,
                          "logging_steps": 2, "save_steps": 4}},
            {"cluster": {"embedder": "model", "k": 3, "dedup": {"semantic": None}}},
            {"augment": {"ops": ["swap", "delete"], "max_sources": 24, "max_per_source": 1}},
            {"curriculum": {"difficulty": ["length"], "max_steps": 6, "block_size": 32, "batch_size": 8}},
            {"adversarial": {"rounds": 2, "steps_per_round": 2, "learning_rate": 1e-3, "groups_per_step": 2,
                             "num_generations": 4, "completion_tokens": 8, "precision": "fp32", "eval_samples": 8,
                             "eval_tokens": 256, "synthesize": 8,
                             "discriminator": {"kind": "scratch", "pretrain_steps": 8, "pretrain_samples": 16,
                                               "calibration_texts": 8}}},
            {"selfplay": {"env": "spin", "num_prompts": 8, "prefix_tokens": 8, "continuation_tokens": 8,
                          "max_steps": 2, "batch_size": 4}},
            {"fewshot": {"task": str(base / "task.yaml"), "inputs": "task", "rounds": 1, "per_class": 4,
                         "eval_limit": 16, "train": {"max_steps": 2, "batch_size": 4}}},
            {"self_instruct": {"seed_tasks": [{"instruction": "Say where the cat is.", "response": "In the garden."}],
                               "num_pairs": 6, "max_batches": 1, "batch_size": 6,
                               "train": {"max_steps": 2, "batch_size": 2}}},
        ],
    }


# ---------------------------------------------------------------------------- one launch
def launch(config: Path, log: Path, fault: str | None = None, fault_log: Path | None = None) -> int:
    """`selftrain run CONFIG` in a forked child; its exit code, or -signal if a signal ended it."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ.pop("SELFTRAIN_FAULT", None)
            if fault:
                os.environ["SELFTRAIN_FAULT"] = fault
            if fault_log:
                os.environ["SELFTRAIN_FAULT_LOG"] = str(fault_log)
            sys.argv = ["selftrain", "run", str(config)]
            selftrain.cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


# ---------------------------------------------------------------------------- checks from outside
def check_state(run_dir: Path) -> list[str]:
    """What a cut may leave: no manifest yet (cut in set-up), or a manifest that loads and whose every
    named checkpoint, pool, annotation layer and artefact matches its checksums. Problems, or []."""
    ws = Workspace(run_dir)
    if not ws.exists():
        return []
    problems = []
    try:
        manifest = ws.load_manifest()
    except Exception as e:
        return [f"manifest: {e}"]
    named = {manifest["pool"], manifest["current_checkpoint"], "data/heldout"}
    for e in manifest["stages"]:
        if e["status"] == "accepted":
            named |= {p for kind in ("artefacts", "auxiliary") for p in (e.get(kind) or {}).values()}
            if e.get("annotations"):
                named.add(e["annotations"]["path"])
    for rel in sorted(named):
        if rel not in manifest.get("checksums", {}):
            problems.append(f"{rel}: no checksum recorded")
            continue
        try:
            integrity.verify(manifest, run_dir, rel, rel)
        except Exception as e:
            problems.append(str(e))
    ws.read_metrics()  # torn lines are skipped, never raised
    return problems


def check_finished(run_dir: Path, expected: list[str]) -> list[str]:
    """A finished run: each of the ``expected`` stages once, all decided, the final model whole, no
    temp file left, every stage in the report."""
    ws = Workspace(run_dir)
    manifest = ws.load_manifest()
    problems = check_state(run_dir)
    keys = [e["key"] for e in manifest["stages"]]
    if keys != expected:
        problems.append(f"stages {keys}, expected {expected}")
    if manifest["status"] != "finished" or any(e["status"] not in DONE for e in manifest["stages"]):
        problems.append(f"not finished: {manifest['status']}, {[e['status'] for e in manifest['stages']]}")
    try:
        integrity.verify(manifest, run_dir, "final", "final model")
    except Exception as e:
        problems.append(str(e))
    left = [str(p.relative_to(run_dir)) for p in run_dir.rglob(".*") if TEMP_NAME.fullmatch(p.name)]
    if left:
        problems.append(f"temp files left: {left}")
    html = (run_dir / "report.html").read_text() if (run_dir / "report.html").exists() else ""
    problems += [f"report lacks {k}" for k in keys if f'data-key="{k}"' not in html]
    return problems


def compare_runs(a_dir: Path, b_dir: Path, rel_tol: float) -> dict[str, list[str]]:
    """Stage by stage, what differs between two runs of one config: the decision, each held-out
    metric (beyond ``rel_tol``), the stage's own metrics, the rows it added to the pool and its
    annotations. {stage key: differences}."""
    import datasets

    a, b = Workspace(a_dir).load_manifest(), Workspace(b_dir).load_manifest()
    pool_a, pool_b = (datasets.load_from_disk(str(d / m["pool"])) for d, m in ((a_dir, a), (b_dir, b)))
    out = {}
    for x, y in zip(a["stages"], b["stages"], strict=True):
        diffs = []
        if x.get("decision") != y.get("decision"):
            diffs.append(f"decision {x.get('decision')} vs {y.get('decision')}")
        for field in ("metrics_after", "stage_metrics"):
            u, v = dict(x.get(field) or {}), dict(y.get(field) or {})
            if u.get("resumed_from_step") != v.get("resumed_from_step"):
                # Trainer's train_loss averages the steps of the launch that finished; the loss curve is whole
                u.pop("train_loss", None), v.pop("train_loss", None)
            diffs += _differences(field, u, v, rel_tol)
        rows_a = [(i, t) for i, t, s in zip(pool_a["id"], pool_a["text"], pool_a["stage"]) if s == x["key"]]
        rows_b = [(i, t) for i, t, s in zip(pool_b["id"], pool_b["text"], pool_b["stage"]) if s == y["key"]]
        if rows_a != rows_b:
            diffs.append(f"pool rows added: {len(rows_a)} vs {len(rows_b)}, not the same")
        ann = [json.loads((d / e["annotations"]["path"]).read_text()) if e.get("annotations") else None
               for d, e in ((a_dir, x), (b_dir, y))]
        if ann[0] != ann[1]:
            diffs.append("annotations differ")
        out[x["key"]] = diffs
    return out


def _differences(where: str, u, v, rel_tol: float) -> list[str]:
    if isinstance(u, dict) and isinstance(v, dict):
        return [d for k in u.keys() | v.keys() if not TIMING.search(str(k))
                for d in _differences(f"{where}.{k}", u.get(k), v.get(k), rel_tol)]
    if isinstance(u, list) and isinstance(v, list) and len(u) == len(v):
        return [d for i, (p, q) in enumerate(zip(u, v)) for d in _differences(f"{where}[{i}]", p, q, rel_tol)]
    if isinstance(u, (int, float)) and isinstance(v, (int, float)) and not isinstance(u, bool):
        return [] if u == v or abs(u - v) <= rel_tol * max(abs(u), abs(v)) else [f"{where} {u} vs {v}"]
    return [] if u == v else [f"{where} {u!r} vs {v!r}"[:300]]


# ---------------------------------------------------------------------------- the harness
def plan_cuts(hits: list[tuple[str, str]], per_part: int, rng: random.Random) -> list[tuple[str, str, str, int]]:
    """Per part of the run, ``per_part`` kills at random points: a kind of point first (train, eval,
    generate, data, write, save, append), so that rare kinds are hit as often as training steps,
    then a point of that kind, then a random one of its hits. In every stage, one full disk at a
    random write. Returned in the order the uncut run met them: (action, part, point, n)."""
    order = {}  # (part, point, n) -> position in the uncut run
    seen: Counter = Counter()
    for i, hit in enumerate(hits):
        seen[hit] += 1
        order[(*hit, seen[hit])] = i
    cuts = []
    for part in dict.fromkeys(part for part, _ in hits):
        names = sorted({p for q, p in hits if q == part})
        kinds = sorted({n.split(":")[0] for n in names})
        for _ in range(per_part):
            kind = rng.choice(kinds)
            name = rng.choice([n for n in names if n.split(":")[0] == kind])
            cuts.append(("kill", part, name, rng.randint(1, seen[part, name])))
        writes = [n for n in names if n.split(":")[0] in ("write", "save")]
        if part not in ("setup", "finish") and writes:
            name = rng.choice(writes)
            cuts.append(("enospc", part, name, rng.randint(1, seen[part, name])))
    return sorted(set(cuts), key=lambda c: order[c[1:]])


def finished_parts(run_dir: Path) -> set[str]:
    ws = Workspace(run_dir)
    if not ws.exists():
        return set()
    manifest = ws.load_manifest()
    return {"setup", *(e["key"] for e in manifest["stages"] if e["status"] in DONE)} | (
        {"finish"} if manifest["status"] == "finished" else set())


def real_disk_full(base: Path, megabytes: float = 2) -> dict:
    """A real full disk: the run lives on a small tmpfs (2 MB) (mounted here, so run this under
    ``unshare -rm``), which fills during the run; then the tmpfs grows and the same command resumes."""
    import subprocess

    cfg = micro_pipeline(base)
    disk = base / "disk"
    disk.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(megabytes * 1024)}k", "selftrain-full", str(disk)],
                   check=True)
    cfg["run"]["output_dir"] = str(disk / "run")
    (base / "disk.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    rc = launch(base / "disk.yaml", base / "disk-full.log")
    text = (base / "disk-full.log").read_text(errors="replace")
    problems = [] if rc == 2 and "no space left on device" in text.lower() and "Traceback" not in text else [
        f"full disk: rc {rc}, expected 2 with one message\n{text[-3000:]}"]
    problems += check_state(disk / "run")
    state = finished_parts(disk / "run")
    subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)
    rc = launch(base / "disk.yaml", base / "disk-resumed.log")
    if rc != 0:
        problems.append(f"resumed on a larger disk: rc {rc}\n{(base / 'disk-resumed.log').read_text()[-3000:]}")
    else:
        expected = [f"r1-{i:02d}-{next(iter(s)) if isinstance(s, dict) else s}" for i, s in enumerate(cfg["stages"], 1)]
        problems += check_finished(disk / "run", expected)
    summary = {"real_disk_full": True, "finished_before_the_disk_filled": sorted(state), "problems": problems,
               "message": next((line for line in text.splitlines() if "no space left" in line.lower()), None)}
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills-per-stage", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    ap.add_argument("--real-disk-full", type=float, nargs="?", const=2, default=None, metavar="MB",
                    help="instead: fill a real tmpfs of MB megabytes (run under unshare -rm)")
    args = ap.parse_args(argv)
    base = args.work or Path(tempfile.mkdtemp(prefix="selftrain-faults-"))
    base.mkdir(parents=True, exist_ok=True)
    if args.real_disk_full is not None:
        return real_disk_full(base, args.real_disk_full)
    rng = random.Random(args.seed)
    start = time.time()

    # 1. the census (and the uncut reference)
    cfg = micro_pipeline(base)
    census_cfg = {**cfg, "run": {**cfg["run"], "output_dir": str(base / "census")}}
    (base / "census.yaml").write_text(yaml.safe_dump(census_cfg, sort_keys=False))
    (base / "run.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    census_log = base / "census.points"
    census_log.unlink(missing_ok=True)
    rc = launch(base / "census.yaml", base / "census.log", "census", census_log)
    if rc != 0:
        raise SystemExit(f"the census run failed (rc {rc}): {(base / 'census.log').read_text()[-3000:]}")
    hits = [tuple(line.split("\t")) for line in census_log.read_text().splitlines()]
    census = Workspace(base / "census").load_manifest()

    # determinism: the same config again, uncut, in another directory; compared stage by stage
    twin_cfg = {**cfg, "run": {**cfg["run"], "output_dir": str(base / "twin")}}
    (base / "twin.yaml").write_text(yaml.safe_dump(twin_cfg, sort_keys=False))
    rc = launch(base / "twin.yaml", base / "twin.log")
    determinism = compare_runs(base / "census", base / "twin", REL_TOL) if rc == 0 else {"twin": [f"rc {rc}"]}

    # 2. the cut run
    cuts = plan_cuts(hits, args.kills_per_stage, rng)
    outcomes, problems, by_point = Counter(), [], Counter()
    for i, (action, part, name, nth) in enumerate(cuts):
        if part in finished_parts(base / "run"):  # an earlier cut landed after this part was committed
            outcomes[f"{'kill' if action == 'kill' else 'disk full'} not run: its part had finished"] += 1
            continue
        log = base / f"launch-{i:03d}.log"
        rc = launch(base / "run.yaml", log, f"{action}@{part}/{name}#{nth}")
        text = log.read_text(errors="replace")
        if action == "kill":
            at_end = "/(end)" in text  # the point came fewer times in this launch: cut at the part's end
            outcomes[("killed at the part's end" if at_end else "killed at the point") if rc == -signal.SIGKILL
                     else f"kill: rc {rc}"] += 1
            if rc == -signal.SIGKILL:
                by_point["(end of part)" if at_end else name.split(":")[0]] += 1
            if rc not in (-signal.SIGKILL, 0):
                problems.append(f"launch {i} ({part}/{name}#{nth}): rc {rc}\n{text[-2000:]}")
        else:
            ok = rc == 2 and "no space left on device" in text.lower() and "Traceback" not in text
            outcomes["disk full: clear exit 2" if ok else f"disk full: rc {rc}"] += 1
            if not ok:
                problems.append(f"launch {i} (disk full at {part}/{name}#{nth}): rc {rc}\n{text[-2000:]}")
        problems += [f"after launch {i} ({action} {part}/{name}#{nth}): {p}" for p in check_state(base / "run")]
        if rc == 0:  # the run finished before this cut: later cuts have nothing left to cut
            outcomes["finished early"] += 1
            break

    # 3. the end
    rc = launch(base / "run.yaml", base / "final.log")
    if rc != 0:
        problems.append(f"the final launch failed (rc {rc}): {(base / 'final.log').read_text()[-3000:]}")
    else:
        problems += check_finished(base / "run", [e["key"] for e in census["stages"]])
        # killed a dozen times and resumed, it ends exactly where the uncut run did
        problems += [f"cut run vs uncut, {key}: {d}" for key, diffs in compare_runs(base / "census", base / "run",
                                                                                    REL_TOL).items() for d in diffs]
    if not problems:  # the final model loads with plain transformers (imported only now: after the forks)
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(base / "run" / "final")
    summary = {"fault_injection": True, "parts": len({c[1] for c in cuts}), "kills_planned": sum(c[0] == "kill" for c in cuts),
               "disk_full_planned": sum(c[0] == "enospc" for c in cuts), "outcomes": dict(outcomes),
               "kills_by_point": dict(by_point), "census_points": len(hits), "launches": len(cuts) + 2,
               "determinism": determinism, "determinism_rel_tol": REL_TOL, "problems": problems, "seconds": round(time.time() - start, 1), "work": str(base)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    result = main()
    sys.exit(1 if result["problems"] or any(result.get("determinism", {}).values()) else 0)
