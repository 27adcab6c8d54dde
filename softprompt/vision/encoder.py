"""The image forward path: a frozen Hugging Face ViT-family image encoder with visual prompt tokens inserted.

The only place image prompts meet a model (softprompt.prompted is the text side's). Supported towers: ViT, DeiT,
DINOv2, and the vision towers of CLIP and SigLIP (a full CLIPModel / SiglipModel keeps its text tower for CoOp).

Every encoder layer's input, token path (VPT's own formulation):

    [own S tokens][prompt P][patches N]        (B, S+P+N, d)

- the prompt enters at the input of layer 0: after the embeddings module (patch + position embeddings and [CLS], so
  the prompt gets no position embedding, as VPT does); on CLIP after its `pre_layrnorm`, which is part of how CLIP
  embeds an image (so the first layer sees the prompt tokens exactly as given, on every tower);
- VPT-shallow: the slots then evolve through the layers like any token;
- VPT-deep (token path): the prompt slots of every layer's input are overwritten with that layer's own tokens;
- after the last layer the prompt slots are dropped, so the final norm and the pooling see the model's own layout:
  [CLS] for ViT/DeiT/DINOv2/CLIP; SigLIP has no [CLS] (the prompt goes in front of the patches) and its
  attention-pooling head pools the patch tokens only (the prompt acts through attention, as with [CLS] models).

VPT-deep, shared key/value path (kv=True): a deep prompt slot at layer l holds p_l whatever the image, and its
output is discarded (overwritten at l+1, dropped after the last layer), so its only effect is the keys/values
K_l = k_proj(norm1(p_l)), V_l = v_proj(norm1(p_l)) that the image tokens attend to (every tower here is pre-norm).
This path runs the layers on the image tokens only and lets each attention attend to [K_l ; own keys]: the same
logits as the token path, computed once per prompt instead of per image, with P fewer tokens through every
query, output projection and MLP (bench/vision.py measures it). It goes in through a registered transformers
attention function (`softprompt_vpt`): sdpa with the prompt's keys/values prepended.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ATTN = "softprompt_vpt"  # the transformers attention implementation the vision tower runs with

# model_type -> (leading own tokens S, the layer's pre-attention norm, the layer's attention module)
FAMILIES: dict[str, tuple[int, str, str]] = {
    "vit": (1, "layernorm_before", "attention"),
    "deit": (2, "layernorm_before", "attention"),  # [CLS][DIST]
    "dinov2": (1, "norm1", "attention"),
    "clip": (1, "layer_norm1", "self_attn"),
    "siglip": (0, "layer_norm1", "self_attn"),  # no [CLS]: the prompt goes in front of the patches
}
TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}


class VisionModelError(ValueError):
    """A model that is not a supported image encoder, or an input it cannot take; the message names it."""


@dataclass
class VisualPrompt:
    """What an image prompt inserts: `tokens` (R, L', P, d), R = 1 (one prompt for the batch) or B (one per row),
    L' = 1 (shallow: layer 0 only) or L (deep: one set per layer). kv: a deep prompt runs the shared K/V path."""

    tokens: torch.Tensor
    deep: bool
    kv: bool = True

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[2])


_ACTIVE: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(attention module) -> (K, V) (R, H, P, dh)


