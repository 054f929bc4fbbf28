"""An explicit order of the training rows, through the Trainer's own sampler hook.

``OrderedSampling`` goes first in a trainer class's bases (``class LMTrainer(OrderedSampling,
Trainer)``); with ``order`` set, the training dataloader yields exactly those row indices, in
that order (repeated each epoch), instead of the trainer's shuffle. ``order`` may also be a
sampler of its own (a curriculum's ``data.pacing.PacedSampler``), used as it is. Everything else (batching,
gradient accumulation, distributed sharding, resuming mid-epoch) stays the trainer's.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from torch.utils.data import Sampler

from selftrain.errors import SelftrainError


class FixedOrder(Sampler[int]):
    """Yields the given indices, in order."""

    def __init__(self, order: Sequence[int]):
        self.order = list(order)

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class OrderedSampling:
    """Trainer mixin: ``order`` (row indices) replaces the trainer's random train sampler."""

    def __init__(self, *args, order: Sequence[int] | Sampler | None = None, **kwargs):
        self.order = order if order is None or isinstance(order, Sampler) else list(order)
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, *args, **kwargs):
        if self.order is None:
            return super()._get_train_sampler(*args, **kwargs)
        return self.order if isinstance(self.order, Sampler) else FixedOrder(self.order)


@functools.cache
def ordered(trainer_cls: type) -> type:
    """``trainer_cls`` with ``OrderedSampling`` mixed in (for trainers imported lazily, as TRL's)."""
    return type(f"Ordered{trainer_cls.__name__}", (OrderedSampling, trainer_cls), {})


def check_order(order: Sequence[int] | Sampler | None, n_rows: int) -> list[int] | Sampler | None:
    """The order as a list (a sampler as it is), or SelftrainError if it is empty or names a row
    that does not exist."""
    if order is None:
        return None
    if isinstance(order, Sampler):
        rows = getattr(order, "n", n_rows)
        if rows != n_rows:
            raise SelftrainError(f"the training sampler ranks {rows} rows, but there are {n_rows} training rows")
        return order
    order = [int(i) for i in order]
    if not order:
        raise SelftrainError("the training order is empty")
    bad = [i for i in order if not 0 <= i < n_rows]
    if bad:
        raise SelftrainError(f"the training order names row {bad[0]}, but there are {n_rows} training rows")
    return order
