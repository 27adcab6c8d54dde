"""Data-parallel training on Accelerate: N processes, each with the frozen backbone and a replica of the prompt.

    accelerate launch --num_processes 2 [--multi_gpu] -m softprompt train --train ... --out p.safetensors
    torchrun --nproc_per_node 2 -m softprompt train ...            # the same; any torchrun-style launcher works
    softprompt train --distributed [--nproc-per-node N] ...       # a thin wrapper that runs `accelerate launch`

No distribution layer of our own: Accelerate sets up the process group (gloo on CPUs, NCCL on GPUs) and its
`reduce` sums the gradients. softprompt.train's loop runs unchanged in every process through the `Replicas` hooks:

- `--batch-size` stays the GLOBAL batch: every process builds the same global micro-batch (the schedule is a
  pure function of seed and step) and takes its contiguous shard (rank r of N gets rows r*B/N..). Its loss is
  weighted by its share of the micro-batch (rows for classification, target tokens for generation), so the
  gradients summed over processes equal the single-process gradient of the same global batch, and every
  replica takes the identical optimiser step. A run on N processes ends with the prompt a one-process run
  with the same flags and seed gives (up to float summation order).
- Only the main process (rank 0) writes the prompt, the training state, the JSONL log, TensorBoard and plots;
  every process reads the state on `--resume`, so a killed distributed run resumes like a single one.
- Evaluation runs in every process on the whole eval set (identical results, so early stopping agrees).

For backbones that do not fit one device see docs/distributed.md (FSDP / DeepSpeed ZeRO-3 configurations).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

import torch

from softprompt.config import ConfigError, RunConfig, build_config, to_dict
from softprompt.data import Encoded
from softprompt.parsers import build_parser
from softprompt.train import Replicas, TrainResult, run_files, train

LAUNCHER_ENV = ("WORLD_SIZE", "LOCAL_RANK", "RANK")
FAULT_ENV = "SOFTPROMPT_FAULT_AFTER_STEP"  # tests: the process of rank SOFTPROMPT_FAULT_RANK dies after this step
FAULT_RANK_ENV = "SOFTPROMPT_FAULT_RANK"


def under_launcher() -> bool:
    """True inside a process started by accelerate launch / torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class AccelerateReplicas(Replicas):
    """The data-parallel hooks of softprompt.train on top of an accelerate.Accelerator."""

    def __init__(self, accelerator: Any, *, task: str = "classify") -> None:
        self.acc = accelerator
        self.rank = int(accelerator.process_index)
        self.world = int(accelerator.num_processes)
        self.is_main = bool(accelerator.is_main_process)
        self.by_tokens = task == "generate"  # generation's loss is a mean over target tokens, not rows
        fault = os.environ.get(FAULT_ENV)
        self.fault_step = int(fault) if fault else None
        self.fault_rank = int(os.environ.get(FAULT_RANK_ENV, str(self.world - 1)))

    def _weight(self, ex: list[Encoded]) -> int:
        return sum(len(e.target_ids or []) for e in ex) if self.by_tokens else len(ex)

    def shard(self, ex: list[Encoded]) -> tuple[list[Encoded], float]:
        n, w = len(ex), self.world
        lo = self.rank * (n // w) + min(self.rank, n % w)
        hi = lo + n // w + (1 if self.rank < n % w else 0)
        mine, total = ex[lo:hi], self._weight(ex)
        return mine, (self._weight(mine) / total if total else 0.0)

    def all_reduce(self, params: list[torch.nn.Parameter], loss: float) -> float:
        grads = []
        for p in params:
            if p.grad is None:  # this process had no rows in the step
                p.grad = torch.zeros_like(p)
            grads.append(p.grad.reshape(-1))
        flat = self.acc.reduce(torch.cat(grads), reduction="sum")  # one collective for every trainable tensor
        i = 0
        for p in params:
            g = p.grad
            assert g is not None
            g.copy_(flat[i : i + g.numel()].view_as(g))
            i += g.numel()
        device = params[0].device if params else torch.device("cpu")
        total = self.acc.reduce(torch.tensor([loss], dtype=torch.float64, device=device), reduction="sum")
        return float(total.item())

    def step_done(self, step: int) -> None:
        if self.fault_step is not None and step == self.fault_step:
            self.acc.wait_for_everyone()  # the main process has written this step's state
            if self.rank == self.fault_rank:
                sys.stderr.write(f"softprompt: injected fault: rank {self.rank} exits after step {step}\n")
                sys.stderr.flush()
                os._exit(17)


def make_accelerator(device: str = "auto") -> Any:
    """An Accelerator for this process: CPU (gloo) when asked or when there is no GPU, else its GPU (NCCL)."""
    from accelerate import Accelerator

    cpu = device == "cpu" or not torch.cuda.is_available()
    return Accelerator(cpu=cpu)


def train_distributed(cfg: RunConfig, *, log=print, accelerator: Any = None) -> TrainResult:
    """softprompt.train.train in every process of a launched job; the result is the same in each process."""
    from softprompt.models import load_backbone

    acc = accelerator or make_accelerator(cfg.model.device)
    kind = str(getattr(acc, "distributed_type", "")).rsplit(".", 1)[-1]
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ConfigError(
            f"accelerate is configured for {kind}: sharding the frozen backbone is not implemented yet (each process "
            "would hold a full copy); use a plain multi-process config, or see docs/distributed.md"
        )
    cfg.model.device = str(acc.device)  # each process on its own device (cuda:LOCAL_RANK or cpu)
    rep = AccelerateReplicas(acc, task=cfg.data.task)
    quiet = lambda *a, **k: None  # noqa: E731
    say = log if rep.is_main else quiet
    if rep.is_main and cfg.train.batch_size % rep.world:
        say(
            f"note: --batch-size {cfg.train.batch_size} is the global batch; it does not split evenly over "
            f"{rep.world} processes (shards differ by one row; the result is unchanged)"
        )
    run_files(cfg).check()  # before the model loads (train() checks again, cheaply)
    with acc.main_process_first():  # the main process converts/caches the model first (e.g. the GGUF cache)
        bb = load_backbone(cfg.model, progress=cfg.train.progress and rep.is_main)
    try:
        return train(cfg, backbone=bb, log=say, replicas=rep)
    finally:
        acc.wait_for_everyone()


def train_auto(cfg: RunConfig, *, log=print) -> TrainResult | None:
    """What `softprompt train` runs: data-parallel under a launcher, else the plain loop. None in processes other
    than the main one (they print nothing)."""
    if not under_launcher():
        return train(cfg, log=log)
    res = train_distributed(cfg, log=log)
    return res if int(os.environ.get("RANK", "0")) == 0 else None


# ----- CLI ------------------------------------------------------------------------------------------------------
def launch_command(config_path: str, nproc: int, accelerate_config: str | None = None) -> list[str]:
    """The `accelerate launch` command that runs `softprompt train --config CONFIG` in `nproc` processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        cmd += ["--config_file", accelerate_config, "--num_processes", str(nproc)]
    else:
        # --multi_gpu is accelerate's name for "several local processes": with no GPU they use CPUs and gloo
        # (`--cpu` would start a single process).
        cmd += [
            "--num_processes",
            str(nproc),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
        if nproc > 1:
            cmd.append("--multi_gpu")
    return [*cmd, "-m", "softprompt.distributed", "--config", config_path]


def default_nproc() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def relaunch(cfg: RunConfig, nproc: int | None = None, accelerate_config: str | None = None) -> int:
    """`softprompt train --distributed`: write the resolved configuration to a temporary YAML file and run
    `accelerate launch` on it; returns the launcher's exit code (its children print the result line)."""
    import yaml

    n = nproc or default_nproc()
    if n < 1:
        raise ConfigError(f"--nproc-per-node must be >= 1, got {n}")
    tmp = tempfile.mkdtemp(prefix="softprompt-launch-")
    try:
        path = os.path.join(tmp, "train.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
        return subprocess.call(launch_command(path, n, accelerate_config), env=env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_train(args: argparse.Namespace, log=None) -> int:
    """The whole `softprompt train` command: relaunch for --distributed, else train (data-parallel under a
    launcher); the main process prints the one-line JSON result."""
    log = log or (lambda s: print(s, file=sys.stderr))
    cfg = build_config(args)
    if cfg.data.train and args.config:  # the --config file is an input too (train() checks the others again)
        run_files(cfg, reads=[("--config", args.config)]).check()
    if getattr(args, "distributed", False) and not under_launcher():
        return relaunch(cfg, getattr(args, "nproc_per_node", None), getattr(args, "accelerate_config", None))
    res = train_auto(cfg, log=log)
    if res is not None:
        print(
            json.dumps(
                {
                    "out": res.out,
                    "steps": res.steps,
                    "best_step": res.best_step,
                    "wall_s": round(res.wall_s, 1),
                    **dict(res.metrics.items()),
                }
            )
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m softprompt.distributed [train flags]`: what each launched process runs (and usable directly:
    `accelerate launch -m softprompt.distributed --train ...`)."""
    args = build_parser().parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_train(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, OSError) as e:
        print(f"softprompt: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
