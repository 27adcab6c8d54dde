"""bench/compile.py: every row the study offers can run and be reported, without loading a model: each --methods
name has a handler (an ICL context, a DEEP_ROWS entry or a run_ method), each DEEP_ROWS entry's settings are ones
Study._deep / Study._prompt / DistillObjective take, and the report has a label for every row (a distilled one among
DISTILLED, which the targets judge)."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import compile as study  # noqa: E402
from bench import compile_report as report  # noqa: E402
from softprompt.distill import DistillObjective  # noqa: E402


def _keywords(fn) -> set[str]:
    return {
        n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY or p.default is not p.empty
    }


def test_every_method_has_a_handler() -> None:
    for m in study.METHODS:
        handled = m in study.ICL_K or m in study.DEEP_ROWS or hasattr(study.Study, "run_" + m.replace("-", "_"))
        assert handled, f"--methods {m}: no ICL context, DEEP_ROWS entry or Study.run_{m.replace('-', '_')}"
    assert set(study.DEEP_ROWS) <= set(study.METHODS)


def test_deep_rows_settings_are_ones_the_study_takes() -> None:
    args = study.parser().parse_args([])
    takes = _keywords(study.Study._deep) | _keywords(study.Study._prompt)
    takes |= {f.name for f in dataclasses.fields(DistillObjective)} - {"base", "teacher"}
    for m, settings in study.DEEP_ROWS.items():
        got = settings(args)
        assert set(got) <= takes, f"{m}: {sorted(set(got) - takes)} are not settings of Study._deep"
    assert study.DEEP_ROWS["distill-deep-fast"](args)["lr"] == 3 * args.deep_lr  # read from the flags
    assert study.DEEP_ROWS["distill-deep-batch"](study.parser().parse_args(["--batch", "5"]))["batch"] == 20


def test_every_row_has_a_report_label() -> None:
    labels = dict(report.ROWS)
    for m in study.METHODS:
        # diagnostics: the notes and targets report them, not the table
        if m not in ("margins", "margins-dev", "accuracy-dev", "teacher-noise"):
            assert m in labels, f"compile_report.ROWS has no label for --methods {m}"
    for m in study.DEEP_ROWS:
        assert m in report.DISTILLED, f"{m} is distilled: compile_report.DISTILLED must list it"


def test_deep_rows_passes_over_their_inputs_are_their_labels() -> None:
    """The rows named by epochs see their inputs that many times: steps x batch / rows, with Study._deep's steps
    (epochs x times x --long-steps) and rows ((rows or times) x --long-train-n)."""
    a = study.parser().parse_args(["--batch", "8", "--long-steps", "250", "--long-train-n", "2000"])
    want = {"distill-deep-long": 1, "distill-deep-epochs": 4, "distill-deep-batch": 4, "distill-deep-data": 1,
            "distill-deep-batch-more": 4, "distill-deep-data-twice": 2}  # fmt: skip
    for m, passes in want.items():
        s = study.DEEP_ROWS[m](a)
        times = s.get("times", 1)
        steps = s.get("epochs", 1) * times * a.long_steps
        rows = (s.get("rows", 0) or times) * a.long_train_n
        assert steps * s.get("batch", a.batch) / rows == passes, m
    assert study.DEEP_ROWS["distill-deep-data-twice"](a)["rows"] * a.long_train_n == 8000


def test_margins_carries_a_gone_students_measurement_only_from_the_same_rows(tmp_path) -> None:
    """--redo margins-dev on a machine without a recorded student's checkpoint keeps its earlier measurement (marked
    with that record's date) when the earlier record measured the same held-out and fitted rows, else lists it
    missing; no checkpoint is on hand here, so no model runs."""
    from types import SimpleNamespace

    from bench.compile_diagnostics import margins

    rows = [SimpleNamespace(label=i % 2) for i in range(6)]
    student = {"task": "sst2", "agreement": 90.0}
    done = {"sst2:distill-deep-batch": student, "sst2:distill-deep-alpha": student, "sst2:pt": {"task": "sst2"}}
    fake = SimpleNamespace(
        done=done, eval_set=rows[:4], a=SimpleNamespace(margin_train_n=3), long_rows=lambda: "train.jsonl",
        probe=SimpleNamespace(encode_file=lambda path: (rows, None, None)),
        checkpoint=lambda name: tmp_path / f"{name.replace(':', '-')}.safetensors",
    )  # fmt: skip
    measured = {"teacher_k": "16long", "agreement": 88.0, "by_margin": []}
    previous = {"date": "2026-12-04", "eval_rows": 6, "train_rows": 3, "teacher_accuracy": {"16long": 83.0},
                "prompts": {"sst2:distill-deep-alpha": measured}}  # fmt: skip
    out = margins(fake, "sst2", rows, previous=previous)
    assert out["prompts"] == {"sst2:distill-deep-alpha": {**measured, "carried": "2026-12-04"}}
    assert out["missing"] == ["sst2:distill-deep-batch"] and out["teacher_accuracy"] == {"16long": 83.0}
    again = margins(fake, "sst2", rows, previous={**previous, "prompts": out["prompts"], "date": "2026-12-05"})
    assert again["prompts"]["sst2:distill-deep-alpha"]["carried"] == "2026-12-04"  # the measurement's own date
    other_rows = margins(fake, "sst2", rows[:5], previous=previous)  # measured on other rows: not comparable
    assert other_rows["prompts"] == {} and len(other_rows["missing"]) == 2


def test_redo_must_name_methods_being_run(capsys) -> None:
    import pytest

    with pytest.raises(SystemExit):
        study.main(["--methods", "pt", "--redo", "margins"])
    assert "--redo: margins not in --methods" in capsys.readouterr().err
