"""The data of softprompt's forward path (softprompt.prompted): what goes in front of the inputs (Prefix), the
inputs (Batch), the classification heads that read its pooled output besides the verbalizer, and the pure tensor
helpers that lay rows out for scoring (pack_rows, word_table, mean_target_logp).

Notation: G distinct prompts, P prefix slots (left-padded to the widest), N rows, T tokens, d embedding width,
H key/value heads, dh head dim. pooled: (N, d) with d the backbone's hidden size (an encoder's mean-pooled output,
a decoder's last input state).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def left_pad(t: torch.Tensor, width: int, dim_from_end: int, value: float = 0) -> torch.Tensor:
    """`t` left-padded to `width` along dimension -dim_from_end (no copy when it is that wide already)."""
    n = width - t.shape[-dim_from_end]
    if n == 0:
        return t  # F.pad copies even when it pads nothing
    return F.pad(t, [0, 0] * (dim_from_end - 1) + [n, 0], value=value)


@dataclass
class Prefix:
    """Input-independent part of each row, for G distinct prompts, left-padded to a common length P."""

    embeds: torch.Tensor  # (G, P, d)
    mask: torch.Tensor  # (G, P) 1 = real slot
    pool: torch.Tensor  # (G, P) 1 = a real token (BOS/CLS) that encoder pooling includes; 0 for prompt rows
    lengths: torch.Tensor  # (G,) real slots per prefix
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (G, H, P, dh); causal fast path
    deep: bool = False  # kv holds learned slots (softprompt.deep); an encoder's kv is then wider than the mask
    starts: torch.Tensor | None = None  # (G, P) the first layer at which each slot is a key (late prompts,
    # softprompt.late: L for its slots, 0 for the lead token); None: every slot at every layer
    gap: torch.Tensor | None = None  # (G,) positions skipped between the prefix and the input (a deep student
    # that keeps its teacher's input positions, softprompt.distill); None: 0 for every prompt

    def gaps(self) -> torch.Tensor:
        """(G,) each prompt's position gap (0 where none)."""
        return self.gap if self.gap is not None else torch.zeros_like(self.lengths)

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def detach(self) -> Prefix:
        kv = None if self.kv is None else [(k.detach(), v.detach()) for k, v in self.kv]
        return Prefix(self.embeds.detach(), self.mask, self.pool, self.lengths, kv, self.deep, self.starts, self.gap)

    @staticmethod
    def stack(parts: list[Prefix]) -> Prefix:
        """One Prefix from several (each computed once, e.g. cached per task): left-padded to the widest."""
        width = max(p.width for p in parts)

        kv = None
        deep = any(p.deep for p in parts)
        if all(p.kv is not None for p in parts):
            n_layers = len(parts[0].kv)  # type: ignore[arg-type]
            kv_lens = [int(p.kv[0][0].shape[2]) for p in parts]  # type: ignore[index]
            kv_width = max(kv_lens)  # = width, except for an encoder's deep slots (kv only, no mask columns)
            if deep and len(set(kv_lens)) > 1 and any(n != p.width for n, p in zip(kv_lens, parts)):
                raise ValueError("encoder deep prompts of different lengths cannot share a batch")

            kv = [
                (
                    torch.cat([left_pad(p.kv[i][0], kv_width, 2) for p in parts]),  # type: ignore[index]
                    torch.cat([left_pad(p.kv[i][1], kv_width, 2) for p in parts]),  # type: ignore[index]
                )
                for i in range(n_layers)
            ]
        elif deep:  # its embeddings are placeholders: without keys/values the deep prompt would silently vanish
            raise ValueError("a deep prompt cannot share a batch with a prefix that holds no keys/values")
        starts = None
        if any(p.starts is not None for p in parts):  # a late prompt among them: every other slot starts at layer 0
            starts = torch.cat([left_pad(p.starts if p.starts is not None else torch.zeros_like(p.mask), width, 1)
                                for p in parts])  # fmt: skip
        return Prefix(
            torch.cat([left_pad(p.embeds, width, 2) for p in parts]),
            torch.cat([left_pad(p.mask, width, 1) for p in parts]),
            torch.cat([left_pad(p.pool, width, 1) for p in parts]),
            torch.cat([p.lengths for p in parts]),
            kv,
            deep,
            starts,
            torch.cat([p.gaps() for p in parts]) if any(p.gap is not None for p in parts) else None,
        )

    def only(self, g: int) -> Prefix:
        """Prompt g alone, its left padding dropped (a one-row prefix of exactly its own slots)."""
        n, P = int(self.lengths[g]), self.width
        kv = None if self.kv is None else [(k[g : g + 1, :, P - n :], v[g : g + 1, :, P - n :]) for k, v in self.kv]
        sl = slice(P - n, P)
        starts = None if self.starts is None else self.starts[g : g + 1, sl]
        gap = None if self.gap is None else self.gap[g : g + 1]
        return Prefix(self.embeds[g : g + 1, sl], self.mask[g : g + 1, sl], self.pool[g : g + 1, sl],
                      self.lengths[g : g + 1], kv, self.deep, starts, gap)  # fmt: skip

    def row_starts(self, rows: torch.Tensor) -> torch.Tensor | None:
        """(N, P) the first layer of each row's slots (`starts` of the prompt of each row), or None."""
        return None if self.starts is None else self.starts[rows]

    def nbytes(self) -> int:
        """Memory held by this prefix (embeddings and K/V)."""
        n = self.embeds.numel() * self.embeds.element_size()
        for k, v in self.kv or []:
            n += k.numel() * k.element_size() + v.numel() * v.element_size()
        return n


