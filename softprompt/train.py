"""Training loop: only the soft prompt (and an encoder's linear head) learns; the backbone stays frozen.

Read top to bottom: set-up (model, task, data, prompt, optimiser), optional resume, then the step loop
(prefix once per step -> batch loss -> backward -> clip -> step), evaluation, best-prompt keeping, state saves.
A run killed at any point and resumed with the same flags ends with the same prompt as an uninterrupted run:
batch order is a pure function of (seed, epoch), and the state file holds prompt, optimiser, schedule, step
and RNG states (safetensors + JSON, never pickle).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import get_scheduler
from transformers.optimization import Adafactor

from softprompt.checkpoint import atomic_write, save_prompt
from softprompt.config import RunConfig, to_dict
from softprompt.data import Encoded, length_grouped_batches
from softprompt.evaluate import evaluate_examples
from softprompt.models import Backbone, load_backbone
from softprompt.prompt import SoftPrompt, init_prompt
from softprompt.prompted import PromptedModel
from softprompt.task import BoundTask, TaskSpec


class TrainingError(RuntimeError):
    """Training stopped (e.g. a non-finite loss); the message says why and what was kept."""


@dataclass
class TrainResult:
    out: str
    steps: int
    metrics: dict[str, Any]
    best_step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0


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


def batch_schedule(
    lengths: list[int], batch_size: int, seed: int, step: int, accum: int, group_by_length: bool = True
) -> list[list[int]]:
    """The micro-batches of optimiser step `step` (0-based): a pure function of (seed, step), so resume repeats it.
    group_by_length=False: uniformly random batches (one mega-chunk of size 1 batch = no sorting across rows)."""
    per_epoch = max(1, len(lengths) // batch_size) if len(lengths) >= batch_size else 1
    gf = 50 if group_by_length else 1  # chunk = one batch: sorting inside a batch changes nothing
    out = []
    for m in range(accum):
        k = step * accum + m
        epoch, i = divmod(k, per_epoch)
        out.append(length_grouped_batches(lengths, batch_size, seed=seed, epoch=epoch, group_factor=gf)[i])
    return out


def total_steps(cfg: RunConfig, n_train: int) -> int:
    t = cfg.train
    if t.max_steps > 0:
        return t.max_steps
    per_epoch = max(1, n_train // (t.batch_size * t.grad_accum))
    return max(1, math.ceil(t.epochs * per_epoch))


def _state_dir(cfg: RunConfig) -> Path:
    return Path(cfg.train.resume) if cfg.train.resume else Path(cfg.train.out + ".state")


def save_state(path: Path, params: list[torch.nn.Parameter], opt, sched, step: int, extra: dict[str, Any]) -> None:
    """Training state in ONE atomically written safetensors file: tensors, with the scalars as JSON in its header
    (a kill between two files could otherwise pair step k's scalars with step k+1's tensors). state.json, a
    readable copy of the scalars, is written after it and is not read back."""
    tensors: dict[str, torch.Tensor] = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
    opt_sd = opt.state_dict()
    scalars: dict[str, Any] = {}
    for pid, st in opt_sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    tensors["rng.torch"] = torch.get_rng_state()
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "step": step,
        "param_groups": opt_sd["param_groups"],
        "opt_scalars": scalars,
        "sched": sched.state_dict(),
        "python_rng": repr(random.getstate()),
        **extra,
    }
    meta_json = json.dumps(meta, default=str)
    atomic_write(path / "state.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"state": meta_json}))
    atomic_write(path / "state.json", lambda tmp: Path(tmp).write_text(meta_json))


# What fixes a run's trajectory: resuming with any of these changed would splice two different runs together.
_RUN_FIELDS = {
    "data": ("train", "template", "labels", "head", "task"),
    "prompt": ("num_tokens", "init", "init_scale", "position", "method"),
    "train": (
        "optimizer", "lr", "head_lr", "weight_decay", "schedule", "warmup_steps", "batch_size", "grad_accum",
        "group_by_length", "max_steps", "epochs", "max_grad_norm", "seed", "precision",
    ),
}  # fmt: skip


def run_identity(cfg: RunConfig, fingerprint: str) -> dict[str, Any]:
    """The flags (and the base model's fingerprint) a resumed run must share with the run that wrote the state."""
    d = to_dict(cfg)
    if d["data"].get("train") and Path(d["data"]["train"]).exists():  # ./a.tsv and /abs/a.tsv are one file
        d["data"]["train"] = str(Path(d["data"]["train"]).resolve())
    out: dict[str, Any] = {"fingerprint": fingerprint}
    for sect, names in _RUN_FIELDS.items():
        out.update({f"--{sect}.{n}": d[sect][n] for n in names if n in d[sect]})
    return json.loads(json.dumps(out, default=str))  # as it reads back from the state file


def check_resumable(saved: dict[str, Any] | None, now: dict[str, Any], state_dir: Path) -> None:
    """Raise ConfigError naming the first flag that differs from the run that wrote the state."""
    from softprompt.config import ConfigError

    if saved is None:  # a state written before run identities were stored
        return
    for k, v in now.items():
        if k in saved and saved[k] != v:
            what = "the base model (fingerprint)" if k == "fingerprint" else k
            raise ConfigError(
                f"--resume {state_dir}: {what} was {saved[k]!r} in the interrupted run, now {v!r}; "
                "resume with the same flags, or delete the state directory to start over"
            )


def load_state(
    path: Path, params: list[torch.nn.Parameter], opt, sched, run: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Restore the training state; with `run` (run_identity of this run), first refuse a state that another
    configuration wrote, before anything is touched."""
    import ast

    with safe_open(str(path / "state.safetensors"), framework="pt") as f:
        header = (f.metadata() or {}).get("state")
    meta = json.loads(header if header is not None else (path / "state.json").read_text())
    if run is not None:
        check_resumable(meta.get("run"), run, path)
    tensors = load_file(str(path / "state.safetensors"))
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"])
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for k, v in meta["opt_scalars"].items():
        pid, name = k.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["sched"])
    torch.set_rng_state(tensors["rng.torch"])
    random.setstate(ast.literal_eval(meta["python_rng"]))
    return meta


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


def train(
    cfg: RunConfig, *, backbone: Backbone | None = None, log=print, replicas: Replicas | None = None
) -> TrainResult:
    """Train a soft prompt as configured; returns where it was written and its metrics."""
    rep = replicas or Replicas()
    t0 = time.time()
    cfg.validate()
    t = cfg.train
    random.seed(t.seed)
    torch.manual_seed(t.seed)
    if not cfg.data.train:
        from softprompt.config import ConfigError

        raise ConfigError("--train: a training file is required")

    # ---- model, task, data --------------------------------------------------------------------------
    bb = backbone or load_backbone(cfg.model, progress=t.progress)
    spec = TaskSpec.from_config(cfg.data, position=cfg.prompt.position)
    pm = PromptedModel(bb, position=cfg.prompt.position, naive=t.naive)
    task = BoundTask(spec, pm, num_tokens=cfg.prompt.num_tokens)
    train_set, n_cut, _ = task.encode_file(cfg.data.train, truncate=not cfg.data.no_truncate, columns=cfg.data.columns)
    eval_set: list[Encoded] = []
    if cfg.data.eval:
        eval_set, _, _ = task.encode_file(cfg.data.eval, truncate=not cfg.data.no_truncate, columns=cfg.data.columns)
        if t.eval_max:
            eval_set = eval_set[: t.eval_max]
    if n_cut:
        log(f"note: {n_cut} of {len(train_set)} training inputs were truncated to {task.max_input_length()} tokens")
    if t.gradient_checkpointing:
        bb.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ---- trainable tensors --------------------------------------------------------------------------
    prompt = SoftPrompt(cfg.prompt.num_tokens, bb.embed_dim).to(bb.device)
    init_rule = cfg.prompt.init
    if init_rule.strip() == "labels" and spec.task != "classify":
        init_rule = "vocab"  # the default rule needs class labels; Lester et al. use vocab init otherwise
        log("note: --init labels needs class labels; using --init vocab for --task generate")
    init = init_prompt(
        init_rule,
        cfg.prompt.num_tokens,
        pm.embedding_matrix(),
        bb.tokenizer,
        seed=t.seed,
        scale=cfg.prompt.init_scale,
        label_words=task.label_words() if spec.task == "classify" and spec.verbalizer else None,
    )
    with torch.no_grad():
        prompt.embedding.copy_(init)
    pm.head = task.make_head(seed=t.seed)
    deep = None  # --method deep: learned keys/values at every layer instead of the input prompt (softprompt.deep)
    if cfg.prompt.method == "deep":
        from softprompt.deep import make_deep_prompt

        deep = make_deep_prompt(pm, init, reparam=cfg.prompt.deep_reparam)
    prompt_params = deep.trainable() if deep is not None else [prompt.embedding]
    head_params = [p for p in (pm.head.parameters() if pm.head is not None else []) if p.requires_grad]
    params = prompt_params + head_params
    steps = total_steps(cfg, len(train_set))
    opt = make_optimizer(prompt_params, cfg, head_params)
    sched = get_scheduler(
        t.schedule if t.schedule != "constant" else "constant_with_warmup",
        opt,
        num_warmup_steps=t.warmup_steps,
        num_training_steps=steps,
    )

    meta = {
        "base_model": bb.model_id,
        "architecture": bb.architecture,
        "family": bb.family,
        "fingerprint": bb.fingerprint,
        "init": init_rule,
        "train_config": to_dict(cfg),
        **spec.to_meta(),
    }

    def write_prompt(path: str, metrics: dict[str, Any]) -> None:
        if not rep.is_main:
            return
        extra = {}
        if pm.head is not None and hasattr(pm.head, "linear"):  # head.linear.weight/.bias: what Predictor.load reads
            extra = {f"head.{k}": v for k, v in pm.head.state_dict().items()}
        if deep is not None:  # an empty input prompt, the per-layer keys/values as deep.keys/deep.values
            extra.update(deep.tensors())
            save_prompt(path, prompt.embedding[:0], {**meta, **deep.meta(), "metrics": _scalars(metrics)}, extra)
            return
        save_prompt(path, prompt.embedding, {**meta, "metrics": _scalars(metrics)}, extra)

    # ---- resume -------------------------------------------------------------------------------------
    state_dir = _state_dir(cfg)
    run_id = run_identity(cfg, bb.fingerprint)
    start, history, best, best_step, bad_evals = 0, [], None, -1, 0
    if t.resume and (state_dir / "state.safetensors").exists():
        if rep.is_main:
            _remove_stale_temps(state_dir, Path(t.out))
        st = load_state(state_dir, params, opt, sched, run=run_id)
        start, history, best, best_step, bad_evals = (
            st["step"],
            st.get("history", []),
            st.get("best"),
            st.get("best_step", -1),
            st.get("bad_evals", 0),
        )
        log(f"resumed from {state_dir} at step {start}")

    # ---- loop ---------------------------------------------------------------------------------------
    lengths = [len(e.input_ids) + len(e.target_ids or []) for e in train_set]
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
    autocast = torch.autocast(bb.device.type, dtype=amp) if amp else nullcontext()
    log_path = Path(t.out).with_suffix(".log.jsonl")
    log_path.parent.mkdir(parents=True, exist_ok=True)  # the log's first line comes before any prompt is saved
    if rep.is_main and start == 0 and log_path.exists():
        log_path.unlink()
    elif rep.is_main and start > 0:  # a kill can land after a step's log line but before its state: the log
        # follows the state
        atomic_write(log_path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in history)))
    tb = _tensorboard(Path(t.out).with_suffix(".tb")) if rep.is_main else None
    bar = _progress(steps, start, t.progress and rep.is_main)
    last_good = [p.detach().clone() for p in params]  # prompt (and head) after the last finite update
    larger_is_better = t.metric != "loss"

    def stop_non_finite(what: str, step: int) -> NoReturn:
        hint = "(lower --lr or use --max-grad-norm)"
        if best_step >= 1:  # an evaluated best prompt is already in t.out: keep it
            raise TrainingError(f"{what}: stopped; kept the best prompt (step {best_step}) in {t.out} {hint}")
        with torch.no_grad():
            for p, good in zip(params, last_good, strict=True):
                p.copy_(good)
        write_prompt(t.out, {"stopped": f"{what}; last good prompt from step {step}"})
        raise TrainingError(f"{what}: stopped; kept the last good prompt (step {step}) in {t.out} {hint}")

    for step in range(start, steps):
        loss_sum = 0.0
        for idx in batch_schedule(lengths, t.batch_size, t.seed, step, t.grad_accum, t.group_by_length):
            ex, share = rep.shard([train_set[i] for i in idx])
            if not ex:  # more processes than rows in this micro-batch
                continue
            batch = pm.collate(
                [e.input_ids for e in ex],
                labels=[int(e.label) for e in ex] if spec.task == "classify" else None,  # type: ignore[arg-type]
                targets=[e.target_ids or [] for e in ex] if spec.task == "generate" else None,
            )
            with autocast:
                prefix = pm.build_prefix([prompt()]) if deep is None else deep.prefix(pm)  # once per micro-batch
                loss = pm.loss(prefix, batch.to(bb.device), task.label_ids) * share / t.grad_accum
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
        if eval_set and ((t.eval_every and (step + 1) % t.eval_every == 0) or done):
            pm.eval()
            eval_prefix = pm.build_prefix([prompt.embedding.detach()]) if deep is None else deep.eval_prefix(pm)
            m = evaluate_examples(
                pm,
                eval_prefix,
                eval_set,
                task=spec.task,
                label_ids=task.label_ids,
                labels=spec.verbalizer.labels if spec.verbalizer else None,
            )
            pm.train(cfg.model.dropout)  # back to training mode: --dropout stays active after an evaluation
            rec.update({f"eval_{k}": v for k, v in _scalars(m).items()})
            score = m.get(t.metric, m.get("loss"))
            improved = best is None or (score > best if larger_is_better else score < best)
            if improved:
                best, best_step, bad_evals = score, step + 1, 0
                write_prompt(t.out, m)  # keep the best prompt
            else:
                bad_evals += 1
        history.append(rec)
        if rep.is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    tb.add_scalar(k, v, step + 1)
        bar.update(1)
        bar.set_postfix({"loss": f"{loss_sum:.4f}", **({t.metric: f"{best:.4f}"} if best is not None else {})})
        stop = bool(t.patience) and bad_evals >= t.patience
        if ((step + 1) % t.save_every == 0 or done or stop) and rep.is_main:
            save_state(
                state_dir,
                params,
                opt,
                sched,
                step + 1,
                {"history": history, "best": best, "best_step": best_step, "bad_evals": bad_evals, "run": run_id},
            )
        rep.step_done(step + 1)
        if stop:
            log(f"early stopping at step {step + 1}: no {t.metric} improvement in {t.patience} evaluations")
            break
    bar.close()
    if not eval_set:  # no evaluation: the last prompt is the result
        write_prompt(t.out, {"train_loss": history[-1]["loss"] if history else None})
    if t.plot and rep.is_main:
        plot_history(history, Path(t.out).with_suffix(".png"), t.metric)
    final = {k[5:]: v for k, v in (history[-1] if history else {}).items() if k.startswith("eval_")}
    return TrainResult(t.out, len(history) and history[-1]["step"], final, best_step, history, time.time() - t0)


def _remove_stale_temps(state_dir: Path, out: Path) -> None:
    """Temp files of atomic writes cut short by a kill (atomic_write's names: .NAME.XXXX.tmp)."""
    for folder, prefixes in ((state_dir, (".state.",)), (out.parent, (f".{out.name}.", f".{out.stem}.log."))):
        for f in folder.glob(".*.tmp"):
            if f.name.startswith(prefixes):
                f.unlink(missing_ok=True)


def _scalars(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def _progress(total: int, start: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", file=sys.stderr, dynamic_ncols=True)


def _tensorboard(path: Path):
    if os.environ.get("SOFTPROMPT_TENSORBOARD", "1") == "0":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(str(path))


def plot_history(history: list[dict[str, Any]], path: Path, metric: str) -> None:
    """PNG with the training loss and the evaluation metric against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ev = [(h["step"], h[f"eval_{metric}"]) for h in history if f"eval_{metric}" in h]
    if ev:
        ax2 = ax.twinx()
        ax2.plot(*zip(*ev), "o-", color="tab:orange", label=f"eval {metric}")
        ax2.set_ylabel(metric)
    ax.set_title(path.stem)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
