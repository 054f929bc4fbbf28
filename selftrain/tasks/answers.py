"""Answers checked by code: numbers read out of model text, matched against a computed answer,
and the arithmetic that computes them (for the eval rows and the self-play family alike)."""

from __future__ import annotations

import math
import operator
import re

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")  # applied after thousands separators (commas) are removed

ARITHMETIC_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def numbers(text: str) -> list[float]:
    """Every number in ``text``, in order: "-3", "2.5", "1,024" (a thousands separator) -> 1024."""
    return [float(n) for n in NUMBER.findall(text.replace(",", ""))]


def first_number(text: str) -> float | None:
    """The first number in ``text`` ("The answer is 12." -> 12.0), or None."""
    m = NUMBER.search(text.replace(",", ""))
    return float(m.group()) if m else None


def final_number(text: str) -> float | None:
    """The last number in ``text`` (a solver may restate the question before answering), or None."""
    found = numbers(text)
    return found[-1] if found else None


def answer_matches(output: str, gold: str, *, match: str = "exact", regex: str | None = None) -> bool:
    """Whether a generated ``output`` answers ``gold``.

    ``exact``: equal after stripping spaces; ``numeric``: the first number of each is equal;
    ``final_number``: the output's last number equals the gold's (first) number; ``regex``: the
    first group (or the whole match) of ``regex`` in the output equals the gold, stripped.
    """
    if match in ("numeric", "final_number"):
        got = first_number(output) if match == "numeric" else final_number(output)
        want = first_number(gold)
        return got is not None and want is not None and math.isclose(got, want)
    if match == "regex":
        m = re.search(regex, output)
        got = (m.group(1) if m.groups() else m.group()) if m else None
        return got is not None and got.strip() == gold.strip()
    return output.strip() == gold.strip()


def operand_range(digits: int) -> tuple[int, int]:
    """The smallest and largest operand with ``digits`` digits (0-9 for one digit)."""
    return (10 ** (digits - 1) if digits > 1 else 0), 10 ** digits - 1


def arithmetic(a: int, op: str, b: int) -> int:
    """``a op b`` for op in + - *: the answer an arithmetic item is checked against."""
    return ARITHMETIC_OPS[op](a, b)
