"""Verifiable task families for proposer/solver self-play.

The model (as proposer) writes a problem in free text; the family parses it and computes the
answer with code (Python arithmetic, a string function, or the sandbox running a program), so
no answer is ever written by a person or trusted from the model. The model (as solver) then
answers the family's solver prompt, and ``check`` compares its answer with the computed one.

A family is a small class: ``proposer_instruction`` (what to write), ``parse`` (text ->
``Problem`` or None when unparsable / outside the family), ``example`` (a problem as the proposer
is shown it), ``solver_question`` and ``check``.
``random_problem`` draws from the family's own generator, for the comparison arm of benches.

Every family carries an ``exclude`` set of canonical problem keys (``canonical``: for ``+`` and
``*`` the operands are ordered, so 23 + 45 and 45 + 23 are one problem): the evaluation items of a
run. ``random_problem`` draws until it gets a problem outside it, and the self-play environment
drops proposals inside it, so no evaluation item is ever a training problem.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from selftrain.errors import SelftrainError
from selftrain.sandbox import SandboxLimits, run_python
from selftrain.tasks.answers import ARITHMETIC_OPS, answer_matches, arithmetic, operand_range


@dataclass(frozen=True)
class Problem:
    question: str  # what the solver is asked, without the answer format instruction
    answer: str  # computed by the family, never by the model
    key: str  # canonical form, for deduplication and the replay buffer


class Family:
    """What every family shares: the evaluation exclusion and the generator that respects it."""

    exclude: frozenset[str] = frozenset()  # canonical keys of problems that must never be trained on
    max_draws = 10_000  # random_problem gives up (an error, not a hang) after this many excluded draws
    redraws = 0  # generator draws that fell in ``exclude`` and were drawn again

    def canonical(self, p: Problem) -> str:
        """The key under which two problems are the same item (the family's own key by default)."""
        return p.key

    def excluded(self, p: Problem | None) -> bool:
        return p is not None and bool(self.exclude) and self.canonical(p) in self.exclude

    def exclusion_keys(self, texts) -> set[str]:
        """Canonical keys of the texts that parse as problems of this family (the others add nothing)."""
        keys = set()
        for text in texts:
            p = self.parse(str(text))
            if p is not None:
                keys.add(self.canonical(p))
        return keys

    def random_problem(self, rng: random.Random) -> Problem:
        """A problem from the family's generator, never one in ``exclude`` (redrawn; counted in ``redraws``)."""
        for _ in range(self.max_draws):
            p = self._draw(rng)
            if not self.excluded(p):
                return p
            self.redraws += 1
        raise SelftrainError(f"the {self.name} generator drew {self.max_draws} excluded (evaluation) problems "
                             f"in a row; the exclusion set ({len(self.exclude)} keys) covers the family")

    def _draw(self, rng: random.Random) -> Problem:
        raise NotImplementedError


class Arithmetic(Family):
    """``A op B`` with operands of a fixed number of digits, e.g. two-digit addition."""

    name = "arithmetic"

    def __init__(self, digits: int = 2, ops: tuple[str, ...] = ("+",)):
        if not ops or any(op not in ARITHMETIC_OPS for op in ops):
            raise SelftrainError(f"arithmetic ops must be some of + - *, got {ops!r}")
        self.digits, self.ops = digits, tuple(ops)
        self.lo, self.hi = operand_range(digits)
        words = {"+": "addition", "-": "subtraction", "*": "multiplication"}
        kinds = " or ".join(words[o] for o in self.ops)
        self.proposer_instruction = (
            f"Write one new {kinds} problem with two {digits}-digit numbers. "
            f"Write it exactly in the form: What is A {self.ops[0]} B?")
        self._pattern = re.compile(r"(-?\d+)\s*([" + re.escape("".join(self.ops)) + r"xX×])\s*(-?\d+)")

    def parse(self, text: str) -> Problem | None:
        m = self._pattern.search(text)
        if not m:
            return None
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        op = "*" if op in "xX×" else op
        if op not in self.ops or not all(self.lo <= v <= self.hi for v in (a, b)):
            return None  # outside the family: wrong size or operator
        return Problem(f"{a} {op} {b}", str(arithmetic(a, op, b)), f"{a}{op}{b}")

    def example(self, p: Problem) -> str:
        return f"What is {p.question}?"

    def solver_question(self, p: Problem) -> str:
        return f"What is {p.question}? Reply with only the number."

    def check(self, completion: str, p: Problem) -> bool:
        """The last number of the first line: "23 + 45 = 68" counts; what follows a newline does not."""
        return answer_matches(completion.strip().split("\n")[0], p.answer, match="final_number")

    def canonical(self, p: Problem) -> str:
        """``a op b`` with the operands ordered for the commutative ops: 45+23 and 23+45 are one item."""
        m = re.fullmatch(r"(-?\d+) ([-+*]) (-?\d+)", p.question)
        if not m:
            return p.key
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        if op in "+*":
            a, b = min(a, b), max(a, b)
        return f"{a}{op}{b}"

    def _draw(self, rng: random.Random) -> Problem:
        a, b, op = rng.randint(self.lo, self.hi), rng.randint(self.lo, self.hi), rng.choice(self.ops)
        return self.parse(f"{a} {op} {b}")


_TRANSFORMS = {
    "reverse": lambda s: s[::-1],
    "uppercase": str.upper,
    "lowercase": str.lower,
    "sort the letters of": lambda s: "".join(sorted(s)),
    "double": lambda s: s + s,
    "count the vowels in": lambda s: str(sum(c in "aeiouAEIOU" for c in s)),
}


class StringTransforms(Family):
    """Named string functions of a short word: reverse "plane", uppercase "tree", ..."""

    name = "strings"

    def __init__(self, max_len: int = 8):
        self.max_len = max_len
        names = ", ".join(_TRANSFORMS)
        self.proposer_instruction = (
            f"Write one new string puzzle. Choose one operation from: {names}; and one English word "
            f"of at most {max_len} letters. Write it exactly in the form: operation \"word\"")
        self._pattern = re.compile(r"(" + "|".join(map(re.escape, _TRANSFORMS)) + r")\s*(?:the word\s*)?"
                                   r"[\"'“]([A-Za-z]{1," + str(max_len) + r"})[\"'”]", re.IGNORECASE)

    def parse(self, text: str) -> Problem | None:
        m = self._pattern.search(text)
        if not m:
            return None
        op, word = m.group(1).lower(), m.group(2)
        return Problem(f'{op} "{word}"', _TRANSFORMS[op](word), f"{op}:{word}")

    def example(self, p: Problem) -> str:
        return p.question

    def solver_question(self, p: Problem) -> str:
        return f"What is the result of: {p.question}? Reply with only the result."

    def check(self, completion: str, p: Problem) -> bool:
        line = completion.strip().split("\n")[0].strip().strip(".").strip("\"'“”` ")
        return line == p.answer

    def _draw(self, rng: random.Random) -> Problem:
        words = ["plane", "river", "stone", "garden", "pencil", "window", "apple", "tiger", "cloud", "music"]
        return self.parse(f'{rng.choice(list(_TRANSFORMS))} "{rng.choice(words)}"')


_CODE = re.compile(r"```(?:python)?\s*\n(.*?)```", re.DOTALL)


class PythonPrograms(Family):
    """A short program that prints one line; the sandbox runs it to compute the answer."""

    name = "python"

    def __init__(self, max_lines: int = 8, limits: SandboxLimits | None = None, min_isolation: str = "full"):
        self.max_lines, self.min_isolation = max_lines, min_isolation
        self.limits = limits or SandboxLimits(cpu_seconds=1, wall_seconds=3, memory_mb=256, output_chars=200)
        self.proposer_instruction = (
            f"Write one new short Python program (at most {max_lines} lines) that defines a function and "
            "prints one value computed by it. Put the program in a ```python code block.")

    def parse(self, text: str) -> Problem | None:
        m = _CODE.search(text)
        code = (m.group(1) if m else "").strip()
        if not code or "print(" not in code or code.count("\n") >= self.max_lines:
            return None
        result = run_python(code, limits=self.limits, min_isolation=self.min_isolation)
        out = result.stdout.strip()
        if not result.ok or not out or "\n" in out:
            return None  # crashed, timed out, printed nothing or several lines: not a usable problem
        return Problem(f"```python\n{code}\n```", out, " ".join(code.split()))

    def example(self, p: Problem) -> str:
        return p.question

    def solver_question(self, p: Problem) -> str:
        return f"What does this program print?\n{p.question}\nReply with only the output."

    def check(self, completion: str, p: Problem) -> bool:
        return completion.strip().split("\n")[0].strip().strip("`") == p.answer

    def _draw(self, rng: random.Random) -> Problem:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        body = rng.choice(["return x * {a} + {b}", "return x ** 2 - {b}", "return sum(range(x)) + {a}"])
        code = f"def f(x):\n    {body.format(a=a, b=b)}\nprint(f({rng.randint(1, 9)}))"
        return self.parse(f"```python\n{code}\n```")


FAMILIES = {"arithmetic": Arithmetic, "strings": StringTransforms, "python": PythonPrograms}


def make_family(name: str, **options):
    if name not in FAMILIES:
        raise SelftrainError(f"unknown task family {name!r}; choose one of {sorted(FAMILIES)}")
    try:
        return FAMILIES[name](**options)
    except TypeError as e:
        raise SelftrainError(f"bad options for task family {name!r}: {e}") from None
