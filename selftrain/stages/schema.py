"""Every stage's options, read from their pydantic Configs: as rows of help text (``selftrain
stages NAME``) and as the JSON Schema of a whole run config (``selftrain config --schema``), so an
editor can validate and complete a YAML config."""

from __future__ import annotations

import json
import sys
import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic_core import PydanticUndefined

from selftrain.config import RunConfig
from selftrain.stages.base import REGISTRY


def type_name(annotation: Any) -> str:
    """``int``, ``auto|clm|mlm``, ``float | None``, ``list[str]``: what a user may write."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation.__name__
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _nested(annotation: Any) -> type[BaseModel] | None:
    """The section model of a field typed ``Model`` or ``Model | None`` (not ``list[Model]``)."""
    candidates = typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) \
        else (annotation,)
    found = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
    return found[0] if found else None


def option_rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(option, type, default, description) for every field, nested sections flattened with dots."""
    rows = []
    # the option every stage shares (the guard's target) comes last, after the stage's own
    fields = sorted(model.model_fields.items(), key=lambda item: item[0] == "target" and not prefix)
    for name, info in fields:
        key = f"{prefix}{name}"
        nested = _nested(info.annotation)
        if nested is not None and info.default is not None:  # a section: its own rows show the defaults
            default = "(required)" if info.is_required() else ""
        elif info.default is not PydanticUndefined:
            default = json.dumps(info.default.model_dump(mode="json") if isinstance(info.default, BaseModel)
                                 else info.default, default=str)
        elif info.default_factory is not None:
            made = info.default_factory()
            default = json.dumps(made.model_dump(mode="json") if isinstance(made, BaseModel) else made, default=str)
        else:
            default = "(required)"
        rows.append((key, type_name(info.annotation), default, info.description or ""))
        if nested is not None:
            rows += option_rows(nested, prefix=f"{key}.")
    return rows


def summary(cls) -> str:
    """One line on what a stage does: its class docstring, else its module's."""
    doc = cls.__doc__ or sys.modules[cls.__module__].__doc__ or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def config_schema() -> dict:
    """JSON Schema of a run config, with each registered stage's options under its name."""
    entries = []
    for name, cls in sorted(REGISTRY.items()):
        entries.append(create_model(
            f"stage_{name}", __config__=ConfigDict(extra="forbid", title=f"stage {name}"),
            **{name: (cls.Config | None, Field(..., description=summary(cls)))}))  # `name:` with no options: null
    names = Literal[tuple(sorted(REGISTRY))]  # a bare name runs the stage with its defaults
    typed = create_model("RunConfig", __base__=RunConfig, stages=(
        list[Union[(names, *entries)]], Field(..., min_length=1, description="Stages, in order.")))
    schema = typed.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
