"""One module per label-free method; each registers a Stage under its config name."""

from selftrain.stages.base import RunState, Stage, StageConfig, StageResult
from selftrain.stages.fewshot import FewshotStage
from selftrain.stages.pretrain import PretrainStage
from selftrain.stages.self_instruct import SelfInstructStage
from selftrain.stages.selfplay import SelfplayStage

REGISTRY: dict[str, type[Stage]] = {cls.name: cls for cls in (PretrainStage, FewshotStage, SelfInstructStage,
                                                           SelfplayStage)}

__all__ = ["REGISTRY", "RunState", "Stage", "StageConfig", "StageResult"]
