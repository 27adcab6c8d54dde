"""Multi-task prompt tuning (`softprompt train-multi`): one shared prompt plus a prompt per task, trained on
mixed-task batches; each task is exported as an ordinary prompt file.

Composition: shared ⊕ task (concatenation). Task k's prompt is  P_k = [shared (S, d) ; task_k (T, d)],  S + T tokens.
Why concatenation rather than MPT's  P_k = shared ⊙ (u_k v_kᵀ)  (Wang et al. 2023):
- Export is the identity: P_k *is* an ordinary prompt, so an exported task serves, ensembles and transfers like any
  other prompt file, with no new code path at inference (MPT's product exports too, but needs its own training).
- MPT obtains its shared prompt by distilling single-task teacher prompts first; concatenation trains in one stage,
  with nothing to distil: the shared rows get the gradient of every task, the task rows only of their own.
- Under causal attention the shared rows come first and never see the task rows, so their keys/values are the same
  for every task (and can be cached once when serving many tasks).
- Adding a task later is training T new rows with the shared rows frozen (or not): nothing else changes.
Cost: the exported prompt is S + T tokens long (longer sequences at inference), and each task holds T*d parameters
where MPT's rank-one factors hold S + d. The two are compared in docs/methods.md.

Batches: each optimiser step draws batch_size rows; row i's task is drawn with probability rate_k / sum(rates), then
an example of that task uniformly (with replacement). The draw is a pure function of (seed, step, micro-batch), so
`--resume` repeats it. All rows go through one forward pass: one Prefix holds the K task prompts (rows = task index,
the same mechanism as an ensemble); classification scores every row against the union of the tasks' verbalizers
and takes the cross-entropy over its own task's labels (an encoder applies its task's head to the pooled output).
All tasks of a run are classification or all are generation.

Training is softprompt.trainer's fit(), the loop `softprompt train` runs, with `MultiObjective` (mixed-batch loss,
per-task evaluation, the K exports): the same resume identity check, non-finite rollback, lr log, early stopping
and output-file checks (softprompt.runfiles) as a single-task run.

Config (YAML; every `softprompt train` option works at the top level, and a task's own keys override them):

    model: smollm2-135m
    shared_tokens: 10       # S (0: independent task prompts, trained together)
    num_tokens: 10          # T, per task
    max_steps: 200
    out: runs/multi         # a directory: runs/multi/<task>.safetensors, state/, train.log.jsonl
    tasks:
      - name: sst2
        train: sst2/train.tsv
        eval: sst2/dev.tsv
        template: "Review: {sentence}\\nSentiment:"
        labels: "0=negative,1=positive"
        rate: 1.0            # sampling weight (default 1)
      - name: agnews
        train: agnews/train.tsv
        columns: text,label
        template: "Article: {text}\\nTopic:"
        rate: 2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from softprompt.checkpoint import save_prompt
from softprompt.commands import TrainMultiConfig
from softprompt.config import DataConfig, RunConfig, apply_options, load_yaml, to_dict
from softprompt.data import DataError, Encoded
from softprompt.evaluate import evaluate_examples
from softprompt.models import Backbone, load_backbone
from softprompt.prompt import init_prompt
from softprompt.prompted import Batch, Prefix, PromptedModel
from softprompt.runfiles import RunFiles, input_paths, keeping_mode, run_identity
from softprompt.task import BoundTask, TaskSpec
from softprompt.trainer import Evaluation, fit, scalars, tensorboard_enabled

TASK_KEYS = {f for f in DataConfig.__dataclass_fields__} | {"name", "rate", "init"}
DEFAULT_OUT = "multitask"


class MultiTaskError(ValueError):
    """A bad multi-task configuration; the message names the task or key."""


@dataclass
class TaskEntry:
    name: str
    data: DataConfig
    rate: float = 1.0
    init: str | None = None


@dataclass
class MultiConfig:
    run: RunConfig
    tasks: list[TaskEntry]
    shared_tokens: int = 10

    @property
    def out_dir(self) -> Path:
        out = self.run.train.out
        return Path(DEFAULT_OUT if out == "prompt.safetensors" else out)

    def validate(self) -> None:
        self.run.validate()
        if len(self.tasks) < 1:
            raise MultiTaskError("tasks: at least one task is required")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise MultiTaskError(f"tasks: duplicate task names in {names}")
        for t in self.tasks:
            if not t.name or not all(c.isalnum() or c in "-_." for c in t.name):
                raise MultiTaskError(f"tasks: name {t.name!r} must be letters, digits, '-', '_' or '.' (a file name)")
            if not (t.rate > 0 and math.isfinite(t.rate)):
                raise MultiTaskError(f"task {t.name}: rate must be > 0, got {t.rate}")
            if not t.data.train:
                raise MultiTaskError(f"task {t.name}: a train file is required")
        if len({t.data.task for t in self.tasks}) > 1:
            raise MultiTaskError("tasks: all tasks must be classify or all generate (a batch mixes their rows)")
        if self.shared_tokens < 0:
            raise MultiTaskError("--shared-tokens must be >= 0")


def parse_multi_config(raw: dict[str, Any], source: str, overrides: dict[str, Any] | None = None) -> MultiConfig:
    """MultiConfig from a YAML mapping (top-level RunConfig options, shared_tokens, tasks) and flag overrides."""
    raw = dict(raw)
    tasks_raw = raw.pop("tasks", None)
    shared = raw.pop("shared_tokens", raw.pop("shared-tokens", 10))
    overrides = dict(overrides or {})
    if overrides.get("shared_tokens") is not None:
        shared = overrides.pop("shared_tokens")
    overrides.pop("shared_tokens", None)
    run = RunConfig()
    apply_options(run, raw, source)
    apply_options(run, {k: v for k, v in overrides.items() if v is not None}, "command line")
    if isinstance(tasks_raw, dict):  # {name: {options}}
        tasks_raw = [{"name": k, **(v or {})} for k, v in tasks_raw.items()]
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise MultiTaskError(f"{source}: 'tasks' must list at least one task (each with name, train, template, ...)")
    tasks = []
    for i, t in enumerate(tasks_raw, 1):
        if not isinstance(t, dict):
            raise MultiTaskError(f"{source}: task {i} must be a mapping of options")
        t = {k.replace("-", "_"): v for k, v in t.items()}
        unknown = sorted(set(t) - TASK_KEYS)
        if unknown:
            raise MultiTaskError(f"{source}: task {t.get('name', i)}: unknown option(s) {', '.join(unknown)}")
        data = copy.deepcopy(run.data)  # top-level data options are every task's defaults
        opts = {k: v for k, v in t.items() if k not in ("name", "rate", "init")}
        holder = RunConfig(data=data)
        apply_options(holder, {"data": opts}, f"{source}: task {t.get('name', i)}")
        try:
            rate = float(t.get("rate", 1.0))
        except (TypeError, ValueError):
            raise MultiTaskError(f"{source}: task {t.get('name', i)}: rate must be a number") from None
        tasks.append(TaskEntry(str(t.get("name", f"task{i}")), holder.data, rate, t.get("init")))
    try:
        shared_n = int(shared)
    except (TypeError, ValueError):
        raise MultiTaskError(f"{source}: shared_tokens must be an integer") from None
    mc = MultiConfig(run, tasks, shared_n)
    mc.validate()
    return mc


# ---- the multi-task model ---------------------------------------------------------------------------------------
class MultiPrompt(torch.nn.Module):
    """shared (S, d) and per-task (T, d) rows; prompt(k) = cat(shared, task_k)."""

    def __init__(self, shared: torch.Tensor, tasks: list[torch.Tensor]) -> None:
        super().__init__()
        self.shared = torch.nn.Parameter(shared.clone())
        self.tasks = torch.nn.ParameterList([torch.nn.Parameter(t.clone()) for t in tasks])

    def prompt(self, k: int) -> torch.Tensor:
        return torch.cat([self.shared, self.tasks[k]])

    def prompts(self) -> list[torch.Tensor]:
        return [self.prompt(k) for k in range(len(self.tasks))]


@dataclass
class MultiTask:
    """The K bound tasks on one PromptedModel and their heads (encoders)."""

    pm: PromptedModel
    names: list[str]
    tasks: list[BoundTask]
    heads: list[torch.nn.Module | None] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.tasks[0].spec.task

    def class_scores(self, prefix: Prefix, rows: torch.Tensor, batch: Batch) -> list[torch.Tensor]:
        """Row i's class scores over its own task's labels (L_k,), from one forward pass over the mixed batch
        (PromptedModel.row_scores: each row against its own verbalizer, or by its own task's head)."""
        tasks = rows.tolist()
        if self.pm.family == "encoder":
            return self.pm.row_scores(prefix, rows, batch, [[] for _ in tasks], [self.heads[k] for k in tasks])
        return self.pm.row_scores(prefix, rows, batch, [self.tasks[k].label_ids for k in tasks])

    def loss(self, prefix: Prefix, rows: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy over the rows (each against its task's labels), or token-level CE for generation."""
        if self.kind == "generate":
            tok, valid = self.pm.target_logp(prefix, rows, batch)
            return -tok.sum() / valid.sum().clamp(min=1)
        assert batch.labels is not None
        scores = self.class_scores(prefix, rows, batch)
        return torch.stack([F.cross_entropy(s[None], y[None]) for s, y in zip(scores, batch.labels)]).mean()

    @torch.no_grad()
    def probs(
        self, prefix: Prefix, examples: list[Encoded], task_of: list[int], batch_size: int = 32
    ) -> list[torch.Tensor]:
        """Class probabilities of mixed-task examples (each under its task's prompt), in mixed batches."""
        out: list[torch.Tensor] = []
        device = prefix.mask.device
        for s in range(0, len(examples), batch_size):
            ex = examples[s : s + batch_size]
            rows = torch.tensor(task_of[s : s + batch_size], device=device)
            batch = self.pm.collate([e.input_ids for e in ex]).to(device)
            out += [x.softmax(-1).cpu() for x in self.class_scores(prefix, rows, batch)]
        return out


def sample_rows(
    sizes: list[int], rates: list[float], n: int, seed: int, step: int, micro: int
) -> list[tuple[int, int]]:
    """(task, example) pairs of one micro-batch: a pure function of (seed, step, micro)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1024 + micro)
    tasks = torch.multinomial(torch.tensor(rates, dtype=torch.float64), n, replacement=True, generator=g).tolist()
    return [(k, int(torch.randint(sizes[k], (1,), generator=g))) for k in tasks]


@dataclass
class MultiResult:
    out_dir: str
    exports: dict[str, str]
    steps: int
    metrics: dict[str, dict[str, Any]]
    best_step: int
    history: list[dict[str, Any]]
    wall_s: float


def _task_init(rule: str, n: int, bb: Backbone, bt: BoundTask, seed: int, scale: float) -> torch.Tensor:
    if n == 0:
        return torch.zeros(0, bb.embed_dim)
    words = bt.label_words() if bt.spec.task == "classify" and bt.spec.verbalizer else None
    weight = bb.model.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    return init_prompt(rule, n, weight, bb.tokenizer, seed=seed, scale=scale, label_words=words)


def build(
    mc: MultiConfig, bb: Backbone, *, log=print
) -> tuple[MultiTask, MultiPrompt, list[list[Encoded]], list[list[Encoded]]]:
    """Bound tasks, encoded train/eval sets and the initial prompts (shared: --init, or vocab when --init is
    `labels`; task k: its own `init`, else --init with its labels)."""
    cfg, t = mc.run, mc.run.train
    pm = PromptedModel(bb, position=cfg.prompt.position, naive=t.naive)
    total = mc.shared_tokens + cfg.prompt.num_tokens
    bound, trains, evals = [], [], []
    for te in mc.tasks:
        try:
            spec = TaskSpec.from_config(te.data, position=cfg.prompt.position)
            bt = BoundTask(spec, pm, num_tokens=total)
            tr, n_cut, _ = bt.encode_file(
                te.data.train or "", truncate=not te.data.no_truncate, columns=te.data.columns
            )
            ev: list[Encoded] = []
            if te.data.eval:
                ev = bt.encode_file(te.data.eval, truncate=not te.data.no_truncate, columns=te.data.columns)[0]
                if t.eval_max:
                    ev = ev[: t.eval_max]
        except (DataError, ValueError) as e:
            raise MultiTaskError(f"task {te.name}: {e}") from None
        if n_cut:
            log(f"note: task {te.name}: {n_cut} of {len(tr)} training inputs were truncated")
        bound.append(bt)
        trains.append(tr)
        evals.append(ev)
    mt = MultiTask(pm, [te.name for te in mc.tasks], bound)
    mt.heads = [bt.make_head(seed=t.seed + k) for k, bt in enumerate(bound)]
    shared_rule = "vocab" if cfg.prompt.init == "labels" else cfg.prompt.init
    shared = _task_init(shared_rule, mc.shared_tokens, bb, bound[0], t.seed, cfg.prompt.init_scale)
    parts = []
    for k, (te, bt) in enumerate(zip(mc.tasks, bound)):
        rule = te.init or cfg.prompt.init
        if rule.startswith("file:") and te.init is None:  # a --init file: seeds the shared rows, not every task
            rule = "vocab"
        parts.append(_task_init(rule, cfg.prompt.num_tokens, bb, bt, t.seed + 1 + k, cfg.prompt.init_scale))
    return mt, MultiPrompt(shared, parts).to(bb.device), trains, evals


def multi_files(mc: MultiConfig, reads: list[tuple[str, str]] | None = None) -> RunFiles:
    """What a train-multi run writes (OUT/<task>.safetensors, OUT/train.log.jsonl, OUT/state/ or --resume,
    OUT/train.png, OUT/train.tb) and reads (every task's data and --init file:, and `reads`: the --config file)."""
    t, out = mc.run.train, mc.out_dir
    inputs = input_paths("--", train=None, eval=None, init=mc.run.prompt.init) + (reads or [])
    for te in mc.tasks:
        inputs += input_paths(f"task {te.name} ", train=te.data.train, eval=te.data.eval, init=te.init)
    return RunFiles(
        where=str(out),
        prompts=[(f"task {te.name}'s prompt", out / f"{te.name}.safetensors") for te in mc.tasks],
        log=out / "train.log.jsonl",
        state=Path(t.resume) if t.resume else out / "state",
        resume=bool(t.resume),
        inputs=inputs,
        plot=out / "train.png" if t.plot else None,
        tensorboard=out / "train.tb" if tensorboard_enabled() else None,
        overwrite=t.overwrite,
    )


def _check_out_dir(mc: MultiConfig) -> None:
    if mc.out_dir.exists() and not mc.out_dir.is_dir():
        raise MultiTaskError(f"--out {mc.out_dir} is a file; train-multi writes a directory (one prompt per task)")


@dataclass
class MultiObjective:
    """K tasks on mixed batches: the shared rows, each task's rows, and each task's head (encoders)."""

    mc: MultiConfig
    bb: Backbone
    mt: MultiTask
    mp: MultiPrompt
    trains: list[list[Encoded]]
    evals: list[list[Encoded]]
    exports: dict[str, str]  # task -> its prompt file

    def __post_init__(self) -> None:
        mp = self.mp
        # state order: param.0 = shared (when S > 0), then the task rows (T > 0), then the heads' tensors
        self.params = ([mp.shared] if self.mc.shared_tokens else []) + [p for p in mp.tasks if p.shape[0] > 0]
        self.head_params = [p for h in self.mt.heads if h is not None for p in h.parameters() if p.requires_grad]

    @property
    def n_train(self) -> int:
        return sum(len(x) for x in self.trains)

    @property
    def has_eval(self) -> bool:
        return any(self.evals)

    @property
    def device(self) -> torch.device:
        return self.bb.device

    def batches(self, step: int) -> list[list[tuple[int, Encoded]]]:
        t = self.mc.run.train
        sizes, rates = [len(x) for x in self.trains], [te.rate for te in self.mc.tasks]
        return [
            [(k, self.trains[k][i]) for k, i in sample_rows(sizes, rates, t.batch_size, t.seed, step, micro)]
            for micro in range(t.grad_accum)
        ]

    def loss(self, rows: list[tuple[int, Encoded]]) -> torch.Tensor:
        mt, pm = self.mt, self.mt.pm
        ex = [e for _, e in rows]
        batch = pm.collate(
            [e.input_ids for e in ex],
            labels=[int(e.label) for e in ex] if mt.kind == "classify" else None,  # type: ignore[arg-type]
            targets=[e.target_ids or [] for e in ex] if mt.kind == "generate" else None,
        )
        task_of = torch.tensor([k for k, _ in rows], device=self.bb.device)  # (N,) row -> its task's prompt
        prefix = pm.build_prefix(self.mp.prompts())  # the K task prompts, each run once
        return mt.loss(prefix, task_of, batch.to(self.bb.device))

    def evaluate(self) -> Evaluation:
        metric = self.mc.run.train.metric
        per_task = evaluate_tasks(self.mt, self.mp, self.evals, metric=metric)
        log: dict[str, Any] = {}
        for name, m in per_task.items():
            log.update({f"eval_{name}_{k}": v for k, v in scalars(m).items()})
        scored = [float(m.get(metric, m.get("loss", 0.0))) for m in per_task.values()]
        log[f"eval_mean_{metric}"] = score = sum(scored) / len(scored)
        return Evaluation(score, log, per_task)

    def save(self, metrics: Evaluation | dict[str, Any]) -> None:
        mc, cfg, bb, mt = self.mc, self.mc.run, self.bb, self.mt
        for k, (name, bt) in enumerate(zip(mt.names, mt.tasks)):
            m = metrics.metrics.get(name, {}) if isinstance(metrics, Evaluation) else metrics
            tcfg = copy.deepcopy(cfg)
            tcfg.data = mc.tasks[k].data
            tcfg.prompt.num_tokens = mc.shared_tokens + cfg.prompt.num_tokens
            meta = {
                "base_model": bb.model_id,
                "architecture": bb.architecture,
                "family": bb.family,
                "fingerprint": bb.fingerprint,
                "init": mc.tasks[k].init or cfg.prompt.init,
                "train_config": to_dict(tcfg),
                **bt.spec.to_meta(),
                "metrics": scalars(m),
                "multitask": {
                    "task": name,
                    "tasks": mt.names,
                    "shared_tokens": mc.shared_tokens,
                    "task_tokens": cfg.prompt.num_tokens,
                    "rates": [te.rate for te in mc.tasks],
                },
            }
            head = mt.heads[k]
            extra = {}
            if head is not None and hasattr(head, "linear"):
                extra = {f"head.{n}": v for n, v in head.state_dict().items()}  # head.linear.*, as train.py
            with keeping_mode(self.exports[name]):  # an overwritten prompt keeps its permission mode
                save_prompt(self.exports[name], self.mp.prompt(k), meta, extra)

    def identity(self) -> dict[str, Any]:
        """run_identity's prompt and train flags, S, and every task's name, rate, init and data flags."""
        cfg = self.mc.run
        out = run_identity(cfg, self.bb.fingerprint, sections=("prompt", "train"))
        out["--shared_tokens"] = self.mc.shared_tokens
        out["--tasks"] = [te.name for te in self.mc.tasks]
        for te in self.mc.tasks:
            one = run_identity(RunConfig(data=te.data), "", sections=("data",))
            out.update({f"--tasks.{te.name}.{k[len('--data.') :]}": v for k, v in one.items() if k != "fingerprint"})
            out[f"--tasks.{te.name}.rate"], out[f"--tasks.{te.name}.init"] = te.rate, te.init
        return json.loads(json.dumps(out, default=str))  # as it reads back from the state file


def train_multi(mc: MultiConfig, *, backbone: Backbone | None = None, log=print) -> MultiResult:
    """Train shared + per-task prompts on mixed-task batches; export OUT/<task>.safetensors for every task."""
    t0 = time.time()
    mc.validate()
    cfg, t = mc.run, mc.run.train
    _check_out_dir(mc)
    files = multi_files(mc)
    files.check()  # before the model loads: a run that would destroy a file stops before any work
    random.seed(t.seed)
    torch.manual_seed(t.seed)
    bb = backbone or load_backbone(cfg.model, progress=t.progress)
    mt, mp, trains, evals = build(mc, bb, log=log)
    exports = {name: str(p) for name, (_, p) in zip(mt.names, files.prompts)}
    obj = MultiObjective(mc, bb, mt, mp, trains, evals, exports)
    res = fit(obj, cfg, files, log=log, t0=t0)
    last = res.last.metrics if res.last is not None else {}
    return MultiResult(str(mc.out_dir), exports, res.steps, last, res.best_step, res.history, time.time() - t0)


@torch.no_grad()
def evaluate_tasks(
    mt: MultiTask, mp: MultiPrompt, evals: list[list[Encoded]], *, metric: str = "accuracy"
) -> dict[str, dict[str, Any]]:
    """Each task's metrics under its own prompt (exactly what its exported file gives)."""
    out = {}
    for k, (name, bt, ev) in enumerate(zip(mt.names, mt.tasks, evals)):
        if not ev:
            continue
        labels = bt.spec.verbalizer.labels if bt.spec.verbalizer else None
        out[name] = evaluate_examples(
            mt.pm,
            mt.pm.build_prefix([mp.prompt(k).detach()]),
            ev,
            task=bt.spec.task,
            label_ids=bt.label_ids,
            labels=labels,
            head=mt.heads[k],
        )
    return out


# ---- CLI ----------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int | None:
    if args.cmd != "train-multi":
        return None
    # every TrainMultiConfig field but the file itself overrides the file's option of the same name (None: unset)
    over = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(TrainMultiConfig) if f.name != "config"}
    mc = parse_multi_config(load_yaml(args.config), args.config, over)
    _check_out_dir(mc)
    multi_files(mc, reads=[("--config", args.config)]).check()  # train_multi checks the rest again
    res = train_multi(mc, log=lambda s: print(s, file=sys.stderr))
    print(
        json.dumps(
            {
                "out": res.out_dir,
                "exports": res.exports,
                "steps": res.steps,
                "best_step": res.best_step,
                "wall_s": round(res.wall_s, 1),
                "metrics": {k: _summary(m) for k, m in res.metrics.items()},
            }
        )
    )
    return 0


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k in ("accuracy", "macro_f1", "exact_match", "token_f1", "loss", "n")}
