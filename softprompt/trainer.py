"""The one training loop, shared by `softprompt train` (softprompt.train) and `softprompt train-multi`
(softprompt.multitask). A caller passes an Objective: the tensors that learn and how a micro-batch's loss and an
evaluation are computed. `fit()` does everything else, the same way for both: optimiser and schedule, resume
(refusing a state that another configuration wrote), the step loop, evaluation and best-prompt keeping, early
stopping, rollback to the last good prompt on a non-finite loss, logs (JSONL, TensorBoard when installed, progress
bar, plot) and atomic state writes (softprompt.runfiles).

One optimiser step, top to bottom in fit():
    for each of the grad_accum micro-batches (a pure function of (seed, step), so --resume repeats them):
        rows -> this process's shard -> loss (a () tensor: the shard's share of the micro-batch mean) -> backward
    gradients summed over processes -> loss finite? -> clip -> the lr of this step -> optimiser and schedule step
    -> prompt finite? (else roll back) -> evaluate (keep the best) -> log -> state
A run killed at any point and resumed with the same flags ends with the same prompt as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

import torch
from transformers import get_scheduler
from transformers.optimization import Adafactor

from softprompt.checkpoint import atomic_write
from softprompt.config import RunConfig
from softprompt.data import Encoded
from softprompt.runfiles import RunFiles, keeping_mode, load_state, remove_stale_temps, save_state


class TrainingError(RuntimeError):
    """Training stopped (e.g. a non-finite loss); the message says why and what was kept."""


@dataclass
class Evaluation:
    """One evaluation of the current prompt(s)."""

    score: float  # the --metric value (train-multi: the mean over tasks): picks the best prompt
    log: dict[str, Any]  # eval_* scalars for this step's log line
    metrics: dict[str, Any]  # what Objective.save writes into the prompt metadata (train-multi: per task)


class Objective(Protocol):
    """What a run trains. fit() owns the optimiser, schedule, state, logs and the decision when to save."""

    params: list[torch.nn.Parameter]  # the prompt tensors (state param.0, param.1, ...)
    head_params: list[torch.nn.Parameter]  # a trained head's tensors, after them (their own lr with --head-lr)

    @property
    def n_train(self) -> int:
        """Training examples (--epochs -> steps)."""
        ...

    @property
    def has_eval(self) -> bool:
        """An evaluation set was given."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the loss is computed (autocast's device type)."""
        ...

    def batches(self, step: int) -> list[list[Any]]:
        """The grad_accum global micro-batches of optimiser step `step` (0-based): rows that loss() takes."""
        ...

    def loss(self, rows: list[Any]) -> torch.Tensor:
        """() mean loss over `rows` (a shard of one micro-batch), with the graph to the trainable tensors."""
        ...

    def evaluate(self) -> Evaluation: ...

    def save(self, metrics: Evaluation | dict[str, Any]) -> None:
        """Write the prompt file(s): after an evaluation that improved, with its metrics; else with a note of why
        this prompt is kept ({"stopped": ...} or {"train_loss": ...}) as their metrics."""
        ...

    def identity(self) -> dict[str, Any]:
        """The flags (and base-model fingerprint) a resumed run must share with the run that wrote the state."""
        ...


@dataclass
class Fitted:
    history: list[dict[str, Any]]  # one log record per step, from step 1 (a resumed run's too)
    best_step: int  # step of the best evaluation (-1: none)
    last: Evaluation | None  # the last evaluation of this process's part of the run
    wall_s: float

    @property
    def steps(self) -> int:
        return int(self.history[-1]["step"]) if self.history else 0


class Replicas:
    """Data-parallel hooks; this default is one process. softprompt.distributed.AccelerateReplicas runs N processes
    that each hold the frozen backbone and a replica of the prompt: each takes its shard of every global micro-batch,
    gradients are summed across processes, and only the main process writes files."""

    is_main = True

    def shard(self, ex: list[Encoded]) -> tuple[list[Encoded], float]:
        """This process's rows of a global micro-batch, and their share of that micro-batch's mean loss."""
        return ex, 1.0

    def all_reduce(self, params: list[torch.nn.Parameter], loss: float) -> float:
        """Sum the gradients (and the loss) over processes; returns the global loss."""
        return loss

    def step_done(self, step: int) -> None:
        """Called after optimiser step `step` (1-based) and its state save."""


