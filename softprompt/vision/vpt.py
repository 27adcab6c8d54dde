"""Visual Prompt Tuning (Jia et al. 2022), `--method vpt` (VPT-shallow) and `--method vpt-deep` (VPT-deep).

What is learned: P prompt tokens (d wide) that go between the encoder's own leading tokens and the patches
(softprompt.vision.encoder says exactly where): shallow, at the input of the first layer only; deep, a fresh set at
every layer's input (tokens (L, P, d)). The backbone is frozen; a linear head on the pooled output ([CLS]; SigLIP's
pooled patches) learns with the prompt (softprompt.vision.objective).

Init (--init):
    vpt (default)  uniform(-v, v), v = sqrt(6 / (3 * patch^2 + d)): VPT's code, a Xavier bound whose fan-in is
                   the patch (3 channels x patch x patch pixels) and fan-out the width d
    patches        from patch statistics: each token drawn from N(mean, std) of the patch tokens at the layer
                   input it goes into (per dimension, over the training images given)
    random         uniform(-s, s), s = --init-scale
    file:PATH      the tokens of a saved vpt / vpt-deep prompt (a deep file into vpt: its layer-0 tokens)

Checkpoint (softprompt.checkpoint): `prompt` (P, d) = the layer-0 tokens, a deep prompt's layers 1..L-1 in
`vpt.deep` (L-1, P, d); `head.linear.weight` (C, d), `head.linear.bias` (C,); metadata `method`, `vision`
({family, layers, patch, image_size, hidden, processor}) and the image model's fingerprint.

Training and inference of vpt-deep use the shared key/value path (exact; --naive: the token path).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from softprompt.checkpoint import CheckpointError, PromptCheckpoint, load_prompt
from softprompt.vision.encoder import VisionModel, VisualPrompt

DEEP_KEY = "vpt.deep"
INIT_RULES = ("vpt", "patches", "random")


class InitError(ValueError):
    """A bad --init for an image prompt; the message names the flag."""


def vpt_bound(patch: int, hidden: int) -> float:
    """VPT's init bound: sqrt(6 / (3 * patch^2 + d)) (Xavier uniform with fan-in 3*patch*patch, fan-out d)."""
    return math.sqrt(6.0 / float(3 * patch * patch + hidden))


def init_tokens(
    rule: str,
    vm: VisionModel,
    num_tokens: int,
    *,
    deep: bool,
    seed: int = 0,
    scale: float = 0.5,
    pixels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Initial tokens (L', P, d) float32, L' = L (deep) or 1, following `rule` (module docstring). `pixels`
    (B, 3, H, W): the images whose patch statistics --init patches uses."""
    layers, d = (vm.num_layers if deep else 1), vm.hidden
    gen = torch.Generator().manual_seed(seed)
    rule = rule.strip()
    if rule == "vpt":
        v = vpt_bound(vm.patch, d)
        return (torch.rand(layers, num_tokens, d, generator=gen) * 2 - 1) * v
    if rule == "random":
        return (torch.rand(layers, num_tokens, d, generator=gen) * 2 - 1) * scale
    if rule == "patches":
        if pixels is None or pixels.shape[0] == 0:
            raise InitError("--init patches needs training images")
        ins = vm.layer_inputs(pixels)[:layers]  # L' tensors (B, S+N, d)
        out = []
        for h in ins:
            patches = h[:, vm.special :].reshape(-1, d).float().cpu()  # (B*N, d)
            mean, std = patches.mean(0), patches.std(0)  # (d,)
            out.append(mean + std * torch.randn(num_tokens, d, generator=gen))  # (P, d)
        return torch.stack(out)
    if rule.startswith("file:"):
        ck = load_prompt(rule[5:])
        if ck.meta.get("method") not in ("vpt", "vpt-deep"):
            raise InitError(f"--init {rule}: not a vpt or vpt-deep prompt")
        t = tokens_of(ck)  # (L'', P, d)
        if t.shape[1:] != (num_tokens, d) or (deep and t.shape[0] != layers):
            raise InitError(f"--init {rule}: tokens {tuple(t.shape)} do not fit ({layers}, {num_tokens}, {d})")
        return t[:layers].clone()
    raise InitError(f"--init for an image prompt must be one of {', '.join(INIT_RULES)} or file:PATH, got {rule!r}")


def tokens_of(ckpt: PromptCheckpoint) -> torch.Tensor:
    """The tokens (L', P, d) a vpt / vpt-deep file holds: `prompt` (layer 0) and `vpt.deep` (layers 1..L-1)."""
    first = ckpt.prompt[None]  # (1, P, d)
    rest = ckpt.extra.get(DEEP_KEY)
    return first if rest is None else torch.cat([first, rest], dim=0)


class VPTPrompt(nn.Module):
    """The trained state of a VPT prompt: tokens (L', P, d). Implements softprompt.methods.Trainable, with a
    VisionModel in place of a PromptedModel (an image prompt is tokens in an image encoder, not a text Prefix)."""

    def __init__(self, init: torch.Tensor, *, deep: bool, name: str, kv: bool = True) -> None:
        super().__init__()
        self.tokens = nn.Parameter(init.detach().float().clone())  # (L', P, d)
        self.deep, self.name, self.kv = deep, name, kv

    def trainable(self) -> list[nn.Parameter]:
        return [self.tokens]

    def prefix(self, vm: VisionModel) -> VisualPrompt:
        return VisualPrompt(self.tokens[None], deep=self.deep, kv=self.kv)  # (1, L', P, d)

    def eval_prefix(self, vm: VisionModel) -> VisualPrompt:
        return VisualPrompt(self.tokens.detach()[None], deep=self.deep, kv=self.kv)

    def saved(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        t = self.tokens.detach()
        extra = {DEEP_KEY: t[1:]} if self.deep else {}
        return t[0], extra, {"method": self.name}


class VPTMethod:
    """softprompt.methods.Method for vpt / vpt-deep. `modality` "image": the text commands refuse it."""

    needs_kv = False
    per_row = False
    exports: frozenset[str] = frozenset()  # no PEFT/other format holds a visual prompt
    modality = "image"

    def __init__(self, name: str, deep: bool) -> None:
        self.name, self.deep = name, deep

    def create(self, vm: VisionModel, init: torch.Tensor, cfg: Any, *, kv: bool = True) -> VPTPrompt:
        """The trainable tokens, started from `init` (L', P, d) (init_tokens)."""
        return VPTPrompt(init, deep=self.deep, name=self.name, kv=kv)

    def load_prefix(self, vm: VisionModel, ckpt: PromptCheckpoint, *, kv: bool | None) -> VisualPrompt:
        t = tokens_of(ckpt)
        if self.deep and t.shape[0] != vm.num_layers:
            raise CheckpointError(f"{ckpt.path}: a vpt-deep prompt of {t.shape[0]} layers, this model has "
                                  f"{vm.num_layers}")  # fmt: skip
        return VisualPrompt(t.to(vm.device)[None], deep=self.deep, kv=kv is not False)

    def vectors(self, ckpt: PromptCheckpoint) -> torch.Tensor:
        """(P, L'*d) float64: each slot's tokens over the layers (what prompt similarity compares)."""
        t = tokens_of(ckpt)  # (L', P, d)
        return t.permute(1, 0, 2).reshape(t.shape[1], -1).double()


SHALLOW = VPTMethod("vpt", deep=False)
DEEP = VPTMethod("vpt-deep", deep=True)
METHOD = SHALLOW
