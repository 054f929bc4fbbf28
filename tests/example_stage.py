"""The example of the Stage contract (v2): a whole new stage in one file, touching no other module.

It annotates every pool row with a length class, leaves an artefact (the length histogram) and
writes its own section of the report. A second run of it (round 2) reads what the first left:
the annotation column and the artefact. tests/test_stage_contract.py runs it through the runner.
"""

from __future__ import annotations

from pydantic import Field

from selftrain.stages.base import RunState, Stage, StageConfig, StageResult, register
from selftrain.workspace import atomic_write_text


class LengthClassesConfig(StageConfig):
    bins: int = Field(3, ge=2, description="Number of length classes (equal-count bins).")
    bad_id: bool = Field(False, description="Test only: also annotate a row id the pool does not hold.")
    artefact_outside: bool = Field(False, description="Test only: name an artefact outside the stage directory.")


@register
class LengthClassesStage(Stage):
    """Annotates every text with its length class (a toy difficulty score) and reports the cut points."""

    name = "example_lengths"
    Config = LengthClassesConfig

    def run(self, state: RunState, config: LengthClassesConfig) -> StageResult:
        ids, texts = state.pool.ds["id"], state.pool.ds["text"]
        lengths = sorted(len(t) for t in texts)
        edges = [lengths[len(lengths) * i // config.bins] for i in range(1, config.bins)]
        length_class = {i: sum(len(t) >= e for e in edges) for i, t in zip(ids, texts)}
        if config.bad_id:
            length_class["no-such-row"] = 0
        histogram = state.stage_dir / "lengths.txt"
        atomic_write_text(histogram, "\n".join(map(str, lengths)) + "\n")
        seen = state.pool.ds["length_class"] if "length_class" in state.pool.ds.column_names else []
        return StageResult(
            annotations={"length_class": length_class},
            artefacts={"lengths": state.stage_dir.parent if config.artefact_outside else histogram},
            metrics={"edges": edges, "rows": len(ids), "annotated_before": sum(v is not None for v in seen),
                     "artefact_before": str(state.artefacts.get("lengths", ""))})

    def report(self, entry: dict) -> str:
        m = entry["stage_metrics"]
        return (f"Length classes of {m['rows']} texts, split at {', '.join(map(str, m['edges']))} characters "
                f"(histogram: `{entry['artefacts']['lengths']}`).")
