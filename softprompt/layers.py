"""A decoder run in parts, with the model's own forward: keys that only some layers see, stopping before a layer,
entering at a layer with given hidden states, replacing hidden states at a layer. softprompt.prompted uses these for
late prompts (softprompt.late), whose slots are keys from layer L up and absent below.

Everything here runs the architecture's own `forward` (its embeddings, rotary tables, mask construction, layers and
final norm), changing only what the part needs:

- Per-layer key visibility (`hidden_keys`): forward pre-hooks on the self-attention modules of the layers below a
  slot's first layer mask that slot's key column out of the mask the layer receives (a masked key gets exactly
  zero attention weight, so the layer computes what it computes without the slot). Every query also keeps its own
  column, so a padding query that would otherwise see no key gives a finite (unread) output instead of NaN.
- Stopping before layer l (`stop_before`): a pre-hook on layer l raises with its input hidden states, so layers
  >= l never run.
- Entering at layer l (`forward_from`): the decoder's own forward called on a stand-in for the decoder whose layer
  list is layers[l:] and whose absolute position embeddings (GPT-2's `wpe`) add zero, given the layer-l hidden
  states as `inputs_embeds`. Each layer keeps its own index into the cache, so the cache holds all layers.
- Replacing hidden states at layer l (`replace_at`): a pre-hook on layer l swaps a slice of its input.

softprompt.late's load-time check runs a probe both in parts and whole and refuses an architecture where they
differ (one line naming it and the flag).

Notation: N rows, Q query tokens, K key columns, P prefix slots (the first P key columns), d hidden size.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from softprompt.arch import ArchitectureError

ABSOLUTE_POSITIONS = ("wpe",)  # decoder attributes whose output the forward adds to inputs_embeds (GPT-2 family)


def decoder_layers(base: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's attribute holding its layers, and the layers (a ModuleList of num_hidden_layers)."""
    n = int(getattr(base.config.get_text_config(), "num_hidden_layers", 0) or 0)  # type: ignore[operator,union-attr]
    for name, child in base.named_children():
        if isinstance(child, nn.ModuleList) and len(child) == n and n > 0:
            return name, child
    raise ArchitectureError(f"{type(base).__name__}: no list of {n} decoder layers found")


def self_attention(layer: nn.Module) -> nn.Module:
    """A decoder layer's self-attention module (its first child whose class name ends in Attention)."""
    for child in layer.children():
        if type(child).__name__.endswith("Attention"):
            return child
    raise ArchitectureError(f"{type(layer).__name__}: no self-attention module found")


