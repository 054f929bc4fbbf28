"""Training the discriminator: a few optimizer steps at a time, interleaved with the generator's.

A GAN alternates its two players step by step, so the discriminator's updates are a small loop of
their own (AdamW on a two-class cross-entropy) rather than a ``Trainer`` run: each call takes the
real and generated texts of the moment. Three knobs weaken a discriminator that wins too easily
(a reward of ~0 for every sample carries no signal): one-sided label smoothing (real targets
1 - s, Salimans et al. 2016), instance noise (a share of input tokens replaced at random), and the
number of updates per generator step.

``calibrate`` fits one temperature on texts the discriminator never trained on (Guo et al. 2017),
so that its P(real) is a probability (the reward, and the threshold a filter applies, mean what
they say); the expected calibration error before and after is reported. The temperature is kept
within [0.5, 20].
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from selftrain.modeling.discriminator import Discriminator, real_probability

# A discriminator that separates its calibration set perfectly would be "calibrated" by sharpening
# without bound (every P(real) 0 or 1: a reward with no order left in it); 0.5 is as far as it goes.
MIN_TEMPERATURE = 0.5


@dataclass
class Weakening:
    """How hard the discriminator is being held back (grows each time it wins too easily)."""

    label_smoothing: float = 0.0
    noise: float = 0.0  # share of input tokens replaced by random ones during updates
    updates: int = 1  # optimizer steps per generator step
    times: int = 0  # how often it was weakened

    def weaken(self, *, smoothing_step: float = 0.1, noise_step: float = 0.05) -> None:
        """More smoothing and noise (never less than now), half the updates (never below one)."""
        self.label_smoothing = max(self.label_smoothing, round(min(0.45, self.label_smoothing + smoothing_step), 3))
        self.noise = max(self.noise, round(min(0.5, self.noise + noise_step), 3))
        self.updates = max(1, self.updates // 2) if self.updates else 0  # 0 (frozen) stays frozen
        self.times += 1

    def as_dict(self) -> dict:
        return asdict(self)


class DiscriminatorUpdater:
    """The discriminator's optimizer and its update step (real = 1, generated = 0)."""

    def __init__(self, disc: Discriminator, *, learning_rate: float, batch_size: int, seed: int):
        self.disc, self.batch_size = disc, batch_size
        self.optimizer = torch.optim.AdamW(disc.model.parameters(), lr=learning_rate, weight_decay=0.01)
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Minibatch and noise draws from ``seed`` (each round reseeds, so a resumed game draws alike)."""
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def save(self, path: Path) -> None:
        torch.save(self.optimizer.state_dict(), path)

    def load(self, path: Path) -> None:
        """The optimizer's moments from a saved round (tensors and numbers only: ``weights_only``)."""
        self.optimizer.load_state_dict(torch.load(path, weights_only=True, map_location=self.disc.model.device))

    def update(self, real: list[str], fake: list[str], *, steps: int, weakening: Weakening) -> float:
        """``steps`` optimizer steps on minibatches drawn from ``real`` and ``fake``; the mean loss."""
        real, fake = [t for t in real if t.strip()], [t for t in fake if t.strip()]  # empty ones are never real: P = 0 by rule
        model = self.disc.model
        if not real or not fake:
            return float("nan")
        model.train()
        losses = []
        half = max(1, self.batch_size // 2)
        for _ in range(steps):
            r = self.rng.sample(real, min(half, len(real)))
            f = self.rng.sample(fake, min(half, len(fake)))
            batch = self.disc.encode(r + f)
            batch["input_ids"] = self._noised(batch["input_ids"], batch["attention_mask"], weakening.noise)
            target = torch.tensor([1.0 - weakening.label_smoothing] * len(r) + [0.0] * len(f),
                                  device=model.device)
            logits = self.disc.logits(batch)
            loss = F.cross_entropy(logits, torch.stack([1 - target, target], dim=1))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            self.optimizer.step()
            losses.append(float(loss.detach()))
        model.eval()
        return sum(losses) / len(losses) if losses else float("nan")

    def _noised(self, ids: torch.Tensor, mask: torch.Tensor, rate: float) -> torch.Tensor:
        if rate <= 0:
            return ids
        hit = (torch.rand(ids.shape, generator=self.gen) < rate).to(ids.device) & mask.bool()
        random_ids = torch.randint(0, self.disc.model.config.vocab_size, ids.shape, generator=self.gen).to(ids.device)
        return torch.where(hit, random_ids, ids)


def accuracy(disc: Discriminator, real: list[str], fake: list[str]) -> dict:
    """Balanced accuracy (threshold 0.5) and the mean P(real) of each side."""
    p_real, p_fake = disc.p_real(real), disc.p_real(fake)
    return {"accuracy": float(((p_real > 0.5).mean() + (p_fake <= 0.5).mean()) / 2),
            "p_real_of_real": float(p_real.mean()), "p_real_of_generated": float(p_fake.mean())}


def expected_calibration_error(p: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Mean |confidence - accuracy| over equal-width confidence bins, weighted by their size."""
    confidence = np.maximum(p, 1 - p)
    correct = (p > 0.5) == labels.astype(bool)
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    return float(sum(abs(confidence[which == b].mean() - correct[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def calibrate(disc: Discriminator, real: list[str], fake: list[str]) -> dict:
    """Fit the temperature that minimises the log loss on (real, fake); set it; before/after figures."""
    from scipy.optimize import minimize_scalar

    fake = [t for t in fake if t.strip()]  # empty samples score 0 by rule, not by the temperature
    logits = disc.raw_logits(real + fake)
    labels = np.array([1] * len(real) + [0] * len(fake))

    def log_loss(log_t: float) -> float:
        p = np.clip(real_probability(logits, math.exp(log_t)), 1e-7, 1 - 1e-7)
        return float(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean())

    before_t = disc.temperature
    ece_before = expected_calibration_error(real_probability(logits, before_t), labels)
    best = minimize_scalar(log_loss, bounds=(math.log(MIN_TEMPERATURE), math.log(20.0)), method="bounded")
    disc.temperature = float(math.exp(best.x))
    return {"temperature": round(disc.temperature, 4),
            "ece_before": round(ece_before, 4),
            "ece_after": round(expected_calibration_error(real_probability(logits, disc.temperature), labels), 4),
            "calibration_texts": len(labels)}
