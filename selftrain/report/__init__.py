"""A run's report: ``report.md`` and its self-contained twin ``report.html``, from the manifest,
metrics.jsonl, the pool and the stages' own sections. Written after every stage (readable while
the run goes on) and at the end; ``selftrain report RUN`` writes it again.

Sections, in order: the outcome (status, why the rounds ended, start vs final metrics); the
checkpoint lineage; every stage with its metrics before and after and the guard's checks;
held-out metrics across stages and rounds; training loss and rewards; the pool by origin;
generations before and after on the same held-out prompts; each stage's own section (cluster map,
curriculum competence, self-play signals, the discriminator game); the config.
"""

from __future__ import annotations

import re
from pathlib import Path

from selftrain.report.html import markdown_to_html
from selftrain.report.lineage import lineage_svg
from selftrain.report.plots import curves, heldout_metric, pool_by_origin
from selftrain.stages.base import fmt
from selftrain.workspace import Workspace, atomic_write_text

SUMMARY = ("heldout_ppl", "heldout_loss", "heldout_entropy", "distinct_1", "distinct_2", "self_bleu",
           "repetition_rate")


def stage_rows(manifest: dict) -> list[dict]:
    """One row per stage execution: what the closing table, `inspect` and the report show."""
    rows = []
    for e in manifest.get("stages", []):
        before, after = e.get("metrics_before") or {}, e.get("metrics_after") or {}
        rows.append({
            "stage": e["key"], "status": e.get("status"), "decision": e.get("decision", "-"),
            "ppl_before": before.get("heldout_ppl"), "ppl_after": after.get("heldout_ppl"),
            "distinct_2": after.get("distinct_2"), "seconds": e.get("seconds"), "steps": e.get("steps"),
            "attempts": e.get("attempts"), "reason": e.get("reason", ""),
        })
    return rows


