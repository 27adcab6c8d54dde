"""The plain prompt (`--method prompt`, the default): P learned input embeddings in front of the input (Lester et
al. 2021), as a prompt method (softprompt.methods).

Trained: the SoftPrompt tensor (P, d). Prefix: [lead token][P prompt rows], built by PromptedModel.build_prefix
(decoder-only: run once, its per-layer keys/values shared by every row). File: the tensor `prompt` (P, d).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from softprompt.checkpoint import PromptCheckpoint
from softprompt.config import PromptConfig
from softprompt.prefix import Prefix
from softprompt.prompt import SoftPrompt
from softprompt.prompted import PromptedModel


class PlainPrompt(nn.Module):
    """The trainable prompt (P, d)."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.soft = SoftPrompt(int(init.shape[0]), int(init.shape[1]))
        with torch.no_grad():
            self.soft.embedding.copy_(init)

    @property
    def embedding(self) -> nn.Parameter:
        return self.soft.embedding

    def trainable(self) -> list[nn.Parameter]:
        return [self.soft.embedding]

    def prefix(self, pm: PromptedModel) -> Prefix:
        return pm.build_prefix([self.soft()])

    @torch.no_grad()
    def eval_prefix(self, pm: PromptedModel) -> Prefix:
        return pm.build_prefix([self.soft.embedding.detach()])

    def saved(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        return self.soft.embedding, {}, {"method": "prompt"}


class _Plain:
    name = "prompt"
    needs_kv = False
    per_row = False
    exports = frozenset({"peft", "prompt-table"})

    def create(self, pm: PromptedModel, init: torch.Tensor, cfg: PromptConfig) -> PlainPrompt:
        return PlainPrompt(init).to(pm.backbone.device)

    def load_prefix(self, pm: PromptedModel, ckpt: PromptCheckpoint, *, kv: bool | None) -> Prefix:
        # (kv only changes a decoder's prefix; Prefix.stack refuses an encoder batch mixing K/V slots and none)
        return pm.build_prefix([ckpt.prompt.to(pm.backbone.device)], kv=kv)

    def vectors(self, ckpt: PromptCheckpoint) -> torch.Tensor:
        return ckpt.prompt.double()


METHOD = _Plain()
