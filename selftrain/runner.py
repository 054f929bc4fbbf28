"""Rounds x stages, with a guard after each stage and resume from the manifest.

The run lock is taken first. Set-up then reads the data, builds the model and runs every
stage's preflight *before* anything is written, so bad input never leaves a half-made or
damaged run behind. Each stage then runs from the last accepted checkpoint; the same held-out
evaluation follows (part of the stage's attempt: a model that breaks it fails the stage); the
guard accepts it or rolls it back; and only then is the manifest (the single source of truth)
rewritten atomically. Running the same command again skips finished stages and restarts an
interrupted one (pretrain itself resumes from its last Trainer checkpoint). Resuming checks the
config per stage: run-level sections and finished stages must match, stages still to run may
change, and ``restart_from`` redoes a stage and every one after it.

Under ``torchrun`` / ``accelerate launch`` every rank runs every stage (the trainers need them
all) and rank 0 alone sets up, resumes and writes the run (see ``selftrain.distributed``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
import traceback
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.markup import escape

from selftrain import distributed, faults, integrity, stopping
from selftrain.config import RunConfig
from selftrain.data.arrowfile import text_batches
from selftrain.data.pool import Pool, plain_annotations, prepare_corpus
from selftrain.data.scrub import scrub_examples
from selftrain.errors import DiskFull, SelftrainError, disk_full
from selftrain.evaluation import evaluate, sample_prompts
from selftrain.guard import best_values, judge
from selftrain.modeling.factory import (
    build_initial,
    count_parameters,
    load_checkpoint,
    save_checkpoint,
)
from selftrain.progress import PROGRESS_FILE, StageLog
from selftrain.sandbox import require_isolation
from selftrain.stages import (
    REGISTRY,
    RunState,
    StageResult,
    StageSpec,
    stage_fingerprint,
    stage_specs,
)
from selftrain.training.arguments import report_to_value
from selftrain.workspace import (
    MANIFEST_VERSION,
    TEMP_NAME,
    Workspace,
    atomic_write_json,
    atomic_write_text,
    replace_dir,
)

DONE = ("accepted", "rolled_back", "failed", "skipped")
SETUP_FILES = {".lock", "config.yaml", "data", "checkpoints", "metrics.jsonl", ".ranks"}
# What an attempt records about its outcome; cleared when the stage is tried again.
OUTCOME = ("decision", "reason", "checks", "metrics_after", "stage_metrics", "checkpoint", "checkpoint_deleted",
           "seconds", "eval_seconds", "steps", "finished", "pool_added", "pool_dropped_by_cap", "annotations",
           "artefacts", "auxiliary", "auxiliary_deleted", "scrubbed")


class Runner:
    def __init__(self, config: RunConfig, console: Console | None = None, *, restart_from: str | None = None,
                 config_path: str | Path | None = None):
        self.cfg = config
        self.specs = stage_specs(config)  # every stage's options validated before anything is touched
        self.restart_from = restart_from
        self.command = f"selftrain run {config_path or 'CONFIG'}"  # for the hints in error messages
        self.ws = Workspace(config.run_dir)
        self.console = console or Console(stderr=True, quiet=not distributed.is_main())
        dev = config.run.device
        if dev == "cuda" and not torch.cuda.is_available():
            raise SelftrainError("run.device=cuda but no CUDA device is available")
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev

    def rounds(self) -> int:
        """The most rounds this config can run (``rounds: auto`` stops earlier, see ``stopping``)."""
        return self.cfg.stop.max_rounds if self.cfg.rounds == "auto" else self.cfg.rounds

    def plan(self) -> list[tuple[str, int, int, StageSpec]]:
        """Every stage execution this config asks for, in order: (key, round, index, spec)."""
        return [(f"r{rnd}-{idx:02d}-{spec.name}", rnd, idx, spec)
                for rnd in range(1, self.rounds() + 1) for idx, spec in enumerate(self.specs, 1)]

    # ------------------------------------------------------------------ entry point
    def run(self) -> dict:
        root = self.ws.root
        if root.exists() and not self.ws.exists() and (not root.is_dir() or any(
                p.name not in SETUP_FILES and not TEMP_NAME.fullmatch(p.name) for p in root.iterdir())):
            # checked before locking: never put a lock file into someone else's folder
            raise SelftrainError(f"{root} exists and is not a selftrain run directory; choose another run.output_dir")
        if self.restart_from and not self.ws.exists():
            raise SelftrainError(f"--restart-from {self.restart_from}: {root} holds no run to restart")
        if os.environ.get("ACCELERATE_USE_FSDP") == "true" or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
            raise SelftrainError("FSDP and DeepSpeed launches are not supported yet: a sharded model must be gathered "
                                 "by every rank before rank 0 saves it, and the stages save on rank 0 alone. Use "
                                 "DDP (torchrun, or configs/accelerate/ddp.yaml)")
        distributed.init()
        try:
            return self._locked_run()
        except Exception as e:
            if disk_full(e) and not isinstance(e, SelftrainError):
                raise DiskFull(f"no space left on device for {root}: a write failed ({type(e).__name__}: {e}). "
                               "Every write is atomic, so the run is as it was last saved; free space, then run "
                               "the same command again to resume") from None
            raise

    def _locked_run(self) -> dict:
        # rank 0 holds the lock; the other ranks of its launch work under it
        with self.ws.locked() if distributed.is_main() else nullcontext():
            # before set-up: a second process is refused whatever this one is doing
            manifest = distributed.on_main(self._start)
            if not distributed.is_main():  # what an earlier launch of this rank left
                shutil.rmtree(self.ws.scratch_dir, ignore_errors=True)
            manifest = self._stages(manifest)
            distributed.on_main(lambda: self._finish(manifest))
            distributed.barrier()  # every rank is done with its scratch before rank 0 removes them all
            if distributed.is_main():
                shutil.rmtree(self.ws.root / ".ranks", ignore_errors=True)
        return manifest

    def _start(self) -> dict:
        self.ws.clean_temp()
        faults.in_stage("resume" if self.ws.exists() else "setup")
        return self._resume() if self.ws.exists() else self._setup()

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> dict:
        corpus_dir = self.ws.data_dir / ".corpus.tmp"  # the streamed documents, until the pool is saved
        try:
            return self._set_up(corpus_dir)
        finally:  # bad input leaves nothing behind
            shutil.rmtree(corpus_dir, ignore_errors=True)
            if self.ws.data_dir.is_dir() and not any(self.ws.data_dir.iterdir()):
                self.ws.data_dir.rmdir()

    def _set_up(self, corpus_dir: Path) -> dict:
        cfg, con = self.cfg, self.console
        con.print(f"[bold]loading data[/] {cfg.data.train}")
        train, heldout, stats = prepare_corpus(cfg.data, cfg.run.seed, work_dir=corpus_dir)
        con.print(f"  {stats['train_documents']} train / {stats['heldout_documents']} held-out documents "
                  f"({stats['train_chars'] / 1e6:.2f} MB train)")
        con.print(f"[bold]building model[/] {cfg.model.preset or cfg.model.pretrained}")
        # lazy views of the memory-mapped corpus: a corpus larger than memory is never a list
        train_texts, heldout_texts = train["text"], Pool(heldout).spread_texts(cfg.eval.max_documents)
        model, tokenizer, kind = build_initial(cfg.model, (t for b in text_batches(train) for t in b), cfg.run.seed)
        con.print(f"  {type(model).__name__}, {count_parameters(model) / 1e6:.2f}M parameters, "
                  f"vocab {len(tokenizer)}")
        self._preflight(self.specs, model, tokenizer, kind, train_texts)  # reject bad input before writing
        con.print("[bold]evaluating the starting model[/] on held-out text")
        baseline, samples = evaluate(model.to(self.device), tokenizer, heldout_texts, cfg.eval, kind=kind,
                                     seed=cfg.run.seed)
        # the prompts every evaluation's samples continue: the report shows them before and after
        prompts = sample_prompts(heldout_texts, tokenizer, cfg.eval.samples, cfg.eval.prompt_tokens)[:4] \
            if kind == "causal" and cfg.eval.samples > 0 else []
        self._check_metric_names(baseline)
        self.ws.metrics_path.unlink(missing_ok=True)  # left by a set-up that was interrupted
        atomic_write_text(self.ws.config_path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        Pool(train).save(self.ws.data_dir / "pool")
        Pool(heldout).save(self.ws.data_dir / "heldout")
        initial = save_checkpoint(model.cpu(), tokenizer, self.ws.root / "checkpoints" / "initial")
        self.ws.log_metrics({"stage": "initial", "phase": "eval", **baseline})
        manifest = {
            "version": MANIFEST_VERSION, "run_name": cfg.run.name, "status": "running",
            "run_fingerprints": cfg.run_fingerprints(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "model_kind": kind, "device": self.device, "data": stats,
            "initial_checkpoint": self.ws.rel(initial), "current_checkpoint": self.ws.rel(initial),
            "pool": "data/pool", "baseline_metrics": baseline, "accepted_metrics": baseline,
            "initial_samples": samples[:4], "sample_prompts": prompts, "stages": [],
            "eval_documents": cfg.eval.max_documents,  # the held-out texts every evaluation of this run reads
        }
        for rel in ("data/pool", "data/heldout", manifest["initial_checkpoint"]):
            integrity.record(manifest, self.ws.root, rel)
        self.ws.save_manifest(manifest)
        return manifest

    def _check_metric_names(self, baseline: dict) -> None:
        """guard.metric, guard.protect and every stage's target must be metrics the evaluation computes:
        a typo is refused now, not after a stage has run and been rolled back for it."""
        named = [("guard.metric", self.cfg.guard.metric), *(("guard.protect", m) for m in self.cfg.guard.protect),
                 *((f"stages[{i}].{spec.name}.target", spec.config.target) for i, spec in enumerate(self.specs)
                   if spec.config.target is not None)]
        for where, name in named:
            if name not in baseline:
                raise SelftrainError(f"{where} {name!r} is not a metric the evaluation computes; it computes: "
                                     f"{', '.join(sorted(k for k in baseline if not k.startswith('diverged')))}")

    def _preflight(self, specs, model, tokenizer, kind: str, train_texts: Sequence[str]) -> None:
        report_to_value(self.cfg.run.report_to)  # a missing tracker package is refused now, not mid-run
        for spec in specs:
            stage = REGISTRY[spec.name]()
            if stage.requires_causal and kind != "causal":
                raise SelftrainError(f"stage {spec.name} generates or scores continuations with a causal LM; this "
                                     f"run's model is a {kind} LM")
            stage.preflight(spec.config, model=model, tokenizer=tokenizer, kind=kind, train_texts=train_texts)
            if stage.runs_model_code(spec.config):  # refused here, not hours into the run
                require_isolation(self.cfg.sandbox.min_isolation)

    # ------------------------------------------------------------------ resume
    def _resume(self) -> dict:
        """Check the config against the run, preflight the stages still to run, and only then
        change anything (restart, config snapshot). Everything here fails before a write."""
        ws, cfg = self.ws, self.cfg
        manifest = ws.load_manifest()
        entries, cut = manifest["stages"], len(manifest["stages"])
        if self.restart_from:
            keys = [e["key"] for e in entries]
            if self.restart_from not in keys:
                raise SelftrainError(f"--restart-from {self.restart_from}: no such stage in {ws.root}; "
                                     f"its stages are {', '.join(keys) or 'none yet'}")
            cut = keys.index(self.restart_from)
        self._check_config(manifest, entries[:cut])
        self._check_metric_names(manifest["baseline_metrics"])
        finished = {e["key"] for e in entries[:cut] if e["status"] in DONE}
        todo = [spec for key, _, _, spec in self.plan() if key not in finished]
        # what the run reads next, checked before anything changes: the run as it will be after a restart
        # (whose damaged later stages the restart is there to redo), with the current pool it filters
        view = manifest if cut == len(entries) else {**manifest, "stages": entries[:cut],
                                                     "current_checkpoint": entries[cut]["start_checkpoint"]}
        problem = self._input_problem(view, also=["data/pool"])
        if problem:
            raise SelftrainError(problem)
        if todo:
            model, tokenizer = load_checkpoint(ws.abs(view["current_checkpoint"]), manifest["model_kind"])
            train_texts = Pool.load(ws.data_dir / "pool").text_view()
            self._preflight(todo, model, tokenizer, manifest["model_kind"], train_texts)
            del model
        # valid: from here on the run is changed
        if cut < len(entries):
            self._restart(manifest, cut)
        planned = {key for key, *_ in self.plan()}
        gone = [e for e in manifest["stages"] if e["key"] not in planned]  # unfinished, no longer asked for
        for e in gone:
            manifest["stages"].remove(e)
            shutil.rmtree(ws.stage_dir(e["key"]), ignore_errors=True)
        ws.drop_metrics({e["key"] for e in gone})
        fingerprints = {key: stage_fingerprint(spec) for key, _, _, spec in self.plan()}
        for e in manifest["stages"]:
            e.setdefault("fingerprint", fingerprints[e["key"]])  # a version-1 manifest (config was identical)
        manifest.update(version=MANIFEST_VERSION, run_fingerprints=cfg.run_fingerprints(),
                        status="running" if todo else manifest["status"])
        manifest.pop("config_fingerprint", None)
        atomic_write_text(ws.config_path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        ws.save_manifest(manifest)
        self.console.print(f"[bold]resuming[/] {ws.root} ({_progress(manifest)}; {len(todo)} to run)")
        return manifest

    def _check_config(self, manifest: dict, kept: list[dict]) -> None:
        """Run-level sections must match; finished stages must match theirs and come first."""
        cfg, root, hint = self.cfg, self.ws.root, f"{self.command} --restart-from"
        if "run_fingerprints" not in manifest:  # version 1: one hash of the whole config
            if manifest.get("config_fingerprint") != cfg.fingerprint():
                raise SelftrainError(
                    f"{root} holds a run with a different config, written by an older selftrain that can only "
                    f"resume with exactly the same config (its copy: {root / 'config.yaml'}); or choose another "
                    "run.name or run.output_dir")
            return
        saved, now = manifest["run_fingerprints"], cfg.run_fingerprints()
        changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
        if changed:
            raise SelftrainError(
                f"{root} holds a run with a different config: {', '.join(changed)} changed, and these shape every "
                f"finished stage. Resume with the run's settings ({root / 'config.yaml'}), or choose another "
                "run.name or run.output_dir")
        plan = {key: spec for key, _, _, spec in self.plan()}
        order = list(plan)
        finished = [e["key"] for e in kept if e["status"] in DONE]
        for e in kept:
            if e["status"] not in DONE:
                continue
            if e["key"] not in plan:
                raise SelftrainError(f"stage {e['key']} of {root} is finished but no longer in the config; to drop "
                                     f"it and every stage after it: {hint} {e['key']}")
            if e.get("fingerprint") != stage_fingerprint(plan[e["key"]]):
                raise SelftrainError(f"stage {e['key']} of {root} has finished with other options, and finished "
                                     f"stages are kept as they ran; to redo it and every stage after it with the "
                                     f"new options: {hint} {e['key']}")
        todo = [k for k in order if k not in finished]
        late = [k for k in order[order.index(todo[0]):] if k in finished] if todo else []
        if late:
            raise SelftrainError(f"stage {todo[0]} is new but comes before finished stage {late[0]}; to run the "
                                 f"stages in the config's order: {hint} {late[0]}")

    def _restart(self, manifest: dict, cut: int) -> None:
        """Forget stage ``cut`` and every later one: checkpoint, accepted metrics and pool go
        back to what they were when it started."""
        ws, first = self.ws, manifest["stages"][cut]
        dropped = {e["key"] for e in manifest["stages"][cut:]}
        pool = Pool.load(ws.abs(manifest["pool"]))  # verified by _resume, which calls this
        kept = [i for i, s in enumerate(pool.ds["stage"]) if s not in dropped]  # rows are only ever appended
        # a pool version a dropped stage wrote goes with it, even when it added no row
        if len(kept) < len(pool) or manifest["pool"] in {f"data/pool-{key}" for key in dropped}:
            path = f"data/pool-restart-{first['key']}"
            Pool(pool.ds.select(kept)).save(ws.abs(path))
            manifest["pool"] = path
            integrity.record(manifest, ws.root, path)
        manifest.update(stages=manifest["stages"][:cut], current_checkpoint=first["start_checkpoint"],
                        accepted_metrics=first["metrics_before"])
        for key in dropped:  # their files go below: so do their checksums
            integrity.forget(manifest, under=f"stages/{key}")
            integrity.forget(manifest, under=f"data/pool-{key}")
        ws.save_manifest(manifest)
        ws.drop_metrics(dropped)
        for key in dropped:
            shutil.rmtree(ws.stage_dir(key), ignore_errors=True)
        self.console.print(f"[bold]restarting from[/] {first['key']}: {len(dropped)} stage(s) will be redone")

    # ------------------------------------------------------------------ the loop
    def _stages(self, manifest: dict) -> dict:
        ws = self.ws
        self._verify_inputs(manifest, only=["data/heldout"])
        held = Pool.load(ws.data_dir / "heldout")
        # a run begun before eval.max_documents existed scored every held-out text: it goes on so
        heldout = held.texts() if "eval_documents" not in manifest else held.spread_texts(manifest["eval_documents"])
        entries = {e["key"]: e for e in manifest["stages"]}
        manifest.pop("stop", None)  # decided again from the record: resumed with a larger budget, it goes on
        for key, rnd, idx, spec in self.plan():
            entry = entries.get(key)
            if not (entry and entry["status"] in DONE):
                # rank 0 decides on its clock; every rank follows
                budget = distributed.broadcast(stopping.budget_left(self.cfg, manifest, rnd))
                if budget and budget[0] == "run":
                    self._stop(manifest, budget[1])
                    break
                if budget:  # this round's budget: its later stages are recorded as skipped
                    entry = entries[key] = {"key": key, "round": rnd, "index": idx, "name": spec.name, "attempts": 0,
                                            "status": "skipped", "decision": "skipped", "reason": budget[1],
                                            "fingerprint": stage_fingerprint(spec),
                                            "start_checkpoint": manifest["current_checkpoint"],
                                            "metrics_before": manifest["accepted_metrics"]}
                    old = next((i for i, e in enumerate(manifest["stages"]) if e["key"] == key), None)
                    if old is None:
                        manifest["stages"].append(entry)
                    else:  # an unfinished attempt (interrupted, or an error fixed since) is skipped in its place
                        manifest["stages"][old] = entry
                        shutil.rmtree(ws.stage_dir(key), ignore_errors=True)
                        ws.drop_metrics({key})
                    ws.save_manifest(manifest)
                    self.console.print(f"[yellow]{key} skipped[/]: {budget[1]}")
                else:
                    self._attempt(manifest, entries, key, rnd, idx, spec, heldout)
            if idx == len(self.specs):
                why = distributed.broadcast(stopping.after_round(self.cfg, manifest, rnd, self.rounds()))
                if why:
                    self._stop(manifest, why)
                    break
        return manifest

    def _stop(self, manifest: dict, reason: str) -> None:
        """Record why the rounds ended (shown by inspect and the report)."""
        stages = manifest["stages"]
        minutes, steps = stopping.spent(stages)
        manifest["stop"] = {"reason": reason, "after": stages[-1]["key"] if stages else None,
                            "rounds": max((e["round"] for e in stages), default=0), "minutes": round(minutes, 2),
                            "steps": steps}
        self.ws.save_manifest(manifest)
        self.console.print(f"[bold]rounds end[/]: {reason}")

    def _attempt(self, manifest: dict, entries: dict, key: str, rnd: int, idx: int, spec: StageSpec,
                 heldout) -> None:
        ws, entry = self.ws, entries.get(key)
        faults.in_stage(key)  # the fault points from here to this stage's report are this stage's
        self._verify_inputs(manifest)  # before this attempt changes anything
        fingerprint = stage_fingerprint(spec)
        if entry is None or entry.get("fingerprint") != fingerprint:
            # a fresh start: nothing from a redone stage, or from this one's old options, is reused
            shutil.rmtree(ws.stage_dir(key), ignore_errors=True)
        if entry is None:
            entry = entries[key] = {"key": key, "round": rnd, "index": idx, "name": spec.name, "attempts": 0}
            manifest["stages"].append(entry)
        ws.drop_metrics({key})  # a retried stage logs its steps once, not once per attempt
        for k in OUTCOME:
            entry.pop(k, None)
        entry.update(status="running", attempts=entry["attempts"] + 1, fingerprint=fingerprint,
                     start_checkpoint=manifest["current_checkpoint"],
                     started=time.strftime("%Y-%m-%dT%H:%M:%S"), metrics_before=manifest["accepted_metrics"])
        ws.save_manifest(manifest)
        before = copy.deepcopy(manifest)  # what is saved if Ctrl-C lands mid-commit
        try:
            self._run_one(manifest, entry, spec, rnd, heldout)
        except KeyboardInterrupt:  # Ctrl-C: the manifest as it was, the stage retried next time
            interrupted = next(e for e in before["stages"] if e["key"] == key)
            interrupted.update(status="interrupted", reason="interrupted (Ctrl-C); retried on the next run")
            ws.save_manifest(before)
            raise
        ws.save_manifest(manifest)
        distributed.on_main(lambda: self._report(final=False))  # readable while the run goes on
        distributed.barrier()  # rank 0's new pool is written before any rank reads it

    def _run_one(self, manifest: dict, entry: dict, spec, rnd: int, heldout) -> None:
        cfg, ws, con = self.cfg, self.ws, self.console
        key, stage_dir = entry["key"], ws.stage_dir(entry["key"])
        stage_dir.mkdir(parents=True, exist_ok=True)
        con.rule(f"[bold]{key}[/] (attempt {entry['attempts']})")
        accepted = [e for e in manifest["stages"] if e["status"] == "accepted"]
        pool = Pool.load(ws.abs(manifest["pool"]))  # the rows; accepted stages' annotations are laid over them
        layers = [json.loads(ws.abs(e["annotations"]["path"]).read_text()) for e in accepted if e.get("annotations")]
        state = RunState(config=cfg, checkpoint=ws.abs(manifest["current_checkpoint"]),
                         kind=manifest["model_kind"], pool=pool.annotated(layers).without_duplicates(), heldout=heldout, seed=cfg.run.seed + rnd,
                         round=rnd, stage_key=key, stage_dir=stage_dir, device=self.device,
                         artefacts={n: ws.abs(p) for e in accepted for n, p in (e.get("artefacts") or {}).items()},
                         auxiliary={n: ws.abs(p) for e in accepted for n, p in (e.get("auxiliary") or {}).items()},
                         log=(steps := StageLog(ws.log_metrics, key, con if distributed.is_main() else None,
                                                ws.root / PROGRESS_FILE if distributed.is_main() else None)))
        start, result = time.perf_counter(), None
        try:
            try:
                result = REGISTRY[spec.name]().run(state, spec.config)
            finally:
                steps.close()
            self._check_result(result, pool, layers, stage_dir)
        except SelftrainError as e:  # bad input found mid-stage: not DONE, so a fixed rerun retries it
            entry.update(status="error", reason=str(e))
            ws.save_manifest(manifest)
            raise
        except Exception as e:  # a crash in one stage must not lose the run: record it, roll back
            if disk_full(e):  # not the stage's fault: the run stops as last saved, and a rerun retries the stage
                raise
            entry["steps"] = steps.total
            return self._failed(entry, e, start, result)
        stage_seconds = time.perf_counter() - start
        entry["steps"] = steps.total
        before = entry["metrics_before"]
        try:  # evaluating the new model is part of the attempt: a model that breaks it fails the stage
            after = before if result.checkpoint is None else self._evaluate(
                result.checkpoint, manifest["model_kind"], heldout, stage_dir)
        except Exception as e:
            if disk_full(e):
                raise
            return self._failed(entry, e, start, result)
        # the best value of each protected metric so far: the drift budget is measured from it
        history = [manifest["baseline_metrics"], *(e["metrics_after"] for e in manifest["stages"]
                                                   if e["status"] == "accepted")]
        # rank 0 decides: a threshold met on one rank's floats and missed on another's must not split them
        decision = distributed.broadcast(judge(cfg.guard, before, after, result.metrics,
                                               target_metric=spec.config.target, best=best_values(cfg.guard, history)))
        accepted, reason = decision.accepted, decision.reason
        entry.update(
            status="accepted" if accepted else "rolled_back", decision="accepted" if accepted else "rolled_back",
            reason=reason, checks=decision.records(), metrics_after=after, stage_metrics=_jsonable(result.metrics),
            checkpoint=ws.rel(result.checkpoint), seconds=round(stage_seconds, 1),
            eval_seconds=round(time.perf_counter() - start - stage_seconds, 1),
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
            # recorded either way (the report shows them); only an accepted stage's reach later stages
            artefacts={n: ws.rel(p) for n, p in result.artefacts.items()},
            auxiliary={n: ws.rel(p) for n, p in result.auxiliary.items()},
        )
        ws.log_metrics({"stage": key, "phase": "eval", "decision": entry["decision"], **after})
        if accepted:
            if result.annotations:
                path = stage_dir / "annotations.json"
                atomic_write_json(path, result.annotations)
                entry["annotations"] = {"path": ws.rel(path), "rows": {c: len(v) for c, v in result.annotations.items()}}
                integrity.record(manifest, ws.root, ws.rel(path))
            for path in (result.checkpoint, *result.artefacts.values(), *result.auxiliary.values()):
                if path is not None and distributed.is_main():  # what later stages load, as it is now
                    integrity.record(manifest, ws.root, ws.rel(path))
            if result.checkpoint is not None:
                manifest["current_checkpoint"] = ws.rel(result.checkpoint)
            manifest["accepted_metrics"] = after
            if result.additions:
                # secrets the model wrote are replaced before anything trains on them again
                additions, scrubbed = scrub_examples(result.additions, cfg.guard.scrub)
                if scrubbed:
                    entry["scrubbed"] = dict(scrubbed)
                    entry["checks"].append({"name": "scrub", "ok": True, "detail": "replaced in synthetic text: " + ", ".join(
                        f"{n} {kind}" for kind, n in sorted(scrubbed.items()))})
                new_pool, added, dropped = pool.add(additions, max_synthetic_fraction=cfg.guard.max_synthetic_fraction,
                                                    seed=state.seed)
                entry.update(pool_added=added, pool_dropped_by_cap=dropped)
                if added:  # a new version; the manifest switches to it
                    if distributed.is_main():
                        new_pool.save(ws.data_dir / f"pool-{key}")
                        integrity.record(manifest, ws.root, f"data/pool-{key}")
                    manifest["pool"] = f"data/pool-{key}"
                synthetic = new_pool.n_synthetic() / max(1, len(new_pool))
                entry["checks"].append({"name": "synthetic cap", "ok": True, "detail": (
                    f"pool {synthetic:.0%} synthetic after adding {added} (cap {cfg.guard.max_synthetic_fraction:.0%}; "
                    f"{dropped} over the cap dropped)")})
        else:
            self._discard(entry, result)
        colour = "green" if accepted else "yellow"
        con.print(f"[{colour}]{entry['decision']}[/]: {reason}")

    @staticmethod
    def _check_result(result: StageResult, pool: Pool, layers: list[dict], stage_dir: Path) -> None:
        """A stage's outputs must be its own files and name real rows with plain values of one type
        per column (earlier stages' values of that column included): anything else fails the stage."""
        if not isinstance(result, StageResult):
            raise TypeError(f"a stage's run() returns a StageResult, not {type(result).__name__}")
        named = {"checkpoint": result.checkpoint} if result.checkpoint is not None else {}
        named.update({f"artefact {n!r}": p for n, p in result.artefacts.items()})
        named.update({f"auxiliary model {n!r}": p for n, p in result.auxiliary.items()})
        for what, path in named.items():
            if not distributed.is_main():  # its checkpoints link to rank 0's, which rank 0 checks
                break
            path = Path(path).resolve()
            if not path.is_relative_to(stage_dir.resolve()):
                raise ValueError(f"{what} {path} is outside the stage directory {stage_dir}")
            if not path.exists():
                raise FileNotFoundError(f"{what} {path} does not exist")
        for row in result.additions:  # rows joining the pool: a text and JSON meta, as make_examples writes
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError("a stage's additions are rows with a text (see selftrain.data.pool.make_examples)")
            try:
                json.loads(row.get("meta") or "{}")
            except (TypeError, ValueError):
                raise ValueError(f"addition {row.get('id')!r}: its meta is not a JSON string") from None
        result.annotations = plain_annotations(result.annotations)
        pool.check_annotations(result.annotations)
        pool.annotated([*layers, result.annotations])  # raises if a column would mix types

    def _verify_inputs(self, manifest: dict, only: list[str] | None = None) -> None:
        """Everything a stage reads (or just ``only``), checked against the checksums recorded when it
        was written. Rank 0 checks (it wrote them and holds their checksums) and every rank follows."""
        problem = None
        if distributed.is_main():
            try:
                problem = self._input_problem(manifest, also=only or [], inputs=only is None)
            except Exception as e:  # an unreadable file, say: every rank must leave, not wait for rank 0
                problem = f"cannot check the run's files: {type(e).__name__}: {e}"
        problem = distributed.broadcast(problem)
        if problem:
            raise SelftrainError(problem)

    def _input_problem(self, manifest: dict, also: list[str] = (), inputs: bool = True) -> str | None:
        """What is damaged among the model, the pool, accepted stages' annotations, artefacts and
        auxiliary models (``inputs``) and the paths in ``also``; None if nothing. Each path is hashed once."""
        root = self.ws.root
        named = [(manifest["pool"], "pool"), (manifest["current_checkpoint"], "checkpoint")] if inputs else []
        for e in manifest["stages"] if inputs else []:
            if e["status"] != "accepted":
                continue
            if e.get("annotations"):
                named.append((e["annotations"]["path"], f"annotations of {e['key']}"))
            for kind, what in (("artefacts", "artefact"), ("auxiliary", "auxiliary model")):
                named += [(rel, f"{what} {name!r} of {e['key']}") for name, rel in (e.get(kind) or {}).items()]
        named += [(rel, "held-out data" if rel == "data/heldout" else "pool") for rel in also]
        try:
            for rel, what in dict(named).items():
                integrity.verify(manifest, root, rel, what)
        except SelftrainError as e:
            return str(e)
        return None

    def _discard(self, entry: dict, result: StageResult | None) -> None:
        """Delete the weights of a rolled-back or failed attempt (unless run.keep_rejected_checkpoints):
        its checkpoint and auxiliary models, where they lie inside its stage directory."""
        if result is None or not isinstance(result, StageResult) or self.cfg.run.keep_rejected_checkpoints:
            return
        inside = self.ws.stage_dir(entry["key"]).resolve()
        for field, paths in (("checkpoint_deleted", [result.checkpoint]),
                             ("auxiliary_deleted", list(result.auxiliary.values()))):
            for path in paths:
                if path is not None and Path(path).resolve().is_relative_to(inside) and Path(path).exists():
                    shutil.rmtree(path, ignore_errors=True)
                    entry[field] = True

    def _evaluate(self, checkpoint: Path, kind: str, heldout: list[str], stage_dir: Path) -> dict:
        model, tokenizer = load_checkpoint(checkpoint, kind)
        after, samples = evaluate(model.to(self.device), tokenizer, heldout, self.cfg.eval, kind=kind,
                                  seed=self.cfg.run.seed)
        _write_samples(stage_dir / "samples.txt", samples)
        return after

    def _failed(self, entry: dict, error: Exception, start: float, result: StageResult | None = None) -> None:
        """Record a crashed attempt (traceback in error.txt) and roll it back; the run goes on.
        In a multi-process run a crash may be one rank's alone (out of memory on one GPU): rolling
        back there would leave the others waiting in a collective, so the launch ends instead and
        the stage, still "running" in the manifest, is retried by the next launch."""
        if distributed.active():
            raise error
        key, stage_dir = entry["key"], self.ws.stage_dir(entry["key"])
        atomic_write_text(stage_dir / "error.txt", "".join(traceback.format_exception(error)))
        checkpoint = result.checkpoint if isinstance(result, StageResult) else None
        entry.update(status="failed", decision="rolled_back", reason=f"{type(error).__name__}: {error}",
                     seconds=round(time.perf_counter() - start, 1), metrics_after=entry["metrics_before"],
                     checkpoint=self.ws.rel(checkpoint) if checkpoint else None,
                     finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self._discard(entry, result)
        self.console.print(f"[red]{key} failed[/]: {type(error).__name__}: {escape(str(error))} "
                           f"(traceback in {stage_dir / 'error.txt'})")

    # ------------------------------------------------------------------ the end
    def _finish(self, manifest: dict) -> None:
        ws = self.ws
        faults.in_stage("finish")
        integrity.verify(manifest, ws.root, manifest["current_checkpoint"], "checkpoint")
        current = ws.abs(manifest["current_checkpoint"])
        tmp = ws.final_dir.with_name(".final.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(current, tmp)
        manifest.update(status="finished", final_checkpoint="final", final_metrics=manifest["accepted_metrics"])
        from selftrain.report.card import model_card

        # the card goes in with the weights: final/ appears whole, card included, or not at all
        try:
            card = model_card(ws, manifest, self.cfg.model_dump(mode="json"))
        except Exception as e:  # a card must never make a finished run unfinishable
            card = f"# {manifest['run_name']}\n\nTrained by selftrain. (The full card failed: {type(e).__name__}: {e}.)\n"
        atomic_write_text(tmp / "README.md", card)
        replace_dir(tmp, ws.final_dir)
        integrity.record(manifest, ws.root, "final")
        for path in ws.data_dir.glob("pool-*"):  # superseded pool versions
            if f"data/{path.name}" != manifest["pool"]:
                integrity.forget(manifest, under=f"data/{path.name}")
        ws.save_manifest(manifest)
        for path in ws.data_dir.glob("pool-*"):  # removed only once the manifest no longer names them
            if f"data/{path.name}" != manifest["pool"]:
                shutil.rmtree(path, ignore_errors=True)
        self._report(final=True)

    def _report(self, final: bool) -> None:
        """Write report.md and report.html; a report that fails costs the run nothing but a warning
        (``selftrain report RUN`` writes it again). A full disk stops the run: its next write would fail."""
        from selftrain.report import write_report

        try:
            path = write_report(self.ws)
        except Exception as e:
            if disk_full(e):  # the run's next write would fail too: stop here, everything saved so far intact
                raise
            self.console.print(f"[yellow]the report could not be written[/]: {type(e).__name__}: {escape(str(e))}")
            return
        if final:
            self.console.print(f"report: {path.with_suffix('.html')}")


def _progress(manifest: dict) -> str:
    done = sum(e["status"] in DONE for e in manifest["stages"])
    return f"{done} stage(s) finished"


def _write_samples(path: Path, samples: list[str]) -> None:
    if samples:
        atomic_write_text(path, "\n\n---\n\n".join(samples) + "\n")


def _jsonable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))}
