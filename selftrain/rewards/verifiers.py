"""Verifier rewards: the answer is checked by code, never by a label someone wrote.

Each takes the dataset column that holds the computed answer (``answer``) as TRL passes extra
columns: ``reward(prompts, completions, answer=[...])``. Completions may be strings or chat
messages (a list of ``{"role", "content"}``); both are read.
"""

from __future__ import annotations

import math

from selftrain.evaluation.harness import extract_number
from selftrain.sandbox import SandboxLimits, run_python


def completion_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a string or a list of chat messages, not {type(completion).__name__}")


def _check_lengths(completions, answer) -> None:
    if answer is None or len(answer) != len(completions):
        raise ValueError(f"{len(completions)} completions but "
                         f"{'no' if answer is None else len(answer)} answers; pass the `answer` column")


def numeric_reward(prompts, completions, answer=None, **_) -> list[float | None]:
    """1.0 when the first number in the completion equals the answer, else 0.0."""
    _check_lengths(completions, answer)
    out: list[float | None] = []
    for c, a in zip(completions, answer):
        got, want = extract_number(completion_text(c)), extract_number(str(a))
        if want is None:
            out.append(None)  # the environment could not compute this one: no signal
        else:
            out.append(float(got is not None and math.isclose(got, want)))
    return out


def exact_reward(prompts, completions, answer=None, **_) -> list[float | None]:
    """1.0 when the completion's first line equals the answer (surrounding spaces ignored)."""
    _check_lengths(completions, answer)
    return [None if a is None else float(completion_text(c).strip().split("\n")[0].strip() == str(a).strip())
            for c, a in zip(completions, answer)]


def program_output(code: str, limits: SandboxLimits | None = None) -> str | None:
    """What a (model-written) program prints, computed in the sandbox; None if it fails."""
    result = run_python(code, limits=limits or SandboxLimits(cpu_seconds=1, wall_seconds=3, memory_mb=256))
    return result.stdout.strip() if result.ok else None
