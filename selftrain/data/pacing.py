"""Pacing: which training rows a curriculum may draw at each step (Platanios et al. 2019).

Rows are ranked by difficulty. At optimizer step t the model's *competence* c(t) in (0, 1] says
which share of the ranking is open: every draw of that step comes from the c(t) easiest rows
(the hardest, for ``direction: hard_first`` — anti-curriculum), uniformly. Competence grows from
``c0`` to 1 over the first ``ramp`` share of the steps (Platanios' T), after which every row is
open:

- ``linear``       c(t) = c0 + (1 - c0) t/T
- ``sqrt``         c(t) = sqrt(c0² + (1 - c0²) t/T)   (opens fast early: new rows stay a large share)
- ``exponential``  c(t) = c0 · (1/c0)^(t/T)            (opens slowly, then fast)
- ``baby_steps``   the ranking cut into ``buckets`` equal parts, opened one at a time at equal
                   intervals (Spitkovsky et al. 2010; Cirik et al. 2016)
- ``none``         no curriculum: each pass over the rows is a fresh seeded permutation (the baseline)

Every draw is a function of (seed, step, the ranking in force at that step): ``rescore`` (self-
paced mode) adds a ranking that takes effect from a given step on, and the history of rankings is
what a checkpoint saves, so a run resumed at step k draws exactly what the uninterrupted run drew
from step k on. Ties in difficulty are broken by a seeded shuffle, not by pool order; rows with no
difficulty (None) rank last. A ranking with no order at all (every difficulty equal) is drawn like
``none``: a curriculum over a random subset would only be an arbitrary one.

``length_at`` is sequence-length warm-up (Li et al. 2022): the training length grows linearly from
``length_warmup`` tokens to the full block over the same ramp.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.utils.data import Sampler

from selftrain.errors import SelftrainError

Pacing = Literal["none", "linear", "sqrt", "exponential", "baby_steps"]


class PacingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pacing: Pacing = Field("sqrt", description="Competence schedule: none (random order), linear, sqrt, exponential, baby_steps.")
    c0: float = Field(0.1, gt=0, le=1, description="Initial competence: share of the ranking open at step 0, in (0, 1] (baby_steps: 1/buckets).")
    ramp: float = Field(0.5, gt=0, le=1, description="Share of the steps over which competence grows from c0 to 1 (Platanios' T).")
    buckets: int = Field(5, ge=2, description="baby_steps: number of difficulty buckets opened one after another.")
    direction: Literal["easy_first", "hard_first"] = Field(
        "easy_first", description="easy_first (curriculum) or hard_first (anti-curriculum: the ranking reversed).")
    rescore_every: int | None = Field(
        None, ge=1, description="Self-paced: re-score difficulty with the current model every N steps (null: never).")
    length_warmup: int | None = Field(
        None, ge=1, description="Sequence-length warm-up: start at this many tokens per row, grow to the block over the ramp (null: off).")

    @model_validator(mode="after")
    def _exponential_needs_room(self):
        if self.pacing == "exponential" and self.c0 >= 1:
            raise ValueError("pacing=exponential grows c0 to 1; with c0=1 it is `none`: lower c0 or use pacing: none")
        return self


def competence(step: int, total_steps: int, options: PacingOptions) -> float:
    """c(step) in (0, 1]: the share of the difficulty ranking open at this optimizer step."""
    if options.pacing == "none":
        return 1.0
    t = min(1.0, step / max(1.0, options.ramp * total_steps))
    c0 = options.c0
    if options.pacing == "linear":
        c = c0 + (1 - c0) * t
    elif options.pacing == "sqrt":
        c = math.sqrt(c0 ** 2 + (1 - c0 ** 2) * t)
    elif options.pacing == "exponential":
        c = c0 * (1 / c0) ** t
    else:  # baby_steps: bucket k of K opens at t = k/K
        c = min(options.buckets, math.floor(t * options.buckets) + 1) / options.buckets
    return min(1.0, c)


def length_at(step: int, total_steps: int, block_size: int, options: PacingOptions) -> int:
    """Tokens per row at ``step`` under sequence-length warm-up: the largest divisor of
    ``block_size`` not above the linear ramp from ``length_warmup`` (so blocks split evenly)."""
    if options.length_warmup is None or options.length_warmup >= block_size:
        return block_size
    t = min(1.0, step / max(1.0, options.ramp * total_steps))
    target = options.length_warmup + (block_size - options.length_warmup) * t
    fits = [d for d in range(2, block_size + 1) if block_size % d == 0 and d <= target]  # 2: a row predicts a token
    return max(fits, default=block_size)


def rank_rows(difficulty: Sequence[float | None], direction: str, seed: int) -> list[int]:
    """Row indices from the first to be opened to the last: easiest first (hardest first for
    ``hard_first``), ties in seeded random order, rows with no difficulty last either way."""
    n = len(difficulty)
    tiebreak = list(range(n))
    random.Random(seed).shuffle(tiebreak)
    position = {row: k for k, row in enumerate(tiebreak)}
    known = [i for i in range(n) if difficulty[i] is not None]
    sign = -1.0 if direction == "hard_first" else 1.0
    ranked = sorted(known, key=lambda i: (sign * float(difficulty[i]), position[i]))
    return ranked + [i for i in tiebreak if difficulty[i] is None]


def check_difficulty(difficulty: Sequence[float | None]) -> None:
    """SelftrainError for difficulty a curriculum cannot rank: none given, or a value not a finite number."""
    if not len(difficulty):
        raise SelftrainError("the curriculum has no rows to rank")
    for v in difficulty:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise SelftrainError(f"a difficulty must be a finite number (or missing); got {v!r}")
    if all(v is None for v in difficulty):
        raise SelftrainError("no row has a difficulty: run a scorer (the `curriculum` stage) first")


def is_constant(difficulty: Sequence[float | None]) -> bool:
    """True when every known difficulty is the same: the ranking would only be the tie-break."""
    known = {float(v) for v in difficulty if v is not None}
    return len(known) <= 1


class PacedSampler(Sampler[int]):
    """Row indices for ``total_steps`` optimizer steps of ``per_step`` rows each, drawn under
    ``options``' competence schedule from rows ranked by ``difficulty``.

    ``per_step`` is every row one optimizer step consumes (micro-batch x accumulation x
    processes). Within a step rows are drawn without replacement while enough are open.
    ``history`` is [(from_step, difficulty), ...]: the rankings in force from each step on.
    """

    def __init__(self, difficulty: Sequence[float | None], options: PacingOptions, *, total_steps: int,
                 per_step: int, seed: int, history: list | None = None):
        check_difficulty(difficulty)
        if total_steps < 1 or per_step < 1:
            raise SelftrainError(f"a paced sampler needs steps and rows per step >= 1; got {total_steps}, {per_step}")
        self.options, self.total_steps, self.per_step, self.seed = options, total_steps, per_step, seed
        self.n = len(difficulty)
        self.history: list[tuple[int, list]] = []
        self._rankings: list[tuple[int, list[int], bool]] = []
        for from_step, values in history or [(0, difficulty)]:
            self.rescore(values, from_step)

    def rescore(self, difficulty: Sequence[float | None], from_step: int = 0) -> None:
        """A new difficulty for every row (self-paced mode), in force from ``from_step`` on. Give a
        step the data loader has not drawn yet (two past the current one: it fetches one ahead)."""
        check_difficulty(difficulty)
        if len(difficulty) != self.n:
            raise SelftrainError(f"rescore got {len(difficulty)} difficulties for {self.n} rows")
        self.history = [h for h in self.history if h[0] < from_step] + [(from_step, list(difficulty))]
        self._rankings = [r for r in self._rankings if r[0] < from_step] + [
            (from_step, rank_rows(difficulty, self.options.direction, self.seed), is_constant(difficulty))]

    @property
    def difficulty(self) -> list:
        """The latest difficulty given."""
        return self.history[-1][1]

    def ranking_at(self, step: int) -> tuple[list[int], bool]:
        """(ranking, whether it is constant) in force at ``step``."""
        return next((r, c) for s, r, c in reversed(self._rankings) if s <= step)

    def competence(self, step: int) -> float:
        return competence(step, self.total_steps, self.options)

    def open_rows(self, step: int) -> int:
        """How many rows of the ranking are open at ``step`` (at least one)."""
        return max(1, min(self.n, math.ceil(self.competence(step) * self.n - 1e-9)))

    def draw(self, step: int) -> list[int]:
        """The rows of optimizer step ``step``: a function of the seed, the step and the ranking in force."""
        ranking, constant = self.ranking_at(step)
        if self.options.pacing == "none" or constant:  # consecutive slices of fresh seeded permutations
            start = step * self.per_step
            return [self._permutation(s // self.n)[s % self.n] for s in range(start, start + self.per_step)]
        k = self.open_rows(step)
        rng = random.Random(self.seed * 1_000_003 + step)
        picks = rng.sample(range(k), self.per_step) if k >= self.per_step else rng.choices(range(k), k=self.per_step)
        return [ranking[p] for p in picks]

    def _permutation(self, epoch: int) -> list[int]:
        if getattr(self, "_epoch", None) != epoch:
            self._epoch, self._perm = epoch, random.Random(self.seed * 7919 + epoch).sample(range(self.n), self.n)
        return self._perm

    def __iter__(self) -> Iterator[int]:
        for step in range(self.total_steps):  # lazy: a rescore reaches the steps not yet drawn
            yield from self.draw(step)

    def __len__(self) -> int:
        return self.total_steps * self.per_step
