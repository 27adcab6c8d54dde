"""Prompt compilation (`softprompt distill`): distil a long hard prompt (instructions and/or demonstrations) into a
soft prompt of a few tokens, as an objective of the one trainer (softprompt.trainer.fit), not a second training loop.

Teacher: the frozen model with the hard prompt in context: [BOS][hard prompt tokens][input]; the hard prompt's
keys/values are computed once (softprompt.icl.context_prefix), so each teacher row costs about what a student
row does. Student: a soft prompt of N tokens (any prompt method) with no hard prompt: [BOS][N slots][input].
Loss per row:

    classify:  KL(p_t || p_s) = sum_c p_t(c) (log p_t(c) - log p_s(c))  over the verbalizer's classes
               (p = softmax of the class scores, PromptedModel.label_scores)          (+ alpha * CE(p_s, label))
               (+ vocab_kl * KL(q_t || q_s), q = the next-token distribution over the whole vocabulary at the
               answer position, T = 1: --vocab-kl; --vocab-kl-at input: the mean of that KL over every position
               of the input, the teacher's own next-token distributions along the input as Cartridges match theirs)
    generate:  token-level: the mean over the continuation's tokens j of KL(p_t(. | y<j) || p_s(. | y<j)) over the
               whole vocabulary, both teacher-forced on the same continuation y       (+ alpha * CE(p_s, y))

A deep student (--method deep) can start from the teacher's own keys/values (--student-init anchors: its label words
and last tokens, anchor_kv) and keep the input at the positions it has behind the teacher's context
(--student-positions teacher: a position gap after the slots, so the input's distance to the lead token, which no
slot can change, is the teacher's; teacher_positions).

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
    from softprompt.deep import DeepPrompt
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
    vocab_kl: float = 0.0  # classify: weight of the whole-vocabulary KL at the answer position (decoder LM head)
    vocab_at: str = "answer"  # where that KL is taken: "answer", or "input": at every position of the input
    student_init: str = "prompt"  # "anchors": a deep student starts from the teacher context's own K/V (anchor_kv)
    student_positions: str = "own"  # "teacher": a deep student's input keeps its positions behind the teacher's context

    def __post_init__(self) -> None:
        if self.base.pm.family != "causal":
            raise DataError("distill: the teacher's hard prompt in context needs a decoder-only model")
        self.kind = self.base.spec.task
        if self.base.head is not None:
            raise DataError("distill: --head: the student is scored by the verbalizer through the LM head, as its "
                            "teacher is; a head of its own is not supported")  # fmt: skip
        if self.vocab_kl and self.kind != "classify":
            raise DataError("distill: --vocab-kl needs a classify task (generate rows match the whole vocabulary)")
        if self.vocab_at not in ("answer", "input"):
            raise DataError(f"distill: --vocab-kl-at must be answer or input, got {self.vocab_at!r}")
        self.teacher_prefix: Prefix = context_prefix(self.base.pm, self.teacher)  # K/V once, no gradient
        if self.student_positions == "teacher":
            teacher_positions(self.base, self.teacher)
        elif self.student_positions != "own":
            raise DataError(f"distill: --student-positions must be own or teacher, got {self.student_positions!r}")
        self.anchors: list[int] = []  # the context positions a --student-init anchors student started from
        if self.student_init == "anchors":
            self.start_from_anchors()
        elif self.student_init != "prompt":
            raise DataError(f"distill: --student-init must be prompt or anchors, got {self.student_init!r}")
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

    def start_from_anchors(self) -> None:
        """Set the deep student's slots to anchor_kv of the teacher's context (--student-init anchors; before
        training)."""
        self.anchors, self.student_init = init_from_anchors(self.base, self.teacher), "anchors"

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
        pm = self.base.pm
        batch = pm.collate([e.input_ids for e in rows], labels=[int(e.label or 0) for e in rows]).to(self.device)
        with torch.no_grad():
            t_scores, t_vocab = self._scores(self.teacher_prefix, batch)
            t = (t_scores / self.temperature).log_softmax(-1)  # (B, L)
        s_scores, s_vocab = self._scores(self.base.prompt.prefix(pm), batch)
        s = s_scores.log_softmax(-1)  # (B, L)
        loss = F.kl_div(s, t, log_target=True, reduction="batchmean")
        if t_vocab is not None and s_vocab is not None:  # (B, V), or (B, T, V) at every input position
            kl = (t_vocab.exp() * (t_vocab - s_vocab)).sum(-1)  # (B,) or (B, T)
            if kl.dim() == 2:  # the mean over each batch's real (unpadded) input positions
                kl = (kl * batch.mask).sum() / batch.mask.sum().clamp(min=1)
            loss = loss + self.vocab_kl * kl.mean()
        labelled = torch.tensor([e.label is not None for e in rows], device=self.device)
        if self.alpha > 0 and bool(labelled.any()):  # self-study rows carry no label
            assert batch.labels is not None
            loss = loss + self.alpha * F.nll_loss(s[labelled], batch.labels[labelled])
        return loss

    def _scores(self, prefix: Prefix, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L) class scores behind `prefix`, and with --vocab-kl the next-token log-probabilities over the whole
        vocabulary: (B, V) at the answer position, or (B, T, V) at every input position (--vocab-kl-at input); one
        forward where every verbalizer is one token (the scores are the answer position's label columns)."""
        pm, labels = self.base.pm, self.base.task.label_ids
        if not self.vocab_kl:
            return pm.label_scores(prefix, None, batch, labels), None
        vocab = pm.next_token_logp(prefix, None, batch, every=self.vocab_at == "input")
        if all(len(w) == 1 for w in labels):
            answer = vocab[:, -1] if vocab.dim() == 3 else vocab  # (B, V)
            return answer[:, [w[0] for w in labels]], vocab
        return pm.label_scores(prefix, None, batch, labels), vocab

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
            "vocab_kl": self.vocab_kl,
            **({"vocab_kl_at": self.vocab_at} if self.vocab_kl else {}),
            "student_init": self.student_init,
            "student_positions": self.student_positions,
            **({"agreement": metrics.metrics["agreement"]} if isinstance(metrics, Evaluation) else {}),
        }
        self.base.save(metrics)

    def identity(self) -> dict[str, Any]:
        return {
            **self.base.identity(),
            "--teacher": self.teacher.sha256,
            "--alpha": self.alpha,
            "--teacher-temperature": self.temperature,
            "--vocab-kl": self.vocab_kl,
            "--vocab-kl-at": self.vocab_at,
            "--student-init": self.student_init,
            "--student-positions": self.student_positions,
        }


