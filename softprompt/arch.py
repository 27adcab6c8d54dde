"""What an architecture's own forward does around its layers, repeated exactly by softprompt's forward path.

softprompt feeds the backbone `inputs_embeds` (so a prompt can sit among the tokens), reads hidden states at
the positions it scores, and lays a batch out as `[prefix][pads][input]`. Each of these skips or changes a step of
the model's own `input_ids` forward on some architectures; this module holds the general mechanisms that put the
step back, and `softprompt.equivalence` checks the result against the model's own forward at load time.

- Input scale: Marian, Pegasus, FSMT & co multiply `embed_tokens(input_ids)` by `embed_scale` inside their
  encoder/decoder, and skip it for `inputs_embeds`; models whose embedding module scales by itself (Gemma, BART,
  XGLM: a `*ScaledWordEmbedding`) and models that scale `inputs_embeds` too (Granite) need nothing.
- Output path: scored hidden states go through the model's own `*ForCausalLM.forward` after its decoder (the LM
  head plus whatever the architecture does to the logits: Granite's `logits_scaling`, Cohere's `logit_scale`,
  Gemma 2's soft-capping), never a re-derived `lm_head` call.
- Sliding windows: transformers measures a window in key columns, so the pad slots between a prefix and a shorter
  row would count; the mask is then built from positions instead (each row sees the keys it sees alone).
  Windows built into the attention layer itself (GPT-Neo's local attention) cannot be moved: a batch whose pads
  would enter such a window is refused.

Notation: N rows, Q query tokens, K key columns (prefix slots + pads + tokens), d hidden size, V vocabulary.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

FULL, SLIDING = "full_attention", "sliding_attention"


class ArchitectureError(ValueError):
    """softprompt cannot run this architecture (or this batch on it) exactly; the message names model and cause."""


def input_scale(model: Any, family: str) -> float:
    """The factor the model's own forward applies to `embed_tokens(input_ids)` outside the embedding module."""
    if hasattr(model.get_input_embeddings(), "embed_scale"):
        return 1.0  # a scaled embedding module: get_input_embeddings()(ids) is already what the layers see
    consumer = model.get_encoder() if family == "seq2seq" else model.base_model
    scale = getattr(consumer, "embed_scale", None)
    return 1.0 if scale is None else float(scale)


class _Outputs:
    """A decoder's outputs holding only its last hidden state; every other field (cache, attentions) is None."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.last_hidden_state = hidden

    def __getitem__(self, i: int | str) -> torch.Tensor:
        if i in (0, "last_hidden_state"):
            return self.last_hidden_state
        raise KeyError(i)

    def __getattr__(self, name: str) -> None:
        return None


class _Decoded:
    """Stands for the decoder inside a `*ForCausalLM.forward` call: whatever it is asked, it returns `out`."""

    def __init__(self, out: _Outputs) -> None:
        self._out = out

    def __call__(self, *args: Any, **kwargs: Any) -> _Outputs:
        return self._out

    def __getattr__(self, name: str) -> _Decoded:  # OPT calls self.model.decoder(...)
        return self


class _WithHidden:
    """The causal LM itself, except that its decoder (`base_model_prefix`) returns given hidden states."""

    def __init__(self, model: Any, hidden: torch.Tensor) -> None:
        self.__dict__["_model"] = model
        self.__dict__["_decoder"] = _Decoded(_Outputs(hidden))

    def __getattr__(self, name: str) -> Any:
        if name == self._model.base_model_prefix:
            return self._decoder
        return getattr(self._model, name)


class OutputPath:
    """hidden (..., d) -> logits (..., V) float32: the causal LM's own forward after its decoder, run on the given
    hidden states (no copy of its head logic here, so scaling, soft-capping and any future step come along)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.forward = type(model).forward
        params = inspect.signature(self.forward).parameters
        self.kwargs: dict[str, Any] = {k: v for k, v in (("use_cache", False), ("logits_to_keep", 0)) if k in params}

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden if hidden.ndim == 3 else hidden.reshape(-1, 1, hidden.shape[-1])  # (N, K, d)
        out = self.forward(_WithHidden(self.model, h), **self.kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]  # (N, K, V)
        return logits.float().reshape(*hidden.shape[:-1], logits.shape[-1])


@dataclass(frozen=True)
class Windows:
    """Local attention of a decoder: the layer types it has and their window (keys less than `size` positions
    back, the query's own included), and whether the window lives in the attention mask (`maskable`: built by
    transformers' masking utilities, so softprompt can build it from positions) or inside the layers."""

    types: tuple[str, ...]
    size: int
    maskable: bool


def windows_of(config: Any) -> Windows | None:
    """The sliding windows of a decoder config, or None when every layer attends to all earlier keys."""
    c = config.get_text_config()
    if getattr(c, "model_type", "") == "gpt_neo" and "local" in (getattr(c, "attention_layers", None) or []):
        return Windows(("global", "local"), int(c.window_size), maskable=False)
    types = tuple(sorted(set(getattr(c, "layer_types", None) or [])))
    size = getattr(c, "sliding_window", None)
    if not types:
        types = (SLIDING,) if size else (FULL,)
    unknown = [t for t in types if t not in (FULL, SLIDING)]
    if unknown:
        raise ArchitectureError(f"{type(config).__name__}: layers of type {unknown[0]!r} are not supported")
    if SLIDING not in types:
        return None
    if not size:
        raise ArchitectureError(f"{type(config).__name__}: sliding-attention layers without a sliding_window size")
    return Windows(types, int(size), maskable=True)


def attention_mask(
    attn: torch.Tensor, q_len: int, windows: Windows | None, impl: str, dtype: torch.dtype, name: str
) -> torch.Tensor | dict[str, torch.Tensor]:
    """What to pass as `attention_mask` for keys `attn` (N, K; 1 = real) of which the last `q_len` are the queries.

    The 2-D mask when no window can cut (no window, or K <= its size: every key is within it); else a 4-D mask per
    layer type built from positions (a real key's position is its rank among its row's real keys, as if alone).
    """
    K = attn.shape[1]
    if windows is None or K <= windows.size:
        return attn
    if not windows.maskable:
        if bool(attn.all()):  # no pad slot anywhere: key columns are positions, the layers' own window is exact
            return attn
        raise ArchitectureError(
            f"{name}: its local attention (window {windows.size}) is built into the layers and counts padding slots;"
            f" a batch of rows of different lengths spanning more than {windows.size} positions cannot be exact"
            " (use batch size 1)"
        )
    pos = attn.cumsum(-1) - 1  # (N, K)
    dist = pos[:, -q_len:, None] - pos[:, None, :]  # (N, Q, K) query position - key position
    seen = attn.bool()[:, None, :] & (dist >= 0)
    own = F.pad(torch.eye(q_len, dtype=torch.bool, device=attn.device), (K - q_len, 0))  # (Q, K): a pad query sees
    masks: dict[str, torch.Tensor] = {}  # itself, so no row of the mask is empty (NaN in softmax)
    for t in windows.types:
        m = ((seen & (dist < windows.size)) if t == SLIDING else seen) | own
        masks[t] = m[:, None]  # (N, 1, Q, K)
    if impl == "eager":
        lo = torch.finfo(dtype).min
        masks = {t: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, lo) for t, m in masks.items()}
    elif "sdpa" not in impl:
        raise ArchitectureError(f"{name}: sliding windows need the sdpa or eager attention, not {impl!r}")
    return masks[windows.types[0]] if len(windows.types) == 1 else masks
