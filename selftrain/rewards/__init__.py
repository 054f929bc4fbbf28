"""Reward functions in TRL's convention: ``f(prompts, completions, **columns) -> list[float | None]``.

``None`` means "no opinion on this sample" (TRL skips it when weighting several rewards).
Completions may be strings or chat messages (a list of ``{"role", "content"}``); ``completion_text``
reads both. Verifiers of answers computed by code live with their tasks (``selftrain.tasks``:
``answers``, the self-play families' ``check``).
"""

from __future__ import annotations


def completion_text(completion) -> str:
    """The text of a completion: the string itself, or the content of the last chat message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a string or a list of chat messages, not {type(completion).__name__}")
