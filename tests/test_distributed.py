"""Data-parallel training (softprompt.distributed) with 2 CPU processes and the gloo backend.

The launched tests start real processes with `accelerate launch` (each loads torch + transformers: ~20-40 s per
launch on a busy machine), so they are marked slow. The sharding and reduction rules are unit-tested without
processes.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_model_dir

from softprompt.checkpoint import load_prompt
from softprompt.config import RunConfig, apply_options
from softprompt.data import Encoded
from softprompt.distributed import FAULT_ENV, AccelerateReplicas, launch_command, relaunch
from softprompt.train import Replicas, train

WORDS = ["good", "great", "bad", "awful", "fine", "nice", "poor", "dull"]
TOL = 1e-6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir("llama", tmp_path_factory.mktemp("tiny"))


def write_data(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cls = [
        {"text": f"{WORDS[(i * 5) % 8]} movie {i} " + "x " * (i % 4), "label": "a" if i % 2 else "b"} for i in range(24)
    ]
    gen = [{"text": f"say {i}", "target": f"number {i} " + "y " * (i % 3)} for i in range(16)]
    (folder / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cls))
    (folder / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    return folder / "cls.jsonl", folder / "gen.jsonl"


def flags(model: Path, data: Path, out: Path, task: str, **over: object) -> dict[str, object]:
    opts: dict[str, object] = {
        "model": str(model), "device": "cpu", "train": str(data), "out": str(out), "num_tokens": 4,
        "warmup_steps": 0, "lr": 0.02, "max_steps": 6, "save_every": 1, "seed": 3, "progress": False,
        "init": "random",
    }  # fmt: skip
    if task == "classify":
        opts.update(labels="a=yes,b=no", template="Text: {text} Answer:")
    else:
        opts.update(task="generate", template="{text} =")
    opts.update(over)
    return opts


def argv(opts: dict[str, object]) -> list[str]:
    out: list[str] = []
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, str(v)]
    return out


def single(opts: dict[str, object]) -> torch.Tensor:
    cfg = RunConfig()
    apply_options(cfg, opts, "test")
    train(cfg, log=lambda *_: None)
    return load_prompt(str(opts["out"])).prompt


def launch(opts: dict[str, object], cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SOFTPROMPT_TENSORBOARD": "0", **(env_extra or {})}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = launch_command("X", 2)
    cmd = cmd[: cmd.index("--config")] + argv(opts)  # run the flags directly instead of a --config file
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def initial() -> torch.Tensor:
    from softprompt.prompt import init_prompt

    return init_prompt("random", 4, torch.zeros(8, 32), None, seed=3)  # what flags() trains from


def log_lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in out.with_suffix(".log.jsonl").read_text().splitlines()]


# ----- without processes ----------------------------------------------------------------------------------------
def fake_acc(rank: int, world: int) -> SimpleNamespace:
    return SimpleNamespace(
        process_index=rank,
        num_processes=world,
        is_main_process=rank == 0,
        reduce=lambda t, reduction: t * world,
        wait_for_everyone=lambda: None,
    )


def enc(n: int, targets: bool = False) -> list[Encoded]:
    return [Encoded([1] * (i + 1), None if targets else 0, [2] * (i + 1) if targets else None, False) for i in range(n)]


@pytest.mark.parametrize("n,world", [(5, 2), (4, 2), (7, 3), (1, 2)])
@pytest.mark.parametrize("task", ["classify", "generate"])
def test_shards_cover_the_batch_and_shares_sum_to_one(n: int, world: int, task: str) -> None:
    ex = enc(n, targets=task == "generate")
    parts = [AccelerateReplicas(fake_acc(r, world), task=task).shard(ex) for r in range(world)]
    assert [e for p, _ in parts for e in p] == ex  # contiguous, in order, every row once
    assert max(len(p) for p, _ in parts) - min(len(p) for p, _ in parts) <= 1
    assert sum(s for _, s in parts) == pytest.approx(1.0)
    if task == "generate":  # weighted by target tokens, not rows
        for p, s in parts:
            assert s == pytest.approx(sum(len(e.target_ids or []) for e in p) / sum(i + 1 for i in range(n)))


def test_all_reduce_sums_grads_and_fills_missing_ones() -> None:
    rep = AccelerateReplicas(fake_acc(1, 2))
    a, b = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4))
    a.grad = torch.ones(2, 3)
    assert rep.all_reduce([a, b], 0.25) == 0.5
    assert torch.equal(a.grad, torch.full((2, 3), 2.0)) and b.grad is not None and torch.equal(b.grad, torch.zeros(4))
    assert not rep.is_main and Replicas().is_main and Replicas().shard(enc(3)) == (enc(3), 1.0)


def test_launch_command() -> None:
    cmd = launch_command("/tmp/c.yaml", 2)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd
    assert cmd[-5:] == ["--multi_gpu", "-m", "softprompt.distributed", "--config", "/tmp/c.yaml"]
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    fsdp = launch_command("/tmp/c.yaml", 4, "fsdp.yaml")
    assert fsdp[fsdp.index("--config_file") + 1] == "fsdp.yaml" and "--multi_gpu" not in fsdp


# ----- 2 processes, gloo ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_equal_one_process(model_dir: Path, tmp_path: Path) -> None:
    """Global batch 5 over 2 processes (uneven shards 3 + 2), 2 micro-batches per step: same prompt as 1 process."""
    cls, _ = write_data(tmp_path / "data")
    over = {"batch_size": 5, "grad_accum": 2}
    ref = single(flags(model_dir, cls, tmp_path / "ref" / "p.safetensors", "classify", **over))
    out = tmp_path / "dist" / "p.safetensors"
    proc = launch(flags(model_dir, cls, out, "classify", **over), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["steps"] == 6  # only rank 0 prints
    got = load_prompt(out).prompt
    assert (got - ref).abs().max().item() <= TOL, (got - ref).abs().max().item()
    assert (got - initial()).abs().max().item() > 1000 * TOL  # the prompt did move
    # rank 0 alone wrote the log (6 lines, not 12) and the state; losses match the single-process run
    dist_log, ref_log = log_lines(out), log_lines(tmp_path / "ref" / "p.safetensors")
    assert [r["step"] for r in dist_log] == list(range(1, 7))
    for a, b in zip(dist_log, ref_log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == b["lr"]
    assert json.loads((Path(str(out) + ".state") / "state.json").read_text())["step"] == 6


@pytest.mark.slow
def test_distributed_kill_and_resume(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Generation (loss weighted by target tokens); rank 1 dies after step 3 and the launcher stops the job; the
    `softprompt train --distributed` wrapper (relaunch) with --resume ends with the single-process prompt."""
    _, gen = write_data(tmp_path / "data")
    ref = single(flags(model_dir, gen, tmp_path / "ref" / "p.safetensors", "generate", batch_size=4))
    out = tmp_path / "dist" / "p.safetensors"
    state = Path(str(out) + ".state")
    opts = flags(model_dir, gen, out, "generate", batch_size=4)
    killed = launch(opts, tmp_path, {FAULT_ENV: "3"})
    assert killed.returncode != 0, killed.stdout[-2000:]
    assert "injected fault: rank 1 exits after step 3" in killed.stderr
    assert json.loads((state / "state.json").read_text())["step"] == 3 and not out.exists()

    cfg = RunConfig()
    apply_options(cfg, {**opts, "resume": str(state)}, "test")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("SOFTPROMPT_TENSORBOARD", "0")
    capfd.readouterr()
    assert relaunch(cfg, 2) == 0  # writes cfg to a YAML file, runs accelerate launch on it
    stdout, stderr = capfd.readouterr()
    assert f"resumed from {state} at step 3" in stderr, stderr[-3000:]
    assert json.loads([x for x in stdout.splitlines() if x.startswith("{")][-1])["steps"] == 6
    got = load_prompt(out).prompt
    assert (got - ref).abs().max().item() <= TOL, (got - ref).abs().max().item()
    assert [r["step"] for r in log_lines(out)] == list(range(1, 7))
