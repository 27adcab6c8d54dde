"""Typed configuration: the single source of truth for the CLI, YAML files and the Python API.

Every field has a docstring (the string literal under it); the command tree (`softprompt.parsers`) builds every
command's flags from these dataclasses, so a field added here is a flag at once. `train`'s sections (RunConfig) are
also YAML keys: each field is `--lr` and `--train.lr`; field names are unique across sections so that the short flag
form is unambiguous. The other commands' dataclasses (ServeConfig, TrainMultiConfig, EvalConfig, ...) are in
softprompt.commands, one field per flag; `flag()` adds what a type and a default do not say (choices, required, a
positional, ...).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

from softprompt.methods import IMAGE_METHODS
from softprompt.methods import REGISTRY as METHODS


class ConfigError(ValueError):
    """A bad option value; the message names the flag or field."""


def flag(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **meta: Any) -> Any:
    """A dataclass field with the command-line details its type and default do not give (softprompt.parsers):

    flags=("--to",)   its option strings (default: --field-name)     positional=True  an argument, not a flag
    choices=[...]     the values allowed                              nargs="+"        (positionals) one or more
    required=True     the flag must be given                          metavar="DIR"    the value's name in --help
    action="append"   repeatable (a list)                             one_of="source"  exactly one of the fields
    group="title"     shown under this heading in --help                               sharing the name is given
    """
    return field(default=default, default_factory=factory, metadata=meta)


@dataclass
class ModelConfig:
    model: str = "smollm2-135m"
    """Backbone: an alias from `softprompt models`, a local directory or a hub name (offline cache only)."""
    dtype: str = "float32"
    """Weight dtype of the frozen backbone: float32, bfloat16 or float16."""
    device: str = "auto"
    """Device: auto (cuda when available, else cpu), cpu, cuda, cuda:N."""
    dropout: bool = False
    """Keep the backbone's dropout active during training (off by default: the backbone is frozen)."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: sdpa or eager."""
    quantize: str = "none"
    """Frozen-weight quantization: none, int8 or int4 (optimum-quanto; CPU/GPU), bnb8 or bnb4 (bitsandbytes; CUDA)."""
    skip_equivalence_check: bool = False
    """Skip the load-time check that softprompt's forward path equals the model's own (softprompt.arch)."""


@dataclass
class PromptConfig:
    num_tokens: int = 20
    """Number of virtual tokens in the soft prompt (Lester et al.: 5-100)."""
    init: str = "labels"
    """Initialisation: random | vocab | sample-vocab | text:"phrase" | labels | file:PATH (see softprompt.prompt)."""
    init_scale: float = 0.5
    """Half-width of the uniform distribution used by `random` init."""
    position: str = "auto"
    """Where the prompt goes: auto (after the BOS/CLS token when the tokenizer adds one, else first) or start."""
    method: str = "prompt"
    """Prompt method (softprompt.methods): prompt (input-embedding soft prompt), deep (learned keys/values at every
    layer, softprompt.deep), routed (K prompts and a router), conditioned (a prompt generated from the input) or
    late (hidden states entering at --layer, softprompt.late); with --task image-classify: vpt, vpt-deep (visual
    prompt tokens in the image encoder) or coop (context vectors in CLIP's/SigLIP's text encoder), softprompt.vision."""
    deep_reparam: int = 0
    """--method deep: hidden size of the reparameterisation MLP used while training (0: none; dropped at save)."""
    reparam: str = "none"
    """--method prompt: none, or residual (Residual Prompt Tuning: the prompt passes through a residual bottleneck MLP
    while training; folded into an ordinary prompt at save, softprompt.prompt)."""
    reparam_hidden: int = 400
    """--reparam residual: the bottleneck width of its MLP."""
    routes: int = 4
    """--method routed: K, the number of prompts (routes) of --num-tokens tokens each; every input takes one."""
    balance_weight: float = 0.1
    """--method routed: weight of the load-balancing loss (Switch-Transformer style) added to the training loss."""
    route_noise: float = 0.1
    """--method routed: route k starts from the --init prompt plus seeded Gaussian noise of this standard deviation,
    relative to the init's RMS (0: every route starts from the --init prompt)."""
    rank: int = 1
    """--method conditioned: rank r of the input-dependent part of the prompt (softprompt.conditioned)."""
    layer: int = 0
    """--method late: the layer L the prompt enters at (0 < L < the model's layers; layers below L run on the input
    alone, softprompt.late)."""
    late_cache_mb: int = 2048
    """--method late: memory (MiB) for what enters --layer per training example, kept across epochs so a step runs
    only the layers from --layer up (0: no cache)."""
    context_tokens: int = 16
    """--method coop: learned context vectors M in front of each class name ([SOS][V1..VM][CLASS].[EOS])."""
    class_specific: bool = False
    """--method coop: one set of context vectors per class (CoOp's class-specific context) instead of one shared."""


