"""The Stage contract (v2) shared by every method, and the registry of stages.

A stage is one module under ``selftrain/stages/``: a class decorated with ``@register``, with a
pydantic ``Config`` (every field has a one-line ``description``; ``selftrain stages NAME`` prints
them), capability flags the runner checks before anything is written (``requires_causal``), an
optional ``preflight`` for input the stage cannot use, ``run(state, config) -> StageResult`` and
``report(entry) -> markdown`` for its section of the run's report. Stages never import each other.

``run`` reads the accepted checkpoint (``state.load_model()``), the pool with every earlier
stage's annotation columns (``state.pool.ds``; rows an accepted stage marked ``duplicate_of``
are left out, though the pool file keeps them), earlier artefacts (``state.artefacts``) and
auxiliary models (``state.auxiliary``); it writes only inside ``state.stage_dir`` and returns:

- ``checkpoint``: a new model directory, or None when the model is unchanged;
- ``additions``: new pool rows with provenance (``data.pool.make_examples``), capped by the guard;
- ``annotations``: new columns on rows the pool held when the stage started, ``{column: {row id:
  value}}`` (``cluster``, ``duplicate_of``, ``difficulty``, ``weight``), one value type per
  column; kept per stage like additions (a restart drops those of the stages it redoes), and
  laid over the pool for every later stage once the stage is accepted;
- ``artefacts``: named files for later stages and the report (``{"cluster_map": path}``);
- ``auxiliary``: named model directories a later stage may load (a trained discriminator);
- ``metrics``: JSON-able numbers and lists, kept in the manifest and passed to ``report``.

A later stage's artefact or auxiliary model of the same name replaces an earlier one's. The
runner evaluates the new checkpoint on held-out real text, and the guard accepts or rolls back
the whole result (a rolled-back or failed attempt's weights, auxiliary ones included, are
deleted). Stages train through ``selftrain.training``, whose LM, SFT and DPO functions take an
explicit data order: a stage that trains on pool rows exposes it as an option built from
annotations (``selftrain.data.order``; random by default), and a curriculum calls them with its
own. ``lm_train`` keeps Trainer checkpoints in the stage directory, so a killed attempt resumes
where it was, for the main model or an auxiliary one. An example stage, complete::

    from pydantic import Field

    from selftrain.stages.base import RunState, Stage, StageConfig, StageResult, register
    from selftrain.workspace import atomic_write_text


    class LengthConfig(StageConfig):
        bins: int = Field(3, ge=2, description="Number of length classes.")


    @register
    class LengthStage(Stage):
        \"\"\"Annotates every text with its length class (a toy difficulty).\"\"\"

        name = "length"
        Config = LengthConfig

        def run(self, state: RunState, config: LengthConfig) -> StageResult:
            ids, texts = state.pool.ds["id"], state.pool.ds["text"]
            cuts = sorted(len(t) for t in texts)
            edges = [cuts[len(cuts) * i // config.bins] for i in range(1, config.bins)]
            length = {i: sum(len(t) > e for e in edges) for i, t in zip(ids, texts)}
            histogram = state.stage_dir / "histogram.txt"
            atomic_write_text(histogram, "\\n".join(str(len(t)) for t in texts))
            return StageResult(annotations={"length": length}, artefacts={"lengths": histogram},
                               metrics={"edges": edges})

        def report(self, entry: dict) -> str:
            return f"Length classes split at {entry['stage_metrics']['edges']} characters."
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from selftrain.config import RunConfig, format_validation_error, unknown_name
from selftrain.data.pool import Pool
from selftrain.errors import SelftrainError
from selftrain.modeling.factory import load_checkpoint


class StageConfig(BaseModel):
    """Base of every stage's Config: unknown options are errors. ``target`` is read by the guard."""

    model_config = ConfigDict(extra="forbid")

    target: str | None = Field(
        None, description="Evaluation metric this stage sets out to raise (e.g. arith_0shot_acc): the guard asks it "
        "to rise, and lets protected metrics give up to guard.forgetting_budget.")


@dataclass
class RunState:
    config: RunConfig
    checkpoint: Path  # the last accepted model directory
    kind: str  # "causal" or "masked"
    pool: Pool  # every row so far but those marked duplicate_of, with the annotation columns of accepted stages
    heldout: list[str]  # held-out real texts: to keep evaluation items out of training, never to train on
    seed: int
    round: int = 1
    stage_key: str = ""
    stage_dir: Path = Path(".")
    device: str = "cpu"
    artefacts: dict[str, Path] = field(default_factory=dict)  # name -> file, from accepted stages
    auxiliary: dict[str, Path] = field(default_factory=dict)  # name -> model directory, from accepted stages
    log: Callable[[dict], None] = lambda record: None

    def load_model(self):
        """(model, tokenizer) of the accepted checkpoint, on the run's device."""
        model, tokenizer = load_checkpoint(self.checkpoint, self.kind)
        return model.to(self.device), tokenizer