def _hide(mask: Any, hide: torch.Tensor, q: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """`mask` (a layer's attention mask: (N|1, 1, Q, K) bool or additive float, or None = every key visible) with the
    key columns hide (N, P) True masked out; every query keeps its own column (the last Q)."""
    n, p = hide.shape
    if mask is None:
        if q != 1:  # None with several queries means a causal mask left to the kernel: not built here
            raise ArchitectureError("a late prompt's layers need an explicit attention mask")
        mask = torch.ones(n, 1, q, k, dtype=torch.bool, device=hide.device)
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
        raise ArchitectureError(f"a late prompt needs 4-D attention masks, got {type(mask).__name__}")
    m = mask.expand(n, -1, -1, -1).clone()  # (N, 1, Q, K)
    cols = hide[:, None, None, :]  # (N, 1, 1, P)
    own = torch.eye(q, dtype=torch.bool, device=hide.device)[None, None]  # (1, 1, Q, Q): the last Q columns
    if m.dtype == torch.bool:
        m[..., :p] &= ~cols
        m[..., -q:] |= own
    else:
        lo = torch.finfo(m.dtype).min
        m[..., :p] = m[..., :p].masked_fill(cols, lo)
        m[..., -q:] = m[..., -q:].masked_fill(own, 0.0)
    return m


@contextmanager
def hidden_keys(base: nn.Module, starts: torch.Tensor | None) -> Iterator[None]:
    """While active, layer i's attention does not see key column j < P of row r where starts[r, j] > i.
    starts: (N, P) the first layer of each row's prefix slots (None or all 0: nothing to hide)."""
    if starts is None or not bool((starts > 0).any()):
        yield
        return
    _, layers = decoder_layers(base)
    top = int(starts.max())
    with ExitStack() as stack:
        for i in range(min(top, len(layers))):
            hide = starts > i  # (N, P)
            attn = self_attention(layers[i])

            def pre(module: nn.Module, args: tuple, kwargs: dict, hide: torch.Tensor = hide) -> tuple[tuple, dict]:
                h = kwargs.get("hidden_states", args[0] if args else None)
                if h is None or "attention_mask" not in kwargs:
                    raise ArchitectureError(f"{type(module).__name__}: no attention_mask keyword to mask late slots")
                q = int(h.shape[1])
                cache, idx = kwargs.get("cache"), getattr(module, "layer_idx", None)
                k = q + (int(cache.layers[idx].get_seq_length()) if cache is not None and idx is not None else 0)
                kwargs["attention_mask"] = _hide(kwargs["attention_mask"], hide, q, k, h.dtype)
                return args, kwargs

            stack.enter_context(attn.register_forward_pre_hook(pre, with_kwargs=True))
        yield


class _Stop(Exception):
    def __init__(self, hidden: Any) -> None:
        self.hidden = hidden


@contextmanager
def stop_before(base: nn.Module, layer: int, out: list[torch.Tensor]) -> Iterator[None]:
    """Within the block, the decoder's forward stops as layer `layer` is called; its input hidden states (N, T, d)
    are appended to `out`. Use: `with stop_before(base, l, out): base(...)`."""
    _, layers = decoder_layers(base)

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        raise _Stop(kwargs.get("hidden_states", args[0] if args else None))

    handle = layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    except _Stop as s:
        out.append(s.hidden)
    finally:
        handle.remove()


@contextmanager
def replace_at(base: nn.Module, layer: int, start: int, states: torch.Tensor) -> Iterator[None]:
    """Layer `layer`'s input hidden states (1, S, d) get states (n, d) at positions start .. start+n-1 (gradients
    flow to `states`)."""
    _, layers = decoder_layers(base)

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        in_kw = "hidden_states" in kwargs
        h = kwargs["hidden_states"] if in_kw else args[0]
        n = states.shape[0]
        new = torch.cat([h[:, :start], states[None].to(h.dtype), h[:, start + n :]], 1)  # (1, S, d)
        if in_kw:
            return args, {**kwargs, "hidden_states": new}
        return (new, *args[1:]), kwargs

    handle = layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class _ZeroPositions:
    """Stands for an absolute position embedding: adds nothing (the given states already hold their positions)."""

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(())


class _FromLayer:
    """The decoder, except that its layer list starts at some layer and its position embeddings add zero."""

    def __init__(self, base: nn.Module, overrides: dict[str, Any]) -> None:
        self.__dict__["_base"] = base
        self.__dict__["_over"] = overrides

    def __getattr__(self, name: str) -> Any:
        if name in self._over:
            return self._over[name]
        return getattr(self._base, name)


def forward_from(base: nn.Module, layer: int, states: torch.Tensor, **kwargs: Any) -> Any:
    """The decoder's own forward from layer `layer` on: `states` (N, T, d) are the layer's input hidden states;
    kwargs (attention_mask, position_ids, cache, use_cache) as for the whole decoder. The cache must hold entries
    for every layer (each layer reads and writes its own index; the mask's key count is read off layer 0)."""
    name, layers = decoder_layers(base)
    over: dict[str, Any] = {name: layers[layer:]}
    for a in ABSOLUTE_POSITIONS:
        if hasattr(base, a):
            over[a] = _ZeroPositions()
    return type(base).forward(_FromLayer(base, over), inputs_embeds=states, **kwargs)  # type: ignore[arg-type]