def _cell(text) -> str:
    """Table-safe text: a pipe or a newline would break the Markdown table."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fence(text: str) -> list[str]:
    """Model-written text as a code block: shown verbatim, never rendered as Markdown or HTML (control
    characters a byte-level tokenizer can emit are shown as U+FFFD)."""
    text = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "\ufffd", text)
    ticks = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return [ticks + "text", text, ticks]


def write_report(ws: Workspace) -> Path:
    manifest = ws.load_manifest()
    md = _markdown(ws, manifest)
    path = ws.root / "report.md"
    atomic_write_text(path, md)
    svg = lineage_svg(manifest)
    atomic_write_text(ws.root / "lineage.svg", svg)
    html = markdown_to_html(md, ws.root, f"selftrain run {manifest['run_name']}", svg_inline={"lineage.svg": svg})
    atomic_write_text(ws.root / "report.html", html)
    return path


def _markdown(ws: Workspace, manifest: dict) -> str:
    base = manifest.get("baseline_metrics", {})
    final = manifest.get("final_metrics") or manifest.get("accepted_metrics", {})
    stages = manifest.get("stages", [])
    lines = [f"# selftrain run `{manifest['run_name']}`", ""]
    status = f"Status: **{manifest['status']}**"
    stop = manifest.get("stop")
    if stop:
        status += f"; the rounds ended after round {stop.get('rounds')}: {stop['reason']}"
    elif manifest["status"] == "running":
        status += " (this report is rewritten after every stage)"
    counts = {s: sum(e.get("status") == s for e in stages) for s in ("accepted", "rolled_back", "failed", "skipped")}
    minutes = sum((e.get("seconds") or 0) + (e.get("eval_seconds") or 0) for e in stages) / 60
    lines += [status + ".", "",
              f"Model: {manifest['model_kind']} LM. Data: {manifest['data'].get('train_documents')} train / "
              f"{manifest['data'].get('heldout_documents')} held-out documents. Stages: "
              + ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts.items() if n)
              + f"; {minutes:.1f} minutes of stages and evaluations.", ""]

    task_keys = sorted(k for k in {**base, **final} if "shot_" in k and not k.endswith("_stderr"))
    lines += ["| metric (held-out, real text) | start | final |", "|---|---|---|"]
    for k in (*SUMMARY, *task_keys):
        if k in base or k in final:
            lines.append(f"| {k} | {fmt(base.get(k), 3)} | {fmt(final.get(k), 3)} |")

    lines += ["", "## Checkpoint lineage", "",
              "The accepted chain runs along the top from the start model to the final one; an attempt the "
              "guard rolled back (or that failed, or a budget skipped) hangs below the checkpoint it started from.",
              "", "![checkpoint lineage](lineage.svg)"]
    lines += _stage_table(manifest, task_keys)
    lines += _checks(stages)
    lines += _figures(ws, manifest, task_keys)
    lines += _generations(ws, manifest)
    lines += _stage_sections(manifest)
    if ws.config_path.exists():
        lines += ["", "## Config", "", *_fence(ws.config_path.read_text(encoding="utf-8").rstrip())]
    lines += ["", "Full record: `manifest.json` (decisions), `metrics.jsonl` (every log line), "
              "`stages/<key>/samples.txt` (what the model wrote after each stage).", ""]
    return "\n".join(lines)


def _stage_table(manifest: dict, task_keys: list[str]) -> list[str]:
    acc_keys = [k for k in task_keys if k.endswith("_acc")]
    lines = ["", "## Stages", "",
             "| stage | decision | ppl before | ppl after | distinct-2 | self-BLEU | "
             + "".join(f"{k} | " for k in acc_keys) + "steps | seconds | reason |",
             "|---|---|---|---|---|---|" + "---|" * len(acc_keys) + "---|---|---|"]
    for e, r in zip(manifest.get("stages", []), stage_rows(manifest)):
        after = e.get("metrics_after") or {}
        lines.append(f"| {r['stage']} | {r['decision'] if r['decision'] != '-' else r['status']} | "
                     f"{fmt(r['ppl_before'])} | {fmt(r['ppl_after'])} | {fmt(r['distinct_2'], 3)} | "
                     f"{fmt(after.get('self_bleu'), 3)} | " + "".join(f"{fmt(after.get(k), 3)} | " for k in acc_keys)
                     + f"{fmt(r['steps'])} | {fmt(r['seconds'], 1)} | {_cell(r['reason'])} |")
    return lines


def _checks(stages: list[dict]) -> list[str]:
    """One row per stage: the checks that failed, with their numbers, and the names of those that passed."""
    rows = [e for e in stages if e.get("checks")]
    if not rows:
        return []
    lines = ["", "## The guard's checks", "",
             "Each stage is judged on its target (or the guard metric), on every protected metric (per stage "
             "and against the run's best: the drift budget) and by the collapse detectors.", "",
             "| stage | decision | failed | passed |", "|---|---|---|---|"]
    for e in rows:
        failed = "; ".join(f"**{c['name']}**: {c['detail']}" for c in e["checks"] if not c["ok"]) or "-"
        passed = "; ".join(f"{c['name']} ({c['detail']})" if c["name"].startswith(("target", "synthetic"))
                           else c["name"] for c in e["checks"] if c["ok"])
        lines.append(f"| {e['key']} | {e.get('decision', e.get('status'))} | {_cell(failed)} | {_cell(passed) or '-'} |")
    return lines


def _figures(ws: Workspace, manifest: dict, task_keys: list[str]) -> list[str]:
    lines: list[str] = []

    def figure(title: str, path: Path | None, text: str = "") -> None:
        if path is not None:
            lines.extend(["", f"## {title}", "", *([text, ""] if text else []), f"![{title}]({path.name})"])

    figure("Held-out perplexity across stages and rounds", heldout_metric(ws, manifest, "heldout_ppl",
                                                                          ws.root / "heldout_ppl.png"),
           "Measured on held-out real text after every stage. Dots: each stage's model; line: the accepted one.")
    for k in (k for k in task_keys if k.endswith("_acc")):
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", k).lstrip(".")  # a task's name comes from its YAML
        figure(f"{k} across stages", heldout_metric(ws, manifest, k, ws.root / f"{safe}.png"))
    records = ws.read_metrics()  # read once for both curves
    figure("Training loss", curves(records, "loss", "training loss", ws.root / "train_loss.png", phases=("train",)))
    figure("Rewards", curves(records, "reward", "mean reward", ws.root / "rewards.png"),
           "The mean reward of every GRPO step (self-play, the adversarial game).")
    path, steps = pool_by_origin(ws, manifest, ws.root / "pool_by_origin.png")
    figure("The pool by origin", path, "Rows in the training pool after set-up and after each stage that added "
           "some; synthetic rows are capped by guard.max_synthetic_fraction.")
    if steps:
        origins = sorted({o for _, c in steps for o in c}, key=lambda o: (o != "real", o))
        lines += ["", "| after | " + " | ".join(origins) + " |", "|---|" + "---|" * len(origins)]
        lines += [f"| {s} | " + " | ".join(str(c.get(o, 0)) for o in origins) + " |" for s, c in steps]
    return lines


def _generations(ws: Workspace, manifest: dict) -> list[str]:
    """The start model's samples and the final accepted model's, continuing the same held-out prompts."""
    before = manifest.get("initial_samples") or []
    accepted = [e for e in manifest.get("stages", []) if e.get("status") == "accepted" and e.get("checkpoint")]
    after: list[str] = []
    if accepted:
        path = ws.stage_dir(accepted[-1]["key"]) / "samples.txt"
        if path.exists():
            after = path.read_text(encoding="utf-8").rstrip("\n").split("\n\n---\n\n")[:len(before) or 4]
    if not before:
        return []
    prompts = manifest.get("sample_prompts") or []
    lines = ["", "## Generations before and after", "",
             "The same held-out prompts, continued by the start model and by the final one "
             f"({accepted[-1]['key'] if accepted else 'no stage changed the model'}); sampled at eval.temperature."]
    for i, sample in enumerate(before):
        lines += ["", f"**Prompt {i + 1}**", ""]
        if i < len(prompts):
            lines += [*_fence(prompts[i]), ""]
        lines += ["Start:", "", *_fence(sample)]
        if i < len(after):
            lines += ["", "Final:", "", *_fence(after[i])]
    return lines


def _stage_sections(manifest: dict) -> list[str]:
    """Each stage's own section (``Stage.report``): the report knows no stage by name."""
    from selftrain.stages import REGISTRY

    lines: list[str] = []
    for e in manifest.get("stages", []):
        cls = REGISTRY.get(e.get("name"))
        if cls is None or "stage_metrics" not in e:  # a stage this version lacks, or one that did not finish
            continue
        try:
            body = cls().report(e)
        except Exception as err:  # a report section must never cost the report
            body = f"(this section failed: {type(err).__name__}: {err})"
        if body:
            lines += ["", f"## {e['key']}", "", body.strip()]
    return lines
