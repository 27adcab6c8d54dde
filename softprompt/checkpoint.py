"""Prompt checkpoints: one `.safetensors` file, tensors plus string metadata in the header.

Tensors: `prompt` (P, d); optionally `head.linear.weight` (L, d) and `head.linear.bias` (L,) for a
linear head on an encoder.
A deep prompt (method "deep", softprompt.deep) has an empty `prompt` (0, d) and `deep.keys`, `deep.values`
(layers, kv heads, tokens, head dim): learned keys/values at every layer; num_tokens counts their tokens.
A routed prompt (softprompt.routed) stacks its K routes in `prompt` (K*P, d) and adds `routed.router.*`; a
conditioned prompt (softprompt.conditioned) has its shared prompt in `prompt` and adds `conditioned.*`.
A late prompt (method "late", softprompt.late) has an empty `prompt` and `late.states` (tokens, hidden size).
An image prompt (softprompt.vision; task "image-classify", family "vision"): vpt/vpt-deep hold `prompt` (P, d) =
the first layer's tokens, vpt-deep also `vpt.deep` (layers-1, P, d), and head.linear.*; coop holds `prompt` =
its context rows (M or C*M, d_text); metadata `vision` (the image model's geometry and processor settings),
`coop` ({context_tokens, class_specific}); `fingerprint` hashes the image model's patch embedding.
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
import stat
import struct
import tempfile
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

from softprompt.methods import IMAGE_METHODS
from softprompt.methods import REGISTRY as METHODS

FORMAT = "softprompt"
FORMAT_VERSION = "1"
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A prompt file that cannot be used; the message names the file. `framing`: raised before the file was known
    to be a softprompt prompt (unreadable, not a regular file, not safetensors, no softprompt metadata); such
    messages may quote the file's size or header, so the server does not pass them on for files it did not receive
    (admin {"path": ...})."""

    def __init__(self, message: str, *, framing: bool = False) -> None:
        super().__init__(message)
        self.framing = framing


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


_JSON_KEYS = ("labels", "train_config", "metrics", "fields", "embed_dim", "num_tokens", "extra", "multitask", "deep",
              "distill", "routed", "conditioned", "late", "vision", "coop")  # fmt: skip


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
    """Call write(tmp_path) then rename tmp over `path` (same directory, so the rename is atomic). The file gets
    the mode an ordinary write would give it: an existing file keeps its own, a new one gets 0666 less the umask
    (the writers, mkstemp and safetensors alike, create private 0600 files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask, read without changing it (os.umask sets it: a race with other threads' file creation)."""
    with suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    return 0o022


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


MAX_FILE = 2**30  # a prompt file is kilobytes to megabytes; nothing larger is read into memory
TENSOR_NAMES = ("prompt", "head.linear.weight", "head.linear.bias", "head.weight", "head.bias", "deep.keys",
                "deep.values", "late.states", "vpt.deep")  # fmt: skip
# metadata fields with a closed set of values (absent: the reader's default)
ALLOWED_META = {
    "method": METHODS,  # softprompt.methods.REGISTRY (its keys; read at each check, so a new method is one line)
    "family": ("causal", "seq2seq", "encoder", "vision"),
    "task": ("classify", "generate", "image-classify"),
    "head": ("lm", "linear", "similarity", "cosine"),
    "position": ("auto", "start"),
}


