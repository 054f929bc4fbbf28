"""Answers read out of model text and checked against computed ones; the one arithmetic."""

from __future__ import annotations

import random

import pytest

from selftrain.tasks.answers import (
    answer_matches,
    arithmetic,
    final_number,
    first_number,
    numbers,
    operand_range,
)
from selftrain.tasks.families import Arithmetic
from selftrain.tasks.generators import arithmetic as arithmetic_rows


@pytest.mark.parametrize("text, first, final", [
    ("The answer is 12.", 12.0, 12.0),
    ("-7", -7.0, -7.0),
    ("3.5 apples", 3.5, 3.5),
    ("It is 1,024", 1024.0, 1024.0),
    ("23 + 45 = 68", 23.0, 68.0),
    ("from -2.5 to 10,000.25.", -2.5, 10000.25),
    ("no numbers here", None, None),
    ("", None, None),
])
def test_one_number_regex_reads_negatives_decimals_and_thousands(text, first, final):
    assert first_number(text) == first and final_number(text) == final


def test_numbers_lists_every_number_in_order():
    assert numbers("1,234 and then 5, -6 or 7.5") == [1234.0, 5.0, -6.0, 7.5]
    assert final_number("1,234 and then 5") == 5.0


def test_answer_matches_each_mode():
    assert answer_matches(" 42.", "42", match="numeric") and answer_matches("It is 1,024", "1024", match="numeric")
    assert not answer_matches("41 or 42", "42", match="numeric")  # the first number counts
    assert answer_matches("41 or 42", "42", match="final_number")  # the last one does
    assert answer_matches("42.0", "42", match="numeric")
    assert not answer_matches("none", "42", match="numeric") and not answer_matches("42", "n/a", match="numeric")
    assert answer_matches(" Paris \n", "Paris") and not answer_matches("Paris.", "Paris")
    assert answer_matches("so #### 17 done", "17", match="regex", regex=r"#### (\d+)")
    assert answer_matches("it is 17", "17", match="regex", regex=r"\d+")  # no group: the whole match
    assert not answer_matches("nothing", "17", match="regex", regex=r"#### (\d+)")


def test_arithmetic_is_one_implementation_for_rows_and_family():
    assert [arithmetic(7, op, 3) for op in "+-*"] == [10, 4, 21]
    assert operand_range(1) == (0, 9) and operand_range(2) == (10, 99) and operand_range(3) == (100, 999)
    for row in arithmetic_rows(n=30, digits=2, ops=("+", "-", "*"), seed=0):
        p = Arithmetic(digits=2, ops=("+", "-", "*")).parse(f"What is {row['question']}?")
        assert p is not None and p.answer == row["answer"]  # the eval rows and the family agree
    p = Arithmetic(digits=1, ops=("-",)).random_problem(random.Random(1))
    a, _, b = p.question.split()
    assert int(p.answer) == int(a) - int(b)
