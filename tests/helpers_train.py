"""Shared helpers for test_train.py, test_trainer.py, test_runfiles.py, test_cli.py and test_config.py: tiny data
files (and two-task train-multi configurations), CLI calls, error checks.

Import from a test: `from helpers_train import ...` (pytest puts tests/ on sys.path). Model directories come
from conftest.py's session fixture `tiny_dir(kind)`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from softprompt.cli import main

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = r"Text: {text}\nAnswer:"  # as typed on a shell command line: softprompt decodes the \n
LABELS = "a=yes,b=no"
# Small and fast: 4 prompt tokens, batch 4, no warm-up (so every step moves the prompt), CPU, no progress bar.
FAST = ["--device", "cpu", "--no-progress", "--num-tokens", "4", "--batch-size", "4", "--warmup-steps", "0"]
WORDS = ["good", "great", "bad", "awful", "fine", "nice", "poor", "dull"]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def cls_records(n: int = 24) -> list[dict[str, Any]]:
    """n short texts labelled a/b (alternating), deterministic."""
    return [{"text": f"{WORDS[(i * 5) % len(WORDS)]} movie {i}", "label": "a" if i % 2 == 0 else "b"} for i in range(n)]


SENT = [("a great film", "pos"), ("dull and slow", "neg"), ("loved every minute", "pos"), ("a waste of time", "neg"),
        ("superb acting", "pos"), ("boring plot", "neg"), ("wonderful music", "pos"), ("awful script", "neg")]  # fmt: skip
TOPIC = [("the match ended two nil", "sport"), ("stocks fell today", "money"), ("new phone released", "tech"),
         ("the striker scored", "sport"), ("interest rates rise", "money"), ("a faster chip", "tech")]  # fmt: skip


def write_multi_data(folder: Path) -> Path:
    """folder/sent.jsonl (8 texts, pos/neg) and folder/topic.jsonl (6 texts, sport/money/tech)."""
    for name, rows in (("sent", SENT), ("topic", TOPIC)):
        write_jsonl(folder / f"{name}.jsonl", [{"text": t, "label": y} for t, y in rows])
    return folder


def multi_config(model: Path, data: Path, out: Path, *, evals: bool = False, **top: Any) -> dict[str, Any]:
    """A two-task train-multi configuration (S = 2 shared rows, T = 3 rows per task), 4 steps, CPU."""
    tasks = [
        {"name": "sent", "train": str(data / "sent.jsonl"), "template": "Review: {text} Sentiment:",
         "labels": "neg=bad,pos=very good", "rate": 1},
        {"name": "topic", "train": str(data / "topic.jsonl"), "template": "Text: {text} Topic:",
         "labels": "money=money,sport=sport,tech=tech", "rate": 2},
    ]  # fmt: skip
    if evals:
        for t in tasks:
            t["eval"] = t["train"]
    return {
        "model": str(model), "device": "cpu", "num_tokens": 3, "shared_tokens": 2, "max_steps": 4, "batch_size": 4,
        "lr": 0.05, "warmup_steps": 0, "progress": False, "init": "random", "out": str(out), "tasks": tasks, **top,
    }  # fmt: skip


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def gen_records(n: int = 12, field: str = "answer") -> list[dict[str, Any]]:
    return [{"text": f"say {i}", field: f"number {i}"} for i in range(n)]


def train_argv(model: Path, train: Path, out: Path, *extra: str) -> list[str]:
    """`softprompt train` on a classify task with the standard template and verbalizer."""
    return [
        "train", "--model", str(model), "--train", str(train), "--out", str(out),
        "--labels", LABELS, "--template", TEMPLATE, *FAST, *extra,
    ]  # fmt: skip


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    """softprompt.cli.main in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()  # drop anything printed before
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def run_quiet(argv: list[str]) -> tuple[int, str, str]:
    """Like run() without capsys (for module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def assert_cli_error(rc: int, out: str, err: str, *needles: str) -> str:
    """Exit code 2, nothing on stdout, ONE stderr line `softprompt: error: ...` containing every needle."""
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert out == "", out
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("softprompt: error: "), lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def temp_leftovers(folder: Path) -> list[Path]:
    """Temporary files of atomic writes (atomic_write names them .NAME.XXXX.tmp), anywhere under folder."""
    return [p for p in folder.rglob("*.tmp") if p.is_file()]


def log_records(out: Path) -> list[dict[str, Any]]:
    """The JSONL metrics log written beside a prompt (OUT with suffix .log.jsonl)."""
    text = out.with_suffix(".log.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@contextlib.contextmanager
def fast_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One torch thread (the test machine has 2 shared cores; one thread is faster and runs bit-reproducibly
    against a subprocess started with OMP_NUM_THREADS=1) and no TensorBoard writer."""
    monkeypatch.setenv("SOFTPROMPT_TENSORBOARD", "0")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def subprocess_env() -> dict[str, str]:
    """Environment for `python -m softprompt` children: the repo importable, one thread, offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", SOFTPROMPT_TENSORBOARD="0", HF_HUB_OFFLINE="1")
    return env


def assert_ensemble_is_the_mean(bb: Any, paths: list[Path], texts: list[str]) -> None:
    """An ensemble of two prompt files (any methods) scores each text with the mean of each prompt's probabilities
    alone (Predictor.load of one file vs of both), and the two prompts really differ."""
    from softprompt import Predictor

    alone = []
    for p in paths:
        one = Predictor.load(str(p), backbone=bb)
        alone.append(one.probs(one.task.encode_texts(texts)[0]))
    both = Predictor.load([str(p) for p in paths], backbone=bb)
    torch.testing.assert_close(both.probs(both.task.encode_texts(texts)[0]), (alone[0] + alone[1]) / 2)
    assert not torch.allclose(alone[0], alone[1])
