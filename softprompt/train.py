"""`softprompt train`: one soft prompt (or a deep prompt) and an encoder's linear head learn; the backbone stays frozen.

This module says WHAT is trained: set-up (model, task, data, prompt, head) and `PromptObjective`, the loss of a
micro-batch, an evaluation and the prompt file. softprompt.trainer's fit() is HOW: optimiser, schedule, resume,
the step loop, best-prompt keeping, early stopping, non-finite rollback, logs and state (the same loop trains
`softprompt train-multi`). A run killed at any point and resumed with the same flags ends with the same prompt
as an uninterrupted run: batch order is a pure function of (seed, epoch), and the state file holds prompt,
optimiser, schedule, step and RNG states (safetensors + JSON, never pickle).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from softprompt import methods
from softprompt.checkpoint import save_prompt
from softprompt.config import ConfigError, RunConfig, to_dict
from softprompt.data import Encoded, length_grouped_batches
from softprompt.dynamic import TrainableSource, step_prefix
from softprompt.evaluate import evaluate_examples
from softprompt.methods import Trainable
from softprompt.models import Backbone, load_backbone
from softprompt.prompt import init_prompt
from softprompt.prompted import PromptedModel
from softprompt.runfiles import (
    RunFiles,
    check_resumable,
    input_paths,
    keeping_mode,
    load_state,
    run_identity,
    save_state,
)
from softprompt.task import BoundTask, TaskSpec
from softprompt.trainer import (
    Evaluation,
    Replicas,
    TrainingError,
    fit,
    make_optimizer,
    plot_history,
    scalars,
    tensorboard_enabled,
    total_steps,
)

__all__ = [
    "PromptObjective", "Replicas", "TrainResult", "TrainingError", "batch_schedule", "check_resumable",
    "load_state", "make_optimizer", "plot_history", "run_files", "run_identity", "save_state", "total_steps", "train",
]  # fmt: skip


@dataclass
class TrainResult:
    out: str
    steps: int
    metrics: dict[str, Any]
    best_step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0


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


def run_files(cfg: RunConfig, reads: list[tuple[str, str]] | None = None) -> RunFiles:
    """What a `softprompt train` run writes (OUT, OUT.log.jsonl, OUT.state/ or --resume, OUT.png, OUT.tb) and
    reads (its data, an --init file: prompt, and `reads`, e.g. the --config file)."""
    t, out = cfg.train, Path(cfg.train.out)
    return RunFiles(
        where=t.out,
        prompts=[("--out", out)],
        log=out.with_suffix(".log.jsonl"),
        state=Path(t.resume) if t.resume else Path(t.out + ".state"),
        resume=bool(t.resume),
        inputs=input_paths("--", train=cfg.data.train, eval=cfg.data.eval, init=cfg.prompt.init) + (reads or []),
        plot=out.with_suffix(".png") if t.plot else None,
        tensorboard=out.with_suffix(".tb") if tensorboard_enabled() else None,
        overwrite=t.overwrite,
    )


@dataclass
class PromptObjective:
    """One task, one prompt of any method (softprompt.methods: input embeddings, per-layer keys/values, ...) and
    its head."""

    cfg: RunConfig
    bb: Backbone
    pm: PromptedModel
    spec: TaskSpec
    task: BoundTask
    prompt: Trainable  # the method's trained state (softprompt.methods.Trainable)
    train_set: list[Encoded]
    eval_set: list[Encoded]
    meta: dict[str, Any]  # what every saved prompt file's header holds besides its metrics
    head: torch.nn.Module | None = None  # an encoder's head or a decoder's --head linear (passed, never set on pm)
    params: list[torch.nn.Parameter] = field(default_factory=list)
    head_params: list[torch.nn.Parameter] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lengths = [len(e.input_ids) + len(e.target_ids or []) for e in self.train_set]

    @property
    def n_train(self) -> int:
        return len(self.train_set)

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_set)

    @property
    def device(self) -> torch.device:
        return self.bb.device

    def batches(self, step: int) -> list[list[Encoded]]:
        t = self.cfg.train
        idx = batch_schedule(self.lengths, t.batch_size, t.seed, step, t.grad_accum, t.group_by_length)
        return [[self.train_set[i] for i in b] for b in idx]

    def loss(self, rows: list[Encoded]) -> torch.Tensor:
        pm, kind = self.pm, self.spec.task
        batch = pm.collate(
            [e.input_ids for e in rows],
            labels=[int(e.label) for e in rows] if kind == "classify" else None,  # type: ignore[arg-type]
            targets=[e.target_ids or [] for e in rows] if kind == "generate" else None,
        )
        batch = batch.to(self.bb.device)
        # the prefix (prompt keys/values) is built once per micro-batch and shared by its rows; an input-dependent
        # prompt's (softprompt.dynamic) maps each row to its own entry and may add a loss term (routed: balance)
        rp = step_prefix(self.prompt, pm, batch, train=True)
        cached = getattr(self.prompt, "start_states", None)  # a late prompt's per-example cache (softprompt.late)
        if cached is not None:
            batch.start = cached(pm, rp.prefix, batch, self.task.label_ids, self.head)
        loss = pm.loss(rp.prefix, batch, self.task.label_ids, self.head, rows=rp.rows)
        return loss if rp.aux is None else loss + rp.aux

    def evaluate(self) -> Evaluation:
        pm, t = self.pm, self.cfg.train
        pm.eval()
        per_row = hasattr(self.prompt, "row_prefix")
        source = TrainableSource(self.prompt, pm) if per_row else self.prompt.eval_prefix(pm)
        m = evaluate_examples(
            pm,
            source,
            self.eval_set,
            task=self.spec.task,
            label_ids=self.task.label_ids,
            labels=self.spec.verbalizer.labels if self.spec.verbalizer else None,
            head=self.head,
        )
        if isinstance(source, TrainableSource) and source.routes is not None:  # rows per route: into its file
            m["routes"] = source.routes.tolist()
            m.update({f"route{k}_rows": n for k, n in enumerate(m["routes"])})  # in the log: eval_route0_rows, ...
            self.prompt.eval_routes = m["routes"]  # type: ignore[attr-defined]
        pm.train(self.cfg.model.dropout)  # back to training mode: --dropout stays active after an evaluation
        score = float(m.get(t.metric, m.get("loss", 0.0)))
        return Evaluation(score, {f"eval_{k}": v for k, v in scalars(m).items()}, m)

    def save(self, metrics: Evaluation | dict[str, Any]) -> None:
        m = scalars(metrics.metrics if isinstance(metrics, Evaluation) else metrics)
        extra = {}
        head = self.head
        if head is not None and hasattr(head, "linear"):  # head.linear.weight/.bias: what Predictor.load reads
            extra = {f"head.{k}": v for k, v in head.state_dict().items()}
        out = self.cfg.train.out
        tensor, tensors, meta = self.prompt.saved()  # what the method's file holds (softprompt.methods)
        with keeping_mode(out):  # an overwritten prompt keeps its permission mode
            save_prompt(out, tensor, {**self.meta, **meta, "metrics": m}, {**extra, **tensors})

    def identity(self) -> dict[str, Any]:
        return run_identity(self.cfg, self.bb.fingerprint)


def build_objective(
    cfg: RunConfig, bb: Backbone, log=print, *, train_set: list[Encoded] | None = None
) -> PromptObjective:
    """Task, encoded data, the initial prompt and head: everything fit() trains. `train_set`: rows already encoded
    (softprompt.distill: unlabelled and self-study inputs) instead of the --train file's."""
    t = cfg.train
    assert cfg.data.train or train_set is not None
    spec = TaskSpec.from_config(cfg.data, position=cfg.prompt.position)
    pm = PromptedModel(bb, position=cfg.prompt.position, naive=t.naive)
    task = BoundTask(spec, pm, num_tokens=cfg.prompt.num_tokens)
    n_cut = 0
    if train_set is None:
        assert cfg.data.train
        train_set, n_cut, _ = task.encode_file(
            cfg.data.train, truncate=not cfg.data.no_truncate, columns=cfg.data.columns
        )
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
    head = task.make_head(seed=t.seed)
    method = methods.get(cfg.prompt.method)
    if method.per_row and spec.task != "classify":
        raise ConfigError(f"--method {method.name}: classification tasks only (--task classify)")
    prompt = method.create(pm, init, cfg.prompt)  # started from the --init embeddings
    fit_inputs = getattr(prompt, "fit_inputs", None)  # routed: the router's centre, from the training inputs
    if fit_inputs is not None:
        fit_inputs(pm, [e.input_ids for e in train_set])
    meta = {
        "base_model": bb.model_id,
        "architecture": bb.architecture,
        "family": bb.family,
        "fingerprint": bb.fingerprint,
        "init": init_rule,
        "train_config": to_dict(cfg),
        **spec.to_meta(),
    }
    return PromptObjective(
        cfg,
        bb,
        pm,
        spec,
        task,
        prompt,
        train_set,
        eval_set,
        meta,
        params=prompt.trainable(),
        head=head,
        head_params=[p for p in (head.parameters() if head is not None else []) if p.requires_grad],
    )


def train(
    cfg: RunConfig, *, backbone: Backbone | None = None, log=print, replicas: Replicas | None = None
) -> TrainResult:
    """Train a soft prompt as configured (text or, with --task image-classify, image prompts: softprompt.vision,
    on the same fit()); returns where it was written and its metrics."""
    t0 = time.time()
    cfg.validate()
    t = cfg.train
    if not cfg.data.train:
        raise ConfigError("--train: a training file (or, for images, folder) is required")
    files = run_files(cfg)
    files.check()  # before the model loads: a run that would destroy a file stops before any work
    random.seed(t.seed)
    torch.manual_seed(t.seed)
    obj: Any
    if cfg.data.task == "image-classify":
        from softprompt.vision.objective import image_objective

        obj = image_objective(cfg, log)
    else:
        obj = build_objective(cfg, backbone or load_backbone(cfg.model, progress=t.progress), log)
    res = fit(obj, cfg, files, log=log, replicas=replicas, t0=t0)
    final = {k[5:]: v for k, v in (res.history[-1] if res.history else {}).items() if k.startswith("eval_")}
    return TrainResult(t.out, res.steps, final, res.best_step, res.history, time.time() - t0)
