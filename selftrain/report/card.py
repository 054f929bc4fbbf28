"""The final model's card: a Hugging Face README.md with YAML metadata (base model, tags, pipeline),
what was done to the model and what the guard decided, its metrics, where its training data came
from, and what label-free training leaves unmeasured."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml

from selftrain.modeling.factory import SMOLLM2_HUB_ID
from selftrain.stages.base import fmt
from selftrain.workspace import Workspace

LIMITS = """\
- **What was not measured.** No person judged this model's output. Every number above is an automatic
  measurement on held-out text of the same sources as the training text{tasks}; gains there need not carry
  to other text, other tasks or human preferences.
- **Gold labels only measured.** Where a task has labels, they scored the model; no label entered training.
- **Known failure modes of training on a model's own output.** Model collapse (less diverse, more repetitive
  text; the guard's distinct-2, entropy and self-BLEU detectors watch for it on a small sample, they do not
  rule it out); confirmation bias of pseudo-labels (a wrong label the model is sure of is taught as right);
  reward hacking in self-play (a verifier checks answers, not reasoning); forgetting of what the held-out
  text does not cover.
- **Inherited.** Whatever the base model and the unlabelled text contain (biases, errors, personal data) is
  still there, and synthetic text written by the model may repeat it."""


def base_model(config: dict) -> tuple[str | None, str]:
    """(hub id for the metadata or None, a sentence for the card)."""
    model = config.get("model", {})
    if model.get("preset") == "smollm2-135m":
        return SMOLLM2_HUB_ID, (f"[{SMOLLM2_HUB_ID}](https://huggingface.co/{SMOLLM2_HUB_ID}) (preset "
                                "`smollm2-135m`: its Q4_1 GGUF, dequantised)")
    if model.get("preset"):
        return None, f"none: a `{model['preset']}` model built from scratch, with a tokenizer trained on the corpus"
    source = str(model.get("pretrained"))
    if Path(source).exists() or "/" not in source or source.startswith((".", "/", "~")):
        return None, f"a local model directory, `{source}`"
    return source, f"[{source}](https://huggingface.co/{source})"


def model_card(ws: Workspace, manifest: dict, config: dict) -> str:
    hub_id, base_text = base_model(config)
    stages = manifest.get("stages", [])
    names = sorted({e["name"] for e in stages})
    meta = {"library_name": "transformers",
            "pipeline_tag": "text-generation" if manifest.get("model_kind") == "causal" else "fill-mask",
            "tags": ["selftrain", "label-free", *names]}
    if hub_id:
        meta["base_model"] = hub_id
    base, final = manifest.get("baseline_metrics", {}), manifest.get("final_metrics") or manifest.get(
        "accepted_metrics", {})
    name = manifest["run_name"]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {name}", "",
             f"Trained by selftrain, without human labels. Base model: "
             f"{base_text}.", "",
             "## What was done", "",
             "Each stage ran from the last accepted model; the same evaluation on held-out real text followed, "
             "and the guard accepted the stage or rolled it back.", "",
             "| stage | decision | why |", "|---|---|---|"]
    for e in stages:
        reason = str(e.get("reason", "")).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {e['key']} | {e.get('decision', e.get('status'))} | {reason} |")
    stop = manifest.get("stop")
    if stop:
        lines += ["", f"The rounds ended after round {stop.get('rounds')}: {stop['reason']}."]
    lines += ["", "## Metrics", "", "On held-out real text the model never trained on.", "",
              "| metric | base | this model |", "|---|---|---|"]
    task_keys = sorted(k for k in {**base, **final} if "shot_" in k and not k.endswith("_stderr"))
    for k in ("heldout_ppl", "heldout_entropy", "distinct_2", "self_bleu", *task_keys):
        if k in base or k in final:
            lines.append(f"| {k} | {fmt(base.get(k), 3)} | {fmt(final.get(k), 3)} |")
    lines += ["", "## Training data", ""]
    data = config.get("data", {})
    sources = data.get("train")
    lines.append(f"Unlabelled text from {', '.join(f'`{s}`' for s in ([sources] if isinstance(sources, str) else sources or []))}: "
                 f"{manifest['data'].get('train_documents')} documents for training, "
                 f"{manifest['data'].get('heldout_documents')} held out for evaluation only.")
    origins = _origins(ws, manifest)
    if origins:
        lines += ["", "The training pool at the end, by origin (every synthetic row records the real text and the "
                  "stage it came from in the run's pool):", "", "| origin | rows |", "|---|---|"]
        lines += [f"| {o} | {n} |" for o, n in origins.most_common()]
    tasks = [t.get("task") for t in config.get("eval", {}).get("tasks", []) if isinstance(t, dict)]
    lines += ["", "## Limits of label-free training", "",
              LIMITS.format(tasks=f" and the tasks {', '.join(tasks)}" if tasks else ""), "",
              "## Use", "", "```python", "from transformers import pipeline",
              f'pipe = pipeline("{meta["pipeline_tag"]}", model="PATH/TO/THIS/FOLDER")', "```", "",
              "## Reproduce", "",
              f"`selftrain run config.yaml` with the run's config (seed {config.get('run', {}).get('seed', 0)}); "
              "the run directory also holds its manifest (every decision) and report.", ""]
    return "\n".join(lines)


def _origins(ws: Workspace, manifest: dict) -> Counter:
    from selftrain.data.pool import Pool

    path = ws.abs(manifest.get("pool", "data/pool"))
    if not path.exists():
        return Counter()
    return Counter(Pool.load(path).ds.with_format("arrow")["origin"].to_pylist())
