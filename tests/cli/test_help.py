"""Help texts name what the commands accept."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("command", ["train", "emit", "compare"])
def test_data_help_names_the_chat_and_instruction_formats(cli, command):
    text = " ".join(cli(command, "--help").stdout.split())
    assert "one document per line" in text and '{"text": ...}' in text
    assert '{"messages": [{"role": "user", "content": ...}, ...]}' in text
    assert '{"instruction": ..., "input": ..., "output": ...}' in text