def read_regular(path: str) -> bytes:
    """The bytes of `path`, which must be a regular file: stat first, so a FIFO, device or socket is never opened
    (opening a FIFO blocks), then open without blocking and check the opened file again (it may have been swapped)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found", framing=True) from None
    except OSError as e:  # a symlink loop (ELOOP), a name too long, a permission error...
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or type(e).__name__})", framing=True) from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{path}: is a directory, expected a .safetensors prompt file", framing=True)
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file (a FIFO, device or socket is never read)", framing=True)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or type(e).__name__})", framing=True) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file", framing=True)
        if st.st_size > MAX_FILE:
            raise CheckpointError(f"{path}: larger than {MAX_FILE} bytes, not a prompt file", framing=True)
        chunks, left = [], st.st_size + 1
        while left > 0:  # +1: a file that grew while being read is caught by the framing check below
            b = os.read(fd, min(left, 1 << 20))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or type(e).__name__})", framing=True) from None
    finally:
        os.close(fd)


def _check_header(path: str, data: bytes) -> dict[str, Any]:
    """Validate the safetensors framing ourselves so a non-safetensors file gives a clear error; the header."""
    size = len(data)
    if size < 8:
        raise CheckpointError(f"{path}: not a safetensors file (too short)", framing=True)
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > size:
        raise CheckpointError(
            f"{path}: not a safetensors file or truncated (header length {n}, file {size} bytes)", framing=True
        )
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)", framing=True) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (bad header)", framing=True)
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):  # e.g. {"prompt": 5}: JSON, but not a tensor table
        raise CheckpointError(f"{path}: not a safetensors file (bad header)", framing=True) from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes, header says {8 + n + end})", framing=True)
    return header


def load_prompt(path: str | Path) -> PromptCheckpoint:
    """Read and validate a prompt file; CheckpointError (naming the file) when it is missing, not a regular file,
    corrupt, not ours, or holds tensors or metadata no reader can use. The one loader of prompt files: the CLI,
    the Python API and the server all get these checks."""
    path = str(path)
    data = read_regular(path)
    header = _check_header(path, data)
    raw = header.get("__metadata__") or {}
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a softprompt prompt file (no 'format: softprompt' in its metadata)", framing=True
        )
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported format_version {raw.get('format_version')!r}", framing=True)
    if not all(isinstance(v, str) for v in raw.values()):
        raise CheckpointError(f"{path}: corrupt safetensors file (metadata values must be strings)", framing=True)
    try:
        tensors = safetensors_load(data)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: corrupt safetensors file ({str(e).splitlines()[0]})", framing=True) from None
    if "prompt" not in tensors:
        raise CheckpointError(f"{path}: no 'prompt' tensor")
    meta = _decode_meta(raw)
    _check_tensors(path, tensors)
    prompt = tensors.pop("prompt")
    ckpt = PromptCheckpoint(prompt=prompt, meta=meta, extra=tensors, path=path)
    _check_meta(path, ckpt)
    return ckpt


def _check_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor floating point and finite; the prompt (tokens, dim) with >= 1 row (a deep prompt: 0 rows and
    its per-layer keys/values); heads (labels, dim) and (labels,)."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {str(t.dtype).replace('torch.', '')}, "
                                  "expected a floating-point tensor")  # fmt: skip
        if not torch.isfinite(t).all():
            what = "'prompt'" if name == "prompt" else repr(name)
            raise CheckpointError(f"{path}: {what} holds NaN or inf values")
    prompt = tensors["prompt"]
    if prompt.ndim != 2:
        raise CheckpointError(f"{path}: 'prompt' must be 2-D (tokens, dim), got shape {tuple(prompt.shape)}")
    if prompt.shape[1] < 1:
        raise CheckpointError(f"{path}: 'prompt' has dim 0")
    _check_deep(path, tensors)
    if prompt.shape[0] < 1 and "deep.keys" not in tensors and "late.states" not in tensors:
        raise CheckpointError(f"{path}: 'prompt' has 0 rows (a prompt needs at least one token)")
    for prefix in ("head.linear.", "head."):  # a head reads hidden states: its width is the model's hidden size,
        w, b = tensors.get(prefix + "weight"), tensors.get(prefix + "bias")  # not always the prompt's (ALBERT), so
        if w is None and b is None:  # BoundTask.saved_head checks it against the loaded backbone
            continue
        if w is None or w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
            shape = None if w is None else tuple(w.shape)
            raise CheckpointError(f"{path}: '{prefix}weight' must be (labels, hidden size), got {shape}")
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise CheckpointError(f"{path}: '{prefix}bias' must be ({w.shape[0]},), got {tuple(b.shape)}")


def _check_meta(path: str, ckpt: PromptCheckpoint) -> None:
    """Metadata fields against their allowed values and the tensors they describe."""
    meta = ckpt.meta
    for key, allowed in ALLOWED_META.items():
        v = meta.get(key)
        if v is not None and v not in allowed:
            raise CheckpointError(f"{path}: unknown {key} {v!r} in its metadata (expected {' or '.join(allowed)})")
    for key, actual in (("embed_dim", ckpt.embed_dim), ("num_tokens", ckpt.num_tokens)):
        v = meta.get(key)
        if v is not None and (type(v) is not int or v != actual):
            raise CheckpointError(f"{path}: metadata {key} {v!r} does not match its tensors ({actual})")
    if "method" in meta and (meta["method"] == "deep") != ckpt.is_deep:
        raise CheckpointError(f"{path}: metadata method {meta.get('method', 'prompt')!r} does not match its tensors")
    _check_image(path, ckpt)
    for key in ("template", "base_model", "fingerprint", "label_field", "target_field"):
        if key in meta and not isinstance(meta[key], str):
            raise CheckpointError(f"{path}: metadata {key} must be a string")
    if "max_length" in meta:
        try:
            ok = int(meta["max_length"]) >= 1
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: metadata max_length {meta['max_length']!r} is not a positive integer")
    fields = meta.get("fields")
    if fields is not None and not (isinstance(fields, list) and all(isinstance(f, str) for f in fields)):
        raise CheckpointError(f"{path}: metadata fields must be a list of names")
    labels = meta.get("labels")
    n_labels = None
    if labels is not None:
        ls, ws = (labels.get("labels"), labels.get("words")) if isinstance(labels, dict) else (None, None)
        if not (isinstance(ls, list) and isinstance(ws, list) and ls and len(ls) == len(ws)
                and all(isinstance(x, str) and x for x in ls + ws) and len(set(ls)) == len(ls)):  # fmt: skip
            raise CheckpointError(f"{path}: metadata labels must be {{\"labels\": [...], \"words\": [...]}}, "
                                  "non-empty, one distinct word list per label")  # fmt: skip
        n_labels = len(ls)
    for name in ("head.linear.weight", "head.weight"):
        w = ckpt.extra.get(name)
        if w is not None and n_labels is not None and w.shape[0] != n_labels:
            raise CheckpointError(  # the wording of BoundTask.saved_head, which checks the hidden size too
                f"{path}: {name} has shape {tuple(w.shape)}, expected ({n_labels}, hidden size): one row per label"
            )


def _deep_tokens(tensors: dict[str, torch.Tensor]) -> int:
    """Slots of a deep prompt (deep.keys/deep.values (layers, kv heads, tokens, head dim)); 0 for a plain prompt."""
    k, s = tensors.get("deep.keys"), tensors.get("late.states")  # a late prompt's (tokens, d): softprompt.late
    return int(k.shape[2]) if k is not None and k.ndim == 4 else int(s.shape[0]) if s is not None and s.ndim == 2 else 0


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


def _check_image(path: str, ckpt: PromptCheckpoint) -> None:
    """An image prompt (softprompt.vision: vpt, vpt-deep, coop) is for --task image-classify, names its classes,
    its image model (fingerprint) and that model's geometry (`vision`); vpt/vpt-deep hold a linear head and
    vpt-deep its layers 1..L-1 in `vpt.deep` (L-1, P, d); a text prompt holds no image tensors."""
    method, meta = ckpt.meta.get("method"), ckpt.meta
    if method not in IMAGE_METHODS:
        if meta.get("task") == "image-classify" or "vpt.deep" in ckpt.extra:
            raise CheckpointError(f"{path}: an image-classify prompt must have method vpt, vpt-deep or coop")
        return
    if meta.get("task") != "image-classify":
        raise CheckpointError(f"{path}: a {method} prompt must have task 'image-classify' in its metadata")
    vision = meta.get("vision")
    if isinstance(vision, str):
        try:
            vision = json.loads(vision)
        except json.JSONDecodeError:
            vision = None
        meta["vision"] = vision
    if not isinstance(vision, dict) or not isinstance(vision.get("layers"), int) or vision["layers"] < 1:
        raise CheckpointError(f"{path}: a {method} prompt needs its image model's 'vision' metadata (layers, ...)")
    if not meta.get("fingerprint") or not isinstance(meta.get("labels"), dict):
        raise CheckpointError(f"{path}: a {method} prompt needs its image model's fingerprint and its class labels")
    deep = ckpt.extra.get("vpt.deep")
    if method != "vpt-deep" and deep is not None:
        raise CheckpointError(f"{path}: a {method} prompt holds no 'vpt.deep' tensor (that is vpt-deep)")
    if method == "vpt-deep":
        want = (vision["layers"] - 1, *ckpt.prompt.shape)
        if deep is None or tuple(deep.shape) != want:
            got = None if deep is None else tuple(deep.shape)
            raise CheckpointError(f"{path}: 'vpt.deep' must be (layers-1, tokens, dim) = {want}, got {got}")
    if method == "coop":
        coop, n = meta.get("coop"), len(meta["labels"].get("labels") or [])
        m = coop.get("context_tokens") if isinstance(coop, dict) else None
        rows = (m or 0) * (n if isinstance(coop, dict) and coop.get("class_specific") else 1)
        if type(m) is not int or m < 1 or ckpt.prompt.shape[0] != rows:
            raise CheckpointError(f"{path}: a coop prompt needs 'coop' metadata (context_tokens) matching its "
                                  f"context rows ({ckpt.prompt.shape[0]})")  # fmt: skip
    if method in ("vpt", "vpt-deep") and "head.linear.weight" not in ckpt.extra:
        raise CheckpointError(f"{path}: a {method} prompt needs its linear head ('head.linear.weight')")
