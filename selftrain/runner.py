"""Rounds x stages, with a guard after each stage and resume from the manifest.

Set-up reads the data, builds the model and runs every stage's preflight *before* the run
directory is touched, so bad input never leaves a half-made or damaged run behind. Each
stage then runs from the last accepted checkpoint; the same held-out evaluation follows; the
guard accepts it or rolls it back; and only then is the manifest (the single source of truth)
rewritten atomically. Running the same command again skips finished stages and restarts an
interrupted one (pretrain itself resumes from its last Trainer checkpoint).
"""

from __future__ import annotations

import math
import shutil
import time
import traceback
from pathlib import Path

import torch
import yaml
from rich.console import Console

from selftrain.config import GuardConfig, RunConfig
from selftrain.data.pool import Pool, prepare_corpus
from selftrain.errors import SelftrainError
from selftrain.evaluation import LOWER_IS_BETTER, evaluate
from selftrain.modeling.factory import (
    build_initial,
    count_parameters,
    load_checkpoint,
    save_checkpoint,
)
from selftrain.stages import REGISTRY, RunState
from selftrain.workspace import MANIFEST_VERSION, Workspace, atomic_write_text, replace_dir

DONE = ("accepted", "rolled_back", "failed")
SETUP_FILES = {".lock", "config.yaml", "data", "checkpoints", "metrics.jsonl"}


def guard_decision(guard: GuardConfig, before: dict, after: dict) -> tuple[bool, str]:
    """Accept unless the guard metric regresses past tolerance or a collapse signal fires."""
    name = guard.metric
    b, a = before.get(name), after.get(name)
    if a is None or b is None:
        return False, f"metric {name!r} missing from evaluation"
    if not math.isfinite(a):
        return False, f"{name} is {a} (diverged)"
    lower = guard.mode == "min" or (guard.mode == "auto" and name in LOWER_IS_BETTER)
    limit = b * (1 + guard.tolerance) if lower else b * (1 - guard.tolerance)
    worse = a > limit if lower else a < limit
    if worse:
        return False, f"{name} {b:.4g} -> {a:.4g} regresses past tolerance {guard.tolerance:.0%} (limit {limit:.4g})"
    if guard.min_distinct_2 is not None and after.get("distinct_2", math.inf) < guard.min_distinct_2:
        return False, f"collapse: distinct-2 {after['distinct_2']:.3f} < floor {guard.min_distinct_2}"
    if guard.min_entropy is not None and after.get("heldout_entropy", math.inf) < guard.min_entropy:
        return False, f"collapse: entropy {after['heldout_entropy']:.3f} nats < floor {guard.min_entropy}"
    return True, f"{name} {b:.4g} -> {a:.4g} (limit {limit:.4g})"


