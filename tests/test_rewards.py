"""Verifier rewards on hand-made inputs."""

from __future__ import annotations

import pytest

from selftrain.rewards.verifiers import exact_reward, numeric_reward, program_output


def test_numeric_reward_checks_the_first_number():
    completions = [" 42", "The answer is 42.", " 41", "no idea", [{"role": "assistant", "content": "42"}], "7"]
    answers = ["42", "42", "42", "42", "42", "not computable"]
    assert numeric_reward(["p"] * 6, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0, None]


def test_exact_reward_compares_the_first_line():
    assert exact_reward(["p"] * 3, ["olleh\nmore", " olleh ", "hello"], answer=["olleh"] * 3) == [1.0, 1.0, 0.0]


def test_wrong_length_answer_column_is_a_clear_error():
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        numeric_reward(["p", "q"], ["1", "2"], answer=["1"])
    with pytest.raises(ValueError, match="no answers"):
        numeric_reward(["p"], ["1"])


def test_program_output_is_computed_in_the_sandbox():
    assert program_output("def f(x):\n    return x * 3\nprint(f(14))") == "42"
    assert program_output("while True:\n    pass") is None  # a hanging program gives no answer
    assert program_output("import os\nos.fork()") is None
