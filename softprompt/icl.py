"""In-context learning (ICL) as a first-class baseline: k labelled demonstrations in front of every input.

The context is plain text: each demonstration is the task's filled template followed by its label word (as a
verbalizer word follows the template: softprompt.prompted.label_text), demonstrations joined by SEPARATOR, then
SEPARATOR before the input. It is tokenised once and goes in the prompt's place as the embeddings of its own tokens,
so on a decoder-only model its keys/values are computed once per evaluation and shared by every row
(PromptedModel.build_prefix), and each row scores exactly as the model's own forward of [BOS] context input does
(tests/test_icl.py checks it against the model's `input_ids` forward).

Demonstrations are drawn by a fixed seed from a labelled file, optionally balanced per class (round-robin over
the classes in label order, each class's examples in seeded order), and never include an evaluation row that
is the same text. Hand-written instructions may come first (the context is then instructions, SEPARATOR,
demonstrations); a hard prompt can also be any text as it is (text_context: a `softprompt distill
--teacher-prompt` file). The same context is what softprompt.distill compiles into a soft prompt, and what
self_study() samples new inputs from (the model writes them itself, behind the context).
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from typing import Any

import torch

from softprompt.data import DataError, Encoded, Sample, Template, load_samples
from softprompt.evaluate import evaluate_examples, generate_ids
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


def build_context(task: BoundTask, demos: list[Sample], instructions: str = "") -> Context:
    """The hard prompt as text and its tokens: `instructions` (if any), then the demonstrations (template filled,
    then the label word), each part followed by SEPARATOR."""
    spec, pm = task.spec, task.pm
    if spec.task != "classify" or spec.verbalizer is None:
        raise DataError("--icl-demos: in-context demonstrations need a classification task with --labels")
    if pm.family != "causal":
        raise DataError("--icl-demos: in-context learning needs a decoder-only model")
    words = spec.verbalizer.words
    parts = [s.text + label_text(words[int(s.label or 0)], spec.template, pm.family) for s in demos]
    parts = ([instructions.strip()] if instructions.strip() else []) + parts
    return text_context(pm, SEPARATOR.join(parts) + (SEPARATOR if parts else ""), k=len(demos))


def text_context(pm: PromptedModel, text: str, *, k: int = 0) -> Context:
    """A hard prompt given as text (a --teacher-prompt file: instructions and/or demonstrations), used as is."""
    if pm.family != "causal":
        raise DataError("a hard prompt in context needs a decoder-only model")
    ids = list(pm.tok(text, add_special_tokens=False)["input_ids"]) if text else []
    return Context(text, k, ids)


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
    instructions: str = "",
) -> dict[str, Any]:
    """Metrics of the frozen model with k demonstrations from `demos_path` in context (after `instructions`, if
    any), on the labelled `path`."""
    pm = PromptedModel(backbone, position=spec.position)
    probe = BoundTask(spec, pm, num_tokens=0)
    pool = load_samples(demos_path, spec.data_config(columns=columns), spec.verbalizer)
    if k > len(pool):
        raise DataError(f"--k {k}: the --icl-demos file {demos_path} has only {len(pool)} labelled examples")
    demos = choose_demos(pool, k, seed=seed, balanced=balanced)
    ctx = build_context(probe, demos, instructions)
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


# ---- self-study: inputs the model writes itself from the context ---------------------------------------------
@torch.no_grad()
def self_study(
    pm: PromptedModel,
    ctx: Context,
    spec: TaskSpec,
    n: int,
    *,
    seed: int = 0,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 0.95,
    batch_size: int = 16,
) -> list[str]:
    """`n` inputs (filled templates) sampled from the model behind the hard prompt, as Cartridges' self-study
    writes synthetic queries about its corpus. The recipe: after [BOS][context], each template field is sampled in
    turn (seeded nucleus sampling), the template's literal text written in between (its trailing spaces written by
    the model, as a word's leading space), a field ending at its first newline or at the next literal; a row with an
    empty field is drawn again (up to 4n draws). Deterministic for a
    seed (torch's RNG is forked, not disturbed). The context's last token is fed with the row, so that a template
    that starts with its field still has an input token to continue from."""
    if not ctx.token_ids:
        raise DataError("--self-study: the model writes inputs from the hard prompt; give --teacher-prompt or --demos")
    parts = [(lit, name) for lit, name, _, _ in string.Formatter().parse(Template(spec.template).text)]
    head = context_prefix(pm, Context(ctx.text, ctx.k, ctx.token_ids[:-1]))  # all but the last token: K/V once
    lead = ctx.token_ids[-1:]
    out: list[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(4):
            want = n - len(out)
            if want <= 0:
                break
            texts = [""] * want
            for i, (lit, name) in enumerate(parts):
                texts = [t + lit for t in texts]
                if name is None:
                    continue
                stop = next((p[0] for p in parts[i + 1 :] if p[0].strip()), "").strip()
                # a literal's trailing spaces are left for the model to write: BPE merges a space into the next
                # word ("Review:" then " great"), so a row ending in a bare space token is one it never saw
                rows = [Encoded(lead + pm.tok(t.rstrip(" "), add_special_tokens=False)["input_ids"], None, None, False)
                        for t in texts]  # fmt: skip
                gen = generate_ids(pm, head, rows, batch_size=batch_size, do_sample=True, top_p=top_p,
                                   temperature=temperature, max_new_tokens=max_new_tokens)  # fmt: skip
                values = [_field_value(str(pm.tok.decode(g, skip_special_tokens=True)), stop) for g in gen]
                texts = [t + v for t, v in zip(texts, values) if v]  # a row with an empty field is dropped
            out += texts
    if len(out) < n:
        raise DataError(f"--self-study {n}: the model wrote only {len(out)} usable inputs in {4 * n} draws")
    return out[:n]


def _field_value(text: str, stop: str) -> str:
    """A sampled field: up to its first newline, and up to the template's next literal text if it wrote it."""
    text = text.split("\n", 1)[0]
    if stop and stop in text:
        text = text[: text.index(stop)]
    return text.strip()
