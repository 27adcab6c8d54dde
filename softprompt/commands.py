"""The typed configs of every command but `train` (whose sections are softprompt.config's RunConfig): one
dataclass field per flag, with its docstring as the flag's help; `softprompt.parsers` builds each command's flags
from them and `softprompt.cli` hands each handler its instance (`from_args`). Imports no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softprompt.config import ConfigError, flag


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """An instance of the command dataclass `cls` from the parsed flags (one attribute per field)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


# ---- the other commands' flags: one field per flag -----------------------------------------------------------
SKIP_CHECK_HELP = "skip the load-time check that softprompt's forward equals the model's own (exit 2 on a mismatch)"
SCHEDULER_MODES = ("mixed", "per-task")  # softprompt.serve.scheduler.MODES (a test keeps the two equal)


@dataclass(kw_only=True)
class TrainCommandConfig:
    """`softprompt train`'s flags besides RunConfig's: the YAML file and the data-parallel launch."""

    config: str | None = None
    """YAML file with any of the options below (flags given here win)"""
    distributed: bool = flag(False, group="distributed")
    """data-parallel training: re-run this command under `accelerate launch` (see docs/distributed.md)"""
    nproc_per_node: int | None = flag(None, group="distributed")
    """processes for --distributed; when not given: the number of GPUs, or 2 on a CPU-only machine"""
    accelerate_config: str | None = flag(None, group="distributed")
    """an `accelerate config` YAML for --distributed (e.g. FSDP or DeepSpeed; see docs/distributed.md)"""


@dataclass(kw_only=True)
class TrainMultiConfig:
    """`softprompt train-multi`: the YAML file and the flags that override its top-level options (None: the
    file's value, else the `softprompt train` default)."""

    config: str = flag(required=True)
    """YAML file with top-level options and a `tasks:` list"""
    shared_tokens: int | None = None
    """tokens of the shared prompt (default 10)"""
    num_tokens: int | None = None
    """tokens of each task's own prompt"""
    out: str | None = None
    """output directory (default: `out` in the config, else multitask/)"""
    model: str | None = None
    """backbone: an alias from `softprompt models`, a local directory or a hub name (overrides `model`)"""
    max_steps: int | None = None
    """optimiser steps (overrides `max_steps`)"""
    lr: float | None = None
    """peak learning rate (overrides `lr`)"""
    batch_size: int | None = None
    """rows per optimiser step, drawn over the tasks (overrides `batch_size`)"""
    seed: int | None = None
    """random seed: init and batch draws (overrides `seed`)"""
    device: str | None = None
    """device: auto, cpu, cuda, cuda:N (overrides `device`)"""
    resume: str | None = None
    """state directory to resume from (default OUT/state)"""
    progress: bool | None = None
    """show a progress bar (overrides `progress`)"""
    overwrite: bool | None = None
    """replace a file in the output directory that is not a softprompt prompt (overrides `overwrite`)"""


@dataclass(kw_only=True)
class PromptCommandConfig:
    """What eval, predict and generate share: the prompt(s) and the backbone they run on."""

    prompt: list[str] = flag(action="append", required=True)
    """prompt .safetensors (repeat for an ensemble)"""
    model: str | None = None
    """backbone (default: the base model recorded in the prompt)"""
    allow_other_model: bool = False
    """skip the base-model fingerprint check"""
    skip_equivalence_check: bool = False
    """skip the load-time check that softprompt's forward equals the model's own (exit 2 on a mismatch)"""
    combine: str = flag("mean", choices=["mean", "vote"])
    """ensemble combination"""
    batch_size: int = 32
    """inputs per forward pass"""
    device: str = "auto"
    """device: auto (cuda when available, else cpu), cpu, cuda, cuda:N"""