@dataclass
class DataConfig:
    train: str | None = None
    """Training file (.jsonl, .json, .csv, .tsv, or hf:NAME[:SPLIT] when `datasets` is installed)."""
    eval: str | None = None
    """Evaluation file (same formats as --train)."""
    task: str = "classify"
    """classify (verbalizer scoring / encoder head), generate (text-to-text) or image-classify (an image model:
    --train is a class-folder tree root/CLASS/*.png|jpg or a CSV/JSONL with an image-path column)."""
    image_field: str = "image"
    """--task image-classify: the CSV/JSONL column holding each image's path (relative to the file's folder)."""
    skip_bad_images: bool = False
    """--task image-classify: skip (and count) missing, truncated or unreadable images instead of stopping at one."""
    template: str = "{text}"
    """Input template; {field} placeholders are filled from each record (\\n and \\t escapes are honoured)."""
    label_field: str = "label"
    """Record field holding the class label (classify)."""
    labels: str | None = None
    """Verbalizer "label=word,label=word words" (classify); default: each label is its own word."""
    target_field: str = "target"
    """Record field holding the target text (generate)."""
    columns: str | None = None
    """Comma-separated column names for CSV/TSV files without a header row."""
    max_length: int = 512
    """Maximum input tokens (template filled); longer inputs are truncated from the left and counted."""
    max_target_length: int = 64
    """Maximum target tokens (generate)."""
    no_truncate: bool = False
    """Error on an over-long input instead of truncating it."""
    head: str = "lm"
    """Scoring head: lm (verbalizer log-likelihood; causal and seq2seq), linear (encoders, and causal: on the last
    input position, started from the verbalizer) or similarity (encoders)."""


