"""Prompt compilation (`softprompt distill`): distil a long hard prompt (instructions and/or demonstrations) into a
soft prompt of a few tokens, as an objective of the one trainer (softprompt.trainer.fit), not a second training loop.

Teacher: the frozen model with the hard prompt in context: [BOS][hard prompt tokens][input]; the hard prompt's
keys/values are computed once (softprompt.icl.context_prefix), so each teacher row costs about what a student
row does. Student: a soft prompt of N tokens (any prompt method) with no hard prompt: [BOS][N slots][input].
Loss per row:

    classify:  KL(p_t || p_s) = sum_c p_t(c) (log p_t(c) - log p_s(c))  over the verbalizer's classes
               (p = softmax of the class scores, PromptedModel.label_scores)          (+ alpha * CE(p_s, label))
    generate:  token-level: the mean over the continuation's tokens j of KL(p_t(. | y<j) || p_s(. | y<j)) over the
               whole vocabulary, both teacher-forced on the same continuation y       (+ alpha * CE(p_s, y))

The continuation y is the --train file's target, or, for an input without one, the teacher's own greedy
continuation (sequence-level distillation). Inputs: the --train file (labels or targets are read when present and
needed only when alpha > 0) and/or --self-study N inputs the model writes itself from the hard prompt
(softprompt.icl.self_study). Evaluation: the agreement of the student with its teacher on the --eval rows
(classify: the predicted classes; generate: the teacher-forced next-token argmax), the score that keeps the best
prompt, with both accuracies. Output: an ordinary prompt file whose metadata also records the teacher prompt's
sha256, its length in tokens, the compression ratio (teacher tokens / student slots) and the measured agreement.

Notation: B rows, L classes, M continuation tokens, V vocabulary.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from softprompt.data import DataError, Encoded
from softprompt.evaluate import class_probs, generate_ids
from softprompt.icl import Context, context_prefix
from softprompt.prefix import Batch, Prefix
from softprompt.prompted import PromptedModel
from softprompt.train import PromptObjective
from softprompt.trainer import Evaluation

if TYPE_CHECKING:
    from softprompt.commands import DistillConfig
    from softprompt.task import TaskSpec


def token_logp(pm: PromptedModel, prefix: Prefix, batch: Batch) -> torch.Tensor:
    """(B, M, V) next-token log-probabilities at the continuation's positions (teacher-forced) behind `prefix`."""
    assert batch.target_pos is not None
    return pm.lm_logits(pm.causal_hidden(prefix, None, batch.ids, batch.mask, batch.target_pos)).log_softmax(-1)