# ---- a deep student from the teacher's own keys/values --------------------------------------------------------
def _deep_student(base: PromptObjective, flag: str) -> DeepPrompt:
    """The student's DeepPrompt, or DataError naming `flag` (a distill option that only a deep student takes)."""
    from softprompt.deep import DeepPrompt

    if not isinstance(base.prompt, DeepPrompt):
        raise DataError(f"{flag}: the student must be a deep prompt (--method deep)")
    return base.prompt


def teacher_positions(base: PromptObjective, ctx: Context) -> int:
    """--student-positions teacher: the deep student's input keeps the positions it has behind the teacher's context
    (a position gap of C - n after the student's n slots), so that its distance to the lead token, whose key no
    slot can change, is the teacher's. Returns the gap."""
    prompt = _deep_student(base, "--student-positions teacher")
    prompt.gap = max(0, len(ctx.token_ids) - prompt.num_tokens)
    return prompt.gap


@torch.no_grad()
def anchor_kv(
    pm: PromptedModel, ctx: Context, label_ids: list[list[int]], n: int, gap: int = 0
) -> tuple[torch.Tensor, list[int]]:
    """(kv (L, 2, H_kv, n, dh), the n context positions it holds): n of the teacher context's own keys/values, as a
    deep student's slots. Which: its last label-word tokens (each demonstration's answer: in-context learning
    gathers a demonstration's information at its label word and reads the prediction from there, "Label Words are
    Anchors", Wang et al. 2023), up to n - r of them, and its last r = max(1, n // 5) tokens, filled up with the
    tokens before those; all of them when n >= the context's length. Where: [lead][context] is run with every
    position shifted by n + gap - C (C context tokens; gap: the student's position gap), so that an input behind
    [lead][n slots] stands at the same distance from each slot as it stood from that token behind the whole
    context. Exact under rotary or other relative position encodings: with n = C the student computes what the
    teacher computes. Refused (DataError) where shifting the positions changes the context's hidden states
    (absolute position embeddings)."""
    C = len(ctx.token_ids)
    if C == 0:
        raise DataError("--student-init anchors: the hard prompt is empty")
    words = {w[0] for w in label_ids}
    r = min(C, max(1, n // 5))
    tail = list(range(C - r, C))
    labels = [i for i in range(C - r) if ctx.token_ids[i] in words][-(n - r) :] if n > r else []
    chosen = set(tail) | set(labels)
    for i in range(C - r - 1, -1, -1):  # too few label words: the tokens before the last r
        if len(chosen) >= min(n, C):
            break
        chosen.add(i)
    pos = sorted(chosen)
    lead = len(pm.prefix_ids)
    ids = torch.tensor([pm.prefix_ids + ctx.token_ids], device=pm.backbone.device)
    at = torch.arange(ids.shape[1], device=ids.device)[None]
    base = pm.model.base_model
    try:
        shifted = base(input_ids=ids, position_ids=at + (len(pos) + gap - C), use_cache=True)
    except (IndexError, RuntimeError) as e:  # a learned position table has no negative rows
        raise DataError(f"--student-init anchors: {pm.backbone.architecture} cannot shift positions ({e})") from e
    plain = base(input_ids=ids, position_ids=at)[0]
    scale = float(plain.abs().max().clamp(min=1))
    if not torch.allclose(shifted[0], plain, atol=1e-4 * scale, rtol=1e-3):
        raise DataError(f"--student-init anchors: {pm.backbone.architecture}'s states depend on absolute positions, "
                        "so the context's keys/values cannot move in front of the input; use --init")  # fmt: skip
    idx = torch.tensor([lead + i for i in pos], device=ids.device)
    kv = torch.stack([torch.stack([layer.keys[0][:, idx], layer.values[0][:, idx]]) for layer in shifted.cache.layers])
    return kv.float(), pos  # (L, 2, H_kv, n, dh)


def init_from_anchors(base: PromptObjective, ctx: Context) -> list[int]:
    """Set a deep student's slots (`base.prompt`, before training) to anchor_kv of the teacher's context; returns
    the context positions used."""
    prompt = _deep_student(base, "--student-init anchors")
    n = prompt.num_tokens
    if n > len(ctx.token_ids):
        raise DataError(f"--student-init anchors: --num-tokens {n} is more than the hard prompt's "
                        f"{len(ctx.token_ids)} tokens")  # fmt: skip
    kv, pos = anchor_kv(base.pm, ctx, base.task.label_ids, n, prompt.gap)
    target = prompt.kv0 if prompt.reparam > 0 else prompt.kv  # reparameterised: kv = kv0 + MLP(E), MLP(E) = 0
    with torch.no_grad():
        target.copy_(kv.to(target.device, target.dtype))
    return pos


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
    obj = DistillObjective(base, ctx, alpha=dc.alpha, temperature=dc.teacher_temperature, vocab_kl=dc.vocab_kl,
                           vocab_at=dc.vocab_kl_at, student_init=dc.student_init,
                           student_positions=dc.student_positions)  # fmt: skip
    res = fit(obj, cfg, files, log=log, t0=t0)
    last = res.last.metrics if res.last else {}
    log(f"distilled {len(ctx.token_ids)} hard-prompt tokens into {cfg.prompt.num_tokens} soft tokens: {cfg.train.out}"
        + (f" (agreement {last['agreement']:.3f})" if "agreement" in last else ""))  # fmt: skip
    return 0