@dataclass
class TrainConfig:
    optimizer: str = "adamw"
    """adamw or adafactor (transformers' Adafactor, Lester et al. use lr 0.3)."""
    lr: float = 0.01
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Weight decay (AdamW) applied to the prompt."""
    head_lr: float = 0.0
    """Peak learning rate of a trained head (--head linear); 0: the same as --lr."""
    schedule: str = "linear"
    """Learning-rate schedule after warm-up: constant, linear or cosine."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    batch_size: int = 16
    """Examples per optimiser step (before accumulation)."""
    grad_accum: int = 1
    """Gradient accumulation steps (effective batch = batch_size * grad_accum)."""
    group_by_length: bool = True
    """Batch examples of similar length together (less padding, faster); off: uniformly random batches."""
    max_steps: int = 300
    """Optimiser steps; 0 means use --epochs."""
    epochs: float = 0.0
    """Epochs over the training set (used when --max-steps is 0)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    eval_every: int = 0
    """Evaluate every K steps (0: only at the end)."""
    eval_max: int = 0
    """Evaluate on at most this many examples during training (0: all)."""
    patience: int = 0
    """Early stopping: stop after this many evaluations without improvement (0 disables)."""
    metric: str = "accuracy"
    """Metric for keeping the best prompt and early stopping: accuracy, macro_f1, exact_match, token_f1, loss."""
    seed: int = 0
    """Random seed (init, data order); two runs with the same seed are identical."""
    out: str = "prompt.safetensors"
    """Where the trained prompt is written (atomically)."""
    overwrite: bool = False
    """Replace an existing file at --out (or its log/plot) that is not a softprompt prompt; inputs never are."""
    resume: str | None = None
    """Training-state directory to resume from (also where state is written; default OUT.state/)."""
    save_every: int = 50
    """Write the training state every K steps (for --resume)."""
    plot: bool = False
    """Write a PNG of the loss and metric curves beside the prompt."""
    naive: bool = False
    """Use the concatenation path even for decoder-only models (for checking the shared-prefix path)."""
    precision: str = "fp32"
    """Autocast precision: fp32, bf16 or fp16 (bf16/fp16 for GPUs)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (long inputs, large models)."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class RunConfig:
    """Everything `softprompt train` takes."""

    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        """Raise ConfigError naming the flag for out-of-range values."""
        p, t, d = self.prompt, self.train, self.data
        checks = [
            (p.num_tokens >= 1, "--num-tokens must be >= 1"),
            (p.num_tokens <= 4096, "--num-tokens must be <= 4096"),
            (p.init_scale > 0, "--init-scale must be > 0"),
            (t.lr > 0, "--lr must be > 0"),
            (t.lr <= 10, "--lr must be <= 10"),
            (t.batch_size >= 1, "--batch-size must be >= 1"),
            (t.grad_accum >= 1, "--grad-accum must be >= 1"),
            (t.max_steps >= 0, "--max-steps must be >= 0"),
            (t.epochs >= 0, "--epochs must be >= 0"),
            (t.max_steps > 0 or t.epochs > 0, "one of --max-steps or --epochs must be > 0"),
            (t.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (t.max_grad_norm >= 0, "--max-grad-norm must be >= 0"),
            (t.eval_every >= 0, "--eval-every must be >= 0"),
            (t.eval_max >= 0, "--eval-max must be >= 0"),
            (t.patience >= 0, "--patience must be >= 0"),
            (t.save_every >= 1, "--save-every must be >= 1"),
            (d.max_target_length >= 1, "--max-target-length must be >= 1"),
            (t.weight_decay >= 0, "--weight-decay must be >= 0"),
            (0 <= t.head_lr <= 10, "--head-lr must be between 0 (= --lr) and 10"),
            (d.max_length >= 1, "--max-length must be >= 1"),
            (t.optimizer in ("adamw", "adafactor"), f"--optimizer must be adamw or adafactor, got {t.optimizer!r}"),
            (
                t.schedule in ("constant", "linear", "cosine"),
                f"--schedule must be constant, linear or cosine, got {t.schedule!r}",
            ),
            (
                d.task in ("classify", "generate", "image-classify"),
                f"--task must be classify, generate or image-classify, got {d.task!r}",
            ),
            (d.head in ("lm", "linear", "similarity"), f"--head must be lm, linear or similarity, got {d.head!r}"),
            (t.precision in ("fp32", "bf16", "fp16"), f"--precision must be fp32, bf16 or fp16, got {t.precision!r}"),
            (
                t.metric in ("accuracy", "macro_f1", "exact_match", "token_f1", "loss"),
                f"--metric must be accuracy, macro_f1, exact_match, token_f1 or loss, got {t.metric!r}",
            ),
            (p.position in ("auto", "start"), f"--position must be auto or start, got {p.position!r}"),
            (p.method in METHODS, f"--method must be one of {', '.join(METHODS)}, got {p.method!r}"),
            (p.deep_reparam >= 0, "--deep-reparam must be >= 0"),
            (p.reparam in ("none", "residual"), f"--reparam must be none or residual, got {p.reparam!r}"),
            (p.reparam == "none" or p.method == "prompt", "--reparam residual is for --method prompt"),
            (p.reparam_hidden >= 1, "--reparam-hidden must be >= 1"),
            (p.routes >= 1, "--routes must be >= 1"),
            (p.balance_weight >= 0 and math.isfinite(p.balance_weight), "--balance-weight must be a number >= 0"),
            (p.route_noise >= 0 and math.isfinite(p.route_noise), "--route-noise must be a number >= 0"),
            (p.rank >= 1, "--rank must be >= 1"),
            (p.method != "late" or p.layer >= 1, "--layer L (0 < L < the model's layers) is required by --method late"),
            (p.method == "late" or p.layer == 0, "--layer is for --method late"),
            (p.late_cache_mb >= 0, "--late-cache-mb must be >= 0"),
            (
                (d.task == "image-classify") == (p.method in IMAGE_METHODS),
                f"--method {p.method} is for {'images' if p.method in IMAGE_METHODS else 'text'}: --task "
                f"image-classify takes --method {', '.join(sorted(IMAGE_METHODS))}, the other tasks the others",
            ),
            (p.context_tokens >= 1, "--context-tokens must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)


SECTIONS: dict[str, type] = {"model": ModelConfig, "prompt": PromptConfig, "data": DataConfig, "train": TrainConfig}


def field_docs(cls: type) -> dict[str, str]:
    """Map each dataclass field to the docstring written under it (parsed from the source; inherited fields too)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(inspect.getsource(klass))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                value = nxt.value if isinstance(nxt, ast.Expr) else None
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    docs[node.target.id] = value.value.strip()
    return docs


def _field_section(name: str) -> str:
    for sec, cls in SECTIONS.items():
        if name in {f.name for f in dataclasses.fields(cls)}:
            return sec
    raise ConfigError(f"unknown option {name!r}")


def apply_options(cfg: RunConfig, options: dict[str, Any], source: str) -> None:
    """Set fields from a flat ({"lr": 0.1}) or nested ({"train": {"lr": 0.1}}) mapping; `source` names the origin."""
    for key, value in options.items():
        key_n = key.replace("-", "_")
        if key_n in SECTIONS and isinstance(value, dict):
            sec_obj = getattr(cfg, key_n)
            for sub, v in value.items():
                sub_n = sub.replace("-", "_")
                if not hasattr(sec_obj, sub_n):
                    raise ConfigError(f"{source}: unknown option {key}.{sub}")
                setattr(sec_obj, sub_n, _coerce(sec_obj, sub_n, v, source))
            continue
        if "." in key_n:
            sec, sub_n = key_n.split(".", 1)
            if sec not in SECTIONS or not hasattr(getattr(cfg, sec), sub_n):
                raise ConfigError(f"{source}: unknown option {key}")
        else:
            try:
                sec, sub_n = _field_section(key_n), key_n
            except ConfigError:
                raise ConfigError(f"{source}: unknown option {key}") from None
        sec_obj = getattr(cfg, sec)
        setattr(sec_obj, sub_n, _coerce(sec_obj, sub_n, value, source))


def _coerce(obj: Any, name: str, value: Any, source: str) -> Any:
    default = getattr(type(obj)(), name)
    if value is None:
        return value
    try:
        if default is None:  # the optional fields are all `str | None`: a YAML list or mapping is a mistake
            if isinstance(value, (dict, list)):
                raise TypeError(value)
            return str(value)
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if isinstance(value, bool) and not isinstance(default, bool):
            raise ValueError(value)  # YAML `lr: yes` is a mistake, not 1.0
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)  # YAML `max_steps: 1.5` must not silently become 1
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        want = "str" if default is None else type(default).__name__
        raise ConfigError(f"{source}: option {name} expects {want}, got {value!r}") from None


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config file; errors name the file."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config: file not found: {path}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of options")
    return data


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def build_config(args: argparse.Namespace) -> RunConfig:
    """`softprompt train`'s RunConfig: defaults, then the YAML file (--config), then flags given on the command
    line; validated."""
    cfg = RunConfig()
    if args.config:
        apply_options(cfg, load_yaml(args.config), args.config)
    given = {f.name: getattr(args, f.name) for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
    apply_options(cfg, {k: v for k, v in given.items() if v is not None}, "command line")
    cfg.validate()
    return cfg
