"""Input-dependent prefixes: the prompt methods whose prompt depends on the input (`per_row = True`).

A static method (prompt, deep) gives one Prefix entry per prompt, built once and shared by every row. An
input-dependent method gives, for a batch of inputs, a Prefix and each row's entry in it (`RowPrefix`):

  routed       (softprompt.routed) the K routes are K entries, built once like K plain prompts (cached by the
               server, K/V shared by the rows that take a route); each row's entry is the route its router picks
  conditioned  (softprompt.conditioned) one entry per row, its generated prompt: nothing is shared across rows

The one forward path (softprompt.prompted) already runs every row behind its own entry of a stacked Prefix
(`rows`), so an input-dependent prompt is a Prefix plus a row map, and a batch can mix it with other tasks' prompts.
Both methods score an input from `input_summary`: the mean of its frozen token embeddings (no backbone pass).

Who calls what:
- training: `step_prefix` (Trainable.row_prefix for per-row methods, else Trainable.prefix / eval_prefix);
- saved prompts (evaluate, predict, ensembles: softprompt.api.Predictor): `PromptSet`, a prefix source that
  class_probs calls per batch (static-only sets stay a plain Prefix: softprompt.methods.checkpoint_prompts);
- the server's mixed-task batches: `resolve` on the tasks' cached static prefixes (softprompt.serve.pipeline).

Notation: N rows, T tokens, d embedding width, G prefix entries, M prompts of a set (members), K routes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from softprompt.prefix import Batch, Prefix

if TYPE_CHECKING:
    from softprompt.checkpoint import PromptCheckpoint
    from softprompt.methods import Method, Trainable
    from softprompt.prompted import PromptedModel


@dataclass
class RowPrefix:
    """A batch's Prefix and each row's entry in it."""

    prefix: Prefix  # G entries
    rows: torch.Tensor | None  # (N,) row -> entry; None: entry 0 for every row (G = 1)
    aux: torch.Tensor | None = None  # an extra training loss term (routed: the load-balancing loss), scalar
    routes: torch.Tensor | None = None  # (N,) the route each row took (routed rows), -1 for other rows


def input_summary(pm: PromptedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, d) float32: the mean of each row's frozen input-token embeddings over its real tokens (mask 1), layer-
    normalised without weights. No backbone pass; float64 sums, so a row's summary does not depend on the padding
    of the batch it is in (a route picked in a batch is the route picked alone)."""
    with torch.no_grad():
        e = pm.embed(ids).double()  # (N, T, d)
        w = mask.to(e.dtype)[..., None]  # (N, T, 1)
        mean = (e * w).sum(1) / w.sum(1).clamp(min=1)  # (N, d)
        return F.layer_norm(mean, mean.shape[-1:]).float()


def step_prefix(prompt: Trainable, pm: PromptedModel, batch: Batch, *, train: bool) -> RowPrefix:
    """The prefix of a training step (train=True, gradients flow) or of an evaluation batch, any method."""
    row_prefix = getattr(prompt, "row_prefix", None)
    if row_prefix is not None:  # an input-dependent method
        out: RowPrefix = row_prefix(pm, batch.ids, batch.mask, train=train)
        return out
    return RowPrefix(prompt.prefix(pm) if train else prompt.eval_prefix(pm), None)


class TrainableSource:
    """An input-dependent Trainable as class_probs' prefix source (training's evaluation): counts the routes taken."""

    def __init__(self, prompt: Trainable, pm: PromptedModel) -> None:
        self.prompt, self.pm = prompt, pm
        self.routes: torch.Tensor | None = None  # (K,) rows per route over the calls so far

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor | None) -> tuple[Prefix, Any]:
        if rows is not None and bool((rows != 0).any()):
            raise ValueError("a trained input-dependent prompt is one prompt: rows must all be 0")
        rp = step_prefix(self.prompt, self.pm, Batch(ids, mask), train=False)
        self.routes = _count(self.routes, rp.routes, int(getattr(self.prompt, "num_routes", 0)))
        return rp.prefix.detach(), rp.rows


