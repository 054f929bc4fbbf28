"""Reward functions in TRL's convention: ``f(prompts, completions, **columns) -> list[float | None]``.

``None`` means "no opinion on this sample" (TRL skips it when weighting several rewards).
"""
