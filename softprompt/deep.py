"""Deep prompts (`--method deep`): learned keys/values at every layer (prefix tuning, Li & Liang 2021; P-tuning v2,
Liu et al. 2022) instead of an input-embedding prompt.

What is learned: for each of the L layers, P key vectors and P value vectors per key/value head, a tensor
kv (L, 2, H_kv, P, dh). Every query of the input attends to these P extra slots at every layer, in addition to the
input (and the BOS/CLS lead token). A plain prompt of P tokens only sets the layer-0 input; its keys/values at the
layers above are computed from it, so they are a function of P*d numbers. A deep prompt sets them all freely:
L*2*H_kv*dh numbers per token (smollm2-135m: 30*2*3*64 = 11,520 per token against 576).

Initialisation: the keys/values that the model computes for the plain prompt given by --init (vocab, text:,
labels, file:). A deep prompt therefore starts out computing exactly what a plain prompt with the same --init
computes, and training moves from there (Li & Liang found initialising from real words' activations helps).

Reparameterisation (--deep-reparam H > 0): during training kv = kv0 + MLP(E), where E (P, d) starts as the --init
embeddings, MLP = Linear(d, H) -> tanh -> Linear(H, L*2*H_kv*dh) with its last layer zero-initialised (so training
starts at kv0 as above), and kv0 is the fixed initial kv. Li & Liang report the MLP stabilises training. At save only
kv is written (the MLP is dropped); the training state (--resume) keeps E, the MLP and kv0.

Checkpoint: an ordinary prompt file with `method: deep`, an empty `prompt` (0, d), and
    deep.keys   (L, H_kv, P, dh)   keys of every layer, as the model's cache stores them (after rotary embeddings)
    deep.values (L, H_kv, P, dh)
plus `deep` metadata {layers, kv_heads, head_dim, tokens, reparam}. Predictor/eval/predict/generate/ensembles
serve it like any prompt (softprompt.deep.checkpoint_prefix builds its Prefix).

Decoder-only models: the deep slots go into the shared-prefix cache (PromptedModel.build_deep_prefix), so a deep
prompt costs the same at inference as a plain prompt of P tokens. Layout: [BOS][P deep slots][input]; positions of
the input continue after the P slots, as for a plain prompt. With --position start (no BOS in front) this is exactly
what PEFT's PrefixTuningConfig computes given the same key/value values (tests/test_deep.py).

Encoder models (BERT, minilm-l6): the P slots are handed to every self-attention layer as a cache (the model's own
mechanism for extra keys/values), with an attention mask that includes them; [CLS] and the input keep the positions
that follow the P slots, as PEFT does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from softprompt.checkpoint import CheckpointError, PromptCheckpoint
from softprompt.prompted import Prefix, PromptedModel

DEEP_KEYS = ("deep.keys", "deep.values")


# ---- geometry ---------------------------------------------------------------------------------------------------
def geometry(pm: PromptedModel) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the backbone's attention caches."""
    if pm.family == "causal":  # read it off the model's own cache: right for GQA, odd head dims, any architecture
        e = pm.embed(torch.zeros(1, 1, dtype=torch.long, device=pm.backbone.device))[0]
        with torch.no_grad():
            kv = pm.build_prefix([e], kv=True).kv
        assert kv is not None
        return len(kv), int(kv[0][0].shape[1]), int(kv[0][0].shape[3])
    if pm.family == "encoder":
        layers, attn = encoder_attention(pm)
        a = attn[0]
        return len(layers), int(a.num_attention_heads), int(a.attention_head_size)
    raise ValueError("--method deep: supported for decoder-only and encoder models, not encoder-decoder")


def encoder_attention(pm: PromptedModel) -> tuple[list[nn.Module], list[Any]]:
    """The encoder's layers and their self-attention modules (BERT-style: layer.attention.self)."""
    model = pm.model
    enc = getattr(model, "encoder", None)
    layers = list(getattr(enc, "layer", []) or [])
    attn = [getattr(getattr(layer, "attention", None), "self", None) for layer in layers]
    if not layers or any(a is None or not hasattr(a, "attention_head_size") for a in attn):
        raise ValueError(
            f"--method deep: {type(model).__name__} is not a BERT-style encoder (encoder.layer[i]"
            ".attention.self); deep prompts support BERT-family encoders"
        )
    return layers, attn