def _attention(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, **kw: Any):
    """sdpa, with a deep prompt's keys/values (R, H, P, dh) prepended to the image's own k, v (B, H, N, dh)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kv = _ACTIVE.get(id(module))
    if kv is not None:
        if mask is not None:
            raise VisionModelError("the shared key/value path needs an encoder without an attention mask")
        pk, pv = (t.to(k.dtype).expand(k.shape[0], -1, -1, -1) for t in kv)
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, H, P+N, dh)
    return sdpa_attention_forward(module, q, k, v, mask, **kw)


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN, _attention)


class VisionModel(nn.Module):
    """A frozen image encoder (`model`, a PreTrainedModel) and where its prompts go. `features(pixels, prompt)` is
    the pooled image representation (B, d) a head reads."""

    def __init__(self, model: nn.Module, model_id: str = "", processor: Any = None) -> None:
        super().__init__()
        self.model: Any = model  # a PreTrainedModel (Any: its towers' attributes differ by architecture)
        self.model_id, self.processor = model_id, processor
        cfg: Any = model.config
        mtype = TYPES.get(str(cfg.model_type), str(cfg.model_type))
        if mtype not in FAMILIES:
            raise VisionModelError(
                f"{model_id or type(model).__name__}: model type {cfg.model_type!r} is not a supported image encoder "
                f"(supported: {', '.join(FAMILIES)})"
            )
        self.family = mtype
        self.tower: Any = getattr(model, "vision_model", model)  # CLIPModel/SiglipModel: the vision tower
        vcfg = self.tower.config
        if mtype == "dinov2" and getattr(vcfg, "num_register_tokens", None):
            raise VisionModelError(f"{model_id}: DINOv2 with register tokens is not supported")
        self.special, norm_name, attn_name = FAMILIES[mtype]
        enc = getattr(self.tower, "encoder", self.tower)
        layers = getattr(enc, "layers", None) or getattr(enc, "layer", None)
        if layers is None:
            raise VisionModelError(f"{model_id}: cannot find the encoder layers of {type(self.tower).__name__}")
        self.layers: list[nn.Module] = list(layers)
        self.norms: list[Any] = [getattr(layer, norm_name) for layer in self.layers]
        self.attns: list[Any] = [getattr(layer, attn_name) for layer in self.layers]
        self.hidden = int(vcfg.hidden_size)
        self.heads = int(vcfg.num_attention_heads)
        self.patch = int(vcfg.patch_size)
        self.image_size = int(vcfg.image_size)
        model.requires_grad_(False)
        model.eval()
        _register_attention()
        self.tower.set_attn_implementation(ATTN)  # type: ignore[operator]
        self.tokenizer: Any = None  # a CLIP/SigLIP text tower's (softprompt.vision.coop)
        self._prompt: VisualPrompt | None = None
        self._record: list[torch.Tensor] | None = None
        self._lock = threading.RLock()
        for i, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True)
        self.layers[-1].register_forward_hook(self._post_hook)

    # ---- facts ------------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def text_hidden(self) -> int:
        """The text tower's width (CoOp's context vectors); an image-only model has none."""
        text = getattr(self.model, "text_model", None)
        if text is None:
            raise VisionModelError(f"{self.model_id}: --method coop needs a CLIP or SigLIP model with its text tower "
                                   f"(this is {self.architecture})")  # fmt: skip
        return int(text.config.hidden_size)

    @property
    def architecture(self) -> str:
        return type(self.model).__name__

    def fingerprint(self) -> str:
        """sha256 prefix of the image tower's patch-embedding weights (and a text tower's token embeddings):
        what a prompt file records, so a prompt is never used on another image model by mistake."""
        h = hashlib.sha256()
        emb = self.tower.embeddings  # type: ignore[union-attr]
        patch = getattr(emb, "patch_embeddings", None)
        conv = patch.projection if patch is not None else emb.patch_embedding
        tensors = [conv.weight]
        text = getattr(self.model, "text_model", None)
        if text is not None:
            tensors.append(text.embeddings.token_embedding.weight)
        for t in tensors:
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    # ---- the forward path -------------------------------------------------------------------------------------
    def features(self, pixel_values: torch.Tensor, prompt: VisualPrompt | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, d): [CLS] after the final norm (ViT, DeiT, DINOv2, CLIP's post_layernorm) or
        SigLIP's pooled patches, with `prompt` inserted (None: the model's own forward)."""
        if prompt is not None:
            self._check(prompt, pixel_values.shape[0])
        with self._lock, self._with_prompt(prompt):  # the hooks read this forward's prompt: one forward at a time
            out = self.tower(pixel_values=pixel_values.to(self.device, self._dtype()))
        if self.family in ("vit", "deit"):
            return out.last_hidden_state[:, 0]  # (B, d) [CLS] after the final layernorm
        return out.pooler_output  # (B, d)

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _check(self, prompt: VisualPrompt, batch: int) -> None:
        t = prompt.tokens
        want = self.num_layers if prompt.deep else 1
        if t.ndim != 4 or t.shape[1] != want or t.shape[3] != self.hidden or t.shape[0] not in (1, batch):
            raise VisionModelError(
                f"prompt tokens {tuple(t.shape)} do not fit this encoder: expected (1 or {batch}, {want}, P, "
                f"{self.hidden})"
            )

    @contextmanager
    def _with_prompt(self, prompt: VisualPrompt | None) -> Iterator[None]:
        self._prompt = prompt
        kv = prompt is not None and prompt.deep and prompt.kv
        if kv:
            assert prompt is not None
            for i, attn in enumerate(self.attns):
                _ACTIVE[id(attn)] = self.prompt_kv(prompt.tokens[:, i], i)
        try:
            yield
        finally:
            self._prompt = None
            if kv:
                for attn in self.attns:
                    _ACTIVE.pop(id(attn), None)

    def prompt_kv(self, tokens: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, P, d) prompt tokens of `layer` -> their keys and values (R, H, P, dh): what image tokens attend to."""
        x = self.norms[layer](tokens.to(self._dtype()))  # (R, P, d)
        attn = self.attns[layer]
        r, p = x.shape[:2]
        k = attn.k_proj(x).view(r, p, self.heads, -1).transpose(1, 2)  # (R, H, P, dh)
        v = attn.v_proj(x).view(r, p, self.heads, -1).transpose(1, 2)
        return k, v

    def _pre_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            h = args[0] if args else kwargs["hidden_states"]  # (B, S+N, d) or, deep l >= 1, (B, S+P+N, d)
            if self._record is not None:
                self._record.append(h.detach())
            pr, s = self._prompt, self.special
            if pr is None or (pr.deep and pr.kv) or (i > 0 and not pr.deep):
                return None
            t = pr.tokens[:, i if pr.deep else 0].to(h.dtype).expand(h.shape[0], -1, -1)  # (B, P, d)
            rest = h[:, s:] if i == 0 else h[:, s + t.shape[1] :]  # the patches (B, N, d)
            h = torch.cat([h[:, :s], t, rest], dim=1)  # (B, S+P+N, d)
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        return hook

    def _post_hook(self, module: nn.Module, args: tuple, out: Any) -> Any:
        pr = self._prompt
        if pr is None or (pr.deep and pr.kv):
            return None
        p, s = pr.num_tokens, self.special
        h = out[0] if isinstance(out, tuple) else out  # (B, S+P+N, d)
        h = torch.cat([h[:, :s], h[:, s + p :]], dim=1)  # (B, S+N, d): the prompt slots' outputs are discarded
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def _name(self) -> str:
        return f"{self.architecture} ({self.model_id})" if self.model_id else self.architecture

    @torch.no_grad()
    def check_paths(self) -> float:
        """The load-time guard: a deep prompt gives the same features on the token path and on the shared K/V path
        (two independent ways in: the layers' inputs, and their attention) for a seeded probe image; the relative
        difference, or VisionModelError in one line naming the architecture."""
        g = torch.Generator().manual_seed(0)
        px = torch.randn(1, 3, self.image_size, self.image_size, generator=g)
        t = (torch.randn(1, self.num_layers, 2, self.hidden, generator=g) * 0.5).to(self.device)
        was = self.model.training
        self.model.eval()
        try:
            a = self.features(px, VisualPrompt(t, deep=True, kv=False)).float()
            b = self.features(px, VisualPrompt(t, deep=True, kv=True)).float()
        except Exception as e:  # a forward that crashes on the probe would crash on real images
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise VisionModelError(f"{self._name()}: the prompt paths fail: {msg}") from e
        finally:
            self.model.train(was)
        err = float((a - b).norm() / a.norm().clamp_min(1e-12))
        tol = 1e-4 if self._dtype() == torch.float32 else 2e-2
        if not err <= tol:  # NaN fails too
            raise VisionModelError(
                f"{self._name()}: VPT-deep's key/value path differs from its token path by "
                f"{err:.3g} (relative, allowed {tol:g}); refused (pass --skip-equivalence-check to run it anyway)"
            )
        return err

    @torch.no_grad()
    def layer_inputs(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The input of every encoder layer (L tensors (B, S+N, d)), no prompt: patch statistics for init."""
        self._record = []
        try:
            self.features(pixel_values)
            return self._record
        finally:
            self._record = None


def load_vision_model(
    source: str, *, device: str = "cpu", dtype: str = "float32", progress: bool = False, check: bool = True
) -> VisionModel:
    """A VisionModel from a local directory (a saved model and its image processor) or a hub name (the offline
    cache, or the network where the user has it); errors name the model. check: run VisionModel.check_paths."""
    from transformers import AutoImageProcessor, AutoModel

    from softprompt.models import _progress_bars, resolve_device, resolve_dtype

    try:
        with _progress_bars(progress):
            model = AutoModel.from_pretrained(source, dtype=resolve_dtype(dtype))
    except (OSError, ValueError) as e:
        raise VisionModelError(f"--model {source}: cannot load an image model ({str(e).splitlines()[0]})") from None
    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise VisionModelError(f"--model {source}: no image processor ({str(e).splitlines()[0]})") from None
    model.to(resolve_device(device))
    vm = VisionModel(model, model_id=str(Path(source)) if Path(source).exists() else source, processor=processor)
    if check:
        vm.check_paths()
    if getattr(model, "text_model", None) is not None:  # CLIP / SigLIP: CoOp and zero-shot need the tokenizer
        from transformers import AutoTokenizer

        try:
            vm.tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise VisionModelError(f"--model {source}: no tokenizer ({str(e).splitlines()[0]})") from None
    return vm
