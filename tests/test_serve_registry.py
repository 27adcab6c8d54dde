"""softprompt.serve.registry: task names (they become file names under --prompts, so anything that could
escape the folder or collide is refused)."""

from __future__ import annotations

import pytest

from softprompt.serve.errors import Unprocessable
from softprompt.serve.registry import validate_name


@pytest.mark.parametrize("name", ["sentiment", "a", "task-0001", "qa.v2", "A_b-c.d", "x" * 64])
def test_valid_task_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "..", "a..b", "a/b", "a\\b", "../x", "x" * 65, "a b", "-x",
                                  "t.safetensors", "caf\u00e9", "a\x00"])  # fmt: skip
def test_invalid_task_names(name: str) -> None:
    with pytest.raises(Unprocessable):
        validate_name(name)
