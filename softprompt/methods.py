"""Prompt methods: what a method trains, how it becomes a Prefix, how it is saved, loaded, compared and exported.

A method is one module that defines `METHOD` (the `Method` protocol below), plus its line in REGISTRY. Training
(softprompt.train, softprompt.trainer), evaluation, prediction, generation, ensembles, transfer similarity and
serving reach every method through `get` / `of` and `checkpoint_prefix`; no other module names a method.

  prompt       softprompt.prompt       input-embedding soft prompt (Lester et al. 2021)
  deep         softprompt.deep         learned keys/values at every layer (prefix tuning, P-tuning v2)
  routed       softprompt.routed       K prompts and a router: each input runs under one of them (SMoP-style)
  conditioned  softprompt.conditioned  a shared prompt plus a low-rank part generated from the input
  late         softprompt.late         hidden states entering at layer --layer (late prompt tuning)
  vpt, vpt-deep, coop   softprompt.vision   image prompts (VPT-shallow/-deep, CoOp): IMAGE_METHODS below

Input-dependent methods (`per_row`: routed, conditioned) add `Trainable.row_prefix` and `Method.rows`: a batch's
Prefix plus each row's entry in it (softprompt.dynamic, which every consumer goes through for them).

Image methods (IMAGE_METHODS, `--task image-classify`) implement the same protocol with one difference: where a
text method takes a PromptedModel and returns a Prefix (input embeddings or per-layer keys/values of a token
sequence), an image method takes a softprompt.vision VisionModel and returns what it inserts into the image encoder
(VPT: tokens between [CLS] and the patches) or into the text encoder's class prompts (CoOp). A text Prefix cannot
express either: there is no token sequence of the user's for it to precede. Their METHOD objects carry
`modality = "image"`; the text commands refuse them and the image commands (softprompt.vision) refuse the others.
A REGISTRY value may name the object as "module:ATTR" (default ATTR: METHOD).

This module imports no torch at import time (the CLI parser and the config validation read REGISTRY).

Notation: P prompt slots, d embedding width, L layers, H key/value heads, dh head dim.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from softprompt.checkpoint import PromptCheckpoint
    from softprompt.config import PromptConfig
    from softprompt.prefix import Prefix
    from softprompt.prompted import PromptedModel

REGISTRY: dict[str, str] = {  # name -> module with METHOD (or "module:ATTR")
    "prompt": "softprompt.prompt",
    "deep": "softprompt.deep",
    "routed": "softprompt.routed",
    "conditioned": "softprompt.conditioned",
    "late": "softprompt.late",
    "vpt": "softprompt.vision.vpt:SHALLOW",
    "vpt-deep": "softprompt.vision.vpt:DEEP",
    "coop": "softprompt.vision.coop:METHOD",
}
IMAGE_METHODS = frozenset({"vpt", "vpt-deep", "coop"})  # prompts of image models (softprompt.vision)


class Trainable(Protocol):
    """The trained state of one prompt (an nn.Module): its tensors, its prefix, what its file holds."""

    def trainable(self) -> list[nn.Parameter]:
        """What the optimiser updates (and --resume restores), in a fixed order."""
        ...

    def prefix(self, pm: PromptedModel) -> Prefix:
        """The prefix for a training step; gradients flow back to the trainable tensors."""
        ...

    def eval_prefix(self, pm: PromptedModel) -> Prefix:
        """The same prefix without gradients (evaluation)."""
        ...

    def saved(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        """What a prompt file holds: the `prompt` tensor (P, d), other tensors, metadata (`method` included)."""
        ...

    # per_row methods only, instead of prefix / eval_prefix (softprompt.dynamic.step_prefix calls it):
    # def row_prefix(self, pm, ids (N, T), mask (N, T), *, train: bool) -> softprompt.dynamic.RowPrefix
    #     the batch's Prefix and each row's entry; train=True: gradients flow (and RowPrefix.aux, an extra loss term)
    # Optional: start_states(pm, prefix, batch, label_ids, head) -> Batch.start or None: a training step's cached
    # hidden states entering some layer (softprompt.late; PromptObjective.loss calls it where it exists).


class Method(Protocol):
    name: str
    needs_kv: bool  # its prefixes are per-layer keys/values: prompts sharing a batch with it must build K/V too
    per_row: bool  # the prefix depends on the input (built per row), not once per prompt
    exports: frozenset[str]  # the `softprompt export --to` formats that can hold it

    def create(self, pm: PromptedModel, init: torch.Tensor, cfg: PromptConfig) -> Trainable:
        """The trainable state, started from the --init embeddings `init` (P, d)."""
        ...

    def load_prefix(self, pm: PromptedModel, ckpt: PromptCheckpoint, *, kv: bool | None) -> Prefix:
        """The prefix of a saved prompt. kv: True builds per-layer keys/values, False concatenates (the PEFT way),
        None takes the PromptedModel's path; a method whose prefix is keys/values ignores it."""
        ...

    def vectors(self, ckpt: PromptCheckpoint) -> torch.Tensor:
        """(P, features) float64: what prompt-transfer similarity compares (softprompt.transfer)."""
        ...

    # per_row methods only (load_prefix gives their input-independent entries: the K routes; none when conditioned):
    # def rows(self, pm, ckpt, ids (n, T), mask (n, T), *, kv: bool) -> tuple[Prefix | None, Tensor (n,)]
    #     (None, r): row i runs under entry r[i] of load_prefix's Prefix (routed); (extra, r): under entry r[i] of
    #     `extra`, a Prefix built for these rows (conditioned; kv: with per-layer keys/values, to join a K/V batch)


