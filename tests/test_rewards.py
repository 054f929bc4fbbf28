"""Reward plumbing shared by every reward function."""

from __future__ import annotations

import pytest

from selftrain.rewards import completion_text


def test_completion_text_reads_strings_and_chat_messages():
    assert completion_text(" 42") == " 42"
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "42"}]) == "42"
    with pytest.raises(TypeError, match="string or a list of chat messages"):
        completion_text(42)
