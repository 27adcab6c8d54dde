"""Classification heads over `PromptedModel.pooled` (what a prompt's scores are read from besides the verbalizer).

pooled: (N, d) with d the backbone's hidden size (an encoder's mean-pooled output, a decoder's last input state).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LinearHead(nn.Module):
    """Trainable linear classifier over the pooled output (PromptedModel.pooled)."""

    def __init__(self, dim: int, num_labels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_labels)

    @property
    def num_labels(self) -> int:
        return int(self.linear.out_features)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(pooled)


class PerPromptHeads(nn.Module):
    """One head per prompt of a stacked Prefix (an ensemble of encoder prompts trained with their own linear
    heads): each row is scored by the head of the prompt it runs under."""

    def __init__(self, heads: list[nn.Module]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.num_labels = int(getattr(heads[0], "num_labels", 0))

    def forward(self, pooled: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        if rows is None:
            return self.heads[0](pooled)
        out = torch.empty(pooled.shape[0], self.num_labels, dtype=pooled.dtype, device=pooled.device)
        for k in rows.unique().tolist():  # rows sharing a prompt are scored together
            sel = rows == k
            out[sel] = self.heads[k](pooled[sel]).to(out.dtype)
        return out


class VerbalizerHead(nn.Module):
    """A decoder's one-token verbalizer as a head over `pooled` (the last input position's final hidden state): the
    LM logits of the label tokens. Their softmax is verbalizer scoring's class probabilities (the log-softmax over
    the vocabulary shifts every label by one constant), so a verbalizer prompt can join --head linear prompts in
    one PerPromptHeads ensemble."""

    def __init__(self, lm_logits: Callable[[torch.Tensor], torch.Tensor], token_ids: list[int]) -> None:
        super().__init__()
        self._lm_logits = lm_logits  # the frozen backbone's output layer: not a submodule, no weights of its own
        self.register_buffer("ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
        self.num_labels = len(token_ids)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self._lm_logits(pooled)[:, self.ids]  # type: ignore[index]


class SimilarityHead(nn.Module):
    """No trainable weights: score = scale * cos(pooled input, pooled encoding of the label description)."""

    def __init__(self, label_embeds: torch.Tensor, scale: float = 20.0) -> None:
        super().__init__()
        self.register_buffer("label_embeds", F.normalize(label_embeds.detach().float(), dim=-1))
        self.scale = scale
        self.num_labels = int(label_embeds.shape[0])

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(pooled.float(), dim=-1) @ self.label_embeds.T  # type: ignore[operator]


def scores_by_head(pooled: torch.Tensor, heads: Sequence[nn.Module | None]) -> list[torch.Tensor]:
    """Row i's scores (L_i,) from `heads[i]` on `pooled[i]` (N, d); rows sharing a head are scored together."""
    out: list[torch.Tensor | None] = [None] * len(heads)
    groups: dict[int, list[int]] = {}
    for i, h in enumerate(heads):
        groups.setdefault(id(h), []).append(i)
    for members in groups.values():
        head = heads[members[0]]
        assert head is not None
        scores = head(pooled[torch.tensor(members, device=pooled.device)]).float()
        for j, i in enumerate(members):
            out[i] = scores[j]
    return [s for s in out if s is not None]