class Runner:
    def __init__(self, config: RunConfig, console: Console | None = None):
        self.cfg = config
        self.specs = config.stage_specs()
        self.ws = Workspace(config.run_dir)
        self.console = console or Console(stderr=True)
        dev = config.run.device
        if dev == "cuda" and not torch.cuda.is_available():
            raise SelftrainError("run.device=cuda but no CUDA device is available")
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev

    # ------------------------------------------------------------------ entry point
    def run(self) -> dict:
        if self.ws.exists():
            manifest = self.ws.load_manifest()
            if manifest.get("config_fingerprint") != self.cfg.fingerprint():
                raise SelftrainError(
                    f"{self.ws.root} holds a run with a different config; to resume, use the same config "
                    "and --set options; otherwise choose another run.name or run.output_dir")
            self.ws.lock()
            self.console.print(f"[bold]resuming[/] {self.ws.root} ({_progress(manifest)})")
        else:
            manifest = self._setup()
        try:
            manifest = self._stages(manifest)
            self._finish(manifest)
        finally:
            self.ws.unlock()
        return manifest

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> dict:
        root = self.ws.root
        if root.exists() and any(p.name not in SETUP_FILES for p in root.iterdir()):
            raise SelftrainError(f"{root} exists and is not a selftrain run directory; choose another run.output_dir")
        cfg, con = self.cfg, self.console
        con.print(f"[bold]loading data[/] {cfg.data.train}")
        train, heldout, stats = prepare_corpus(cfg.data, cfg.run.seed)
        con.print(f"  {stats['train_documents']} train / {stats['heldout_documents']} held-out documents "
                  f"({stats['train_chars'] / 1e6:.2f} MB train)")
        con.print(f"[bold]building model[/] {cfg.model.preset or cfg.model.pretrained}")
        train_texts, heldout_texts = list(train["text"]), list(heldout["text"])
        model, tokenizer, kind = build_initial(cfg.model, train_texts, cfg.run.seed)
        con.print(f"  {type(model).__name__}, {count_parameters(model) / 1e6:.2f}M parameters, "
                  f"vocab {len(tokenizer)}")
        for spec in self.specs:  # reject bad input before writing anything
            REGISTRY[spec.name]().preflight(spec.config, model=model, tokenizer=tokenizer, kind=kind,
                                             train_texts=train_texts)
        con.print("[bold]evaluating the starting model[/] on held-out text")
        baseline, samples = evaluate(model.to(self.device), tokenizer, heldout_texts, cfg.eval, kind=kind,
                                     seed=cfg.run.seed)
        if cfg.guard.metric not in baseline:
            raise SelftrainError(f"guard.metric {cfg.guard.metric!r} is not computed; available: "
                                 f"{', '.join(sorted(baseline))}")
        self.ws.lock()
        atomic_write_text(self.ws.config_path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        Pool(train).save(self.ws.data_dir / "pool")
        Pool(heldout).save(self.ws.data_dir / "heldout")
        initial = save_checkpoint(model.cpu(), tokenizer, self.ws.root / "checkpoints" / "initial")
        self.ws.log_metrics({"stage": "initial", "phase": "eval", **baseline})
        manifest = {
            "version": MANIFEST_VERSION, "run_name": cfg.run.name, "status": "running",
            "config_fingerprint": cfg.fingerprint(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "model_kind": kind, "device": self.device, "data": stats,
            "initial_checkpoint": self.ws.rel(initial), "current_checkpoint": self.ws.rel(initial),
            "pool": "data/pool", "baseline_metrics": baseline, "accepted_metrics": baseline,
            "initial_samples": samples[:4], "stages": [],
        }
        self.ws.save_manifest(manifest)
        return manifest

    # ------------------------------------------------------------------ the loop
    def _stages(self, manifest: dict) -> dict:
        cfg, ws = self.cfg, self.ws
        heldout = Pool.load(ws.data_dir / "heldout").texts()
        entries = {e["key"]: e for e in manifest["stages"]}
        for rnd in range(1, cfg.rounds + 1):
            for idx, spec in enumerate(self.specs, 1):
                key = f"r{rnd}-{idx:02d}-{spec.name}"
                entry = entries.get(key)
                if entry and entry["status"] in DONE:
                    continue
                if entry is None:
                    entry = entries[key] = {"key": key, "round": rnd, "index": idx, "name": spec.name, "attempts": 0}
                    manifest["stages"].append(entry)
                before = manifest["accepted_metrics"]
                entry.update(status="running", attempts=entry["attempts"] + 1,
                             start_checkpoint=manifest["current_checkpoint"],
                             started=time.strftime("%Y-%m-%dT%H:%M:%S"), metrics_before=before)
                ws.save_manifest(manifest)
                self._run_one(manifest, entry, spec, rnd, heldout)
                ws.save_manifest(manifest)
        return manifest

    def _run_one(self, manifest: dict, entry: dict, spec, rnd: int, heldout) -> None:
        cfg, ws, con = self.cfg, self.ws, self.console
        key, stage_dir = entry["key"], ws.stage_dir(entry["key"])
        stage_dir.mkdir(parents=True, exist_ok=True)
        con.rule(f"[bold]{key}[/] (attempt {entry['attempts']})")
        pool = Pool.load(ws.abs(manifest["pool"]))
        state = RunState(config=cfg, checkpoint=ws.abs(manifest["current_checkpoint"]),
                         kind=manifest["model_kind"], pool=pool, heldout=heldout, seed=cfg.run.seed + rnd,
                         round=rnd, stage_key=key, stage_dir=stage_dir, device=self.device,
                         log=ws.log_metrics)
        start = time.perf_counter()
        try:
            result = REGISTRY[spec.name]().run(state, spec.config)
        except SelftrainError as e:  # bad input found mid-stage: not DONE, so a fixed rerun retries it
            entry.update(status="error", reason=str(e))
            ws.save_manifest(manifest)
            raise
        except Exception as e:  # a crash in one stage must not lose the run: record it, roll back
            (stage_dir / "error.txt").write_text(traceback.format_exc())
            entry.update(status="failed", decision="rolled_back", reason=f"{type(e).__name__}: {e}",
                         seconds=round(time.perf_counter() - start, 1), metrics_after=entry["metrics_before"])
            con.print(f"[red]{key} failed[/]: {type(e).__name__}: {e} (traceback in {stage_dir / 'error.txt'})")
            return
        stage_seconds = time.perf_counter() - start
        before = entry["metrics_before"]
        if result.checkpoint is not None:
            model, tokenizer = load_checkpoint(result.checkpoint, manifest["model_kind"])
            after, samples = evaluate(model.to(self.device), tokenizer, heldout, cfg.eval,
                                      kind=manifest["model_kind"], seed=cfg.run.seed)
            _write_samples(stage_dir / "samples.txt", samples)
            del model
        else:
            after = before
        accepted, reason = guard_decision(cfg.guard, before, after)
        entry.update(
            status="accepted" if accepted else "rolled_back", decision="accepted" if accepted else "rolled_back",
            reason=reason, metrics_after=after, stage_metrics=_jsonable(result.metrics),
            checkpoint=ws.rel(result.checkpoint), seconds=round(stage_seconds, 1),
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        ws.log_metrics({"stage": key, "phase": "eval", "decision": entry["decision"], **after})
        if accepted:
            if result.checkpoint is not None:
                manifest["current_checkpoint"] = ws.rel(result.checkpoint)
            manifest["accepted_metrics"] = after
            if result.additions:
                new_pool, added, dropped = pool.add(result.additions, max_synthetic_fraction=cfg.guard.max_synthetic_fraction,
                                                    seed=state.seed)
                new_pool.save(ws.data_dir / f"pool-{key}")  # a new version; the manifest switches to it
                entry.update(pool_added=added, pool_dropped_by_cap=dropped)
                manifest["pool"] = f"data/pool-{key}"
        elif result.checkpoint is not None and not cfg.run.keep_rejected_checkpoints:
            shutil.rmtree(result.checkpoint, ignore_errors=True)
            entry["checkpoint_deleted"] = True
        colour = "green" if accepted else "yellow"
        con.print(f"[{colour}]{entry['decision']}[/]: {reason}")

    # ------------------------------------------------------------------ the end
    def _finish(self, manifest: dict) -> None:
        ws = self.ws
        current = ws.abs(manifest["current_checkpoint"])
        tmp = ws.final_dir.with_name(".final.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(current, tmp)
        replace_dir(tmp, ws.final_dir)
        manifest.update(status="finished", final_checkpoint="final", final_metrics=manifest["accepted_metrics"])
        ws.save_manifest(manifest)
        for path in ws.data_dir.glob("pool-*"):  # superseded pool versions
            if f"data/{path.name}" != manifest["pool"]:
                shutil.rmtree(path, ignore_errors=True)
        from selftrain.report import write_report

        write_report(ws)


def _progress(manifest: dict) -> str:
    done = sum(e["status"] in DONE for e in manifest["stages"])
    return f"{done} stage(s) finished"


def _write_samples(path: Path, samples: list[str]) -> None:
    if samples:
        atomic_write_text(path, "\n\n---\n\n".join(samples) + "\n")


def _jsonable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))}