# ---- the trainable module ---------------------------------------------------------------------------------------
class DeepPrompt(nn.Module):
    """kv (L, 2, H_kv, P, dh): a parameter, or kv0 + MLP(E) with --deep-reparam."""

    def __init__(
        self, kv0: torch.Tensor, *, reparam: int = 0, embeds: torch.Tensor | None = None, embed_dim: int = 0
    ) -> None:
        super().__init__()
        self.shape = tuple(kv0.shape)
        self.reparam = reparam
        self.gap = 0  # positions skipped before the input (set by softprompt.distill --student-positions teacher)
        self.embed_dim = embed_dim or (int(embeds.shape[1]) if embeds is not None else 0)  # of the empty `prompt`
        if reparam <= 0:
            self.kv = nn.Parameter(kv0.detach().float().clone())
            return
        if embeds is None:
            raise ValueError("DeepPrompt: the reparameterisation needs initial embeddings")
        L, two, H, P, dh = self.shape
        self.kv0 = nn.Parameter(kv0.detach().float().clone(), requires_grad=False)  # in the training state, fixed
        self.embedding = nn.Parameter(embeds.detach().float().clone())
        d = self.embedding.shape[1]
        last = nn.Linear(reparam, L * two * H * dh)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(nn.Linear(d, reparam), nn.Tanh(), last)

    @property
    def num_tokens(self) -> int:
        return int(self.shape[3])

    def forward(self) -> torch.Tensor:
        """kv (L, 2, H_kv, P, dh)."""
        if self.reparam <= 0:
            return self.kv
        L, two, H, P, dh = self.shape
        delta = self.mlp(self.embedding).view(P, L, two, H, dh).permute(1, 2, 3, 0, 4)
        return self.kv0 + delta

    def trainable(self) -> list[nn.Parameter]:
        """What the optimiser updates, kv0 included last when reparameterised (no gradient: kept for --resume)."""
        if self.reparam <= 0:
            return [self.kv]
        return [self.embedding, *self.mlp.parameters(), self.kv0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint tensors: deep.keys and deep.values (L, H_kv, P, dh); the MLP is not saved."""
        kv = self().detach()
        return {"deep.keys": kv[:, 0], "deep.values": kv[:, 1]}

    def meta(self) -> dict[str, Any]:
        L, _, H, P, dh = self.shape
        deep = {"layers": L, "kv_heads": H, "head_dim": dh, "tokens": P, "reparam": self.reparam}
        return {"method": "deep", "deep": {**deep, **({"position_gap": self.gap} if self.gap else {})}}

    def saved(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        """An empty input prompt (0, d), the per-layer keys/values as deep.keys / deep.values, the deep metadata."""
        return torch.zeros(0, self.embed_dim), self.tensors(), self.meta()

    def prefix(self, pm: PromptedModel) -> Prefix:
        return deep_prefix(pm, self(), self.gap)

    @torch.no_grad()
    def eval_prefix(self, pm: PromptedModel) -> Prefix:
        return deep_prefix(pm, self(), self.gap).detach()


def initial_kv(pm: PromptedModel, init: torch.Tensor) -> torch.Tensor:
    """kv (L, 2, H_kv, P, dh) that reproduces the plain prompt `init` (P, d): its per-layer keys/values (causal), or
    the key/value projections of its hidden states at every layer (encoder: the prompt run with its lead token)."""
    P = init.shape[0]
    with torch.no_grad():
        if pm.family == "causal":
            prefix = pm.build_prefix([init], kv=True)
            assert prefix.kv is not None
            return torch.stack([torch.stack([k[0, :, -P:], v[0, :, -P:]]) for k, v in prefix.kv]).float()
        layers, attn = encoder_attention(pm)
        seq = torch.cat(
            [
                pm.embed(torch.tensor(pm.prefix_ids, dtype=torch.long, device=init.device)),
                init.to(pm.embed(torch.zeros(1, dtype=torch.long, device=init.device)).dtype),
            ]
        )
        out = pm.model(inputs_embeds=seq[None], output_hidden_states=True)
        hs = out.hidden_states  # (L+1) x (1, S, d): the input of layer l is hs[l]
        kv = []
        for i, a in enumerate(attn):
            h = hs[i][0, -P:]
            k = a.key(h).view(P, a.num_attention_heads, a.attention_head_size).transpose(0, 1)
            v = a.value(h).view(P, a.num_attention_heads, a.attention_head_size).transpose(0, 1)
            kv.append(torch.stack([k, v]))
        return torch.stack(kv).float()


def make_deep_prompt(pm: PromptedModel, init: torch.Tensor, *, reparam: int = 0) -> DeepPrompt:
    """A DeepPrompt starting from the keys/values of the plain prompt `init` (P, d) (see the module docstring)."""
    geometry(pm)  # raises for unsupported families
    kv0 = initial_kv(pm, init.to(pm.backbone.device))
    return DeepPrompt(kv0, reparam=reparam, embeds=init, embed_dim=int(init.shape[1])).to(pm.backbone.device)


# ---- prefixes -----------------------------------------------------------------------------------------------------
def deep_prefix(pm: PromptedModel, kv: torch.Tensor, gap: int = 0) -> Prefix:
    """The Prefix of a deep prompt kv (L, 2, H_kv, P, dh); gap > 0 (decoder-only): the input's positions start that
    many after the slots (metadata deep.position_gap)."""
    layers = [(kv[i, 0], kv[i, 1]) for i in range(kv.shape[0])]
    if pm.family == "causal":
        return pm.build_deep_prefix(layers, gap=gap)
    if gap:
        raise ValueError("a deep prompt's position gap needs a decoder-only model")
    if pm.family == "encoder":
        return encoder_deep_prefix(pm, layers)
    raise ValueError("--method deep: supported for decoder-only and encoder models, not encoder-decoder")


def encoder_deep_prefix(pm: PromptedModel, layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Prefix:
    """Encoder deep prefix: the lead token's embedding as the Prefix (so pooling and packing work as usual) and
    the deep slots in `kv`; PromptedModel hands them to the encoder through `encoder_deep_hidden` (see
    encoder_forward below)."""
    base = pm.build_prefix([None])
    return Prefix(base.embeds, base.mask, base.pool, base.lengths, [(k[None], v[None]) for k, v in layers], deep=True)


def checkpoint_kv(ck: PromptCheckpoint) -> torch.Tensor | None:
    """kv (L, 2, H_kv, P, dh) of a deep checkpoint, or None for a plain prompt."""
    if "deep.keys" not in ck.extra:
        return None
    return torch.stack([ck.extra["deep.keys"], ck.extra["deep.values"]], 1)


def checkpoint_prefix(pm: PromptedModel, ckpts: Sequence[PromptCheckpoint]) -> Prefix:
    """One Prefix for several checkpoints (plain and/or deep): softprompt.methods.checkpoint_prefix."""
    from softprompt.methods import checkpoint_prefix as of_any_method

    return of_any_method(pm, ckpts)


# ---- the method (softprompt.methods) -------------------------------------------------------------------------------
class _Deep:
    name = "deep"
    needs_kv = True
    per_row = False
    exports: frozenset[str] = frozenset()  # PEFT's prompt-tuning format and prompt tables hold input embeddings only

    def create(self, pm: PromptedModel, init: torch.Tensor, cfg: Any) -> DeepPrompt:
        return make_deep_prompt(pm, init, reparam=cfg.deep_reparam)

    def load_prefix(self, pm: PromptedModel, ckpt: PromptCheckpoint, *, kv: bool | None) -> Prefix:
        kvt = checkpoint_kv(ckpt)
        assert kvt is not None
        want = geometry(pm)
        got = (int(kvt.shape[0]), int(kvt.shape[2]), int(kvt.shape[4]))
        if got != want:
            raise CheckpointError(f"{ckpt.path}: deep prompt for (layers, kv heads, head dim) {got}, model has {want}")
        if ckpt.prompt.shape[0]:
            raise CheckpointError(f"{ckpt.path}: a deep prompt with an input-embedding prompt is not supported")
        gap = int(ckpt.meta.get("deep", {}).get("position_gap", 0))
        if gap and pm.family != "causal":
            raise CheckpointError(f"{ckpt.path}: a deep prompt with a position gap needs a decoder-only model")
        return deep_prefix(pm, kvt.to(pm.backbone.device), gap)

    def vectors(self, ckpt: PromptCheckpoint) -> torch.Tensor:
        """(P, L*2*H*dh): each slot's keys and values at every layer."""
        kv = checkpoint_kv(ckpt)
        assert kv is not None  # (L, 2, H, P, dh)
        return kv.permute(3, 0, 1, 2, 4).reshape(kv.shape[3], -1).double()


METHOD = _Deep()