class MethodError(ValueError):
    """An unknown method, or an operation a method does not support; the message names the file or flag."""


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise MethodError(f"--method must be one of {', '.join(REGISTRY)}, got {name!r}")
    module, _, attr = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), attr or "METHOD")  # type: ignore[no-any-return]


def of(ckpt: PromptCheckpoint) -> Method:
    """The method a prompt file was trained with (metadata `method`; files before methods existed: prompt)."""
    name = str(ckpt.meta.get("method") or "prompt")
    if name not in REGISTRY:
        raise MethodError(f"{ckpt.path}: unknown method {name!r} in its metadata")
    return get(name)


def checkpoint_prefix(pm: PromptedModel, ckpts: Sequence[PromptCheckpoint], *, kv: bool | None = None) -> Prefix:
    """One Prefix for several saved prompts (any methods), one prompt per file, in order: an ensemble, or the
    tasks of a mixed batch. Where any of them holds per-layer keys/values, all are built with keys/values; else
    `kv` as in Method.load_prefix."""
    from softprompt.prefix import Prefix

    ms = [of(c) for c in ckpts]
    for m, c in zip(ms, ckpts, strict=True):
        if m.per_row:  # its Prefix alone would run every row under its first entry
            raise MethodError(f"{c.path}: a {m.name} prompt depends on the input (use checkpoint_prompts)")
    kv = True if any(m.needs_kv for m in ms) else kv
    parts = [m.load_prefix(pm, c, kv=kv) for m, c in zip(ms, ckpts, strict=True)]
    return parts[0] if len(parts) == 1 else Prefix.stack(parts)


def checkpoint_prompts(pm: PromptedModel, ckpts: Sequence[PromptCheckpoint], *, kv: bool | None = None) -> Any:
    """checkpoint_prefix's Prefix when every prompt is static; else a softprompt.dynamic.PromptSet, the prefix
    source class_probs calls per batch (input-dependent prompts need the batch's inputs)."""
    if not any(of(c).per_row for c in ckpts):
        return checkpoint_prefix(pm, ckpts, kv=kv).detach()
    from softprompt.dynamic import PromptSet

    return PromptSet(pm, ckpts, kv=kv)


def check_export(ckpt: PromptCheckpoint, fmt: str) -> None:
    """Refuse to export a prompt whose method the format cannot hold (naming the file, the method and the format)."""
    m = of(ckpt)
    if fmt not in m.exports:
        can = ", ".join(sorted(m.exports)) or "none"
        raise MethodError(f"{ckpt.path}: a {m.name} prompt cannot be exported to {fmt} (formats for {m.name}: {can})")
