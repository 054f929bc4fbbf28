"""The Stage contract shared by every method.

A stage has a ``name``, a pydantic ``Config`` (every field with a one-line description), an
optional ``preflight`` that rejects bad input before the run directory is touched, and
``run(state, config) -> StageResult``. It reads the accepted checkpoint and the pool from
``state``, writes only inside ``state.stage_dir``, and returns a new checkpoint (or None),
pool additions (with provenance) and its own metrics. The runner evaluates, guards and commits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from selftrain.config import RunConfig
from selftrain.data.pool import Pool
from selftrain.modeling.factory import load_checkpoint


class StageConfig(BaseModel):
    """Base of every stage's Config: unknown options are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class RunState:
    config: RunConfig
    checkpoint: Path  # the last accepted model directory
    kind: str  # "causal" or "masked"
    pool: Pool
    heldout: list[str]  # held-out real texts: for measuring, never for training
    seed: int
    round: int = 1
    stage_key: str = ""
    stage_dir: Path = Path(".")
    device: str = "cpu"
    log: Callable[[dict], None] = lambda record: None

    def load_model(self):
        """(model, tokenizer) of the accepted checkpoint, on the run's device."""
        model, tokenizer = load_checkpoint(self.checkpoint, self.kind)
        return model.to(self.device), tokenizer


@dataclass
class StageResult:
    checkpoint: Path | None = None  # new model directory inside stage_dir, or None if unchanged
    additions: list[dict] = field(default_factory=list)  # pool rows with provenance columns
    metrics: dict[str, Any] = field(default_factory=dict)


class Stage:
    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]]

    def preflight(self, config: StageConfig, *, model, tokenizer, kind: str, train_texts: list[str]) -> None:
        """Raise SelftrainError for input this stage cannot use; called before anything is written."""

    def runs_model_code(self, config: StageConfig) -> bool:
        """Whether this stage executes code a model wrote (the runner then requires
        ``sandbox.min_isolation`` before the run starts)."""
        return False

    def run(self, state: RunState, config: StageConfig) -> StageResult:
        raise NotImplementedError
