"""The adversarial stage's reward: the discriminator's calibrated probability that a text is real.

The discriminator judges the whole window a reader would see (the prompt's real prefix, if any,
plus the completion), passed by the environment as the ``window`` column; without it, the
completion alone.
"""

from __future__ import annotations

from selftrain.rewards import completion_text


class DiscriminatorReward:
    """``f(prompts, completions, window=None) -> P(real)``, through whatever discriminator it holds now
    (the game updates that discriminator between generator steps)."""

    __name__ = "discriminator"

    def __init__(self, discriminator):
        self.discriminator = discriminator

    def __call__(self, prompts, completions, window=None, **_) -> list[float]:
        texts = list(window) if window is not None else [completion_text(c) for c in completions]
        return [float(p) for p in self.discriminator.p_real(texts)]
