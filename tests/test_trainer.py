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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from helpers_train import SENT, TOPIC, assert_cli_error, fast_env, multi_config, run, write_config, write_multi_data
from safetensors.torch import load_file

from softprompt.checkpoint import load_prompt
from softprompt.multitask import MultiTask, parse_multi_config, train_multi
from softprompt.train import TrainingError

if TYPE_CHECKING:  # imported where used: this file also runs against the code before softprompt.trainer
    from softprompt.trainer import Evaluation


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


def test_train_multi_non_finite_gradient_rolls_back(
    tiny_dir: Callable[[str], Path], data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finite loss with an inf gradient: the update makes the prompts NaN; the exports hold step 1's."""
    calls: list[int] = []
    clip = torch.nn.utils.clip_grad_norm_

    def poisoned_clip(params, max_norm, *a, **kw):
        calls.append(1)
        params = list(params)
        if len(calls) == 2:
            for p in params:
                p.grad.fill_(float("inf"))
        return clip(params, max_norm, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned_clip)
    out = tmp_path / "o"
    mc = parse_multi_config(multi_config(tiny_dir("llama"), data, out, save_every=1), "m.yaml")
    with pytest.raises(TrainingError, match=r"non-finite prompt after the update of step 2 .*\(step 1\)"):
        train_multi(mc, log=lambda s: None)
    step1 = load_file(str(out / "state" / "state.safetensors"))
    torch.testing.assert_close(
        load_prompt(out / "sent.safetensors").prompt, torch.cat([step1["param.0"], step1["param.1"]])
    )


# ---- fit() on its own: any Objective --------------------------------------------------------------------------------
@dataclass
class Toy:
    """A 3-vector pulled towards `target`: loss = |p - target|^2 for every micro-batch; evaluation = that loss."""

    target: list[float]
    n_train: int = 8
    has_eval: bool = True
    device: torch.device = torch.device("cpu")
    saved: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.params = [torch.nn.Parameter(torch.zeros(3))]
        self.head_params: list[torch.nn.Parameter] = []

    def batches(self, step: int) -> list[list[int]]:
        return [[step, step]]  # one micro-batch of two (meaningless) rows

    def loss(self, rows: list[int]) -> torch.Tensor:
        return ((self.params[0] - torch.tensor(self.target)) ** 2).sum()

    def evaluate(self) -> Evaluation:
        from softprompt.trainer import Evaluation

        d = float(self.loss([]).detach())
        return Evaluation(d, {"eval_loss": d}, {"loss": d})

    def save(self, metrics: Evaluation | dict[str, Any]) -> None:
        self.saved.append(metrics)

    def identity(self) -> dict[str, Any]:
        return {"--toy.target": self.target}


def test_fit_with_any_objective(tmp_path: Path) -> None:
    from softprompt.config import ConfigError, RunConfig
    from softprompt.runfiles import RunFiles
    from softprompt.trainer import fit

    cfg = RunConfig()
    t = cfg.train
    t.max_steps, t.lr, t.warmup_steps, t.eval_every, t.save_every, t.metric, t.progress = 5, 0.1, 0, 1, 1, "loss", False
    files = RunFiles(
        "toy", [("--out", tmp_path / "toy.safetensors")], tmp_path / "toy.log.jsonl", tmp_path / "st", False
    )
    toy = Toy([1.0, -1.0, 0.5])
    res = fit(toy, cfg, files, log=lambda s: None)
    losses = [h["loss"] for h in res.history]
    assert res.steps == 5 and losses == sorted(losses, reverse=True) and losses[-1] < losses[0]
    assert [s.score for s in toy.saved] == [h["eval_loss"] for h in res.history]  # every step improved: saved
    assert res.best_step == 5 and [h["lr"] for h in res.history] == pytest.approx([0.1, 0.08, 0.06, 0.04, 0.02])
    resume = RunFiles("toy", files.prompts, files.log, files.state, True)
    with pytest.raises(ConfigError, match=r"--toy.target was \[1.0, -1.0, 0.5\] in the interrupted run, now \[2.0"):
        fit(Toy([2.0, 0.0, 0.0]), cfg, resume, log=lambda s: None)
    again = Toy([1.0, -1.0, 0.5])
    assert fit(again, cfg, resume, log=lambda s: None).steps == 5 and again.saved == []  # done: nothing to redo
    assert torch.equal(again.params[0], toy.params[0])  # the state's tensors were loaded
