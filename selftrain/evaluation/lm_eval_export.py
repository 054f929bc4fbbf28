"""Export a selftrain task to lm-evaluation-harness: a task YAML plus the rows as JSONL.

Our task fields already carry lm-eval's names and Jinja templates, so this is a translation,
not a re-implementation: ``lm_eval --model hf --model_args pretrained=DIR --include_path OUT
--tasks NAME`` then scores any model directory selftrain wrote. Rows from generators are
written out as they were generated; for multiple_choice the gold becomes an index field.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from selftrain.tasks import TaskSpec

GOLD = "_selftrain_gold"


def export_lm_eval(task: TaskSpec, out_dir: Path, *, texts: list[str] | None = None, limit: int | None = None) -> Path:
    """Write ``<out_dir>/<name>.yaml`` and ``<name>.jsonl``; return the YAML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = task.docs(texts)[:limit] if limit else task.docs(texts)
    rows = out_dir / f"{task.name}.jsonl"
    with rows.open("w", encoding="utf-8") as f:
        for d in docs:
            gold = task.target(d)
            f.write(json.dumps({**d, GOLD: gold}) + "\n")
    spec = {
        "task": task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(rows.resolve())}},
        "test_split": "test",
        "fewshot_split": "test",  # lm-eval leaves the evaluated row out of its own demonstrations
        "doc_to_text": task.doc_to_text,
        "doc_to_target": GOLD,
        "target_delimiter": task.target_delimiter,
        "fewshot_delimiter": task.fewshot_delimiter,
    }
    if task.description:
        spec["description"] = task.description + task.fewshot_delimiter
    if task.output_type == "multiple_choice":
        spec.update(output_type="multiple_choice", doc_to_choice=task.doc_to_choice,
                    metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                 for m in ("acc", "acc_norm")])
    else:
        spec.update(output_type="generate_until",
                    generation_kwargs={"until": task.generation.until, "max_gen_toks": task.generation.max_new_tokens,
                                       "do_sample": False},
                    # lm-eval's exact_match compares whole strings: numeric/regex matching is ours alone
                    metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                  "ignore_whitespace": True}])
    path = out_dir / f"{task.name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return path
