"""What goes in front of the inputs, and the inputs: the data of softprompt's forward path (softprompt.prompted).

Notation: G distinct prompts, P prefix slots (left-padded to the widest), N rows, T tokens, d embedding width,
H key/value heads, dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def detach(self) -> Prefix:
        kv = None if self.kv is None else [(k.detach(), v.detach()) for k, v in self.kv]
        return Prefix(self.embeds.detach(), self.mask, self.pool, self.lengths, kv, self.deep)

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
        return Prefix(
            torch.cat([left_pad(p.embeds, width, 2) for p in parts]),
            torch.cat([left_pad(p.mask, width, 1) for p in parts]),
            torch.cat([left_pad(p.pool, width, 1) for p in parts]),
            torch.cat([p.lengths for p in parts]),
            kv,
            deep,
        )

    def only(self, g: int) -> Prefix:
        """Prompt g alone, its left padding dropped (a one-row prefix of exactly its own slots)."""
        n, P = int(self.lengths[g]), self.width
        kv = None if self.kv is None else [(k[g : g + 1, :, P - n :], v[g : g + 1, :, P - n :]) for k, v in self.kv]
        sl = slice(P - n, P)
        return Prefix(self.embeds[g : g + 1, sl], self.mask[g : g + 1, sl], self.pool[g : g + 1, sl],
                      self.lengths[g : g + 1], kv, self.deep)  # fmt: skip

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

    def to(self, device: torch.device) -> Batch:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Batch(self.ids.to(device), self.mask.to(device), mv(self.labels), mv(self.targets), mv(self.target_pos))
