"""Prompt compilation: distil a long hard prompt (instructions and/or demonstrations) into a soft prompt of a few
tokens, as an objective of the one trainer (softprompt.trainer.fit), not a second training loop.

Teacher: the frozen model with the hard prompt in context: [BOS][hard prompt tokens][input]; the hard prompt's
keys/values are computed once (softprompt.icl.context_prefix), so each teacher row costs about what a student
row does. Student: a soft prompt of N tokens (any prompt method) with no hard prompt: [BOS][N slots][input].
Loss per row, over the verbalizer's classes:

    KL(p_teacher || p_student) = sum_c p_t(c) (log p_t(c) - log p_s(c))       (+ alpha * CE(p_student, label))

with p = softmax of the class scores (PromptedModel.label_scores). Inputs: the --train file (its labels enter the
loss only when alpha > 0; the file reader still requires the label column). Evaluation: the agreement of the
student's and the teacher's predicted classes on the --eval rows (the score that picks the best prompt), with both
accuracies. Output: an ordinary
prompt file whose metadata also records the teacher prompt's sha256, its length in tokens, the compression ratio
(teacher tokens / student slots) and the measured agreement.

Notation: B rows, L classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from softprompt.data import Encoded
from softprompt.evaluate import class_probs
from softprompt.icl import Context, context_prefix
from softprompt.prefix import Prefix
from softprompt.train import PromptObjective
from softprompt.trainer import Evaluation


@dataclass
class DistillObjective:
    """A PromptObjective (task, data, student prompt, files) whose loss is the teacher's class distribution."""

    base: PromptObjective
    teacher: Context
    alpha: float = 0.0  # weight of the labelled cross-entropy next to the KL term

    def __post_init__(self) -> None:
        if self.base.spec.task != "classify":
            raise ValueError("distill: compiling a prompt needs a classification task (--labels)")
        self.teacher_prefix: Prefix = context_prefix(self.base.pm, self.teacher)  # K/V once, no gradient
        self.params = self.base.params
        self.head_params: list[torch.nn.Parameter] = []  # the student has no head of its own (verbalizer scoring)
        self._teacher_eval: torch.Tensor | None = None  # (N_eval, L), the teacher does not change

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
        pm, labels = self.base.pm, self.base.task.label_ids
        batch = pm.collate([e.input_ids for e in rows], labels=[int(e.label or 0) for e in rows]).to(self.device)
        with torch.no_grad():
            t = pm.label_scores(self.teacher_prefix, None, batch, labels).log_softmax(-1)  # (B, L)
        s = pm.label_scores(self.base.prompt.prefix(pm), None, batch, labels).log_softmax(-1)  # (B, L)
        loss = F.kl_div(s, t, log_target=True, reduction="batchmean")
        if self.alpha > 0:
            assert batch.labels is not None
            loss = loss + self.alpha * F.nll_loss(s, batch.labels)
        return loss

    @torch.no_grad()
    def evaluate(self) -> Evaluation:
        pm, ev, labels = self.base.pm, self.base.eval_set, self.base.task.label_ids
        if self._teacher_eval is None:
            self._teacher_eval = class_probs(pm, self.teacher_prefix, ev, labels)
        student = class_probs(pm, self.base.prompt.eval_prefix(pm), ev, labels)
        gold = torch.tensor([int(e.label or 0) for e in ev])
        t_pred, s_pred = self._teacher_eval.argmax(-1), student.argmax(-1)
        m = {
            "agreement": float((t_pred == s_pred).float().mean()),
            "accuracy": float((s_pred == gold).float().mean()),
            "teacher_accuracy": float((t_pred == gold).float().mean()),
            "n": len(ev),
        }
        return Evaluation(m["agreement"], {f"eval_{k}": v for k, v in m.items()}, m)

    def save(self, metrics: Evaluation | dict[str, Any]) -> None:
        self.base.meta["distill"] = {
            **self.teacher.meta(),
            "student_tokens": int(self.base.cfg.prompt.num_tokens),
            "compression": round(len(self.teacher.token_ids) / max(1, self.base.cfg.prompt.num_tokens), 2),
            "alpha": self.alpha,
            **({"agreement": metrics.metrics["agreement"]} if isinstance(metrics, Evaluation) else {}),
        }
        self.base.save(metrics)

    def identity(self) -> dict[str, Any]:
        return {**self.base.identity(), "--teacher": self.teacher.sha256, "--alpha": self.alpha}