@dataclass
class DistillObjective:
    """A PromptObjective (task, data, student prompt, files) whose loss is the teacher's distribution."""

    base: PromptObjective
    teacher: Context
    alpha: float = 0.0  # weight of the labelled cross-entropy next to the KL term
    temperature: float = 1.0  # the teacher's distribution is softmax(scores / T): T < 1 sharpens it toward its argmax

    def __post_init__(self) -> None:
        if self.base.pm.family != "causal":
            raise DataError("distill: the teacher's hard prompt in context needs a decoder-only model")
        self.kind = self.base.spec.task
        self.teacher_prefix: Prefix = context_prefix(self.base.pm, self.teacher)  # K/V once, no gradient
        self.params = self.base.params
        self.head_params: list[torch.nn.Parameter] = []  # the student has no head of its own (verbalizer scoring)
        self._teacher_eval: torch.Tensor | None = None  # classify: (N_eval, L), the teacher does not change
        if self.kind == "generate":  # every row needs a continuation: the teacher's own where the file has none
            self.base = dataclasses.replace(
                self.base, train_set=self.continued(self.base.train_set), eval_set=self.continued(self.base.eval_set)
            )

    @torch.no_grad()
    def continued(self, rows: list[Encoded]) -> list[Encoded]:
        """Rows with a continuation: the file's target, else the teacher's greedy one (re-encoded as targets are)."""
        todo = [i for i, e in enumerate(rows) if not e.target_ids]
        if not todo:
            return rows
        pm, spec = self.base.pm, self.base.spec
        gen = generate_ids(pm, self.teacher_prefix, [rows[i] for i in todo], max_new_tokens=spec.max_target_length,
                           do_sample=False)  # fmt: skip
        out = list(rows)
        for i, g in zip(todo, gen):
            ids = self.base.task._causal_target(pm.decode(g))[: spec.max_target_length]
            out[i] = dataclasses.replace(rows[i], target_ids=ids)
        return out

    # ---- what fit() reads -----------------------------------------------------------------------------------
    @property
    def n_train(self) -> int:
        return self.base.n_train

    @property
    def has_eval(self) -> bool:
        return self.base.has_eval

    @property
    def device(self) -> torch.device:
        return self.base.device

    def batches(self, step: int) -> list[list[Encoded]]:
        return self.base.batches(step)

    def loss(self, rows: list[Encoded]) -> torch.Tensor:
        return self.token_loss(rows) if self.kind == "generate" else self.class_loss(rows)

    def class_loss(self, rows: list[Encoded]) -> torch.Tensor:
        pm, labels = self.base.pm, self.base.task.label_ids
        batch = pm.collate([e.input_ids for e in rows], labels=[int(e.label or 0) for e in rows]).to(self.device)
        with torch.no_grad():
            t = (pm.label_scores(self.teacher_prefix, None, batch, labels) / self.temperature).log_softmax(-1)  # (B, L)
        s = pm.label_scores(self.base.prompt.prefix(pm), None, batch, labels).log_softmax(-1)  # (B, L)
        loss = F.kl_div(s, t, log_target=True, reduction="batchmean")
        labelled = torch.tensor([e.label is not None for e in rows], device=self.device)
        if self.alpha > 0 and bool(labelled.any()):  # self-study rows carry no label
            assert batch.labels is not None
            loss = loss + self.alpha * F.nll_loss(s[labelled], batch.labels[labelled])
        return loss

    def token_loss(self, rows: list[Encoded]) -> torch.Tensor:
        pm = self.base.pm
        batch = pm.collate([e.input_ids for e in rows], targets=[e.target_ids or [] for e in rows]).to(self.device)
        assert batch.targets is not None
        valid = (batch.targets != -100).float()  # (B, M)
        with torch.no_grad():
            t = (token_logp(pm, self.teacher_prefix, batch) / self.temperature).log_softmax(-1)  # (B, M, V)
        s = token_logp(pm, self.base.prompt.prefix(pm), batch)  # (B, M, V)
        kl = (t.exp() * (t - s)).sum(-1)  # (B, M)
        loss = (kl * valid).sum() / valid.sum().clamp(min=1)
        if self.alpha > 0:
            tok = s.gather(-1, batch.targets.clamp(min=0)[..., None])[..., 0]  # (B, M)
            loss = loss - self.alpha * (tok * valid).sum() / valid.sum().clamp(min=1)
        return loss

    @torch.no_grad()
    def evaluate(self) -> Evaluation:
        m = self._token_agreement() if self.kind == "generate" else self._class_agreement()
        return Evaluation(m["agreement"], {f"eval_{k}": v for k, v in m.items()}, m)

    def _class_agreement(self) -> dict[str, Any]:
        pm, ev, labels = self.base.pm, self.base.eval_set, self.base.task.label_ids
        if self._teacher_eval is None:
            self._teacher_eval = class_probs(pm, self.teacher_prefix, ev, labels)
        student = class_probs(pm, self.base.prompt.eval_prefix(pm), ev, labels)
        t_pred, s_pred = self._teacher_eval.argmax(-1), student.argmax(-1)
        m: dict[str, Any] = {"agreement": float((t_pred == s_pred).float().mean()), "n": len(ev)}
        if all(e.label is not None for e in ev):
            gold = torch.tensor([int(e.label or 0) for e in ev])
            m["accuracy"] = float((s_pred == gold).float().mean())
            m["teacher_accuracy"] = float((t_pred == gold).float().mean())
        return m

    def _token_agreement(self) -> dict[str, Any]:
        pm, ev = self.base.pm, self.base.eval_set
        same = total = kl_sum = 0.0
        student = self.base.prompt.eval_prefix(pm)
        for i in range(0, len(ev), 16):
            rows = ev[i : i + 16]
            batch = pm.collate([e.input_ids for e in rows], targets=[e.target_ids or [] for e in rows])
            batch = batch.to(self.device)
            assert batch.targets is not None
            valid = batch.targets != -100  # (B, M)
            t, s = token_logp(pm, self.teacher_prefix, batch), token_logp(pm, student, batch)  # (B, M, V)
            same += float(((t.argmax(-1) == s.argmax(-1)) & valid).sum())
            kl_sum += float(((t.exp() * (t - s)).sum(-1) * valid).sum())
            total += float(valid.sum())
        return {"agreement": same / max(total, 1), "kl": kl_sum / max(total, 1), "tokens": int(total), "n": len(ev)}

    def save(self, metrics: Evaluation | dict[str, Any]) -> None:
        n = int(self.base.cfg.prompt.num_tokens)
        self.base.meta["distill"] = {
            **self.teacher.meta(),
            "student_tokens": n,
            "compression": round(len(self.teacher.token_ids) / max(1, n), 2),
            "alpha": self.alpha,
            "teacher_temperature": self.temperature,
            **({"agreement": metrics.metrics["agreement"]} if isinstance(metrics, Evaluation) else {}),
        }
        self.base.save(metrics)

    def identity(self) -> dict[str, Any]:
        return {
            **self.base.identity(),
            "--teacher": self.teacher.sha256,
            "--alpha": self.alpha,
            "--teacher-temperature": self.temperature,
        }


