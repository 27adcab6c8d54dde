"""Prompt checkpoints: one `.safetensors` file, tensors plus string metadata in the header.

Tensors: `prompt` (P, d); optionally `head.linear.weight` (L, d) and `head.linear.bias` (L,) for a
linear head on an encoder.
A deep prompt (method "deep", softprompt.deep) has an empty `prompt` (0, d) and `deep.keys`, `deep.values`
(layers, kv heads, tokens, head dim): learned keys/values at every layer; num_tokens counts their tokens.
Header metadata (all strings; JSON where structured):
    format            "softprompt"
    format_version    "1"
    method            "prompt"
    base_model        what --model named (alias, path or hub id)
    architecture      e.g. "LlamaForCausalLM"
    family            causal | seq2seq | encoder
    embed_dim, num_tokens
    fingerprint       sha256 prefix of the base model's input-embedding matrix
    init, task, template, head, position
    labels            JSON verbalizer {"labels": [...], "words": [...]}
    target_field, label_field, fields
    train_config      JSON of the training configuration
    metrics           JSON of the metrics at save time
The file is written to a temporary file in the same directory and renamed over the target, so a reader
(or a crash) never sees a half-written prompt. Files are read with safetensors only: never unpickled.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "softprompt"
FORMAT_VERSION = "1"
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A prompt file that cannot be used; the message names the file."""


@dataclass
class PromptCheckpoint:
    prompt: torch.Tensor  # (P, d)
    meta: dict[str, Any]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # head.weight, head.bias, ...
    path: str = ""

    @property
    def num_tokens(self) -> int:
        """Positions the prompt takes in front of the input: its rows, plus a deep prompt's per-layer slots."""
        return int(self.prompt.shape[0]) + _deep_tokens(self.extra)

    @property
    def is_deep(self) -> bool:
        return "deep.keys" in self.extra

    @property
    def embed_dim(self) -> int:
        return int(self.prompt.shape[1])


def _encode_meta(meta: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {"format": FORMAT, "format_version": FORMAT_VERSION}
    for k, v in meta.items():
        if v is None:
            continue
        out[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return out


_JSON_KEYS = ("labels", "train_config", "metrics", "fields", "embed_dim", "num_tokens", "extra", "multitask", "deep")


def _decode_meta(raw: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if k in _JSON_KEYS:
            try:
                out[k] = json.loads(v)
            except json.JSONDecodeError:
                out[k] = v
        else:
            out[k] = v
    return out


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path) then rename tmp over `path` (same directory, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_prompt(
    path: str | Path, prompt: torch.Tensor, meta: dict[str, Any], extra: dict[str, torch.Tensor] | None = None
) -> None:
    """Write prompt (and extra tensors) with metadata, atomically."""
    tensors = {"prompt": prompt.detach().to("cpu", torch.float32).contiguous()}
    for k, v in (extra or {}).items():
        tensors[k] = v.detach().to("cpu", torch.float32).contiguous()
    meta = dict(meta)
    meta["num_tokens"] = int(prompt.shape[0]) + _deep_tokens(tensors)
    meta["embed_dim"] = int(prompt.shape[1])
    meta.setdefault("method", "prompt")
    encoded = _encode_meta(meta)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=encoded))


def _check_header(path: str) -> None:
    """Validate the safetensors framing ourselves so a non-safetensors file gives a clear error."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: not a safetensors file or truncated (header length {n}, file {size} bytes)"
                )
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a .safetensors prompt file") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (bad header)")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):  # e.g. {"prompt": 5}: JSON, but not a tensor table
        raise CheckpointError(f"{path}: not a safetensors file (bad header)") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes, header says {8 + n + end})")


def load_prompt(path: str | Path) -> PromptCheckpoint:
    """Read a prompt file; CheckpointError (naming the file) when it is missing, corrupt or not ours."""
    path = str(path)
    _check_header(path)
    try:
        with safe_open(path, framework="pt") as f:
            raw = f.metadata() or {}
            keys = list(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: corrupt safetensors file ({str(e).splitlines()[0]})") from None
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a softprompt prompt file (no 'format: softprompt' in its metadata)")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported format_version {raw.get('format_version')!r}")
    if "prompt" not in tensors:
        raise CheckpointError(f"{path}: no 'prompt' tensor")
    prompt = tensors.pop("prompt")
    if prompt.ndim != 2:
        raise CheckpointError(f"{path}: 'prompt' must be 2-D (tokens, dim), got shape {tuple(prompt.shape)}")
    if not torch.isfinite(prompt).all():
        raise CheckpointError(f"{path}: 'prompt' holds NaN or inf values")
    _check_deep(path, tensors)
    return PromptCheckpoint(prompt=prompt, meta=_decode_meta(raw), extra=tensors, path=path)


def _deep_tokens(tensors: dict[str, torch.Tensor]) -> int:
    """Slots of a deep prompt (deep.keys/deep.values (layers, kv heads, tokens, head dim)); 0 for a plain prompt."""
    k = tensors.get("deep.keys")
    return int(k.shape[2]) if k is not None and k.ndim == 4 else 0


def _check_deep(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """A deep prompt (softprompt.deep) needs both deep.keys and deep.values, 4-D, of one shape, finite."""
    k, v = tensors.get("deep.keys"), tensors.get("deep.values")
    if k is None and v is None:
        return
    if k is None or v is None:
        raise CheckpointError(f"{path}: a deep prompt needs both 'deep.keys' and 'deep.values'")
    if k.ndim != 4 or k.shape != v.shape:
        raise CheckpointError(
            f"{path}: 'deep.keys'/'deep.values' must both be (layers, heads, tokens, head_dim), "
            f"got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
        raise CheckpointError(f"{path}: 'deep.keys'/'deep.values' hold NaN or inf values")


def check_compatible(
    ckpt: PromptCheckpoint, embed_dim: int, fingerprint: str, *, allow_other_model: bool = False
) -> None:
    """A prompt only fits the model it was trained on: dim always checked, fingerprint unless overridden."""
    if ckpt.embed_dim != embed_dim:
        raise CheckpointError(
            f"{ckpt.path}: prompt dim {ckpt.embed_dim} does not match the model's embedding dim {embed_dim}"
        )
    fp = ckpt.meta.get("fingerprint")
    if fp and fp != fingerprint and not allow_other_model:
        raise CheckpointError(
            f"{ckpt.path}: trained on another model (fingerprint {fp}, this model {fingerprint}; "
            f"base_model {ckpt.meta.get('base_model')!r}); pass --allow-other-model to use it anyway"
        )


def file_size_formula(num_tokens: int, embed_dim: int, extra_elems: int = 0) -> int:
    """Bytes of tensor data in a float32 prompt file (the header adds at most a few KiB)."""
    return 4 * (num_tokens * embed_dim + extra_elems)
