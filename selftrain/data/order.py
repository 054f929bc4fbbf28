"""Data-order policies: in which order a training stage sees its texts.

``random`` is the trainer's own shuffle. ``paced`` is a curriculum: rows drawn easy to hard by
``column`` under a competence schedule (``selftrain.data.pacing``; the pacing options sit beside
``policy`` in the same mapping). ``ascending`` / ``descending`` sort the texts by a pool
annotation column (``difficulty`` from a curriculum, say) and train them in that order; rows no
stage annotated (None) come last either way, and ties keep pool order. ``weighted`` draws as
many texts as there are, with replacement, each with probability proportional to the column's
value (``weight``), by a seeded draw; a row no stage weighed (added after the weights were set)
is drawn at the mean weight of the others, neither favoured nor left out.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Literal

import datasets
from pydantic import Field, model_validator

from selftrain.data.pacing import PacingOptions
from selftrain.errors import SelftrainError


class OrderOptions(PacingOptions):
    policy: Literal["random", "ascending", "descending", "weighted", "paced"] = Field(
        "random", description="random (shuffled), ascending / descending by `column`, weighted draws by `column`, "
                              "or paced (a curriculum on `column` under `pacing`).")
    column: str | None = Field(None, description="Pool annotation column that sorts, weighs or paces the texts (difficulty, weight).")

    @model_validator(mode="after")
    def _column_given(self):
        if self.policy != "random" and not self.column:
            raise ValueError(f"order.policy={self.policy} needs order.column (a pool annotation column)")
        pacing = sorted(f for f, info in PacingOptions.model_fields.items() if getattr(self, f) != info.default)
        if self.policy != "paced" and pacing:  # defaults pass, so a full dump of a config loads back
            raise ValueError(f"order.{pacing[0]} is a pacing option: it needs order.policy=paced")
        return self


def column_values(ds: datasets.Dataset, column: str, rows: Sequence[int] | None = None) -> list:
    """``column``'s values for ``rows`` of ``ds`` (all rows by default); SelftrainError if it is missing."""
    if column not in ds.column_names:
        raise SelftrainError(f"order.column {column!r} is not a pool column; the pool has "
                             f"{', '.join(ds.column_names)} (annotation columns come from earlier stages)")
    values = ds[column][:]  # one batch read (iterating a lazy column reads row by row)
    return values if rows is None else [values[i] for i in rows]


def order_of(values: Sequence, policy: str, seed: int) -> list[int] | None:
    """Positions into ``values`` in the order ``policy`` trains them; None for ``random``."""
    if policy == "random":
        return None
    known = [i for i, v in enumerate(values) if v is not None]
    if policy in ("ascending", "descending"):
        try:
            ranked = sorted(known, key=lambda i: values[i], reverse=policy == "descending")  # stable: ties keep order
        except TypeError:
            kinds = sorted({type(values[i]).__name__ for i in known})
            raise SelftrainError(f"order.policy={policy}: the column mixes values that do not sort together "
                                 f"({', '.join(kinds)})") from None
        return ranked + [i for i, v in enumerate(values) if v is None]
    if policy == "weighted":
        known_weights = [v for v in values if v is not None]
        numeric = lambda w: isinstance(w, (int, float)) and not isinstance(w, bool)  # noqa: E731
        if not all(numeric(w) for w in known_weights):
            bad = next(w for w in known_weights if not numeric(w))
            raise SelftrainError(f"order.policy=weighted needs numbers; the column holds {bad!r}")
        mean = sum(known_weights) / len(known_weights) if known_weights else 0.0
        weights = [mean if v is None else v for v in values]
        if not all(isinstance(w, (int, float)) and w >= 0 for w in weights):
            bad = next(w for w in weights if not isinstance(w, (int, float)) or w < 0)
            raise SelftrainError(f"order.policy=weighted needs weights >= 0; the column holds {bad!r}")
        if not any(weights):
            raise SelftrainError("order.policy=weighted: every weight is 0 or missing; nothing could be drawn")
        return random.Random(seed).choices(range(len(values)), weights=weights, k=len(values))
    raise SelftrainError(f"unknown order policy {policy!r}")


def pool_order(ds: datasets.Dataset, options: OrderOptions, seed: int,
               rows: Sequence[int] | None = None) -> list[int] | None:
    """The training order of ``rows`` of the pool dataset ``ds`` (positions into ``rows``, or into
    ``ds`` when ``rows`` is None) under ``options``; None for random (and for paced, whose order is
    drawn step by step by a sampler as training runs)."""
    if options.policy in ("random", "paced"):
        return None
    return order_of(column_values(ds, options.column, rows), options.policy, seed)


def published_pacing(artefacts: dict) -> tuple[str, PacingOptions] | None:
    """(column, pacing) an accepted ``curriculum`` stage published (artefact ``curriculum``), or None."""
    if "curriculum" not in artefacts:
        return None
    published = json.loads(artefacts["curriculum"].read_text())
    return published["column"], PacingOptions(**published["pacing"])


def inherited_order(options: OrderOptions, given: bool, artefacts: dict) -> OrderOptions:
    """The order a training stage uses: its own ``order`` when the config gives one (``given``),
    else the pacing a ``curriculum`` stage published, else ``options`` (random)."""
    published = None if given else published_pacing(artefacts)
    if published is None:
        return options
    column, pacing = published
    return OrderOptions(policy="paced", column=column, **pacing.model_dump())
