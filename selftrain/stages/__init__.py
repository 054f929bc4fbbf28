"""One module per label-free method; importing this package registers every stage (``@register``)."""

from selftrain.stages import fewshot, pretrain, self_instruct, selfplay  # noqa: F401  (they register)
from selftrain.stages.base import (
    REGISTRY,
    RunState,
    Stage,
    StageConfig,
    StageResult,
    StageSpec,
    register,
    stage_fingerprint,
    stage_specs,
)

__all__ = ["REGISTRY", "RunState", "Stage", "StageConfig", "StageResult", "StageSpec", "register",
           "stage_fingerprint", "stage_specs"]
