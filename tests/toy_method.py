"""A prompt method written the way a new one is (softprompt.methods): this file plus one REGISTRY line.

`gain`: a plain prompt times one learned scalar g, prefix [lead][g * prompt]; its file holds the prompt and
`gain.value` (1,). Used by tests/test_methods.py only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from softprompt.prompted import PromptedModel


class GainPrompt(nn.Module):
    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.embedding = nn.Parameter(init.detach().clone().float())
        self.gain = nn.Parameter(torch.ones(1))

    def trainable(self) -> list[nn.Parameter]:
        return [self.embedding, self.gain]

    def prefix(self, pm: PromptedModel):
        return pm.build_prefix([self.embedding * self.gain])

    @torch.no_grad()
    def eval_prefix(self, pm: PromptedModel):
        return pm.build_prefix([(self.embedding * self.gain).detach()])

    def saved(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        return self.embedding, {"gain.value": self.gain.detach()}, {"method": "gain"}


class _Gain:
    name = "gain"
    needs_kv = False
    per_row = False
    exports: frozenset[str] = frozenset()

    def create(self, pm: PromptedModel, init: torch.Tensor, cfg: Any) -> GainPrompt:
        return GainPrompt(init).to(pm.backbone.device)

    def load_prefix(self, pm: PromptedModel, ckpt: Any, *, kv: bool | None):
        return pm.build_prefix([ckpt.prompt * ckpt.extra["gain.value"]], kv=kv)

    def vectors(self, ckpt: Any) -> torch.Tensor:
        return (ckpt.prompt * ckpt.extra["gain.value"]).double()


METHOD = _Gain()