def _count(acc: torch.Tensor | None, routes: torch.Tensor | None, k: int) -> torch.Tensor | None:
    if routes is None or k <= 0:
        return acc
    c = torch.bincount(routes[routes >= 0].cpu(), minlength=k)
    return c if acc is None else acc + c


def resolve(
    pm: PromptedModel,
    ms: Sequence[Method],
    ckpts: Sequence[PromptCheckpoint],
    statics: Sequence[Prefix],
    member: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    stacked: Prefix | None = None,
) -> RowPrefix:
    """The Prefix of a batch whose row i runs under prompt member[i] of M saved prompts (any methods) and each row's
    entry in it. statics[j]: prompt j's input-independent entries (Method.load_prefix: 1 for a static method, K
    routes, none for a conditioned prompt); `stacked`: them stacked already (a PromptSet's, built once). Entries:
    every static entry in order, then the per-row entries of the conditioned rows."""
    sizes = [int(p.mask.shape[0]) for p in statics]
    offsets = torch.tensor([0, *sizes], device=ids.device).cumsum(0)[:-1]  # (M,) first entry of each prompt
    rows = offsets[member]  # (N,)
    keep = [p for p in statics if p.mask.shape[0] > 0]
    if stacked is None and keep:
        stacked = keep[0] if len(keep) == 1 else Prefix.stack(keep)
    routes = torch.full_like(member, -1)
    extra: list[Prefix] = []
    at = sum(sizes)
    kv = stacked is not None and stacked.kv is not None  # per-row entries join a K/V prefix with K/V of their own
    for j, m in enumerate(ms):
        if not m.per_row:
            continue
        sel = (member == j).nonzero()[:, 0]
        if sel.numel() == 0:
            continue
        dyn: Any = m  # a per_row method (Method.rows)
        more, local = dyn.rows(pm, ckpts[j], ids[sel], mask[sel], kv=kv)
        if more is None:  # routed: an entry among the prompt's own static ones
            rows[sel] = offsets[j] + local
            routes[sel] = local
        else:  # conditioned: entries of its own, appended
            rows[sel] = at + local
            at += int(more.mask.shape[0])
            extra.append(more)
    parts = ([stacked] if stacked is not None else []) + extra
    prefix = parts[0] if len(parts) == 1 else Prefix.stack(parts)
    return RowPrefix(prefix, rows, routes=routes)


class PromptSet:
    """Saved prompts of any methods, at least one input-dependent, as class_probs' prefix source: called with a
    batch's ids, mask and each row's prompt (None: prompt 0), it gives the batch's Prefix and each row's entry.
    Static entries (plain prompts, routes) are built once here; `routes[j]` counts the rows prompt j routed."""

    def __init__(self, pm: PromptedModel, ckpts: Sequence[PromptCheckpoint], *, kv: bool | None = None) -> None:
        from softprompt import methods

        self.pm, self.ckpts = pm, list(ckpts)
        self.ms = [methods.of(c) for c in self.ckpts]
        kv = True if any(m.needs_kv for m in self.ms) else kv
        with torch.no_grad():
            self.statics = [m.load_prefix(pm, c, kv=kv).detach() for m, c in zip(self.ms, self.ckpts, strict=True)]
        keep = [p for p in self.statics if p.mask.shape[0] > 0]
        self.stacked = None if not keep else keep[0] if len(keep) == 1 else Prefix.stack(keep)
        self.routes: list[torch.Tensor | None] = [None] * len(self.ckpts)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor | None) -> tuple[Prefix, Any]:
        member = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device) if rows is None else rows
        rp = resolve(self.pm, self.ms, self.ckpts, self.statics, member, ids, mask, stacked=self.stacked)
        assert rp.routes is not None
        for j, m in enumerate(self.ms):
            k = int(m.num_routes(self.ckpts[j])) if hasattr(m, "num_routes") else 0
            self.routes[j] = _count(self.routes[j], rp.routes.masked_fill(member != j, -1), k)
        return rp.prefix, rp.rows