# ---- `softprompt distill` ------------------------------------------------------------------------------------
def teacher_context(pm: PromptedModel, dc: DistillConfig, spec: TaskSpec, columns: str | None) -> Context:
    """The hard prompt: the --teacher-prompt file's text, then k demonstrations from --demos (either or both)."""
    from softprompt.data import load_samples
    from softprompt.icl import build_context, choose_demos, text_context
    from softprompt.task import BoundTask

    text = Path(dc.teacher_prompt).read_text(encoding="utf-8") if dc.teacher_prompt else ""
    if not dc.demos:
        return text_context(pm, text)
    pool = load_samples(dc.demos, spec.data_config(columns=columns), spec.verbalizer)
    if dc.k > len(pool):
        raise DataError(f"--k {dc.k}: the --demos file {dc.demos} has only {len(pool)} labelled examples")
    demos = choose_demos(pool, dc.k, seed=dc.demo_seed, balanced=dc.balanced)
    return build_context(BoundTask(spec, pm, num_tokens=0), demos, instructions=text)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace, log=_stderr) -> int:
    """`softprompt distill`: RunConfig's flags (the student's training) plus DistillConfig's (the teacher, inputs);
    progress lines go to stderr."""
    import time

    from softprompt.api import position_limit
    from softprompt.commands import DistillConfig, from_args
    from softprompt.config import ConfigError, build_config
    from softprompt.icl import self_study
    from softprompt.models import load_backbone
    from softprompt.task import BoundTask, TaskSpec
    from softprompt.train import build_objective, run_files
    from softprompt.trainer import fit

    t0 = time.time()
    dc: DistillConfig = from_args(DistillConfig, args)
    cfg = build_config(args)
    dc.validate()
    if not cfg.data.train and not dc.self_study:
        raise ConfigError("--train or --self-study: the student needs inputs (a file, or inputs the model writes)")
    if dc.alpha > 0 and not cfg.data.train:
        raise ConfigError("--alpha > 0 needs labelled --train rows (self-study inputs carry no labels)")
    reads = [(f, p) for f, p in (("--teacher-prompt", dc.teacher_prompt), ("--demos", dc.demos)) if p]
    files = run_files(cfg, reads)
    files.check()  # before the model loads
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    bb = load_backbone(cfg.model, progress=cfg.train.progress)
    spec = TaskSpec.from_config(cfg.data, position=cfg.prompt.position)
    pm = PromptedModel(bb, position=cfg.prompt.position)
    ctx = teacher_context(pm, dc, spec, cfg.data.columns)
    what = f"--teacher-prompt {dc.teacher_prompt}" if dc.teacher_prompt else f"--demos {dc.demos} --k {dc.k}"
    limit = position_limit(pm)
    room = limit - len(pm.prefix_ids) - len(ctx.token_ids) if limit else None
    if room is not None and room < 16:
        raise DataError(f"{what}: the hard prompt is {len(ctx.token_ids)} tokens; the model's context is {limit}")
    teacher_task = BoundTask(spec, pm, num_tokens=len(ctx.token_ids))
    cfg.data.max_length = min(cfg.data.max_length, teacher_task.max_input_length())  # inputs fit behind it
    student = BoundTask(dataclasses.replace(spec, max_length=cfg.data.max_length), pm, num_tokens=cfg.prompt.num_tokens)
    rows: list[Encoded] = []
    if cfg.data.train:
        rows, _, _ = student.encode_file(cfg.data.train, require_targets=dc.alpha > 0, columns=cfg.data.columns)
    if dc.self_study:
        texts = self_study(pm, ctx, spec, dc.self_study, seed=dc.self_study_seed,
                           max_new_tokens=dc.self_study_tokens, temperature=dc.self_study_temperature)  # fmt: skip
        rows += student.encode_texts(texts)[0]
        log(f"self-study: the model wrote {len(texts)} inputs from the hard prompt ({len(ctx.token_ids)} tokens)")
    base = build_objective(cfg, bb, log, train_set=rows)
    obj = DistillObjective(base, ctx, alpha=dc.alpha, temperature=dc.teacher_temperature)
    res = fit(obj, cfg, files, log=log, t0=t0)
    last = res.last.metrics if res.last else {}
    log(f"distilled {len(ctx.token_ids)} hard-prompt tokens into {cfg.prompt.num_tokens} soft tokens: {cfg.train.out}"
        + (f" (agreement {last['agreement']:.3f})" if "agreement" in last else ""))  # fmt: skip
    return 0
