"""The `selftrain` command: run, demo, inspect, report, eval.

User errors (bad config, data, model path) print one clear message and exit with code 2.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from selftrain.errors import SelftrainError

app = typer.Typer(
    help="Make a language model better without human labels. `selftrain demo` to see it work.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


@contextmanager
def user_errors():
    try:
        yield
    except SelftrainError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None


def _run(config_path: Path, overrides: list[str]) -> None:
    from selftrain.config import load_config

    with user_errors():
        cfg = load_config(config_path, overrides)
        from selftrain.runner import Runner  # heavy imports only once the config is valid

        quiet_libraries()
        manifest = Runner(cfg, console=err_console).run()
    console.print(stage_table(manifest))
    final = cfg.run_dir / "final"
    console.print(f"final model: [bold]{final}[/]  (transformers.pipeline('text-generation', model='{final}'))")
    console.print(f"report: {cfg.run_dir / 'report.md'}")


@app.command()
def run(
    config: Path = typer.Argument(..., help="Run config (YAML). See configs/ for examples."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a config key: --set stages.pretrain.max_steps=50"),
):
    """Run (or resume) a pipeline. Re-running the same command resumes an interrupted run."""
    _run(config, set_)


@app.command()
def demo(
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a demo config key (see configs/demo.yaml)."),
):
    """Tiny model from scratch on Python's own docstrings: the whole loop in a few minutes on a CPU."""
    _run(DEMO_CONFIG, set_)


@app.command()
def inspect(run_dir: Path = typer.Argument(..., help="A run directory, e.g. runs/demo.")):
    """Print a run's manifest as a table: each stage, its decision and why."""
    from selftrain.workspace import Workspace

    with user_errors():
        ws = Workspace(run_dir)
        if not ws.exists():
            raise SelftrainError(f"{run_dir} is not a selftrain run (no manifest.json)")
        manifest = ws.load_manifest()
    console.print(f"run [bold]{manifest['run_name']}[/]: {manifest['status']}, model {manifest['model_kind']}, "
                  f"current checkpoint {manifest['current_checkpoint']}")
    console.print(stage_table(manifest, reasons=True))


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory, e.g. runs/demo.")):
    """(Re)write report.md and its plots for a run."""
    from selftrain.report import write_report
    from selftrain.workspace import Workspace

    with user_errors():
        ws = Workspace(run_dir)
        if not ws.exists():
            raise SelftrainError(f"{run_dir} is not a selftrain run (no manifest.json)")
        console.print(f"wrote {write_report(ws)}")


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="Model directory or hub id."),
    data: str = typer.Option("builtin:pydocs", help="Text to score: file, folder, hf:<id> or builtin:pydocs."),
    max_tokens: int = typer.Option(32768, help="Tokens scored for perplexity."),
    samples: int = typer.Option(16, help="Samples generated for diversity (0 to skip)."),
    output: Path | None = typer.Option(None, help="Write the metrics as JSON here."),
):
    """Held-out perplexity and sample diversity of a model on some text."""
    from selftrain.config import EvalConfig
    from selftrain.data.sources import load_documents
    from selftrain.evaluation import evaluate
    from selftrain.modeling.factory import load_pretrained, model_kind

    with user_errors():
        texts = [t for _, t in load_documents(data)]
        if not texts:
            raise SelftrainError(f"no text in {data}")
        m, tok = load_pretrained(model)
        metrics, _ = evaluate(m, tok, texts, EvalConfig(max_tokens=max_tokens, samples=samples),
                              kind=model_kind(m))
    table = Table("metric", "value")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)
    if output:
        output.write_text(json.dumps(metrics, indent=2))


def stage_table(manifest: dict, reasons: bool = False) -> Table:
    from selftrain.report import _fmt, stage_rows

    table = Table(title=f"run {manifest['run_name']}")
    for col in ("stage", "decision", "ppl before", "ppl after", "distinct-2", "seconds"):
        table.add_column(col)
    if reasons:
        table.add_column("attempts")
        table.add_column("reason")
    base = manifest.get("baseline_metrics", {})
    table.add_row("start", "-", "-", _fmt(base.get("heldout_ppl")), _fmt(base.get("distinct_2"), 3), "-",
                  *(("-", "") if reasons else ()))
    for r in stage_rows(manifest):
        style = {"accepted": "green", "rolled_back": "yellow", "failed": "red"}.get(r["status"], "")
        cells = [r["stage"], f"[{style}]{r['decision'] if r['decision'] != '-' else r['status']}[/]" if style
                 else str(r["status"]), _fmt(r["ppl_before"]), _fmt(r["ppl_after"]), _fmt(r["distinct_2"], 3),
                 _fmt(r["seconds"], 1)]
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
