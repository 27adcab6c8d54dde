"""Late prompts (`--method late --layer L`): the prompt enters at layer L instead of the input layer (Late Prompt
Tuning, Liu et al. 2022).

What is learned: P hidden-state vectors S (P, d). Semantics, on a decoder-only model with layout
[lead token][P slots][input] (the lead token is the BOS when the tokenizer adds one and --position auto):

- layers < L run on [lead; input] alone: the P slots do not exist there (no key, no query);
- at layer L, S is put in front of the input's hidden states (after the lead token's): layers >= L run on
  [lead; S; input], each slot attending to the lead token and the slots before it, each input token to all of them;
- positions: the slots take p0 .. p0+P-1 and the input continues after them (p0+P, ...) at EVERY layer, below L
  too, exactly as under a plain P-token prompt (softprompt.prompted's K/V path). So the layers below L depend on the
  input and the prompt's length P, never on its values.

Under causal attention the slots' keys/values at layers >= L do not depend on the input, so they are computed once
per prompt (batch, task) and kept as an ordinary shared-prefix K/V Prefix: per layer (1, H, p0+P, dh), the slot
columns zero below L and hidden there by `Prefix.starts` (softprompt.layers.hidden_keys masks them out of those
layers' attention). Training, evaluation, prediction, generation (PromptedModel.generate), ensembles and the
server's mixed classification batches take it like any prompt; the serving decode loop (continuous batching of
generations) does not (refused in one line).

Initialisation: S = what layer L receives at the positions of the plain prompt given by --init, run as
[lead; init] through layers < L (the states a plain prompt has at that layer).

Scale: hidden states in the middle of a decoder are far larger than input embeddings (smollm2-135m at layer 15:
row norms ~170, the first slot after BOS ~25,000 from one massive dimension, against ~3 for its embeddings), and
Adam moves every coordinate by about --lr per step whatever its size, so trained directly at a plain prompt's --lr a
late prompt would move ~50x less relative to its size. It is therefore trained as S = c * U, c (fixed) the median
row RMS of the initial S and U the trainable tensor: the same --lr then moves S in proportion to the layer's scale.
The file holds S itself; the training state (--resume) holds U and c.

The training speed-up: what enters layer L for an input row does not depend on the prompt, so it is computed once
per training example (`InputCache`, keyed by the row's tokens, kept across epochs, bounded by --late-cache-mb; rows
beyond the bound are recomputed each time) and a training step runs layers >= L only (Batch.start). It holds with
the backbone in eval mode (no --dropout: with dropout the lower layers differ at every step, so nothing is cached)
and where the scored positions are the rows themselves (one-token verbalizers, a head, generation targets; multi-
token verbalizers run every layer). The loss is the same with or without the cache (tests/test_late.py).

Checkpoint: an ordinary prompt file with `method: late`, an empty `prompt` (0, d), the tensor `late.states` (P, d)
and `late` metadata {layer, layers, tokens}.

Exports: none. PEFT's prompt-tuning format and TensorRT-LLM/NeMo prompt tables hold input embeddings at layer 0.
Families: decoder-only models. Encoders (bidirectional: every slot's states at layers >= L depend on the input) and
encoder-decoders are refused in one line naming the family and --method late.

Notation: P prompt slots, p0 lead tokens (0 or 1), d hidden size, L the entry layer, N rows, T tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from softprompt import arch
from softprompt.checkpoint import CheckpointError, PromptCheckpoint
from softprompt.data import pad_left
from softprompt.layers import decoder_layers, replace_at, stop_before
from softprompt.prompted import Prefix, PromptedModel

KEY = "late.states"


# ---- what is supported ------------------------------------------------------------------------------------------
def n_layers(pm: PromptedModel) -> int:
    return len(decoder_layers(pm.model.base_model)[1])


def check(pm: PromptedModel, layer: int) -> None:
    """Refuse what a late prompt cannot run on exactly (one line naming the family or the flag)."""
    if pm.family != "causal":
        raise ValueError(
            f"--method late: supported for decoder-only models, not {pm.family} models ({pm.backbone.architecture}):"
            " their prompt slots would depend on the input at every layer >= --layer"
        )
    if pm.naive:
        raise ValueError("--method late runs on the shared-prefix K/V path: drop --naive")
    n = n_layers(pm)
    if not 0 < layer < n:
        raise ValueError(f"--layer must satisfy 0 < L < {n} (the model's layers) for --method late, got {layer}")
    key = f"late-parts:{layer}"
    if key not in pm.backbone.verified:
        pm.backbone.verified[key] = parts_error(pm, layer)
    if not pm.backbone.verified[key] <= arch.tolerance(pm.model):  # NaN fails too
        raise arch.ArchitectureError(
            f"--method late: {pm.backbone.architecture} run from layer {layer} on differs from its whole forward by"
            f" {pm.backbone.verified[key]:.3g} (relative); late prompts are refused on it"
        )


def parts_error(pm: PromptedModel, layer: int) -> float:
    """The load-time check: probe rows (two lengths, one batch) behind a random late prompt, run whole and in parts
    (what enters `layer`, then layers >= `layer` only, as a cached training step runs); their largest relative
    difference."""
    dev = pm.backbone.device
    d = pm.embedding_matrix().shape[1]
    was = pm.model.training
    pm.model.eval()
    try:
        with torch.no_grad():
            prefix = late_prefix(
                pm, torch.randn(2, d, generator=torch.Generator().manual_seed(0)).to(dev), layer, False
            )
            b = pm.collate([pm.encode_input(t) for t in arch.PROBE_TEXTS]).to(dev)
            whole = pm.run_decoder(prefix, None, b.ids, b.mask, keep_cache=False).hidden
            entering = layer_input(pm, prefix, b.ids, b.mask, layer)
            parts = pm.run_decoder(prefix, None, b.ids, b.mask, keep_cache=False, start=(layer, entering)).hidden
    finally:
        pm.model.train(was)
    real = b.mask.bool()
    return float((whole - parts)[real].abs().max() / whole[real].abs().max().clamp(min=1e-30))


# ---- prefixes ---------------------------------------------------------------------------------------------------
def late_prefix(pm: PromptedModel, states: torch.Tensor, layer: int, checked: bool = True) -> Prefix:
    """The Prefix of a late prompt: hidden states (P, d) entering at `layer` (see the module docstring): layout
    [lead][P slots]; layers >= `layer` hold the keys/values the model computes for [lead; states] from that layer up
    (the lead token's own below it), layers below hold zeros in the slot columns, hidden by `starts`."""
    if checked:
        check(pm, layer)
    dev, P = pm.backbone.device, int(states.shape[0])
    lead = pm.embed(torch.tensor(pm.prefix_ids, dtype=torch.long, device=dev))  # (p0, d)
    p0 = lead.shape[0]
    seq = torch.cat([lead, lead.new_zeros(P, lead.shape[1])])[None]  # (1, p0+P, d): the slots are filled at `layer`
    base = pm.model.base_model
    with replace_at(base, layer, p0, states):
        out = base(inputs_embeds=seq, position_ids=torch.arange(p0 + P, device=dev)[None], use_cache=True)
    kv = []
    for i, c in enumerate(out.cache.layers):  # keys/values (1, H, p0+P, dh) of layer i
        if i >= layer:
            kv.append((c.keys, c.values))
        else:  # below `layer` the slots do not exist: zero columns (what the lower layers computed there is unused)
            k, v = (torch.cat([t[:, :, :p0], torch.zeros_like(t[:, :, p0:])], 2) for t in (c.keys, c.values))
            kv.append((k, v))
    ones = torch.ones(1, p0 + P, dtype=torch.long, device=dev)
    pool = torch.nn.functional.pad(torch.ones(1, p0, dtype=torch.long, device=dev), (0, P))
    starts = torch.nn.functional.pad(torch.zeros(1, p0, dtype=torch.long, device=dev), (0, P), value=layer)
    embeds = torch.zeros(1, p0 + P, lead.shape[1], dtype=lead.dtype, device=dev)  # the slots have no embedding
    return Prefix(embeds, ones, pool, torch.tensor([p0 + P], device=dev), kv, deep=True, starts=starts)  # type: ignore[arg-type]


def layer_input(pm: PromptedModel, prefix: Prefix, ids: torch.Tensor, mask: torch.Tensor, layer: int) -> torch.Tensor:
    """What enters `layer` (N, T, d) for left-padded rows `ids` (N, T) behind `prefix` (the forward stops there)."""
    seen: list[torch.Tensor] = []
    with stop_before(pm.model.base_model, layer, seen):
        pm.run_decoder(prefix, None, ids, mask, keep_cache=False)
    return seen[0]


def initial_states(pm: PromptedModel, init: torch.Tensor, layer: int) -> torch.Tensor:
    """(P, d) float32: what `layer` receives at the positions of the plain prompt `init` (P, d) behind the lead."""
    P = init.shape[0]
    with torch.no_grad():
        prefix = pm.build_prefix([init], kv=False)  # [lead; init] embeddings (1, p0+P, d)
        seen: list[torch.Tensor] = []
        with stop_before(pm.model.base_model, layer, seen):
            seq = prefix.embeds
            pm.model.base_model(inputs_embeds=seq, position_ids=torch.arange(seq.shape[1], device=seq.device)[None])
    return seen[0][0, -P:].float()


# ---- the training cache -------------------------------------------------------------------------------------------
class InputCache:
    """What enters layer L for each training row, keyed by the row's real tokens; at most `budget` bytes (rows
    beyond it are recomputed each step, never stored). Kept across epochs; not saved (rebuilt after --resume)."""

    def __init__(self, layer: int, budget: int) -> None:
        self.layer, self.budget, self.used = layer, budget, 0
        self.states: dict[tuple[int, ...], torch.Tensor] = {}  # (T_i, d) in the model's dtype
        self.hits = self.misses = 0

    def batch(self, pm: PromptedModel, prefix: Prefix, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, T, d): what enters layer L for the left-padded rows (zeros at pad positions, never read)."""
        keys = [tuple(ids[i][mask[i].bool()].tolist()) for i in range(ids.shape[0])]
        missing = [i for i, k in enumerate(keys) if k not in self.states]
        self.hits, self.misses = self.hits + len(keys) - len(missing), self.misses + len(missing)
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            sub_ids, sub_mask = pad_left([list(keys[i]) for i in missing], pm.pad_id)
            with torch.no_grad():
                h = layer_input(pm, prefix.detach(), sub_ids.to(ids.device), sub_mask.to(ids.device), self.layer)
            for j, i in enumerate(missing):
                s = h[j, h.shape[1] - len(keys[i]) :].detach().clone()  # (T_i, d): its real tokens (left-padded)
                fresh[i] = s
                size = s.numel() * s.element_size()
                if self.used + size <= self.budget:
                    self.states[keys[i]], self.used = s, self.used + size
        rows = [fresh[i] if i in fresh else self.states[k] for i, k in enumerate(keys)]
        out = rows[0].new_zeros(ids.shape[0], ids.shape[1], rows[0].shape[-1])  # (N, T, d)
        for i, s in enumerate(rows):
            out[i, ids.shape[1] - s.shape[0] :] = s
        return out


# ---- the trainable module ---------------------------------------------------------------------------------------
class LatePrompt(nn.Module):
    """states (P, d) entering layer `layer`, trained as states = scale * unit (see the module docstring)."""

    def __init__(self, states: torch.Tensor, layer: int, layers: int, cache_mb: int = 0) -> None:
        super().__init__()
        s = states.detach().float()
        c = s.pow(2).mean(1).sqrt().median().clamp(min=1e-6)  # the typical row RMS of the states at this layer
        self.scale = nn.Parameter(c.reshape(1), requires_grad=False)  # (1,) fixed; in the training state
        self.unit = nn.Parameter(s / c)  # (P, d) what the optimiser moves
        self.layer, self.layers = layer, layers
        self.cache = InputCache(layer, cache_mb * 2**20) if cache_mb > 0 else None

    @property
    def states(self) -> torch.Tensor:
        return self.unit * self.scale  # (P, d)

    def trainable(self) -> list[nn.Parameter]:
        """The unit-scale states, then the fixed scale (no gradient: kept for --resume)."""
        return [self.unit, self.scale]

    def prefix(self, pm: PromptedModel) -> Prefix:
        return late_prefix(pm, self.states, self.layer)

    @torch.no_grad()
    def eval_prefix(self, pm: PromptedModel) -> Prefix:
        return late_prefix(pm, self.states, self.layer).detach()

    def saved(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        """An empty input prompt (0, d), the states as late.states (P, d), the late metadata."""
        P, d = self.unit.shape
        meta = {"method": "late", "late": {"layer": self.layer, "layers": self.layers, "tokens": int(P)}}
        return torch.zeros(0, d), {KEY: self.states.detach().clone()}, meta

    def start_states(
        self, pm: PromptedModel, prefix: Prefix, batch: Any, label_ids: list[list[int]] | None, head: Any
    ) -> tuple[int, torch.Tensor] | None:
        """Batch.start for a training step: (L, what enters layer L (N, T, d)) from the cache, or None where the
        cache does not apply (no cache, dropout active, multi-token verbalizers)."""
        multi = batch.targets is None and head is None and any(len(w) > 1 for w in label_ids or [])
        if self.cache is None or pm.model.training or multi:
            return None
        return self.layer, self.cache.batch(pm, prefix, batch.ids, batch.mask)


def make_late_prompt(pm: PromptedModel, init: torch.Tensor, layer: int, cache_mb: int = 0) -> LatePrompt:
    check(pm, layer)
    states = initial_states(pm, init.to(pm.backbone.device), layer)
    return LatePrompt(states, layer, n_layers(pm), cache_mb).to(pm.backbone.device)


# ---- the method (softprompt.methods) -------------------------------------------------------------------------------
class _Late:
    name = "late"
    needs_kv = True
    per_row = False
    exports: frozenset[str] = frozenset()  # PEFT prompt tuning and prompt tables hold layer-0 input embeddings only

    def create(self, pm: PromptedModel, init: torch.Tensor, cfg: Any) -> LatePrompt:
        return make_late_prompt(pm, init, cfg.layer, cfg.late_cache_mb)

    def load_prefix(self, pm: PromptedModel, ckpt: PromptCheckpoint, *, kv: bool | None) -> Prefix:
        meta = ckpt.meta.get("late") or {}
        if KEY not in ckpt.extra or "layer" not in meta:
            raise CheckpointError(f"{ckpt.path}: a late prompt needs the {KEY} tensor and late.layer metadata")
        states, layer = ckpt.extra[KEY], int(meta["layer"])
        n = n_layers(pm)
        if int(meta.get("layers", n)) != n or not 0 < layer < n:
            raise CheckpointError(f"{ckpt.path}: late prompt for layer {layer} of {meta.get('layers')}, model has {n}")
        if states.ndim != 2 or states.shape[1] != pm.embedding_matrix().shape[1]:
            raise CheckpointError(f"{ckpt.path}: {KEY} {tuple(states.shape)} does not fit hidden size of the model")
        return late_prefix(pm, states.to(pm.backbone.device), layer)

    def vectors(self, ckpt: PromptCheckpoint) -> torch.Tensor:
        """(P, d): the hidden states each slot enters with."""
        return ckpt.extra[KEY].double()


METHOD = _Late()