@dataclass
class StageResult:
    checkpoint: Path | None = None  # new model directory inside stage_dir, or None if unchanged
    additions: list[dict] = field(default_factory=list)  # pool rows with provenance columns
    annotations: dict[str, dict[str, Any]] = field(default_factory=dict)  # column -> {row id: value}
    artefacts: dict[str, Path] = field(default_factory=dict)  # name -> file inside stage_dir
    auxiliary: dict[str, Path] = field(default_factory=dict)  # name -> model directory inside stage_dir
    metrics: dict[str, Any] = field(default_factory=dict)


class Stage:
    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]]
    requires_causal: ClassVar[bool] = False  # generates or scores continuations: refused for a masked LM

    def preflight(self, config: StageConfig, *, model, tokenizer, kind: str, train_texts: Sequence[str]) -> None:
        """Raise SelftrainError for input this stage cannot use; called before anything is written.
        ``train_texts`` is a lazy view of the pool (index, slice or iterate it; do not copy it whole)."""

    def runs_model_code(self, config: StageConfig) -> bool:
        """Whether this stage executes code a model wrote (the runner then requires
        ``sandbox.min_isolation`` before the run starts)."""
        return False

    def run(self, state: RunState, config: StageConfig) -> StageResult:
        raise NotImplementedError

    def report(self, entry: dict) -> str:
        """Markdown for this stage's section of report.md, from its manifest entry (``stage_metrics``,
        ``artefacts`` as run-relative paths, ``decision``); empty for none."""
        return ""


def discriminator_for(min_score: float | None, state: RunState, option: str):
    """The discriminator an accepted ``adversarial`` stage published, when a filter asks for one
    (``min_score`` set); None when it is off, or (with a warning) when no such stage was accepted."""
    if min_score is None:
        return None
    path = state.auxiliary.get("discriminator")
    if path is None:
        from rich.console import Console

        Console(stderr=True).print(f"[yellow]{option} is set, but no accepted adversarial stage has published a "
                                   "discriminator yet: the filter is skipped (the stage's metrics say so)[/]")
        return None
    from selftrain.modeling.discriminator import Discriminator

    disc = Discriminator.load(path)
    disc.model.to(state.device)
    return disc


def code_span(text: str, limit: int | None = None) -> str:
    """Text from the data or the model, for a report line or table cell: one line, cut at ``limit``
    characters, in a code span long enough that no backtick inside ends it (so it is shown, never
    rendered as Markdown), pipes escaped for tables."""
    text = " ".join(str(text).split())
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    ticks = "`" * (1 + max((len(run) for run in re.findall("`+", text)), default=0))
    return f"{ticks} {text} {ticks}".replace("|", "\\|")


def fmt(value, digits: int = 2) -> str:
    """A number for a report table: ``-`` for none, floats to ``digits`` places."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------- the registry

REGISTRY: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage available under ``cls.name`` in configs."""
    if not (isinstance(getattr(cls, "name", None), str) and isinstance(getattr(cls, "Config", None), type)
            and issubclass(cls.Config, StageConfig)):
        raise TypeError(f"{cls.__name__}: a stage needs a `name` and a `Config` subclassing StageConfig")
    if REGISTRY.get(cls.name, cls) is not cls:
        raise TypeError(f"stage name {cls.name!r} is taken by {REGISTRY[cls.name].__qualname__}")
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class StageSpec:
    """One validated stage entry: its registered name and its own config."""

    name: str
    config: StageConfig


def stage_specs(config: RunConfig) -> list[StageSpec]:
    """Validate each ``stages:`` entry against its stage's own Config (the one place that does)."""
    specs = []
    for i, entry in enumerate(config.stages):
        if isinstance(entry, str):
            entry = {entry: {}}
        if len(entry) != 1:
            raise SelftrainError(f"config error at stages[{i}]: each stage is one key, e.g. "
                                 f"`- pretrain: {{max_steps: 100}}`; got keys {sorted(entry)}")
        (name, options), = entry.items()
        if name not in REGISTRY:
            raise SelftrainError(f"config error at stages[{i}]: {unknown_name(name, REGISTRY, what='stage')}")
        if options is not None and not isinstance(options, dict):
            raise SelftrainError(f"config error at stages[{i}].{name}: expected a mapping of options")
        cls = REGISTRY[name]
        try:
            specs.append(StageSpec(name=name, config=cls.Config(**(options or {}))))
        except ValidationError as e:
            raise SelftrainError(format_validation_error(e, cls.Config, f"stages[{i}].{name}")) from None
    return specs


def stage_fingerprint(spec: StageSpec) -> str:
    """Hash of one stage's options (those not at their default), to tell if a finished one changed."""
    dump = {"name": spec.name, "config": spec.config.model_dump(mode="json", exclude_defaults=True)}
    return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]
