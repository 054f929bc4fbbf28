"""One module per label-free method. Importing this package imports every module in it, and each
registers its stage with ``@register``: a new method is one new file here (and its tests)."""

import importlib
import pkgutil

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

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "schema"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "RunState", "Stage", "StageConfig", "StageResult", "StageSpec", "register",
           "stage_fingerprint", "stage_specs"]
