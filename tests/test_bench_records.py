"""bench.dynamic, bench.methods, bench.late, bench.vision: each study's record of finished runs is committed under
bench/results/ (--results; a new machine resumes it), its checkpoints and run files stay under --out. No model is
loaded: the studies load their backbones lazily, and a run already in the record is returned without one."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from bench import dynamic, late, methods, vision

COMMITTED = Path(__file__).resolve().parents[1] / "bench" / "results"


@pytest.mark.parametrize("study", [dynamic, methods, late, vision], ids=lambda m: m.__name__)
def test_record_defaults_to_bench_results(study: ModuleType) -> None:
    name = study.__name__.rsplit(".", 1)[1]
    default = Path(study.parser().parse_args([]).results)
    assert default == study.RESULTS == COMMITTED / f"{name}.jsonl"


def _args(study: ModuleType, tmp_path: Path):
    return study.parser().parse_args(["--out", str(tmp_path / "out"), "--results", str(tmp_path / "rec" / "r.jsonl")])


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_dynamic_writes_and_resumes_its_record_at_results(tmp_path: Path) -> None:
    a = _args(dynamic, tmp_path)
    st = dynamic.Study(Path(a.out), a.eval_rows, Path(a.results))
    st.record({"name": "sst2-plain", "kind": "train"})
    assert len(_lines(tmp_path / "rec" / "r.jsonl")) == 1
    assert not (tmp_path / "out" / "results.jsonl").exists()
    again = dynamic.Study(Path(a.out), a.eval_rows, Path(a.results))
    assert again.train("sst2", "plain", {}) == {"name": "sst2-plain", "kind": "train"}  # skipped: no model loaded
    assert again._bb is None


def test_methods_writes_and_resumes_its_record_at_results(tmp_path: Path) -> None:
    a = _args(methods, tmp_path)
    r = methods.Runner(Path(a.out), Path(a.results))
    r.record({"name": "sst2-minilm-prompt", "accuracy": 0.8, "curve": []})
    assert len(_lines(tmp_path / "rec" / "r.jsonl")) == 1
    again = methods.Runner(Path(a.out), Path(a.results))
    assert again.train("sst2-minilm-prompt", "minilm-l6", {})["accuracy"] == 0.8
    assert not again.backbones and not (tmp_path / "out" / "results.jsonl").exists()


def test_late_writes_and_resumes_its_record_at_results(tmp_path: Path) -> None:
    a = _args(late, tmp_path)
    b = late.Bench(Path(a.out), Path(a.results))
    b.log.record({"name": "sst2-plain", "method": "prompt"})
    b.log.record({"name": "inference-sst2-plain-sst2-late15", "method": "inference"})
    assert len(_lines(tmp_path / "rec" / "r.jsonl")) == 2
    again = late.Bench(Path(a.out), Path(a.results))
    assert again.run("sst2-plain", {}, "", 200)["method"] == "prompt"
    assert late.inference(again, {}, ["sst2-plain", "sst2-late15"], 96)["method"] == "inference"
    assert again._bb is None and not (tmp_path / "out" / "results.jsonl").exists()


def test_vision_writes_and_reads_its_record_at_results(tmp_path: Path) -> None:
    results = Path(vision.parser().parse_args(["--results", str(tmp_path / "rec" / "r.jsonl")]).results)
    assert vision.cached(results) == []
    vision.record(results, {"kind": "pretrain", "accuracy": 0.9, "wall_s": 1.0})
    vision.record(results, {"kind": "kv", "batch": 8})
    assert [r["kind"] for r in vision.cached(results)] == ["pretrain", "kv"]
    assert len(_lines(results)) == 2