@dataclass
class Batch:
    """A collated batch. Decoder-only rows are left-padded; encoder rows right-padded."""

    ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T)
    labels: torch.Tensor | None = None  # (B,) class index
    targets: torch.Tensor | None = None  # (B, M) target ids (generate), pad = -100
    target_pos: torch.Tensor | None = None  # (B, M) causal: positions whose hidden state predicts targets[:, j]
    start: tuple[int, torch.Tensor] | None = None  # (l, (B, T, d)) what enters layer l for these rows (a late prompt's
    # training cache, softprompt.late): only layers >= l run (decoder K/V path; multi-token verbalizers recompute)

    def to(self, device: torch.device) -> Batch:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        st = None if self.start is None else (self.start[0], self.start[1].to(device))
        return Batch(self.ids.to(device), self.mask.to(device), mv(self.labels), mv(self.targets), mv(self.target_pos),
                     st)  # fmt: skip


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


# ----- row layout and target tables (pure tensor helpers of PromptedModel's scoring) -------------------------


def pack_rows(
    prefix: Prefix, rows: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded rows [prefix real slots][input tokens]: (N, S, d), attention (N, S), pooling mask (N, S)."""
    pm = prefix.mask[rows].bool()  # (N, P)
    if bool(pm.all()):  # prefixes of one width: [prefix][input, right-padded] is already exact, one cat
        x = torch.cat([prefix.embeds[rows].to(emb.dtype), emb], 1)
        return x, torch.cat([prefix.mask[rows], mask], 1), torch.cat([prefix.pool[rows], mask], 1)
    parts, pools = [], []
    for i in range(emb.shape[0]):
        g = rows[i]
        keep = mask[i].bool()
        parts.append(torch.cat([prefix.embeds[g][pm[i]].to(emb.dtype), emb[i][keep]]))
        pools.append(torch.cat([prefix.pool[g][pm[i]], mask[i][keep]]))
    S = max(p.shape[0] for p in parts)
    x = torch.stack([F.pad(p, (0, 0, 0, S - p.shape[0])) for p in parts])
    attn = torch.stack([F.pad(torch.ones_like(q), (0, S - q.shape[0])) for q in pools])
    pool = torch.stack([F.pad(q, (0, S - q.shape[0])) for q in pools])
    return x, attn, pool


def word_table(words: Sequence[list[int]], device: torch.device) -> torch.Tensor:
    """(L, m) token ids of L words, right-padded with -100."""
    m = max(len(v) for v in words)
    tgt = torch.full((len(words), m), -100, dtype=torch.long, device=device)
    for j, v in enumerate(words):
        tgt[j, : len(v)] = torch.tensor(v)
    return tgt


def mean_target_logp(logp: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Length-normalised log-likelihood of each row's target (ignoring -100): (N,)."""
    valid = tgt != -100
    tok = logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    return (tok * valid).sum(-1) / valid.sum(-1).clamp(min=1)
