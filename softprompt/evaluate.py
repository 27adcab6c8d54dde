"""Batched inference and metrics: class probabilities, generations, accuracy / macro-F1 / confusion, EM / token F1."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from softprompt.data import Encoded, sorted_batches
from softprompt.prompted import Prefix, PromptedModel

# What class_probs runs rows behind: a Prefix, or an input-dependent prompt's source (softprompt.dynamic: a PromptSet
# or TrainableSource), called per batch with (ids, mask, each row's prompt or None) -> (Prefix, each row's entry).
PrefixSource = Prefix | Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[Prefix, Any]]


@torch.no_grad()
def class_probs(
    pm: PromptedModel,
    prefix: PrefixSource,
    examples: list[Encoded],
    label_ids: list[list[int]],
    *,
    batch_size: int = 32,
    rows: list[int] | None = None,
    head: torch.nn.Module | None = None,
) -> torch.Tensor:
    """(N, L) class probabilities (softmax over the class scores), in the order of `examples`.
    `rows` gives each example's prompt index in `prefix` (default: prompt 0); `head` scores them (an encoder's
    head, a --head linear prompt's; None: the verbalizer, or the deprecated pm.head)."""
    head = head if head is not None else pm.head
    out = torch.zeros(len(examples), max(len(label_ids), int(getattr(head, "num_labels", 0))))
    device = pm.backbone.device
    for idx in sorted_batches([len(e.input_ids) for e in examples], batch_size):  # similar lengths: little padding
        batch = pm.collate([examples[i].input_ids for i in idx]).to(device)
        r = None if rows is None else torch.tensor([rows[i] for i in idx], device=device)
        p, r = (prefix, r) if isinstance(prefix, Prefix) else prefix(batch.ids, batch.mask, r)
        out[idx] = pm.label_scores(p, r, batch, label_ids, head).float().softmax(-1).cpu()
    return out


def combine_probs(p: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """Combine an ensemble's (N, K, L) class probabilities into (N, L): `mean` averages them; `vote` gives each
    label its share of the K members' argmax votes, ties broken by the mean probability."""
    if how not in ("mean", "vote"):
        raise ValueError(f"combine must be mean or vote, got {how!r}")
    if how == "vote" and p.shape[1] > 1:
        votes = torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).double().mean(1)  # (N, L) vote share
        return votes + 1e-6 * p.mean(1).double()  # ties broken by mean probability (float64: not lost to rounding)
    return p.mean(1)


@torch.no_grad()
def generate_ids(
    pm: PromptedModel,
    prefix: Prefix,
    examples: list[Encoded],
    *,
    batch_size: int = 16,
    rows: list[int] | None = None,
    **gen_kwargs: Any,
) -> list[list[int]]:
    """Generated token ids per example (EOS and padding removed), in the order of `examples`."""
    out: list[list[int]] = [[] for _ in examples]
    device = prefix.mask.device
    eos = pm.tok.eos_token_id
    for idx in sorted_batches([len(e.input_ids) for e in examples], batch_size):
        batch = pm.collate([examples[i].input_ids for i in idx]).to(device)
        r = None if rows is None else torch.tensor([rows[i] for i in idx], device=device)
        new = pm.generate(prefix, r, batch, **gen_kwargs).tolist()
        for i, seq in zip(idx, new):
            if pm.family == "seq2seq" and seq and seq[0] == pm.model.config.decoder_start_token_id:
                seq = seq[1:]
            if eos is not None and eos in seq:
                seq = seq[: seq.index(eos)]
            out[i] = [t for t in seq if t != pm.pad_id or t == eos]
    return out


def classification_metrics(gold: list[int], pred: list[int], labels: list[str]) -> dict[str, Any]:
    """accuracy, macro_f1 (mean over classes of per-class F1), confusion[gold][pred], n."""
    L = len(labels)
    conf = [[0] * L for _ in range(L)]
    for g, p in zip(gold, pred):
        conf[g][p] += 1
    f1s = []
    for c in range(L):
        tp = conf[c][c]
        fp = sum(conf[g][c] for g in range(L)) - tp
        fn = sum(conf[c]) - tp
        denom = 2 * tp + fp + fn
        f1s.append(2 * tp / denom if denom else 0.0)
    n = len(gold)
    return {
        "accuracy": sum(g == p for g, p in zip(gold, pred)) / n if n else 0.0,
        "macro_f1": sum(f1s) / L if L else 0.0,
        "per_class_f1": dict(zip(labels, f1s)),
        "confusion": conf,
        "labels": labels,
        "n": n,
    }


def _normalize(text: str) -> str:
    """SQuAD answer normalisation: lower case, no punctuation, articles or extra whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(pred: str, gold: str) -> float:
    p, g = _normalize(pred).split(), _normalize(gold).split()
    if not p or not g:
        return float(p == g)
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(g)
    return 2 * prec * rec / (prec + rec)


def generation_metrics(preds: list[str], golds: list[str]) -> dict[str, Any]:
    n = len(golds)
    return {
        "exact_match": sum(_normalize(p) == _normalize(g) for p, g in zip(preds, golds)) / n if n else 0.0,
        "token_f1": sum(token_f1(p, g) for p, g in zip(preds, golds)) / n if n else 0.0,
        "n": n,
    }


def evaluate_examples(
    pm: PromptedModel,
    prefix: PrefixSource,
    examples: list[Encoded],
    *,
    task: str,
    label_ids: list[list[int]],
    labels: list[str] | None,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    head: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Metrics of one prompt on encoded examples (classification or generation); `head` as in class_probs."""
    if task == "classify":
        assert labels is not None
        probs = class_probs(pm, prefix, examples, label_ids, batch_size=batch_size, head=head)
        gold = [e.label for e in examples]
        if any(g is None for g in gold):
            raise ValueError("evaluation data needs a label on every row")
        m = classification_metrics([int(g) for g in gold if g is not None], probs.argmax(-1).tolist(), labels)
        logp = probs.clamp(min=1e-12).log()
        m["loss"] = float(-logp[torch.arange(len(examples)), torch.tensor(gold)].mean())
        return m
    if not isinstance(prefix, Prefix):
        raise ValueError("an input-dependent prompt (routed, conditioned) serves classification tasks only")
    gen = generate_ids(pm, prefix, examples, batch_size=batch_size, max_new_tokens=max_new_tokens, do_sample=False)
    preds = [pm.decode(g) for g in gen]
    golds = [pm.decode(e.target_ids or []) for e in examples]
    return generation_metrics(preds, golds)
