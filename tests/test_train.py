"""softprompt.train: frozen backbone, kill-and-resume (in-process and a real SIGKILL), determinism, non-finite
losses, optimisers, learning-rate schedules and the loss plot. Tiny random models (hidden 32), 24 texts, few steps.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers_train import (
    FAST,
    LABELS,
    TEMPLATE,
    cls_records,
    fast_env,
    log_records,
    run,
    subprocess_env,
    temp_leftovers,
    train_argv,
    write_jsonl,
)
from safetensors import safe_open
from safetensors.torch import load_file

from softprompt.checkpoint import load_prompt
from softprompt.config import RunConfig
from softprompt.models import load_backbone
from softprompt.prompted import PromptedModel
from softprompt.train import TrainingError, train

# `softprompt.train` as an attribute is the train() function (re-exported by softprompt/__init__.py), which
# shadows the submodule for `import softprompt.train as m`; the module itself is in sys.modules.
train_mod = sys.modules["softprompt.train"]
trainer_mod = sys.modules["softprompt.trainer"]  # the loop (fit) that both train and train-multi run
runfiles_mod = sys.modules["softprompt.runfiles"]  # the training state's reads and writes


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with fast_env(monkeypatch):
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", cls_records())


class Killed(BaseException):
    """Stands in for SIGKILL inside the process: not an Exception, so nothing in softprompt catches it."""


# ---- 1. the backbone never changes ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind,head", [("llama", "lm"), ("bert", "linear")])
def test_backbone_bit_identical_after_training(
    kind: str, head: str, tiny_dir: Callable[[str], Path], data: Path, tmp_path: Path
) -> None:
    bb = load_backbone(str(tiny_dir(kind)), progress=False)  # our own copy: training must not touch it anyway
    before = {k: v.detach().clone() for k, v in bb.model.state_dict().items()}
    modes = {n: m.training for n, m in bb.model.named_modules()}
    cfg = RunConfig()
    cfg.model.device = "cpu"
    cfg.prompt.num_tokens = 4
    cfg.data.train, cfg.data.eval, cfg.data.labels, cfg.data.head = str(data), str(data), LABELS, head
    cfg.data.template = TEMPLATE if head == "lm" else "{text}"
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.warmup_steps, cfg.train.lr = 5, 4, 0, 0.1
    cfg.train.eval_every, cfg.train.progress, cfg.train.out = 2, False, str(tmp_path / "p.safetensors")
    res = train(cfg, backbone=bb, log=lambda s: None)

    assert res.steps == 5 and all(math.isfinite(h["loss"]) for h in res.history)
    after = bb.model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], f"backbone tensors changed: {changed}"
    assert not any(p.requires_grad for p in bb.model.parameters())
    assert not any(p.grad is not None for p in bb.model.parameters())
    assert {n: m.training for n, m in bb.model.named_modules()} == modes  # evaluation did not leave a mode behind
    ck = load_prompt(res.out)
    assert ck.prompt.shape == (4, 32) and ck.meta["fingerprint"] == bb.fingerprint
    if head == "linear":  # the encoder's linear head is trained and saved; the backbone is not
        assert ck.extra["head.linear.weight"].shape == (2, 32)


# ---- 2a. kill and resume, in-process ------------------------------------------------------------------------

RESUME_STEPS = ["--max-steps", "6", "--save-every", "1", "--lr", "0.1", "--eval-every", "2"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir: Callable[[str], Path], data: Path, tmp_path_factory: pytest.TempPathFactory):
    """reference(optimizer) -> (best prompt, final prompt, losses) of an uninterrupted 6-step run."""
    cache: dict[str, tuple[torch.Tensor, torch.Tensor, list[float]]] = {}
    from helpers_train import run_quiet

    def get(optimizer: str) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        if optimizer not in cache:
            out = tmp_path_factory.mktemp(f"ref-{optimizer}") / "p.safetensors"
            argv = train_argv(
                tiny_dir("llama"), data, out, *RESUME_STEPS, "--optimizer", optimizer, "--eval", str(data)
            )
            with pytest.MonkeyPatch.context() as mp, fast_env(mp):
                rc, _, err = run_quiet(argv)
            assert rc == 0, err
            final = load_file(str(Path(str(out) + ".state") / "state.safetensors"))["param.0"]
            cache[optimizer] = (load_prompt(out).prompt, final, [r["loss"] for r in log_records(out)])
        return cache[optimizer]

    return get


@pytest.mark.parametrize(
    "kill_at,optimizer",
    [
        ("after_log", "adamw"),  # step 3 logged, its state not yet written
        ("between_state_files", "adamw"),  # step 3's state.safetensors written, state.json not
        ("after_state", "adamw"),  # step 3 complete
        ("after_state", "adafactor"),  # Adafactor's factored state survives the round trip too
    ],
)
def test_kill_and_resume_in_process(
    kill_at: str,
    optimizer: str,
    uninterrupted,
    tiny_dir: Callable[[str], Path],
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "p.safetensors"
    state_dir = Path(str(out) + ".state")
    argv = train_argv(tiny_dir("llama"), data, out, *RESUME_STEPS, "--optimizer", optimizer, "--eval", str(data))
    save_state, atomic_write = trainer_mod.save_state, runfiles_mod.atomic_write  # where fit() and save_state look

    def killing_save_state(path, params, opt, sched, step, extra):
        if kill_at == "after_log" and step == 3:
            raise Killed
        save_state(path, params, opt, sched, step, extra)
        if kill_at == "after_state" and step == 3:
            raise Killed

    json_writes = []

    def killing_atomic_write(path, write):
        if Path(path).name == "state.json":
            json_writes.append(path)
            if kill_at == "between_state_files" and len(json_writes) == 3:
                raise Killed
        atomic_write(path, write)

    with monkeypatch.context() as mp:
        mp.setattr(trainer_mod, "save_state", killing_save_state)
        mp.setattr(runfiles_mod, "atomic_write", killing_atomic_write)
        with pytest.raises(Killed):
            run(capsys, argv)
    assert len(log_records(out)) == 3  # the "killed" run got through step 3
    assert json.loads((state_dir / "state.json").read_text())["step"] == (2 if kill_at != "after_state" else 3)

    rc, _, err = run(capsys, [*argv, "--resume", str(state_dir)])
    assert rc == 0, err
    assert "resumed from" in err
    best, final, losses = uninterrupted(optimizer)
    records = log_records(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # no step twice, none missing
    assert [r["loss"] for r in records] == losses
    assert torch.equal(load_file(str(state_dir / "state.safetensors"))["param.0"], final)
    assert torch.equal(load_prompt(out).prompt, best)  # the best evaluated prompt is the same one too
    assert temp_leftovers(tmp_path) == []


# ---- 3. determinism -------------------------------------------------------------------------------------------


def test_same_seed_same_prompt_other_seed_other_prompt(
    tiny_dir: Callable[[str], Path], data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = {}
    for name, seed in [("a", "0"), ("b", "0"), ("c", "1")]:
        out = tmp_path / f"{name}.safetensors"
        rc, _, err = run(capsys, train_argv(tiny_dir("llama"), data, out, "--max-steps", "3", "--seed", seed))
        assert rc == 0, err
        prompts[name] = load_prompt(out).prompt
    assert torch.equal(prompts["a"], prompts["b"])
    assert not torch.allclose(prompts["a"], prompts["c"])


# ---- 4. non-finite values -------------------------------------------------------------------------------------


def _nan_loss_at(monkeypatch: pytest.MonkeyPatch, bad_call: int) -> None:
    original, calls = PromptedModel.loss, []

    def loss(self, *a, **kw):
        calls.append(1)
        value = original(self, *a, **kw)
        return value * float("nan") if len(calls) == bad_call else value

    monkeypatch.setattr(PromptedModel, "loss", loss)


def test_nan_loss_stops_and_keeps_last_good_prompt(
    tiny_dir: Callable[[str], Path],
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "p.safetensors"
    _nan_loss_at(monkeypatch, 3)  # batch 4, no accumulation: loss call 3 = step 3
    rc, stdout, err = run(capsys, train_argv(tiny_dir("llama"), data, out, "--max-steps", "6", "--save-every", "1"))
    assert rc == 2 and stdout == ""
    line = err.strip().splitlines()[-1]
    assert line.startswith("softprompt: error: non-finite loss (nan) at step 3"), line
    assert "kept the last good prompt (step 2)" in line and str(out) in line
    ck = load_prompt(out)  # exists, loads (load_prompt refuses NaN/inf) and holds step 2's prompt
    assert torch.isfinite(ck.prompt).all()
    step2 = load_file(str(Path(str(out) + ".state") / "state.safetensors"))["param.0"]
    assert torch.equal(ck.prompt, step2)
    assert "non-finite loss" in ck.meta["metrics"]["stopped"]
    assert temp_leftovers(tmp_path) == []


def test_nan_loss_python_api_raises_training_error(
    tiny_dir: Callable[[str], Path], data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_loss_at(monkeypatch, 1)  # the very first step: the kept prompt is the initial one
    cfg = RunConfig()
    cfg.model.model, cfg.model.device = str(tiny_dir("llama")), "cpu"
    cfg.prompt.num_tokens = 4
    cfg.data.train, cfg.data.labels, cfg.data.template = str(data), LABELS, TEMPLATE
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.progress = 3, 4, False
    cfg.train.out = str(tmp_path / "p.safetensors")
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 1: .*last good prompt \(step 0\)"):
        train(cfg, log=lambda s: None)
    assert torch.isfinite(load_prompt(cfg.train.out).prompt).all()


def test_non_finite_gradient_does_not_poison_the_kept_prompt(
    tiny_dir: Callable[[str], Path],
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A finite loss with an inf gradient makes the prompt NaN after the update; the saved prompt must not be."""
    calls = []
    clip = torch.nn.utils.clip_grad_norm_

    def poisoned_clip(params, max_norm, *a, **kw):
        calls.append(1)
        params = list(params)
        if len(calls) == 2:
            for p in params:
                p.grad.fill_(float("inf"))
        return clip(params, max_norm, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned_clip)
    out = tmp_path / "p.safetensors"
    rc, stdout, err = run(capsys, train_argv(tiny_dir("llama"), data, out, "--max-steps", "4"))
    line = err.strip().splitlines()[-1]
    assert rc == 2 and "non-finite prompt after the update of step 2" in line and "(step 1)" in line, line
    assert torch.isfinite(load_prompt(out).prompt).all()


