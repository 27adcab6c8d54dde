"""The plain prompt (`--method prompt`, the default): P learned input embeddings in front of the input (Lester et
al. 2021), as a prompt method (softprompt.methods).

Trained: the SoftPrompt tensor (P, d). Prefix: [lead token][P prompt rows], built by PromptedModel.build_prefix
(decoder-only: run once, its per-layer keys/values shared by every row). File: the tensor `prompt` (P, d).

Residual reparameterisation (`--reparam residual`, Residual Prompt Tuning, Razdaibiedina et al. 2023): during
training the prompt is P' = P + LayerNorm(W_up ReLU(W_down P)), one bottleneck MLP (d -> --reparam-hidden -> d)
shared by every token, applied to each row. The LayerNorm's gain starts at 0, so step 0 runs exactly the --init
prompt (ReZero-style; the paper's LayerNorm starts at gain 1). At save the MLP is folded away: the file holds P'
as an ordinary prompt (metadata `reparam: residual`), served at no extra cost; the training state (--resume)
keeps P and the MLP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from softprompt.checkpoint import PromptCheckpoint
from softprompt.config import PromptConfig
from softprompt.methods import MethodError
from softprompt.prefix import Prefix
from softprompt.prompt import SoftPrompt
from softprompt.prompted import PromptedModel


class ResidualReparam(nn.Module):
    """p (P, d) -> p + LayerNorm(up(relu(down(p)))), row by row; the identity at start (LayerNorm gain 0)."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Linear(d, hidden)
        self.up = nn.Linear(hidden, d)
        self.norm = nn.LayerNorm(d)
        nn.init.zeros_(self.norm.weight)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return p + self.norm(self.up(F.relu(self.down(p))))


class PlainPrompt(nn.Module):
    """The trainable prompt (P, d), optionally produced by a residual reparameterisation while training."""

    def __init__(self, init: torch.Tensor, *, reparam: str = "none", hidden: int = 0) -> None:
        super().__init__()
        self.soft = SoftPrompt(int(init.shape[0]), int(init.shape[1]))
        with torch.no_grad():
            self.soft.embedding.copy_(init)
        if reparam not in ("none", "residual"):
            raise MethodError(f"--reparam must be none or residual, got {reparam!r}")
        if reparam == "residual" and hidden < 1:
            raise MethodError(f"--reparam residual needs --reparam-hidden >= 1, got {hidden}")
        self.reparam = ResidualReparam(int(init.shape[1]), hidden) if reparam == "residual" else None

    @property
    def embedding(self) -> nn.Parameter:
        return self.soft.embedding

    def forward(self) -> torch.Tensor:
        """The prompt the model sees (P, d)."""
        p = self.soft()
        return p if self.reparam is None else self.reparam(p)

    def trainable(self) -> list[nn.Parameter]:
        return [self.soft.embedding] + ([] if self.reparam is None else list(self.reparam.parameters()))

    def prefix(self, pm: PromptedModel) -> Prefix:
        return pm.build_prefix([self()])

    @torch.no_grad()
    def eval_prefix(self, pm: PromptedModel) -> Prefix:
        return pm.build_prefix([self().detach()])

    def saved(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        if self.reparam is None:
            return self.soft.embedding, {}, {"method": "prompt"}
        with torch.no_grad():  # folded: the file is an ordinary prompt
            return self().detach(), {}, {"method": "prompt", "reparam": "residual"}


class _Plain:
    name = "prompt"
    needs_kv = False
    per_row = False
    exports = frozenset({"peft", "prompt-table"})

    def create(self, pm: PromptedModel, init: torch.Tensor, cfg: PromptConfig) -> PlainPrompt:
        return PlainPrompt(init, reparam=cfg.reparam, hidden=cfg.reparam_hidden).to(pm.backbone.device)

    def load_prefix(self, pm: PromptedModel, ckpt: PromptCheckpoint, *, kv: bool | None) -> Prefix:
        # (kv only changes a decoder's prefix; Prefix.stack refuses an encoder batch mixing K/V slots and none)
        return pm.build_prefix([ckpt.prompt.to(pm.backbone.device)], kv=kv)

    def vectors(self, ckpt: PromptCheckpoint) -> torch.Tensor:
        return ckpt.prompt.double()


METHOD = _Plain()
