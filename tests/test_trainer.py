"""softprompt.trainer: the one loop that `train` and `train-multi` share. `train` has its own tests of this loop
(tests/test_train.py: resume identity, non-finite rollback, the lr log); here the same guarantees are checked for
`train-multi`, which had a copy of the loop without them: resuming with another lr/steps/task is refused naming
the flag, a non-finite loss keeps the last good prompts and says why, and the lr logged for step k is the lr that
step k used. Tiny llama (hidden 32), two tasks of 8 and 6 texts, a few steps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers_train import SENT, TOPIC, assert_cli_error, fast_env, multi_config, run, write_config, write_multi_data
from safetensors.torch import load_file

from softprompt.checkpoint import load_prompt
from softprompt.multitask import MultiTask, parse_multi_config, train_multi
from softprompt.train import TrainingError


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with fast_env(monkeypatch):
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_multi_data(tmp_path_factory.mktemp("multi-data"))


def log_lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "train.log.jsonl").read_text().splitlines() if x.strip()]


# ---- (a) resume: a state written with other flags is refused, naming the flag --------------------------------------
def test_train_multi_resume_with_other_flags_is_refused(
    tiny_dir: Callable[[str], Path], data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    cfg = multi_config(tiny_dir("llama"), data, out, max_steps=2, save_every=1)
    conf = write_config(tmp_path / "multi.yaml", cfg)
    argv = ["train-multi", "--config", str(conf)]
    rc, _, err = run(capsys, argv)
    assert rc == 0, err
    state = out / "state"
    before = (state / "state.safetensors").read_bytes()
    for flags, named in ((["--lr", "0.5"], "--train.lr"), (["--max-steps", "4"], "--train.max_steps"),
                         (["--shared-tokens", "1"], "--shared_tokens")):  # fmt: skip
        rc, stdout, err = run(capsys, [*argv, *flags, "--resume", str(state)])
        line = assert_cli_error(rc, stdout, err, f"--resume {state}", named, "in the interrupted run")
        assert flags[1] in line, line  # the new value is named too
    other = write_config(tmp_path / "other.yaml", {**cfg, "tasks": [{**cfg["tasks"][0], "rate": 3}, cfg["tasks"][1]]})
    rc, stdout, err = run(capsys, ["train-multi", "--config", str(other), "--resume", str(state)])
    assert_cli_error(rc, stdout, err, "--tasks.sent.rate")
    assert (state / "state.safetensors").read_bytes() == before  # nothing was touched
    rc, _, err = run(capsys, [*argv, "--resume", str(state)])  # the same flags resume
    assert rc == 0 and f"resumed from {state} at step 2" in err, err


# ---- (b) a non-finite loss: stop, keep the last good prompts, say why ---------------------------------------------
def _nan_multitask_loss_at(monkeypatch: pytest.MonkeyPatch, bad_call: int) -> None:
    original, calls = MultiTask.loss, []

    def loss(self, *a, **kw):
        calls.append(1)
        value = original(self, *a, **kw)
        return value * float("nan") if len(calls) == bad_call else value

    monkeypatch.setattr(MultiTask, "loss", loss)


def test_train_multi_nan_loss_keeps_last_good_prompts(
    tiny_dir: Callable[[str], Path], data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "o"
    mc = parse_multi_config(multi_config(tiny_dir("llama"), data, out, max_steps=6, save_every=1), "m.yaml")
    _nan_multitask_loss_at(monkeypatch, 3)  # batch 4, no accumulation: loss call 3 = step 3
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 3: .*last good prompt \(step 2\)") as e:
        train_multi(mc, log=lambda s: None)
    assert str(out) in str(e.value)
    step2 = load_file(str(out / "state" / "state.safetensors"))  # param.0 = shared rows, param.1.. = task rows
    assert json.loads((out / "state" / "state.json").read_text())["step"] == 2
    for k, name in enumerate(["sent", "topic"]):
        ck = load_prompt(out / f"{name}.safetensors")  # exists, loads (load_prompt refuses NaN/inf)
        torch.testing.assert_close(ck.prompt, torch.cat([step2["param.0"], step2[f"param.{k + 1}"]]), rtol=0, atol=0)
        assert "non-finite loss" in ck.meta["metrics"]["stopped"]
    assert [r["step"] for r in log_lines(out)] == [1, 2]


def test_train_multi_nan_after_evaluation_keeps_the_best_prompts(
    tiny_dir: Callable[[str], Path], data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    out = tmp_path / "o"
    conf = write_config(tmp_path / "m.yaml", multi_config(tiny_dir("llama"), data, out, evals=True, eval_every=1))
    _nan_multitask_loss_at(monkeypatch, 3)
    rc, stdout, err = run(capsys, ["train-multi", "--config", str(conf)])
    line = assert_cli_error(rc, stdout, err, "non-finite loss (nan) at step 3", "kept the best prompt (step ", str(out))
    assert "lower --lr" in line
    for name in ("sent", "topic"):
        ck = load_prompt(out / f"{name}.safetensors")
        assert "accuracy" in ck.meta["metrics"] and "stopped" not in ck.meta["metrics"]  # the evaluated best


# ---- (c) the lr logged for step k is the lr step k used -----------------------------------------------------------
def test_train_multi_logs_the_lr_each_step_used(tiny_dir: Callable[[str], Path], data: Path, tmp_path: Path) -> None:
    """Warm-up 2 then linear decay to 0 at step 6: step 1 runs at lr 0 (the schedule's first value), step 2 at
    half the peak, step 3 at the peak; the lr after sched.step() (the next step's) would start at 0.05."""
    out = tmp_path / "o"
    cfg = multi_config(tiny_dir("llama"), data, out, max_steps=6, warmup_steps=2, lr=0.1, schedule="linear")
    mc = parse_multi_config(cfg, "m.yaml")
    seen: list[float] = []
    step = torch.optim.AdamW.step

    def recording_step(self, *a, **kw):  # the lr the optimiser really applies in each step
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", recording_step)
        train_multi(mc, log=lambda s: None)
    logged = [r["lr"] for r in log_lines(out)]
    assert logged == pytest.approx([0.0, 0.05, 0.1, 0.075, 0.05, 0.025], abs=1e-12)
    assert logged == pytest.approx(seen, abs=1e-15)


def test_train_multi_epochs_to_steps_as_train(tiny_dir: Callable[[str], Path], data: Path, tmp_path: Path) -> None:
    """--epochs: the step count of `softprompt train`'s formula (14 rows, batch 4: 3 steps an epoch)."""
    from softprompt.trainer import total_steps

    cfg = multi_config(tiny_dir("llama"), data, tmp_path / "o", max_steps=0, epochs=2)
    mc = parse_multi_config(cfg, "m.yaml")
    res = train_multi(mc, log=lambda s: None)
    assert res.steps == total_steps(mc.run, len(SENT) + len(TOPIC)) == 2 * math.floor(14 / 4)


def test_train_multi_overwritten_exports_keep_their_mode(
    tiny_dir: Callable[[str], Path], data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o"
    mc = parse_multi_config(multi_config(tiny_dir("llama"), data, out, max_steps=1), "m.yaml")
    train_multi(mc, log=lambda s: None)
    for mode, name in ((0o644, "sent"), (0o640, "topic")):
        (out / f"{name}.safetensors").chmod(mode)
    train_multi(mc, log=lambda s: None)
    assert [(out / f"{n}.safetensors").stat().st_mode & 0o777 for n in ("sent", "topic")] == [0o644, 0o640]
