"""Quantized frozen backbones: 8-bit or 4-bit weights, the prompt still trains in float32.

`--quantize` (ModelConfig.quantize) picks the scheme; the weights are quantized while transformers loads them
(`from_pretrained(quantization_config=...)`), so the float copy of the whole model never has to fit at once:

    none   float weights (the default)
    int8   weight-only int8, per output channel (optimum-quanto `qint8`): CPU or GPU
    int4   weight-only int4, grouped (optimum-quanto `qint4`): CPU or GPU; lossy on small models (bench/quant_sst2.py)
    bnb8   bitsandbytes LLM.int8(): CUDA only
    bnb4   bitsandbytes 4-bit NF4 (compute in the model dtype): CUDA only

Only the linear layers are quantized: the input embeddings stay in float, so the backbone's fingerprint (and a
prompt trained on it) is the same with or without quantization, and the output head tied to them (or the
`lm_head`, which transformers keeps in float) scores verbalizers at full precision. Gradients flow through the
quantized layers to the prompt: the frozen weights get none, activations are float.

Why optimum-quanto for int8/int4 (measured on smollm2-135m, CPU, fp32 reference, one forward+backward to the
prompt): both optimum-quanto `qint8` and torchao's `Int8WeightOnlyConfig` back-propagate through the frozen
int8 layers, hold the same weight memory (538 -> 220 MB; the tied embedding/head stays float) and agree with
float32 about equally (prompt-gradient cosine 0.994 vs 0.995, same predictions); torchao was ~1.7x faster per
step. But torchao 0.18 has no CPU int4 kernel (its int4 needs a GPU library), and merely having it installed
makes every transformers model load import it (~4 s more start-up, loader warnings) whether or not anything is
quantized. quanto has CPU int8 and int4, costs nothing at import, and transformers loads through it directly.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from softprompt.config import ConfigError

QUANTIZE = ("none", "int8", "int4", "bnb8", "bnb4")
PACKAGES = {"int8": "optimum-quanto", "int4": "optimum-quanto", "bnb8": "bitsandbytes", "bnb4": "bitsandbytes"}
MODULES = {"optimum-quanto": "optimum.quanto", "bitsandbytes": "bitsandbytes"}


def check(kind: str, device: torch.device) -> None:
    """ConfigError naming --quantize when the scheme is unknown, needs CUDA, or its package is missing."""
    if kind not in QUANTIZE:
        raise ConfigError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {kind!r}")
    if kind == "none":
        return
    if kind.startswith("bnb") and device.type != "cuda":
        raise ConfigError(
            f"--quantize {kind}: bitsandbytes needs a CUDA device (got {device}); on CPU use int8 or int4"
        )
    package = PACKAGES[kind]
    if not _available(MODULES[package]):
        raise ConfigError(f"--quantize {kind} needs {package}: pip install {package} (or softprompt[quant])")


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def load_kwargs(kind: str, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Extra from_pretrained kwargs for the scheme ({} for none). bitsandbytes models are placed by device_map
    (they must not be moved with .to() afterwards); quanto models are moved like float ones."""
    check(kind, device)
    if kind == "none":
        return {}
    if kind in ("int8", "int4"):
        from transformers import QuantoConfig

        return {"quantization_config": QuantoConfig(weights=kind)}
    from transformers import BitsAndBytesConfig

    if kind == "bnb8":
        cfg = BitsAndBytesConfig(load_in_8bit=True)
    else:
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return {"quantization_config": cfg, "device_map": {"": device.index or 0}}


def placed_by_loader(kind: str) -> bool:
    """True when from_pretrained already put the model on its device (bitsandbytes)."""
    return kind.startswith("bnb")


def finalize(model: torch.nn.Module, kind: str) -> None:
    """After a quantized load: copy the tensors left in float (embeddings, norms) out of the checkpoint's memory
    map, so the file's pages (every one of them was read to quantize it) are no longer mapped into the process.
    Without this a quanto-int8 smollm2-135m held ~610 MiB of file pages next to its 220 MiB of weights."""
    if kind not in ("int8", "int4"):
        return
    with torch.no_grad():
        for m in model.modules():
            for p in m.parameters(recurse=False):
                if not hasattr(p, "__tensor_flatten__"):
                    p.data = p.data.clone()  # the Parameter object stays: tied weights stay tied
            for name, b in list(m.named_buffers(recurse=False)):
                if b is not None and not hasattr(b, "__tensor_flatten__"):
                    m._buffers[name] = b.clone()


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes held by the model's parameters and buffers: {"total", "quantized", "float"}; a quantized tensor counts
    its packed data and scales (tensor subclasses are unflattened), a tied tensor once."""
    seen: set[int] = set()
    out = {"total": 0, "quantized": 0, "float": 0}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        n = _tensor_bytes(t)
        quantized = hasattr(t, "__tensor_flatten__") or t.dtype in (torch.int8, torch.uint8)
        out["quantized" if quantized else "float"] += n
        out["total"] += n
    return out


def _tensor_bytes(t: torch.Tensor) -> int:
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names if isinstance(getattr(t, n, None), torch.Tensor))
    return t.numel() * t.element_size()


def quantized_modules(model: torch.nn.Module) -> int:
    """How many modules hold quantized weights (0 for a float model)."""
    n = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and (hasattr(w, "__tensor_flatten__") or type(m).__name__ in _BNB_LINEARS):
            n += 1
    return n


_BNB_LINEARS = frozenset(["Linear8bitLt", "Linear4bit"])
