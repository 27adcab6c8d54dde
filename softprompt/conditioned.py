"""Input-conditioned prompts (`--method conditioned`): a shared prompt plus a low-rank part generated from the input.

    x = input_summary(input)                    (d,)    mean frozen input-token embeddings (softprompt.dynamic)
    U(x) = reshape(A x + a)                     (P, r)  generator A (P*r, d), a (P*r,)
    prompt(x) = S + U(x) V                      (P, d)  shared prompt S (P, d), shared basis V (r, d)

Which form, and why: the input-dependent part is low-rank as in LOPA (Jain et al. 2024: an instance-specific
component factorised as a product of two thin matrices, one of them computed from the input) and composed additively
with the shared prompt as in IDPG (Wu et al. 2022, a prompt generated from the input) and ADePT (Tang et al. 2025,
input-dependent offsets from a light network); not LOPA's multiplicative gate S * sigmoid(U V). Additive with V = 0
at the start means step 0 runs exactly the --init prompt (the plain prompt's start), and the generator costs
(P*r + r) * d + P*r parameters: with r = 1 about as many as P more prompt tokens. The generator reads the same cheap
representation as the router of softprompt.routed (no extra backbone pass; IDPG runs the backbone once more).

Cost at inference: every row has a prompt of its own, so nothing is shared across rows. Decoder-only models lose the
shared-prefix cache: the N prompts run as one batch in front of their inputs (concatenated; or, in a batch mixed with
cached prompts, as one batched pass of N prefixes giving per-row keys/values). docs/results-dynamic.md measures it.

File: `prompt` (P, d) = S; `conditioned.down.weight` (P*r, d) = A, `conditioned.down.bias` (P*r,) = a,
`conditioned.up` (r, d) = V; metadata `conditioned` {rank, tokens}. Export: refused (no format holds a generator).

Notation: N rows, T tokens, d embedding width, P prompt tokens, r rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from softprompt.checkpoint import CheckpointError, PromptCheckpoint
from softprompt.dynamic import RowPrefix, input_summary
from softprompt.prefix import Prefix
from softprompt.prompted import PromptedModel

TENSORS = ("conditioned.down.weight", "conditioned.down.bias", "conditioned.up")


def generate(
    shared: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor, up: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """(N, P, d) prompts S + U(x) V for inputs x (N, d): shared (P, d), down_w (P*r, d), down_b (P*r,), up (r, d)."""
    p, r = shared.shape[0], up.shape[0]
    u = (x @ down_w.to(x).T + down_b.to(x)).view(-1, p, r)  # (N, P, r)
    return shared.to(x)[None] + u @ up.to(x)  # (N, P, d)


class ConditionedPrompt(nn.Module):
    def __init__(self, init: torch.Tensor, rank: int) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"--rank must be >= 1, got {rank}")
        p, d = init.shape
        self.shared = nn.Parameter(init.detach().float().clone())  # (P, d)
        self.down = nn.Linear(d, p * rank)  # PyTorch's default init: U(x) is O(1) from the start
        self.up = nn.Parameter(torch.zeros(rank, d))  # zero: step 0 is the --init prompt

    def trainable(self) -> list[nn.Parameter]:
        return [self.shared, *self.down.parameters(), self.up]  # S, A, a, V

    def prefix(self, pm: PromptedModel) -> Prefix:
        raise ValueError("--method conditioned: the prefix depends on the input (row_prefix)")

    eval_prefix = prefix

    def row_prefix(self, pm: PromptedModel, ids: torch.Tensor, mask: torch.Tensor, *, train: bool) -> RowPrefix:
        x = input_summary(pm, ids, mask)  # (N, d)
        with torch.set_grad_enabled(train and torch.is_grad_enabled()):
            prompts = generate(self.shared, self.down.weight, self.down.bias, self.up, x)  # (N, P, d)
            prefix = pm.build_prefix(list(prompts), kv=False)  # one entry per row, concatenated in front of its input
        return RowPrefix(prefix, torch.arange(len(prompts), device=prompts.device))

    def saved(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        tensors = dict(zip(TENSORS, (self.down.weight.detach(), self.down.bias.detach(), self.up.detach())))
        meta = {"rank": int(self.up.shape[0]), "tokens": int(self.shared.shape[0])}
        return self.shared.detach(), tensors, {"method": "conditioned", "conditioned": meta}


def checkpoint_generator(ckpt: PromptCheckpoint) -> tuple[torch.Tensor, ...]:
    """shared (P, d), down weight (P*r, d), down bias (P*r,), up (r, d) of a conditioned prompt file, checked."""
    meta = ckpt.meta.get("conditioned")
    if not isinstance(meta, dict) or not isinstance(meta.get("rank"), int) or meta["rank"] < 1:
        raise CheckpointError(f"{ckpt.path}: a conditioned prompt needs metadata conditioned {{rank, tokens}}")
    p, d, r = int(ckpt.prompt.shape[0]), ckpt.embed_dim, int(meta["rank"])
    want = {TENSORS[0]: (p * r, d), TENSORS[1]: (p * r,), TENSORS[2]: (r, d)}
    for name, shape in want.items():
        t = ckpt.extra.get(name)
        if t is None or tuple(t.shape) != shape:
            got = None if t is None else tuple(t.shape)
            raise CheckpointError(f"{ckpt.path}: a conditioned prompt of rank {r} needs '{name}' {shape}, got {got}")
    return (ckpt.prompt, *(ckpt.extra[n] for n in TENSORS))


class _Conditioned:
    name = "conditioned"
    needs_kv = False
    per_row = True
    exports: frozenset[str] = frozenset()  # PEFT prompt tuning and prompt tables hold fixed prompts only

    def create(self, pm: PromptedModel, init: torch.Tensor, cfg: Any) -> ConditionedPrompt:
        return ConditionedPrompt(init, cfg.rank).to(pm.backbone.device)

    def load_prefix(self, pm: PromptedModel, ckpt: PromptCheckpoint, *, kv: bool | None) -> Prefix:
        """No input-independent entries (every row's prompt is its own): an empty Prefix."""
        checkpoint_generator(ckpt)
        dev, d = pm.backbone.device, ckpt.embed_dim
        empty = torch.zeros(0, 0, dtype=torch.long, device=dev)
        return Prefix(torch.zeros(0, 0, d, device=dev), empty, empty, torch.zeros(0, dtype=torch.long, device=dev))

    def rows(
        self, pm: PromptedModel, ckpt: PromptCheckpoint, ids: torch.Tensor, mask: torch.Tensor, *, kv: bool
    ) -> tuple[Prefix | None, torch.Tensor]:
        """One entry per row; kv=True (joining a batch of cached prompts): its keys/values in one batched pass."""
        s, a_w, a_b, v = (t.to(ids.device) for t in checkpoint_generator(ckpt))
        prompts = generate(s, a_w, a_b, v, input_summary(pm, ids, mask))  # (n, P, d)
        prefix = pm.build_prefix(list(prompts), kv=kv, together=True)
        return prefix, torch.arange(len(prompts), device=ids.device)

    def vectors(self, ckpt: PromptCheckpoint) -> torch.Tensor:
        """(P, d): the shared prompt."""
        return ckpt.prompt.double()


METHOD = _Conditioned()
