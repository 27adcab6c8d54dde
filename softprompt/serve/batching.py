"""Pure batching for the server: requests of many tasks -> one padded batch with a prompt index per row, and back.

`collate` and `unbatch` are pure functions (no model, no I/O) so the batching rules are unit-tested on their own.
`mixed_label_scores` and `mixed_head_scores` are the model side: class scores for a batch whose rows belong to
different tasks, each with its own verbalizer (or encoder head), in one forward pass where possible.

Row layout follows softprompt.prompted exactly: decoder-only inputs are left-padded, encoder inputs right-padded,
and each row sits behind its own task's prefix (`rows[i]` indexes the stacked Prefix), so a row's scores equal
what `softprompt predict` computes for that input and prompt alone (up to float rounding of the padded matmuls).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from softprompt.data import pad_left, pad_right
from softprompt.prompted import Batch, Prefix, PromptedModel


@dataclass(frozen=True)
class Item:
    """One row to run: the task it belongs to (any hashable key) and its encoded input ids."""

    task: Hashable
    input_ids: list[int]


def collate(items: Sequence[Item], *, pad_id: int, left: bool) -> tuple[Batch, torch.Tensor, list[Hashable]]:
    """Pad the rows of a mixed-task batch (pure: no model call).

    Returns the Batch (left-padded for decoder-only models, right-padded otherwise), `rows` (N,) the index of each
    row's task in `tasks`, and `tasks`: the distinct task keys in first-seen order. The caller stacks one Prefix per
    entry of `tasks` (`Prefix.stack`), so `rows` indexes that stacked prefix.
    """
    if not items:
        raise ValueError("collate: no items")
    tasks: list[Hashable] = []
    index: dict[Hashable, int] = {}
    rows = []
    for it in items:
        if it.task not in index:
            index[it.task] = len(tasks)
            tasks.append(it.task)
        rows.append(index[it.task])
    seqs = [list(it.input_ids) for it in items]
    ids, mask = (pad_left if left else pad_right)(seqs, pad_id)
    return Batch(ids, mask), torch.tensor(rows, dtype=torch.long), tasks


def unbatch(values: Sequence[Any], sizes: Sequence[int]) -> list[list[Any]]:
    """Split per-row results back into per-request lists (`sizes[r]` rows for request r, in order)."""
    if sum(sizes) != len(values):
        raise ValueError(f"unbatch: {len(values)} values for requests of {sum(sizes)} rows")
    out, at = [], 0
    for n in sizes:
        out.append(list(values[at : at + n]))
        at += n
    return out


def stack_prefixes(parts: Sequence[Prefix]) -> Prefix:
    """One Prefix for the distinct tasks of a batch; a single task keeps its own (G=1: K/V broadcast, no copy)."""
    return parts[0] if len(parts) == 1 else Prefix.stack(list(parts))


def select(batch: Batch, idx: torch.Tensor) -> Batch:
    return Batch(batch.ids[idx], batch.mask[idx])


@torch.no_grad()
def mixed_label_scores(
    pm: PromptedModel,
    prefix: Prefix,
    rows: torch.Tensor,
    batch: Batch,
    label_ids: Sequence[list[list[int]]],
    heads: Sequence[nn.Module | None] | None = None,
) -> list[torch.Tensor]:
    """Class scores of a decoder-only mixed batch: row i is scored against its own task's `label_ids[i]`, or by
    its own task's linear head `heads[i]` (a --head linear prompt) on the last input position's hidden state.

    Rows with a head or whose verbalizer words are all single tokens share one forward pass (one scored position
    each; every verbalizer row gathers its own label tokens from the full-vocabulary log-probs). Rows with
    multi-token words are expanded to one row per (input, word) as PromptedModel.label_scores does, all tasks
    together in a second pass. The score of a word is its mean token log-likelihood, exactly label_scores'
    definition; a head's score is its logits, exactly label_scores' with that head.
    """
    n, T = batch.ids.shape
    dev = batch.ids.device
    heads = heads if heads is not None else [None] * n
    out: list[torch.Tensor | None] = [None] * n
    single = [i for i in range(n) if heads[i] is not None or all(len(w) == 1 for w in label_ids[i])]
    multi = [i for i in range(n) if i not in set(single)]
    if single:
        idx = torch.tensor(single, device=dev)
        pos = torch.full((len(single), 1), T - 1, dtype=torch.long, device=dev)
        h = pm.causal_hidden(prefix, rows[idx], batch.ids[idx], batch.mask[idx], pos)[:, 0]  # (S, d)
        verb = [j for j, i in enumerate(single) if heads[i] is None]
        if verb:  # the vocabulary projection only for verbalizer rows
            logp = pm.lm_logits(h[verb]).log_softmax(-1)  # (S', V)
            for k, j in enumerate(verb):
                out[single[j]] = logp[k, torch.tensor([w[0] for w in label_ids[single[j]]], device=dev)]
        headed = [j for j, i in enumerate(single) if heads[i] is not None]
        for j, s in zip(headed, _scores_by_head(h[headed], [heads[single[j]] for j in headed]), strict=True):
            out[single[j]] = s
    if multi:
        m = max(len(w) for i in multi for w in label_ids[i])
        ids, mask, prow, tgt, owner = [], [], [], [], []
        for i in multi:
            for w in label_ids[i]:
                cont = list(w[:-1]) + [0] * (m - len(w))  # continuation fed after the input, right-padded (masked)
                ids.append(torch.cat([batch.ids[i], torch.tensor(cont, dtype=torch.long, device=dev)]))
                cmask = [1] * (len(w) - 1) + [0] * (m - len(w))
                mask.append(torch.cat([batch.mask[i], torch.tensor(cmask, dtype=torch.long, device=dev)]))
                prow.append(int(rows[i]))
                tgt.append(list(w) + [-100] * (m - len(w)))
                owner.append(i)
        ids_t, mask_t = torch.stack(ids), torch.stack(mask)
        tgt_t = torch.tensor(tgt, dtype=torch.long, device=dev)
        pos = torch.arange(T - 1, T + m - 1, device=dev)[None].expand(len(ids), -1)
        h = pm.causal_hidden(prefix, torch.tensor(prow, device=dev), ids_t, mask_t, pos)
        logp = pm.lm_logits(h).log_softmax(-1)  # (R, m, V)
        valid = tgt_t != -100
        tok = logp.gather(-1, tgt_t.clamp(min=0)[..., None])[..., 0]
        scores = (tok * valid).sum(-1) / valid.sum(-1).clamp(min=1)  # (R,)
        at = 0
        for i in multi:
            k = len(label_ids[i])
            out[i] = scores[at : at + k]
            at += k
    return [s for s in out if s is not None]


@torch.no_grad()
def seq2seq_label_scores(
    pm: PromptedModel, prefix: Prefix, rows: torch.Tensor, batch: Batch, label_ids: Sequence[list[list[int]]]
) -> list[torch.Tensor]:
    """Encoder-decoder mixed batch: rows grouped by verbalizer, each group scored by PromptedModel.label_scores."""
    n = batch.ids.shape[0]
    out: list[torch.Tensor | None] = [None] * n
    groups: dict[tuple[tuple[int, ...], ...], list[int]] = {}
    for i in range(n):
        groups.setdefault(tuple(tuple(w) for w in label_ids[i]), []).append(i)
    for key, members in groups.items():
        idx = torch.tensor(members, device=batch.ids.device)
        scores = pm.label_scores(prefix, rows[idx], select(batch, idx), [list(w) for w in key])
        for j, i in enumerate(members):
            out[i] = scores[j]
    return [s for s in out if s is not None]


@torch.no_grad()
def mixed_head_scores(
    pm: PromptedModel, prefix: Prefix, rows: torch.Tensor, batch: Batch, heads: Sequence[nn.Module]
) -> list[torch.Tensor]:
    """Encoder mixed batch: one encoder pass for every row (each behind its own prompt), then each row's task head
    on its pooled vector (rows sharing a head are scored together)."""
    return _scores_by_head(pm.pooled(prefix, rows, batch), heads)


def _scores_by_head(pooled: torch.Tensor, heads: Sequence[nn.Module | None]) -> list[torch.Tensor]:
    """Row i's scores from `heads[i]` on `pooled[i]` (N, d); rows sharing a head are scored together."""
    out: list[torch.Tensor | None] = [None] * len(heads)
    groups: dict[int, list[int]] = {}
    for i, h in enumerate(heads):
        groups.setdefault(id(h), []).append(i)
    for members in groups.values():
        idx = torch.tensor(members, device=pooled.device)
        head = heads[members[0]]
        assert head is not None
        scores = head(pooled[idx]).float()
        for j, i in enumerate(members):
            out[i] = scores[j]
    return [s for s in out if s is not None]