def make_optimizer(
    params: list[torch.nn.Parameter], cfg: RunConfig, head: list[torch.nn.Parameter] | None = None
) -> torch.optim.Optimizer:
    """The optimiser over the prompt `params` and a trained head's parameters; the head gets its own parameter
    group only when --head-lr sets a different rate (one group otherwise, as states written before it have)."""
    t = cfg.train
    head = head or []
    groups: list[dict[str, Any]] = [{"params": params + head}]
    if head and t.head_lr > 0 and t.head_lr != t.lr:
        groups = [{"params": params}, {"params": head, "lr": t.head_lr}]
    if t.optimizer == "adafactor":
        # Lester et al.: Adafactor with a fixed lr (no relative step), no warm-up inside the optimiser
        return Adafactor(
            groups, lr=t.lr, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=t.weight_decay
        )
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)


def total_steps(cfg: RunConfig, n_train: int) -> int:
    """--max-steps, else --epochs over n_train examples in steps of batch_size * grad_accum (at least one)."""
    t = cfg.train
    if t.max_steps > 0:
        return t.max_steps
    per_epoch = max(1, n_train // (t.batch_size * t.grad_accum))
    return max(1, math.ceil(t.epochs * per_epoch))


def fit(
    obj: Objective, cfg: RunConfig, files: RunFiles, *, log=print, replicas: Replicas | None = None, t0: float = 0.0
) -> Fitted:
    """Train `obj` as configured, writing what `files` names; TrainingError when a non-finite value stops it."""
    rep = replicas or Replicas()
    t0 = t0 or time.time()
    t = cfg.train
    params = obj.params + obj.head_params  # every trainable tensor, in state order
    steps = total_steps(cfg, obj.n_train)
    opt = make_optimizer(obj.params, cfg, obj.head_params)
    sched = get_scheduler(
        t.schedule if t.schedule != "constant" else "constant_with_warmup",
        opt,
        num_warmup_steps=t.warmup_steps,
        num_training_steps=steps,
    )

    # ---- resume: the identity check comes before any tensor is touched ---------------------------------------
    run_id = obj.identity()
    start, history, best, best_step, bad_evals = 0, [], None, -1, 0
    if files.resume:
        if rep.is_main:
            remove_stale_temps(files)
        st = load_state(files.state, params, opt, sched, run=run_id)
        start, history, best, best_step, bad_evals = (
            st["step"],
            st.get("history", []),
            st.get("best"),
            st.get("best_step", -1),
            st.get("bad_evals", 0),
        )
        log(f"resumed from {files.state} at step {start}")

    logs = _Logs(files, history, start, steps, main=rep.is_main, progress=t.progress)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
    autocast = torch.autocast(obj.device.type, dtype=amp) if amp else nullcontext()
    last_good = [p.detach().clone() for p in params]  # prompt (and head) after the last finite update
    last: Evaluation | None = None
    larger_is_better = t.metric != "loss"

    def stop_non_finite(what: str, step: int) -> NoReturn:
        logs.close()
        hint = "(lower --lr or use --max-grad-norm)"
        if best_step >= 1:  # an evaluated best prompt is already saved: keep it
            raise TrainingError(f"{what}: stopped; kept the best prompt (step {best_step}) in {files.where} {hint}")
        with torch.no_grad():
            for p, good in zip(params, last_good, strict=True):
                p.copy_(good)
        if rep.is_main:
            obj.save({"stopped": f"{what}; last good prompt from step {step}"})
        raise TrainingError(f"{what}: stopped; kept the last good prompt (step {step}) in {files.where} {hint}")

    for step in range(start, steps):
        loss_sum = 0.0
        for micro in obj.batches(step):
            rows, share = rep.shard(micro)  # this process's rows; share: their weight in the micro-batch mean
            if not rows:  # more processes than rows in this micro-batch
                continue
            with autocast:
                loss = obj.loss(rows) * share / t.grad_accum  # (): so the summed gradients are the step's mean
            loss.backward()
            loss_sum += float(loss.detach())
        loss_sum = rep.all_reduce(params, loss_sum)
        if not math.isfinite(loss_sum):
            stop_non_finite(f"non-finite loss ({loss_sum}) at step {step + 1}", step)
        if t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        lr = sched.get_last_lr()[0]  # the lr this step uses (get_last_lr after sched.step() is the next step's)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if not all(bool(torch.isfinite(p).all()) for p in params):  # e.g. an inf/NaN gradient with a finite loss
            stop_non_finite(f"non-finite prompt after the update of step {step + 1} (loss {loss_sum})", step)
        last_good = [p.detach().clone() for p in params]
        rec: dict[str, Any] = {"step": step + 1, "loss": loss_sum, "lr": lr, "time_s": round(time.time() - t0, 2)}
        done = step + 1 == steps
        if obj.has_eval and ((t.eval_every and (step + 1) % t.eval_every == 0) or done):
            last = obj.evaluate()
            rec.update(last.log)
            if best is None or (last.score > best if larger_is_better else last.score < best):
                best, best_step, bad_evals = last.score, step + 1, 0
                if rep.is_main:
                    obj.save(last)  # keep the best prompt
            else:
                bad_evals += 1
        history.append(rec)
        logs.write(rec, {t.metric: best} if best is not None else {})
        stop = bool(t.patience) and bad_evals >= t.patience
        if ((step + 1) % t.save_every == 0 or done or stop) and rep.is_main:
            extra = {"history": history, "best": best, "best_step": best_step, "bad_evals": bad_evals, "run": run_id}
            save_state(files.state, params, opt, sched, step + 1, extra)
        rep.step_done(step + 1)
        if stop:
            log(f"early stopping at step {step + 1}: no {t.metric} improvement in {t.patience} evaluations")
            break
    logs.close()
    if not obj.has_eval and rep.is_main:  # no evaluation: the last prompt is the result
        obj.save({"train_loss": history[-1]["loss"] if history else None})
    if t.plot and rep.is_main and files.plot is not None:
        plot_history(history, files.plot, t.metric)
    return Fitted(history, best_step, last, time.time() - t0)


class _Logs:
    """The per-step outputs of the main process: the JSONL log, TensorBoard scalars and the progress bar."""

    def __init__(self, files: RunFiles, history: list[dict[str, Any]], start: int, steps: int, *, main: bool,
                 progress: bool) -> None:  # fmt: skip
        self.path, self.main = files.log, main
        self.path.parent.mkdir(parents=True, exist_ok=True)  # the log's first line comes before any prompt is saved
        if main and start == 0 and self.path.exists():  # RunFiles.check made sure it is a log of ours
            self.path.unlink()
        elif main and start > 0:  # a kill can land after a step's log line but before its state: the log follows
            # the state
            text = "".join(json.dumps(r) + "\n" for r in history)
            with keeping_mode(self.path):
                atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))
        self.tb = tensorboard_writer(files.tensorboard) if main and files.tensorboard is not None else None
        self.bar = _progress(steps, start, progress and main)

    def write(self, rec: dict[str, Any], best: dict[str, float]) -> None:
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, rec["step"])
        self.bar.update(1)
        self.bar.set_postfix({"loss": f"{rec['loss']:.4f}", **{k: f"{v:.4f}" for k, v in best.items()}})

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def scalars(m: dict[str, Any]) -> dict[str, Any]:
    """The numbers and strings of a metrics dict (what a log line and a prompt's metadata hold)."""
    return {k: v for k, v in m.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def _progress(total: int, start: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", file=sys.stderr, dynamic_ncols=True)


def tensorboard_enabled() -> bool:
    """TensorBoard logging is on when the package is installed, unless SOFTPROMPT_TENSORBOARD=0."""
    if os.environ.get("SOFTPROMPT_TENSORBOARD", "1") == "0":
        return False
    try:
        import torch.utils.tensorboard  # noqa: F401
    except Exception:  # tensorboard not installed
        return False
    return True


def tensorboard_writer(path: Path):
    if not tensorboard_enabled():
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(path))


def plot_history(history: list[dict[str, Any]], path: Path, metric: str) -> None:
    """PNG with the training loss and the evaluation metric (train-multi: its mean over tasks) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    key = next((k for k in (f"eval_{metric}", f"eval_mean_{metric}") if any(k in h for h in history)), None)
    ev = [(h["step"], h[key]) for h in history if key is not None and key in h]
    if ev:
        ax2 = ax.twinx()
        ax2.plot(*zip(*ev), "o-", color="tab:orange", label=f"eval {metric}")
        ax2.set_ylabel(metric)
    ax.set_title(path.stem)
    fig.tight_layout()
    with keeping_mode(path):
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
