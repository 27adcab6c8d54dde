"""bench/compile_tasks.py: the compile study's fixed-seed samples are the same on every run and never put an evaluation row in
the training rows (the ICL demonstrations are drawn from them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import compile_tasks as study  # noqa: E402


@pytest.mark.parametrize("key", ["agnews", "rte"])
def test_samples_are_fixed_and_disjoint(key: str, tmp_path: Path) -> None:
    a = study.sample(study.TASKS[key], 60, 20, tmp_path / "a")
    if isinstance(a, str):
        pytest.skip(a)  # the shared data is absent
    b = study.sample(study.TASKS[key], 60, 20, tmp_path / "b")
    assert not isinstance(b, str)
    rows = [[json.loads(x) for x in Path(p).read_text().splitlines()] for p in (*a, *b)]
    assert rows[0] == rows[2] and rows[1] == rows[3] and len(rows[0]) == 60 and len(rows[1]) == 20
    assert not {json.dumps(r, sort_keys=True) for r in rows[0]} & {json.dumps(r, sort_keys=True) for r in rows[1]}


def test_a_missing_data_file_is_a_reason_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(study, "SHARED", tmp_path / "nowhere")
    why = study.sample(study.TASKS["sst2"], 10, 10, tmp_path)
    assert isinstance(why, str) and why.startswith("skipped:") and "not found" in why


def test_a_larger_sample_extends_the_training_rows_and_keeps_the_evaluation_rows(tmp_path: Path) -> None:
    small = study.sample(study.TASKS["sst2"], 40, 20, tmp_path / "small")
    if isinstance(small, str):
        pytest.skip(small)
    big = study.sample(study.TASKS["sst2"], 100, 20, tmp_path / "big")  # distill-deep-long's unlabelled inputs
    assert not isinstance(big, str)
    s_rows, b_rows = (Path(p[0]).read_text().splitlines() for p in (small, big))
    assert b_rows[:40] == s_rows and len(b_rows) == 100
    assert Path(small[1]).read_text() == Path(big[1]).read_text()
