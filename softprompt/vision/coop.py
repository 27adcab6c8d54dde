"""CoOp (Zhou et al. 2022, "Learning to Prompt for Vision-Language Models"), `--method coop`, and zero-shot CLIP.

What is learned: M context vectors (d_text wide) that replace the words of a hand-written template in front of
each class name, in the text encoder of a CLIP or SigLIP model:

    [SOS][V1 .. VM][CLASS].[EOS]         (C, T, d_text): the token embeddings, before the position embeddings

The class prompts are tokenised once as "X X .. X {class}." (CoOp's placeholder words); a forward hook on the text
tower's token-embedding module writes the context vectors over the M placeholder slots, so everything after it
is the model's own: position embeddings, CLIP's causal mask and pooling at the first [EOS], SigLIP's pooling of the
last position (its text is padded to max_position_embeddings without a mask, as SigLIP is trained), the
projection. Shared context (1, M, d) or class-specific (--class-specific: (C, M, d)). Both towers are frozen.

Scoring, as the model's own logits_per_image: logits = exp(logit_scale) * cos(image features, class text
features) (+ logit_bias, SigLIP), image features = get_image_features (the frozen image tower and projection).
The class text features depend only on the context and the class list: a loaded prompt computes them once
(`CoOpScorer.text_features`, cached per class set) and every image after that costs one image forward.

Zero-shot (the baseline): the same scoring with the class texts `--template` ("a photo of a {}.") filled in and no
context (`zero_shot_logits`); a coop run reports it on --eval before training.

Init (--init): normal (default; CoOp's N(0, 0.02^2)), random (uniform +-(--init-scale)), text:PHRASE (the token
embeddings of PHRASE, CoOp's ctx_init, e.g. text:"a photo of a": M must equal its token count).

Checkpoint: `prompt` = the context rows (M, d_text), class-specific (C*M, d_text) class-major; metadata
coop {context_tokens, class_specific}, the classes (labels), head "cosine". Notation: C classes, M context
tokens, T text tokens, d_text text width, B images, D the joint embedding width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from softprompt.checkpoint import PromptCheckpoint
from softprompt.vision.encoder import VisionModel, VisionModelError

PLACEHOLDER = "X"  # CoOp's placeholder word for the context slots
DEFAULT_TEMPLATE = "a photo of a {}."


def _pooled(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5: an output object


def _tokenize(vm: VisionModel, texts: list[str]) -> dict[str, torch.Tensor]:
    """The model's own text inputs: SigLIP padded to max_position_embeddings without a mask, CLIP to the longest."""
    tok = vm.tokenizer
    if tok is None:
        vm.text_hidden()  # raises: no text tower
        raise VisionModelError(f"{vm.model_id}: no tokenizer saved with the model (CoOp and zero-shot need it)")
    if vm.family == "siglip":
        n = int(vm.model.text_model.config.max_position_embeddings)
        enc = tok(texts, padding="max_length", max_length=n, truncation=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(vm.device)}
    enc = tok(texts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"].to(vm.device), "attention_mask": enc["attention_mask"].to(vm.device)}


def image_features(vm: VisionModel, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, D) L2-normalised image features of the model's own image tower and projection."""
    with torch.no_grad():
        f = _pooled(vm.model.get_image_features(pixel_values=pixels.to(vm.device)))
    return f / f.norm(dim=-1, keepdim=True)


def scale_logits(vm: VisionModel, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """(B, D), (C, D) normalised -> (B, C): exp(logit_scale) * cos (+ SigLIP's logit_bias), as logits_per_image."""
    logits = vm.model.logit_scale.exp() * img @ txt.t().to(img.dtype)
    bias = getattr(vm.model, "logit_bias", None)
    return logits + bias if bias is not None else logits


def text_features(vm: VisionModel, texts: list[str], context: torch.Tensor | None = None,
                  slots: tuple[int, int] | None = None) -> torch.Tensor:  # fmt: skip
    """(C,) class texts -> (C, D) L2-normalised text features; `context` (1 or C, M, d_text) written over the token
    embeddings of positions slots[0]..slots[1]-1 (the placeholders) by a hook on the token-embedding module."""
    inputs = _tokenize(vm, texts)
    emb = vm.model.text_model.embeddings.token_embedding
    handle = None
    if context is not None:
        assert slots is not None
        a, b = slots

        def write(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:  # out (C, T, d_text)
            ctx = context.to(out.dtype).expand(out.shape[0], -1, -1)  # (C, M, d_text)
            return torch.cat([out[:, :a], ctx, out[:, b:]], dim=1)

        handle = emb.register_forward_hook(write)
    try:
        f = _pooled(vm.model.get_text_features(**inputs))
    finally:
        if handle is not None:
            handle.remove()
    return f / f.norm(dim=-1, keepdim=True)


def placeholder_slots(vm: VisionModel, classes: list[str], m: int) -> tuple[list[str], tuple[int, int]]:
    """The class prompts "X X .. X {class}." and the positions [a, a+M) of the M placeholders (the same in every
    class prompt: they follow the tokenizer's own start tokens)."""
    texts = [" ".join([PLACEHOLDER] * m) + f" {c}." for c in classes]
    ids = _tokenize(vm, texts)["input_ids"]
    x = vm.tokenizer(PLACEHOLDER, add_special_tokens=False)["input_ids"]
    if len(x) != 1:
        raise VisionModelError(f"{vm.model_id}: the placeholder {PLACEHOLDER!r} is not one token for its tokenizer")
    row = ids[0].tolist()
    a = row.index(x[0])
    if not all(r[a : a + m].tolist() == x * m for r in ids):
        raise VisionModelError(f"{vm.model_id}: the {m} context slots do not tokenise to {m} placeholders")
    return texts, (a, a + m)


class CoOpPrompt(nn.Module):
    """The trained state of a CoOp prompt: context (1 or C, M, d_text) for `classes`. Scores images itself
    (logits) instead of producing a prefix: its prompt lives in the text tower, read against image features."""

    def __init__(self, init: torch.Tensor, classes: list[str], *, class_specific: bool, name: str = "coop") -> None:
        super().__init__()
        self.context = nn.Parameter(init.detach().float().clone())  # (1 or C, M, d_text)
        self.classes, self.class_specific, self.name = list(classes), class_specific, name
        self._cache: tuple[tuple[str, ...], torch.Tensor] | None = None  # (classes, (C, D)) of a frozen context

    def trainable(self) -> list[nn.Parameter]:
        return [self.context]

    def prefix(self, vm: VisionModel) -> torch.Tensor:
        return self.context

    def eval_prefix(self, vm: VisionModel) -> torch.Tensor:
        return self.context.detach()

    def text_features(self, vm: VisionModel, *, grad: bool) -> torch.Tensor:
        """(C, D) class text features; without grad computed once per context and class set (cached)."""
        key = tuple(self.classes)
        if not grad and self._cache is not None and self._cache[0] == key and not self.training_context:
            return self._cache[1]
        texts, slots = placeholder_slots(vm, self.classes, self.context.shape[1])
        with torch.set_grad_enabled(grad):
            f = text_features(vm, texts, self.context if grad else self.context.detach(), slots)
        if not grad and not self.training_context:
            self._cache = (key, f)
        return f

    @property
    def training_context(self) -> bool:
        return self.context.requires_grad  # a context that trains changes every step: never cached

    def logits(self, vm: VisionModel, pixels: torch.Tensor, *, grad: bool = True) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C)."""
        return self.score(vm, image_features(vm, pixels), grad=grad)

    def score(self, vm: VisionModel, img: torch.Tensor, *, grad: bool = True) -> torch.Tensor:
        """(B, D) normalised image features -> (B, C): what training reads, the frozen image tower's features
        being computed once per image (softprompt.vision.objective)."""
        return scale_logits(vm, img.to(vm.device), self.text_features(vm, grad=grad))

    def saved(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        c = self.context.detach()
        meta = {"method": self.name, "coop": {"context_tokens": int(c.shape[1]), "class_specific": self.class_specific}}
        return c.reshape(-1, c.shape[2]), {}, meta  # (R*M, d_text)


class CoOpMethod:
    """softprompt.methods.Method for coop (`modality` "image": the text commands refuse it)."""

    name = "coop"
    needs_kv = False
    per_row = False
    exports: frozenset[str] = frozenset()
    modality = "image"

    def create(self, vm: VisionModel, init: torch.Tensor, cfg: Any, *, classes: list[str],
               template: str = DEFAULT_TEMPLATE) -> CoOpPrompt:  # fmt: skip
        """The context vectors, started from `init` (1 or C, M, d_text) (init_context)."""
        return CoOpPrompt(init, classes, class_specific=bool(cfg.class_specific))

    def load_prefix(self, vm: VisionModel, ckpt: PromptCheckpoint, *, kv: bool | None) -> torch.Tensor:
        """The saved context (1 or C, M, d_text)."""
        m = int(ckpt.meta["coop"]["context_tokens"])
        return ckpt.prompt.reshape(-1, m, ckpt.prompt.shape[1]).to(vm.device)

    def vectors(self, ckpt: PromptCheckpoint) -> torch.Tensor:
        return ckpt.prompt.double()


METHOD = CoOpMethod()


def init_context(rule: str, vm: VisionModel, cfg: Any, n_classes: int, *, seed: int = 0) -> torch.Tensor:
    """(1 or C, M, d_text) initial context following `rule` (module docstring)."""
    m, d = int(cfg.context_tokens), vm.text_hidden()
    r = n_classes if cfg.class_specific else 1
    gen = torch.Generator().manual_seed(seed)
    rule = rule.strip()
    if rule == "normal":
        return torch.randn(r, m, d, generator=gen) * 0.02
    if rule == "random":
        return (torch.rand(r, m, d, generator=gen) * 2 - 1) * float(cfg.init_scale)
    if rule.startswith("text:"):
        phrase = rule[5:].strip().strip('"')
        ids = vm.tokenizer(phrase, add_special_tokens=False)["input_ids"]
        if len(ids) != m:
            raise VisionModelError(f"--init {rule}: {len(ids)} tokens; pass --context-tokens {len(ids)}")
        with torch.no_grad():
            e = vm.model.text_model.embeddings.token_embedding(torch.tensor(ids, device=vm.device)).float().cpu()
        return e[None].expand(r, -1, -1).clone()
    raise VisionModelError(f"--init for --method coop must be normal, random or text:PHRASE, got {rule!r}")


def zero_shot_logits(vm: VisionModel, classes: list[str], template: str, pixels: torch.Tensor) -> torch.Tensor:
    """(B, C) zero-shot logits: the class texts `template` filled in ("{}" = the class name), no context."""
    tpl = template if "{}" in template else DEFAULT_TEMPLATE
    with torch.no_grad():
        txt = text_features(vm, [tpl.format(c) for c in classes])
        return scale_logits(vm, image_features(vm, pixels), txt)


def saved_scorer(vm: VisionModel, ckpt: PromptCheckpoint, classes: list[str]) -> CoOpPrompt:
    """A loaded coop prompt, frozen: its class text features are computed once, on first use."""
    ctx = METHOD.load_prefix(vm, ckpt, kv=None)
    p = CoOpPrompt(ctx, classes, class_specific=bool(ckpt.meta["coop"].get("class_specific")))
    p.requires_grad_(False)
    return p.to(vm.device)
