"""softprompt.support: the supported-architectures table is the architecture matrix, and the README shows it."""

from __future__ import annotations

from pathlib import Path

import pytest
from archs import ARCHS, REFUSED

from softprompt.cli import main


def test_supported_table_lists_exactly_the_matrix(capsys: pytest.CaptureFixture[str]) -> None:
    """`softprompt models --architectures` and the README show one table, and it claims what the matrix runs."""
    from softprompt import support

    assert support.model_types() == {a.model_type for a in ARCHS}
    refused = {t for f in support.FAMILIES if f.path == "refused" for t in f.model_types}
    assert refused == {next(a.model_type for a in ARCHS if a.id == r) for r in REFUSED}
    assert main(["models", "--architectures"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == support.markdown()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert out in readme, (
        "README's supported-architectures table is out of date: paste `softprompt models --architectures`"
    )
