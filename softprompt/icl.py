"""In-context learning (ICL) as a first-class baseline: k labelled demonstrations in front of every input.

The context is plain text: each demonstration is the task's filled template followed by its label word (as a
verbalizer word follows the template: softprompt.prompted.label_text), demonstrations joined by SEPARATOR, then
SEPARATOR before the input. It is tokenised once and goes in the prompt's place as the embeddings of its own tokens,
so on a decoder-only model its keys/values are computed once per evaluation and shared by every row
(PromptedModel.build_prefix), and each row scores exactly as the model's own forward of [BOS] context input does
(tests/test_icl.py checks it against the model's `input_ids` forward).

Demonstrations are drawn by a fixed seed from a labelled file, optionally balanced per class (round-robin over
the classes in label order, each class's examples in seeded order), and never include an evaluation row that
is the same text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from softprompt.data import DataError, Sample, load_samples
from softprompt.evaluate import evaluate_examples
from softprompt.models import Backbone
from softprompt.prefix import Prefix
from softprompt.prompted import PromptedModel, label_text
from softprompt.task import BoundTask, TaskSpec

SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Context:
    """The demonstrations as one text, and what describes it."""

    text: str
    k: int
    token_ids: list[int]  # the context's tokens (no BOS: the prefix keeps the model's own lead token)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def meta(self) -> dict[str, Any]:
        return {"k": self.k, "context_tokens": len(self.token_ids), "context_sha256": self.sha256}


def choose_demos(samples: list[Sample], k: int, *, seed: int = 0, balanced: bool = False) -> list[Sample]:
    """k labelled samples in a seeded order; balanced: round-robin over the classes (label index order)."""
    if k < 0:
        raise DataError(f"--k must be >= 0, got {k}")
    if k > len(samples):
        raise DataError(f"--k {k}: the demonstrations file has only {len(samples)} examples")
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    if not balanced:
        return [samples[i] for i in order[:k]]
    by_class: dict[int, list[Sample]] = {}
    for i in order:
        by_class.setdefault(int(samples[i].label or 0), []).append(samples[i])
    queues = [by_class[c] for c in sorted(by_class)]
    out: list[Sample] = []
    while len(out) < k:
        for q in queues:
            if q and len(out) < k:
                out.append(q.pop(0))
    return out


def build_context(task: BoundTask, demos: list[Sample]) -> Context:
    """The demonstrations as text (template filled, then the label word) and its tokens."""
    spec, pm = task.spec, task.pm
    if spec.task != "classify" or spec.verbalizer is None:
        raise DataError("--icl-demos: in-context demonstrations need a classification task with --labels")
    if pm.family != "causal":
        raise DataError("--icl-demos: in-context learning needs a decoder-only model")
    words = spec.verbalizer.words
    parts = [s.text + label_text(words[int(s.label or 0)], spec.template, pm.family) for s in demos]
    text = SEPARATOR.join(parts) + (SEPARATOR if parts else "")
    ids = list(pm.tok(text, add_special_tokens=False)["input_ids"]) if text else []
    return Context(text, len(demos), ids)


def context_prefix(pm: PromptedModel, ctx: Context) -> Prefix:
    """[lead token][the context's token embeddings]: its keys/values computed once (decoder-only)."""
    if not ctx.token_ids:
        return pm.build_prefix([None])
    ids = torch.tensor(ctx.token_ids, dtype=torch.long, device=pm.backbone.device)
    with torch.no_grad():
        return pm.build_prefix([pm.embed(ids)]).detach()


def icl_evaluate(
    backbone: Backbone,
    spec: TaskSpec,
    path: str,
    demos_path: str,
    k: int,
    *,
    seed: int = 0,
    balanced: bool = False,
    batch_size: int = 32,
    columns: str | None = None,
) -> dict[str, Any]:
    """Metrics of the frozen model with k demonstrations from `demos_path` in context, on the labelled `path`."""
    pm = PromptedModel(backbone, position=spec.position)
    probe = BoundTask(spec, pm, num_tokens=0)
    pool = load_samples(demos_path, spec.data_config(columns=columns), spec.verbalizer)
    demos = choose_demos(pool, k, seed=seed, balanced=balanced)
    ctx = build_context(probe, demos)
    task = BoundTask(spec, pm, num_tokens=len(ctx.token_ids))  # inputs are cut to fit behind the context
    examples, _, texts = task.encode_file(path, columns=columns)
    shown = {s.text for s in demos}
    if any(t in shown for t in texts):
        raise DataError(f"--icl-demos: {demos_path} shares examples with {path}; the model would see the answers")
    labels = spec.verbalizer.labels if spec.verbalizer else None
    m = evaluate_examples(
        pm, context_prefix(pm, ctx), examples, task="classify", label_ids=task.label_ids, labels=labels,
        batch_size=batch_size,
    )  # fmt: skip
    return {**m, **ctx.meta(), "balanced": balanced, "seed": seed}