def test_nan_loss_after_evaluation_keeps_the_best_prompt(
    tiny_dir: Callable[[str], Path],
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "p.safetensors"
    _nan_loss_at(monkeypatch, 3)
    argv = train_argv(tiny_dir("llama"), data, out, "--max-steps", "6", "--eval", str(data), "--eval-every", "1")
    rc, _, err = run(capsys, argv)
    line = err.strip().splitlines()[-1]
    assert rc == 2 and "non-finite loss" in line and "kept the best prompt (step " in line, line
    ck = load_prompt(out)
    assert "accuracy" in ck.meta["metrics"] and "stopped" not in ck.meta["metrics"]  # the evaluated best, untouched


# ---- 5. optimisers and schedules ------------------------------------------------------------------------------


def test_adafactor_trains_the_prompt(
    tiny_dir: Callable[[str], Path],
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inits: list[torch.Tensor] = []
    original = train_mod.init_prompt
    monkeypatch.setattr(train_mod, "init_prompt", lambda *a, **kw: inits.append(original(*a, **kw)) or inits[-1])
    out = tmp_path / "p.safetensors"
    argv = train_argv(tiny_dir("llama"), data, out, "--optimizer", "adafactor", "--lr", "0.3", "--max-steps", "3")
    rc, _, err = run(capsys, argv)
    assert rc == 0, err
    prompt = load_prompt(out).prompt
    assert torch.isfinite(prompt).all()
    assert (prompt - inits[0]).abs().max() > 1e-3  # Adafactor moved it
    assert load_prompt(out).meta["train_config"]["train"]["optimizer"] == "adafactor"
    assert [r["lr"] for r in log_records(out)] == pytest.approx([0.3, 0.2, 0.1])  # linear decay, no warm-up


def _expected_lr(schedule: str, k: int, peak: float, warmup: int, total: int) -> float:
    """The lr of optimiser update k (0-based) under transformers' schedules."""
    if k < warmup:
        return peak * k / warmup
    progress = (k - warmup) / (total - warmup)
    factor = {"constant": 1.0, "linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}
    return peak * factor[schedule]


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedule_lr_in_log(
    schedule: str, tiny_dir: Callable[[str], Path], data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The log's `lr` is the lr each step used: 0 at step 1, rising through the warm-up, the peak on the first
    step after it, then the schedule down to its value at the last step."""
    out = tmp_path / "p.safetensors"
    argv = train_argv(tiny_dir("llama"), data, out, "--max-steps", "6", "--schedule", schedule, "--lr", "0.1")
    argv += ["--warmup-steps", "2"]  # after FAST's --warmup-steps 0: the last flag wins
    rc, _, err = run(capsys, argv)
    assert rc == 0, err
    lrs = [r["lr"] for r in log_records(out)]
    assert lrs == pytest.approx([_expected_lr(schedule, k, 0.1, 2, 6) for k in range(6)], abs=1e-12)
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.05)  # warm-up
    assert lrs[2] == pytest.approx(0.1)  # warm-up done: the peak
    last = {"constant": 0.1, "linear": 0.1 / 4, "cosine": 0.1 * 0.5 * (1 + math.cos(math.pi * 3 / 4))}[schedule]
    assert lrs[-1] == pytest.approx(last)


# ---- 6. plot --------------------------------------------------------------------------------------------------


def test_plot_writes_png_beside_prompt(
    tiny_dir: Callable[[str], Path], data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs" / "p.safetensors"
    argv = train_argv(tiny_dir("llama"), data, out, "--max-steps", "2", "--eval", str(data), "--eval-every", "1")
    rc, _, err = run(capsys, [*argv, "--plot"])
    assert rc == 0, err
    png = tmp_path / "runs" / "p.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert temp_leftovers(tmp_path) == []


def test_flags_used_by_these_tests_are_real() -> None:
    """Guard against a typo in FAST silently falling back to a default (argparse would exit 2 on unknown flags)."""
    from softprompt.parsers import build_parser

    args = build_parser().parse_args(["train", *FAST])
    assert (args.num_tokens, args.batch_size, args.warmup_steps, args.progress) == ("4", "4", "0", False)


# ---- 2b. a real SIGKILL (last in this file: the child starts with the module and runs beside the other tests) --

SIGKILL_STEPS = ["--max-steps", "40", "--save-every", "1", "--lr", "0.1"]


@dataclass
class KilledRun:
    argv: list[str]
    out: Path
    state_dir: Path
    proc: subprocess.Popen
    watcher: threading.Thread
    child_err: Path
    seen: dict[str, int]


@pytest.fixture(scope="module", autouse=True)
def sigkill_run(tiny_dir: Callable[[str], Path], data: Path, tmp_path_factory: pytest.TempPathFactory):
    """`python -m softprompt train` in a child process, SIGKILLed by a watcher thread once its state says step >= 2.
    Started with the module so that the child's slow start (importing torch and transformers) overlaps the tests."""
    root = tmp_path_factory.mktemp("sigkill")
    out = root / "killed" / "p.safetensors"
    state_dir = Path(str(out) + ".state")
    argv = train_argv(tiny_dir("llama"), data, out, *SIGKILL_STEPS)
    child_err = root / "child.err"
    with open(child_err, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "softprompt", *argv],
            env=subprocess_env(),
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    seen: dict[str, int] = {}

    def kill_after_step_2() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                step = json.loads((state_dir / "state.json").read_text())["step"]
            except (OSError, ValueError, KeyError):
                step = 0
            if step >= 2:
                os.kill(proc.pid, signal.SIGKILL)
                seen["step"] = step
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_after_step_2, daemon=True)
    watcher.start()
    yield KilledRun(argv, out, state_dir, proc, watcher, child_err, seen)
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=60)


def test_sigkill_then_resume_matches_uninterrupted_run(
    sigkill_run: KilledRun,
    tiny_dir: Callable[[str], Path],
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    k = sigkill_run
    ref = tmp_path / "ref" / "p.safetensors"
    rc, _, err = run(capsys, train_argv(tiny_dir("llama"), data, ref, *SIGKILL_STEPS))  # uninterrupted
    assert rc == 0, err
    k.watcher.join(timeout=300)
    if k.proc.poll() is None:
        k.proc.kill()
    k.proc.wait(timeout=60)
    child_log = k.child_err.read_text(errors="replace")
    assert k.proc.returncode == -signal.SIGKILL, f"child was not killed mid-run (rc {k.proc.returncode}):\n{child_log}"
    # the step is the one in state.safetensors' header (what --resume reads); state.json, its readable copy, is
    # written after it and lags by one when the kill lands between the two writes
    with safe_open(str(k.state_dir / "state.safetensors"), framework="pt") as f:
        killed_at = json.loads((f.metadata() or {})["state"])["step"]
    assert 2 <= k.seen["step"] <= killed_at < 40
    if k.out.exists():  # no half-written prompt: it is absent (written at the end of a run without --eval) or valid
        assert torch.isfinite(load_prompt(k.out).prompt).all()

    rc, out, err = run(capsys, [*k.argv, "--resume", str(k.state_dir)])
    assert rc == 0, err
    assert f"resumed from {k.state_dir} at step {killed_at}" in err
    assert json.loads(out)["steps"] == 40
    assert torch.equal(load_prompt(k.out).prompt, load_prompt(ref).prompt)
    resumed, reference = log_records(k.out), log_records(ref)
    assert [r["step"] for r in resumed] == list(range(1, 41))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in reference]
    assert temp_leftovers(k.out.parent.parent) == []


def test_batch_schedule_grouped_or_uniform() -> None:
    """--train.group-by-length off gives uniformly random batches: every row once per epoch, and a batch spans
    the whole length range (grouped batches span ~1/50 of it); both a pure function of (seed, step)."""
    from softprompt.train import batch_schedule

    lengths = list(range(1600))  # length = index: a batch's spread is max - min of its indices

    def epoch(group: bool) -> list[list[int]]:
        return [batch_schedule(lengths, 16, 7, s, 1, group)[0] for s in range(100)]

    for group in (True, False):
        e = epoch(group)
        assert sorted(i for b in e for i in b) == lengths
        assert e == epoch(group)
    spread = {g: sum(max(b) - min(b) for b in epoch(g)) / 100 for g in (True, False)}
    assert spread[True] < 100 and spread[False] > 1000, spread


def test_resume_with_other_flags_is_refused_and_state_kept(
    tiny_dir: Callable[[str], Path], data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Resuming with a changed trajectory flag would splice two runs together: one-line error naming the flag,
    the state untouched; the same flags (in another spelling of the same path) resume."""
    out = tmp_path / "p.safetensors"
    state = Path(str(out) + ".state")
    argv = train_argv(tiny_dir("llama"), data, out, "--max-steps", "2", "--save-every", "1")
    assert run(capsys, argv)[0] == 0
    before = (state / "state.safetensors").read_bytes()
    rc, _, err = run(capsys, [*argv, "--max-steps", "4", "--lr", "0.5", "--resume", str(state)])
    assert rc != 0 and "--train.lr" in err and "0.5" in err and len(err.strip().splitlines()) == 1, err
    assert (state / "state.safetensors").read_bytes() == before
    rc, _, err = run(capsys, [*argv, "--no-group-by-length", "--resume", str(state)])
    assert rc != 0 and "--train.group_by_length" in err, err
    rel = os.path.relpath(data)
    argv_rel = [rel if a == str(data) else a for a in argv]
    rc, _, err = run(capsys, [*argv_rel, "--resume", str(state)])
    assert rc == 0 and "resumed from" in err, err


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_head_lr_gets_its_own_group_and_schedule(optimizer: str) -> None:
    """--head-lr: the head's parameters train at their own peak rate (scaled by the same schedule); unset (0) or
    equal to --lr, prompt and head share one group, as states written before --head-lr have."""
    from transformers import get_scheduler

    from softprompt.train import make_optimizer

    prompt, head = torch.nn.Parameter(torch.zeros(3, 4)), [torch.nn.Parameter(torch.zeros(2, 4))]
    cfg = RunConfig()
    cfg.train.optimizer, cfg.train.lr = optimizer, 0.01
    assert len(make_optimizer([prompt], cfg, head).param_groups) == 1
    cfg.train.head_lr = 0.01
    assert len(make_optimizer([prompt], cfg, head).param_groups) == 1
    cfg.train.head_lr = 0.002
    opt = make_optimizer([prompt], cfg, head)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.002]
    assert opt.param_groups[0]["params"] == [prompt] and opt.param_groups[1]["params"] == head
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=4)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.0075, 0.0015])