@dataclass(kw_only=True)
class EvalConfig(PromptCommandConfig):
    """`softprompt eval`: evaluate a prompt on a labelled file; prints one JSON object. With --icl-demos instead of
    --prompt: the in-context baseline (the frozen model with k demonstrations in context, softprompt.icl)."""

    prompt: list[str] | None = flag(None, action="append")  # type: ignore[assignment]  # optional here
    """prompt .safetensors (repeat for an ensemble); required unless --icl-demos"""
    data: str = flag(required=True)
    """labelled file (jsonl/csv/tsv)"""
    max_new_tokens: int = 32
    """tokens generated per input (generation tasks)"""
    columns: str | None = None
    """comma-separated column names of a headerless CSV/TSV (e.g. text,label)"""
    skip_bad_images: bool = False
    """image prompts: skip (and count) missing or unreadable images instead of stopping at the first"""
    icl_demos: str | None = None
    """labelled file: score the frozen --model with --k of its examples in context instead of a prompt (ICL)"""
    k: int = 8
    """demonstrations in context (--icl-demos)"""
    icl_seed: int = 0
    """seed of the demonstrations' draw (--icl-demos)"""
    icl_balanced: bool = False
    """draw the demonstrations round-robin over the classes (--icl-demos)"""
    icl_instructions: str | None = None
    """text file put before the demonstrations (--icl-demos)"""
    template: str = "{text}"
    """input template (--icl-demos; a prompt file brings its own)"""
    labels: str | None = None
    """verbalizer "label=word,..." (--icl-demos; a prompt file brings its own; default: each label its own word)"""

    def validate(self) -> None:
        """Raise ConfigError naming the flag: a prompt or --icl-demos (not both), existing files, k >= 0."""
        if self.icl_demos is None:
            if not self.prompt:
                raise ConfigError("--prompt: a prompt file is required (or --icl-demos FILE for the ICL baseline)")
            return
        if self.prompt:
            raise ConfigError("--icl-demos: scores the model with demonstrations in context; drop --prompt")
        if not self.model:
            raise ConfigError("--icl-demos: --model is required (no prompt file names the base model)")
        if self.k < 0:
            raise ConfigError(f"--k must be >= 0, got {self.k}")
        for flag_, path in (("--icl-demos", self.icl_demos), ("--icl-instructions", self.icl_instructions)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{flag_}: file not found: {path}")


@dataclass(kw_only=True)
class DistillConfig:
    """`softprompt distill`'s flags besides RunConfig's (the student prompt's training, as `softprompt train`'s):
    the hard prompt to compile (the teacher) and where the student's inputs come from (softprompt.distill)."""

    config: str | None = None
    """YAML file with any of the training options below (flags given here win)"""
    teacher_prompt: str | None = None
    """text file: the hard prompt to compile (instructions and/or demonstrations), put in context as it is"""
    demos: str | None = None
    """labelled file: --k demonstrations drawn from it (template filled, then the label word), after the
    --teacher-prompt text if one is given"""
    k: int = 8
    """demonstrations drawn from --demos"""
    demo_seed: int = 0
    """seed of the demonstrations' draw"""
    balanced: bool = False
    """draw the demonstrations round-robin over the classes"""
    alpha: float = 0.0
    """weight of the labelled cross-entropy next to the KL term (0: --train needs no labels)"""
    self_study: int = 0
    """inputs the model writes itself behind the hard prompt (seeded sampling; added to --train's rows)"""
    self_study_seed: int = 0
    """seed of the self-study sampling"""
    self_study_tokens: int = 48
    """longest sampled template field, in tokens (self-study)"""
    self_study_temperature: float = 1.0
    """sampling temperature of self-study"""
    teacher_temperature: float = 1.0
    """the teacher's class (or token) distribution is softmax(scores / T); T < 1 sharpens it toward its argmax, so the
    student is pulled to agree with the teacher's predictions, not only to match near-ties"""
    vocab_kl: float = 0.0
    """classify: weight of a second KL term over the whole vocabulary at the answer position (the teacher's full
    next-token distribution there, T = 1), next to the verbalizer classes' KL: more of the teacher to match per input"""
    student_init: str = flag("prompt", choices=["prompt", "anchors"])
    """prompt: the student starts from --init as any prompt does; anchors (--method deep): from the teacher context's
    own keys/values at its label words and last tokens, moved in front of the input (softprompt.distill.anchor_kv)"""
    student_positions: str = flag("own", choices=["own", "teacher"])
    """own: the input's positions follow the student's slots; teacher (--method deep): the input keeps the positions
    it has behind the teacher's context (a gap after the slots, recorded in the file), so that its distance to the
    model's lead token is the teacher's"""
    vocab_kl_at: str = flag("answer", choices=["answer", "input"])
    """where --vocab-kl's KL is taken: the answer position, or input: the mean over every position of the input (the
    teacher's next-token distributions along the input, as Cartridges distil)"""

    def validate(self) -> None:
        """Raise ConfigError naming the flag for a missing hard prompt, a missing file or an out-of-range value."""
        if not self.teacher_prompt and not self.demos:
            raise ConfigError("--teacher-prompt or --demos: the hard prompt to compile is required")
        for flag_, path in (("--teacher-prompt", self.teacher_prompt), ("--demos", self.demos)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{flag_}: file not found: {path}")
        if self.demos and self.k < 1:
            raise ConfigError(f"--k must be >= 1 with --demos, got {self.k}")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ConfigError(f"--alpha must be >= 0, got {self.alpha}")
        if self.self_study < 0 or self.self_study_tokens < 1:
            raise ConfigError("--self-study must be >= 0 and --self-study-tokens >= 1")
        if not (math.isfinite(self.self_study_temperature) and self.self_study_temperature > 0):
            raise ConfigError(f"--self-study-temperature must be > 0, got {self.self_study_temperature}")
        if not (math.isfinite(self.teacher_temperature) and self.teacher_temperature > 0):
            raise ConfigError(f"--teacher-temperature must be > 0, got {self.teacher_temperature}")
        if not (math.isfinite(self.vocab_kl) and self.vocab_kl >= 0):
            raise ConfigError(f"--vocab-kl must be >= 0, got {self.vocab_kl}")


@dataclass(kw_only=True)
class PredictConfig(PromptCommandConfig):
    """`softprompt predict`: labels and probabilities per input, JSONL out."""

    data: str = flag(required=True)
    """file, or - for JSONL on stdin"""
    output: str | None = None
    """write JSONL here (atomically) instead of stdout"""
    columns: str | None = None
    """comma-separated column names of a headerless CSV/TSV (e.g. text,label)"""
    skip_bad_images: bool = False
    """image prompts: skip (and count) missing or unreadable images instead of stopping at the first"""


@dataclass(kw_only=True)
class GenerateConfig(PromptCommandConfig):
    """`softprompt generate`: generate text with a prompt."""

    input: str | None = flag(None, one_of="source")
    """one input text (the filled template, or the value of its single field)"""
    data: str | None = flag(None, one_of="source")
    """file, or - for JSONL on stdin"""
    max_new_tokens: int = 32
    """largest number of tokens generated per input"""
    do_sample: bool = False
    """sample (with --temperature, --top-p, --top-k) instead of greedy / beam search"""
    temperature: float = 1.0
    """sampling temperature (with --do-sample)"""
    top_p: float = 1.0
    """nucleus sampling: keep the smallest set of tokens of this total probability (with --do-sample)"""
    top_k: int = 0
    """keep the k most likely tokens (with --do-sample; 0: all)"""
    num_beams: int = 1
    """beam search with this many beams (1: greedy)"""
    seed: int = 0
    """random seed of the sampling"""


@dataclass(kw_only=True)
class InfoConfig:
    """`softprompt info`: metadata and size of a prompt file (JSON)."""

    path: str = flag(positional=True)
    """the prompt file (.safetensors)"""


@dataclass(kw_only=True)
class ModelsConfig:
    """`softprompt models`: the built-in model aliases and whether each is installed."""

    architectures: bool = False
    """the supported-architectures table instead"""


@dataclass(kw_only=True)
class ExportConfig:
    """`softprompt export --to peft|prompt-table PROMPT [PROMPT ...] DIR`."""

    export_to: str = flag(flags=("--to",), required=True, choices=["peft", "prompt-table"])
    """the format written: a PEFT prompt-tuning adapter or a TensorRT-LLM/NeMo prompt table"""
    paths: list[str] = flag(positional=True, nargs="+", metavar="PATH")
    """prompt file(s), then the output directory"""
    model: str | None = None
    """base model (default: the one recorded in the prompt)"""
    allow_other_model: bool = False
    """skip the base-model fingerprint check"""
    base_model: str | None = None
    """peft: base_model_name_or_path to write (default: a loadable path/name)"""
    fold_bos: bool = False
    """peft: a --position auto prompt behind a BOS/CLS gets that token as virtual token 0 (exact)"""
    force: bool = False
    """peft: export even when PEFT's outputs would differ"""
    task_names: str | None = None
    """prompt-table: comma-separated task names (default: the file stems)"""
    dtype: str = flag("float32", choices=["float32", "float16"])
    """prompt-table: array dtype"""


@dataclass(kw_only=True)
class ImportConfig:
    """`softprompt import --from peft DIR PROMPT`."""

    import_from: str = flag(flags=("--from",), required=True, choices=["peft"])
    """the format read: a PEFT prompt-tuning adapter directory"""
    adapter_dir: str = flag(positional=True, metavar="DIR")
    """the adapter directory"""
    out: str = flag(positional=True, metavar="PROMPT")
    """the .safetensors prompt file to write"""
    model: str | None = None
    """base model (default: the adapter's base_model_name_or_path)"""
    allow_other_model: bool = False
    """skip the base-model fingerprint check"""
    task: str | None = flag(None, choices=["classify", "generate"])
    """task of a PEFT-trained adapter"""
    template: str | None = None
    """input template of a PEFT-trained adapter (default {text})"""
    labels: str | None = None
    """verbalizer "label=word,..." of a PEFT-trained classification adapter"""


@dataclass(kw_only=True)
class SimilarityConfig:
    """`softprompt similarity`: rank source prompts by cosine similarity to a target prompt (SPoT)."""

    sources: list[str] = flag(positional=True, nargs="+", metavar="PROMPT")
    """source prompt files"""
    to: str = flag(required=True, metavar="PROMPT")
    """the target task's prompt"""
    by: str = flag("mean", choices=["mean", "flat"])
    """rank by the cosine of the mean token (any lengths) or of the flattened prompt"""
    json: bool = False
    """one JSON object per source instead of a table"""


@dataclass
class ServeConfig:
    """`softprompt serve`: every prompt in `prompts` is a task on one model (softprompt.serve)."""

    prompts: str = flag(".", required=True, metavar="DIR")
    """directory of prompt files (task = file name)"""
    model: str | None = None
    """backbone (default: the base model recorded in the first prompt)"""
    host: str = "127.0.0.1"
    """bind address (default: 127.0.0.1, loopback only)"""
    port: int = 8000
    """TCP port to listen on"""
    admin_token: str | None = None
    """bearer token of the admin endpoints (default: $SOFTPROMPT_ADMIN_TOKEN; neither: admin endpoints disabled)"""
    max_batch_size: int = 32
    """rows per forward pass"""
    max_wait_ms: float = 5.0
    """longest wait for a batch to fill"""
    max_queue: int = 1024
    """queued requests before 429"""
    timeout_s: float = 60.0
    """request timeout, 504"""
    kv_cache_mb: float = 1024.0
    """memory for per-task prompt keys/values"""
    max_input_tokens: int | None = None
    """longest input, 413 (default: each task's own limit)"""
    max_new_tokens: int = 512
    """largest max_new_tokens allowed"""
    max_upload_mb: float = 16.0
    """largest prompt upload"""
    max_inputs: int = 256
    """most inputs in one request, 413"""
    max_body_mb: float = 8.0
    """largest request body of the inference endpoints, chunked or not, 413"""
    max_input_chars: int | None = None
    """longest input in characters, 413 before tokenising (default: the task's token limit x the tokenizer's
    longest token)"""
    max_connections: int = 1000
    """open connections; beyond, the longest-idle one is closed (408) or the new one refused (503)"""
    header_timeout_s: float = 10.0
    """a request's headers must arrive within this, 408"""
    body_timeout_s: float = 30.0
    """its body must arrive within this after them, 408"""
    keep_alive_s: float = 5.0
    """idle kept-alive connections are closed after this"""
    scheduler: str = flag("mixed", choices=list(SCHEDULER_MODES))
    """mixed-task batches or one task per batch"""
    no_kv_cache: bool = False
    """run the prompt with every request (the PEFT way)"""
    device: str = "auto"
    """device: auto (cuda when available, else cpu), cpu, cuda, cuda:N"""
    dtype: str = "float32"
    """weight dtype of the backbone: float32, bfloat16 or float16"""
    allow_other_model: bool = False
    """skip the base-model fingerprint check"""
    skip_equivalence_check: bool = False
    """skip the load-time check that softprompt's forward equals the model's own (exit 2 on a mismatch)"""
    log_level: str = flag("info", choices=["debug", "info", "warning", "error"])
    """log level of the server (softprompt and uvicorn loggers)"""
    threads: int | None = None
    """torch CPU threads (default: torch's choice)"""

    def validate(self) -> None:
        """Raise ConfigError naming the flag for out-of-range values."""
        if self.scheduler not in SCHEDULER_MODES:
            raise ConfigError(f"--scheduler must be one of {', '.join(SCHEDULER_MODES)}, got {self.scheduler!r}")
        for flag_, v in (
            ("--max-batch-size", self.max_batch_size),
            ("--max-queue", self.max_queue),
            ("--max-new-tokens", self.max_new_tokens),
            ("--max-inputs", self.max_inputs),
            ("--max-connections", self.max_connections),
        ):
            if v < 1:
                raise ConfigError(f"{flag_} must be >= 1, got {v}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.max_input_tokens is not None and self.max_input_tokens < 1:
            raise ConfigError(f"--max-input-tokens must be >= 1, got {self.max_input_tokens}")
        if self.max_input_chars is not None and self.max_input_chars < 1:
            raise ConfigError(f"--max-input-chars must be >= 1, got {self.max_input_chars}")
        for flag_, x in (
            ("--max-body-mb", self.max_body_mb),
            ("--header-timeout-s", self.header_timeout_s),
            ("--body-timeout-s", self.body_timeout_s),
            ("--keep-alive-s", self.keep_alive_s),
        ):
            if not (math.isfinite(x) and x > 0):
                raise ConfigError(f"{flag_} must be > 0, got {x}")
        values = (self.max_wait_ms, self.timeout_s, self.kv_cache_mb, self.max_upload_mb)
        if (
            not all(math.isfinite(v) for v in values)
            or self.max_wait_ms < 0
            or self.timeout_s <= 0
            or (self.kv_cache_mb < 0 or self.max_upload_mb <= 0)
        ):
            raise ConfigError("--max-wait-ms and --kv-cache-mb must be >= 0, --timeout-s and --max-upload-mb > 0")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if not Path(self.prompts).is_dir():
            raise ConfigError(f"--prompts: {self.prompts} is not a directory")
