"""bench/quality_report.py: the results page states targets met or missed from the numbers it is given, and
bench/quality.py's cache merges runs written by concurrent `--only` streams."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import quality, quality_report  # noqa: E402


def run(acc: float, **kw: float) -> dict[str, float]:
    return {"accuracy": acc, "macro_f1": acc - 0.01, "trainable": 11520, "steps": 300, "bytes": 47000, **kw}


def test_targets_met_and_missed_are_stated(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    results = {
        "sst2/zero-shot": run(0.786),
        "sst2/pt-20": run(0.901, share=8.5e-5, curve=[(60, 0.85), (120, 0.901)]),
        "sst2/peft-20": run(0.887),
        "agnews/pt-20": run(0.861),
        "agnews/pt-20-500": run(0.885, steps=500),  # a longer run (--only agnews-long) meets the target
        "minilm/full-ft": run(0.905),
        "minilm/pt-linear": run(0.860, share=0.0006),
        "rte/pt-20/s0": run(0.50, date="2026-11-28 10:00", wall_s=600),
        "rte/pt-20/s1": run(0.54, date="2026-11-29 11:00", wall_s=660),
        "ablation/p5-vocab": run(0.7),
    }
    (tmp_path / "README.md").write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\ntail\n")
    docs = tmp_path / "docs"
    quality_report.render(results, "full", quality.FULL, ["x failed: boom"], docs)
    page = (docs / "results.md").read_text()
    readme = (tmp_path / "README.md").read_text()
    assert "old" not in readme and readme.startswith("intro\n") and readme.endswith("<!-- results:end -->\ntail\n")
    assert "| SST-2 | smollm2-135m PEFT prompt tuning, 20 tokens | 88.7 |" in readme
    assert "AG News | smollm2-135m zero-shot" not in readme  # not run: omitted
    assert "≥ PEFT with the same budget (tokens, steps): 20 tokens, 300 steps: 90.10% vs PEFT 88.70% — met" in page
    assert "AG News prompt tuning ≥ 88%: 20 tokens, 300 steps 86.1%; 20 tokens, 500 steps 88.5% — met" in page
    assert "| prompt tuning, 20 tokens, 500 steps | 88.5 |" in page
    assert "90.5% (gap 4.5 points, 0.06% of the parameters) — MISSED" in page
    assert "| RTE prompt tuning (2,240 examples, seed 0) (n=2 seeds) | 52.0 ± 2.8 |" in page
    assert "- x failed: boom" in page
    assert "Command: `python -m bench.quality --only pairs` (cached runs are skipped) · run on 2026-11-28, " in page
    assert "2026-11-29 · wall 21 min" in page
    assert (docs / "img" / "curves.png").stat().st_size > 0 and (docs / "img" / "ablations.png").exists()


def test_sst2_target_needs_89_and_peft_at_the_same_budget() -> None:
    results = {
        "sst2/pt-20": run(0.883),  # below PEFT
        "sst2/pt-100": run(0.8911),  # >= 89% but PEFT ran 20 tokens, not 100: no comparison
        "sst2/pt-100-600": run(0.895, steps=600),  # no PEFT run at 600 steps: does not count
        "sst2/peft-20": run(0.8912),
    }
    lines = quality_report._target_lines(results, "full")
    assert lines[0] == (
        "- SST-2 prompt tuning ≥ 89% and ≥ PEFT with the same budget (tokens, steps): 20 tokens, 300 steps: 88.30% vs"
        " PEFT 89.12%; 100 tokens, 300 steps: 89.11% (no PEFT run at this budget); 100 tokens, 600 steps: 89.50% (no"
        " PEFT run at this budget) — MISSED (full budget)."
    )
    assert lines[1] == "- AG News prompt tuning ≥ 88%: not measured in this run."
    # a 600-step pair: softprompt's run at or above PEFT's on the same budget meets it; below it does not
    results |= {"sst2/pt-20-600": run(0.8945, steps=600), "sst2/peft-20-600": run(0.8945, steps=600)}
    line = quality_report._target_lines(results, "full")[0]
    assert "; 20 tokens, 600 steps: 89.45% vs PEFT 89.45%; 100 tokens" in line and line.endswith("— met (full budget).")
    results["sst2/peft-20-600"] = run(0.8957, steps=600)
    assert quality_report._target_lines(results, "full")[0].endswith("— MISSED (full budget).")
    results["sst2/peft-20-600"] = run(0.85, steps=300)  # a PEFT run of another budget is no twin
    assert "20 tokens, 600 steps: 89.45% (no PEFT run" in quality_report._target_lines(results, "full")[0]


def test_agnews_target_names_the_linear_head_runs() -> None:
    results = {"agnews/pt-20": run(0.84, steps=200), "agnews/pt-20-linear": run(0.883, steps=200)}
    lines = quality_report._target_lines(results, "full")
    assert lines[1] == (
        "- AG News prompt tuning ≥ 88%: 20 tokens, 200 steps 84.0%; 20 tokens + linear head, 200 steps 88.3% — met"
        " (full budget)."
    )
    results = {"agnews/pt-20-linear": run(0.862, steps=200), "agnews/pt-20-linear-9k-500": run(0.87, steps=500)}
    assert quality_report._target_lines(results, "full")[1] == (
        "- AG News prompt tuning ≥ 88%: 20 tokens + linear head, 200 steps 86.2%; 20 tokens + linear head, 9,000 rows,"
        " 500 steps 87.0% — MISSED (full budget)."
    )
    results["agnews/deep-20-linear-9k-400"] = run(0.885, steps=400)  # a deep prompt is named as one, not as a plain
    assert quality_report._target_lines(results, "full")[1].endswith(
        "; deep prompt, 20 tokens + linear head, 9,000 rows, 400 steps 88.5% — met by a deep prompt; MISSED by"
        " input-layer prompts (full budget)."
    )
    results["agnews/deep-20-linear-9k-400"] = run(0.875, steps=400)
    assert quality_report._target_lines(results, "full")[1].endswith("87.5% — MISSED (full budget).")
    # a second seed: the recipe counts by its mean over seeds (88.5 and 87.3: mean 87.9, missed)
    results["agnews/deep-20-linear-9k-400"] = run(0.885, steps=400)
    results["agnews/deep-20-linear-9k-400-s1"] = run(0.873, steps=400)
    line = quality_report._target_lines(results, "full")[1]
    assert (
        "9,000 rows, 400 steps 88.5%; deep prompt, 20 tokens + linear head, 9,000 rows, 400 steps, seed 1 87.3%" in line
    )
    assert line.endswith("; mean of deep-20-linear-9k-400's 2 seeds 87.9% — MISSED (full budget).")
    results["agnews/deep-20-linear-9k-400-s1"] = run(0.881, steps=400)
    assert quality_report._target_lines(results, "full")[1].endswith(
        "2 seeds 88.3% — met by a deep prompt; MISSED by input-layer prompts (full budget)."
    )


def test_held_out_articles_are_not_trained_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """agnews9k: every row that is not held out, less repeats of a held-out article (train10k has a few)."""
    monkeypatch.setattr(quality, "ROOT", tmp_path)
    monkeypatch.setattr(quality, "SHARED", tmp_path / "data")
    texts = [f"article {i % 40}" for i in range(50)]  # articles 0-9 appear twice
    (tmp_path / "data" / "agnews").mkdir(parents=True)
    (tmp_path / "data" / "agnews" / "train10k.tsv").write_text("".join(f"{t}\tWorld\n" for t in texts))  # no header
    study = quality.Study("full", quality.FULL)
    monkeypatch.setitem(quality.TASKS, "agnews9k", replace(quality.TASKS["agnews9k"], holdout=10))
    tr, ev = study.files("agnews9k")
    train = [json.loads(x)["text"] for x in Path(tr).read_text().splitlines()]
    held = [json.loads(x)["text"] for x in Path(ev).read_text().splitlines()]
    assert len(held) == 10 and not set(train) & set(held)
    assert sorted(train) == sorted(t for t in texts if t not in held)  # every other row kept, repeats included
    assert len(train) < 40  # the draw held out at least one repeated article, whose other copy is gone


def test_study_cache_merges_concurrent_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quality, "ROOT", tmp_path)
    a, b = quality.Study("t", quality.QUICK), quality.Study("t", quality.QUICK)  # two streams, both started empty
    a.run("x", lambda: {"accuracy": 0.5})
    b.run("y", lambda: {"accuracy": 0.6})
    a.run("z", lambda: {"accuracy": 0.7})
    assert set(quality.Study("t", quality.QUICK).results) == {"x", "y", "z"}
    assert set(a.results) == {"x", "y", "z"}  # a saw b's run when it merged


def test_refresh_sections_replaces_the_appended_sections_and_keeps_the_generated_part(tmp_path: Path) -> None:
    docs = tmp_path
    (docs / "results-findings.md").write_text("## Reading the numbers\n\nold reading\n")
    (docs / "results.md").write_text("# Results\n\n| table |\n\n## Reading the numbers\n\nold reading\n")
    (docs / "results-findings.md").write_text("## Reading the numbers\n\nnew reading\n")
    (docs / "results-late.md").write_text("# Late prompts\n\nfaster\n")
    quality_report.refresh_sections(docs)
    page = (docs / "results.md").read_text()
    assert page == "# Results\n\n| table |\n\n## Reading the numbers\n\nnew reading\n\n\n# Late prompts\n\nfaster\n\n"
    quality_report.refresh_sections(docs)  # idempotent
    assert (docs / "results.md").read_text() == page
    assert not (docs / ".results.md.tmp").exists()
