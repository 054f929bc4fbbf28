"""Turn a run's manifest and metrics into report.md with plots a person can glance at."""

from __future__ import annotations

from pathlib import Path

from selftrain.stages.base import fmt
from selftrain.workspace import Workspace, atomic_write_figure, atomic_write_text


def stage_rows(manifest: dict) -> list[dict]:
    """One row per stage execution: what the closing table, `inspect` and the report show."""
    rows = []
    for e in manifest.get("stages", []):
        before, after = e.get("metrics_before") or {}, e.get("metrics_after") or {}
        rows.append({
            "stage": e["key"], "status": e.get("status"), "decision": e.get("decision", "-"),
            "ppl_before": before.get("heldout_ppl"), "ppl_after": after.get("heldout_ppl"),
            "distinct_2": after.get("distinct_2"), "seconds": e.get("seconds"),
            "attempts": e.get("attempts"), "reason": e.get("reason", ""),
        })
    return rows


def write_report(ws: Workspace) -> Path:
    manifest = ws.load_manifest()
    rows = stage_rows(manifest)
    plots = _plots(ws, manifest)
    base, final = manifest.get("baseline_metrics", {}), manifest.get("final_metrics") or manifest.get(
        "accepted_metrics", {})
    lines = [
        f"# selftrain run `{manifest['run_name']}`", "",
        f"Status: **{manifest['status']}**. Model kind: {manifest['model_kind']}. "
        f"Data: {manifest['data'].get('train_documents')} train / {manifest['data'].get('heldout_documents')} "
        "held-out documents.", "",
        "| metric | start | final |", "|---|---|---|",
    ]
    task_keys = sorted(k for k in {**base, **final} if "shot_" in k and not k.endswith("_stderr"))
    for k in ("heldout_ppl", "heldout_loss", "heldout_entropy", "distinct_1", "distinct_2", "repetition_rate",
              *task_keys):
        if k in base or k in final:
            lines.append(f"| {k} | {fmt(base.get(k), 3)} | {fmt(final.get(k), 3)} |")
    acc_keys = [k for k in task_keys if k.endswith("_acc")]
    lines += ["", "## Stages", "", "| stage | decision | ppl before | ppl after | distinct-2 | "
              + "".join(f"{k} | " for k in acc_keys) + "seconds | reason |",
              "|---|---|---|---|---|" + "---|" * len(acc_keys) + "---|---|"]
    after_by_key = {e["key"]: e.get("metrics_after") or {} for e in manifest.get("stages", [])}
    for r in rows:
        after = after_by_key.get(r["stage"], {})
        lines.append(f"| {r['stage']} | {r['decision']} | {fmt(r['ppl_before'])} | {fmt(r['ppl_after'])} | "
                     f"{fmt(r['distinct_2'], 3)} | " + "".join(f"{fmt(after.get(k), 3)} | " for k in acc_keys)
                     + f"{fmt(r['seconds'], 1)} | {r['reason']} |")
    lines += _stage_sections(manifest)
    for title, name in plots:
        lines += ["", f"## {title}", "", f"![{title}]({name})"]
    lines += ["", "Full record: `manifest.json` (decisions), `metrics.jsonl` (every log line), "
              "`stages/<key>/samples.txt` (what the model wrote after each stage).", ""]
    path = ws.root / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


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


def _plots(ws: Workspace, manifest: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    labels = ["start"] + [e["key"] for e in manifest["stages"] if e.get("metrics_after")]
    ppl = [manifest["baseline_metrics"].get("heldout_ppl")] + [
        e["metrics_after"].get("heldout_ppl") for e in manifest["stages"] if e.get("metrics_after")]
    ppl = [min(p, 1e12) if isinstance(p, (int, float)) else float("nan") for p in ppl]  # inf stays plottable
    colours = ["grey"] + ["tab:green" if e.get("decision") == "accepted" else "tab:red"
                          for e in manifest["stages"] if e.get("metrics_after")]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(labels)), 3.2))
    ax.bar(range(len(labels)), ppl, color=colours)
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title("after each stage (green accepted, red rolled back)", fontsize=9)
    fig.tight_layout()
    _save(fig, ws.root / "heldout_ppl.png")
    out.append(("Held-out perplexity", "heldout_ppl.png"))

    train = [m for m in ws.read_metrics() if m.get("phase") == "train" and "loss" in m]
    if train:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for key in dict.fromkeys(m["stage"] for m in train):
            pts = [(m["step"], m["loss"]) for m in train if m["stage"] == key]
            ax.plot(*zip(*pts), label=key, marker=".")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
        fig.tight_layout()
        _save(fig, ws.root / "train_loss.png")
        out.append(("Training loss", "train_loss.png"))
    return out


def _save(fig, path: Path) -> None:
    """Render in memory, then write atomically: a kill never leaves half a PNG."""
    atomic_write_figure(fig, path, dpi=110)
