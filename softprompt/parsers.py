"""The `softprompt` command tree (argparse), kept apart from the commands' code: building it imports neither torch
nor transformers, so `softprompt --help` and a mistyped flag answer at once.

Every command's flags come from typed dataclasses (softprompt.config), one field per flag with its docstring as
help: `train`'s from RunConfig's sections (each field is `--field-name` and `--section.field_name`) and
TrainCommandConfig, the others' from the dataclass COMMANDS names (`serve` from ServeConfig, `train-multi` from
TrainMultiConfig, ...). A field's type gives the flag's type (a bool is a switch), its default the default, and
`config.flag()` the rest (choices, required, positionals).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

from softprompt.commands import (
    SKIP_CHECK_HELP,
    DistillConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    ImportConfig,
    InfoConfig,
    ModelsConfig,
    PredictConfig,
    ServeConfig,
    SimilarityConfig,
    TrainCommandConfig,
    TrainMultiConfig,
)
from softprompt.config import SECTIONS, field_docs

__all__ = [
    "COMMANDS",
    "SKIP_CHECK_HELP",
    "add_fields",
    "add_interop_parsers",
    "add_multitask_parser",
    "add_similarity_parser",
    "add_train_flags",
    "build_parser",
    "command_dataclasses",
]


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: the dataclass its flags come from, its one-line help and (optionally) a --help text."""

    config: type
    help: str
    description: str | None = None
    raw_description: bool = False


def _module_doc(name: str) -> str:
    """A softprompt module's docstring, read from its source without importing it (and torch with it)."""
    spec = importlib.util.find_spec(f"softprompt.{name}")
    assert spec is not None and spec.origin is not None
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) or ""


# The command tree, in `softprompt --help` order. `train` also takes RunConfig's sections (_add_config_flags).
COMMANDS: dict[str, Command] = {
    "train": Command(TrainCommandConfig, "train a soft prompt"),
    "export": Command(
        ExportConfig,
        "write a prompt for another engine: a PEFT adapter or a TensorRT-LLM/NeMo prompt table",
        "export --to peft PROMPT DIR | export --to prompt-table PROMPT [PROMPT ...] DIR",
    ),
    "import": Command(ImportConfig, "convert a PEFT prompt-tuning adapter into a softprompt prompt file"),
    "train-multi": Command(
        TrainMultiConfig,
        "multi-task prompt tuning: shared + per-task prompts, one file per task",
        "multitask",  # the module whose docstring is the --help text
        raw_description=True,
    ),
    "similarity": Command(SimilarityConfig, "rank source prompts by cosine similarity to a target prompt (SPoT)"),
    "distill": Command(
        DistillConfig,
        "compile a long hard prompt (instructions, demonstrations) into a soft prompt of a few tokens",
        "distill",  # the module whose docstring is the --help text
        raw_description=True,
    ),
    "eval": Command(EvalConfig, "evaluate a prompt on a labelled file; prints one JSON object"),
    "predict": Command(PredictConfig, "labels and probabilities per input, JSONL out"),
    "generate": Command(GenerateConfig, "generate text with a prompt"),
    "info": Command(InfoConfig, "metadata and size of a prompt file (JSON)"),
    "models": Command(ModelsConfig, "list the built-in model aliases and whether each is installed"),
    "serve": Command(ServeConfig, "HTTP server: every prompt in --prompts DIR is a task on one model"),
}


def command_dataclasses(name: str) -> list[type]:
    """Every dataclass whose fields are `name`'s flags (train: its own and RunConfig's sections)."""
    own = [COMMANDS[name].config]
    return [*own, *SECTIONS.values()] if name in TRAINING else own


TRAINING = ("train", "distill")  # the commands that take RunConfig's sections (a prompt is trained)


_TYPES: dict[str, Any] = {"int": int, "float": float}


def _show(value: Any) -> str:
    """A default as --help shows it: 5.0 as 5, 1e-4 as 0.0001."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_fields(
    p: argparse.ArgumentParser, cls: type, *, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = ()
) -> None:
    """One argument per field of the dataclass `cls` (or of the fields `only` names, less `skip`), help = its
    docstring. The type comes from the annotation (`int | None` is an int flag; `str` and lists take strings; a
    `bool` is a switch, a `bool | None` a --x/--no-x pair whose unset value is None), the default from the field
    (a required flag and a positional have none), and the rest from its config.flag() metadata."""
    docs = field_docs(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or f.name in skip:
            continue
        meta = dict(f.metadata)
        kinds = [k.strip() for k in str(f.type).split("|")]
        optional = "None" in kinds
        kind = next(k for k in kinds if k != "None")
        has_default = f.default is not dataclasses.MISSING
        default = f.default if has_default and not meta.get("required") else None
        help_ = docs.get(f.name, "")
        shown = has_default and default is not None and default is not False and not meta.get("positional")
        if shown and "(default" not in help_:
            help_ += f" (default: {_show(default)})"
        kw: dict[str, Any] = {"help": help_.replace("%", "%%")}  # argparse %-formats help
        for key in ("choices", "metavar", "nargs"):
            if key in meta:
                kw[key] = meta[key]
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction if optional else "store_true"
            kw["default"] = None if optional else bool(default)
        else:
            if kind in _TYPES:
                kw["type"] = _TYPES[kind]
            if "action" in meta:
                kw["action"] = meta["action"]
            if not meta.get("positional"):
                kw["default"] = default
        target: Any = p
        if "group" in meta:
            target = groups.get(meta["group"]) or groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        if "one_of" in meta:  # exactly one of the fields that share the name
            name = f"one_of:{meta['one_of']}"
            target = groups.get(name) or groups.setdefault(name, p.add_mutually_exclusive_group(required=True))
        if meta.get("positional"):
            target.add_argument(f.name, **kw)
        else:
            if meta.get("required"):
                kw["required"] = True
            flags = meta.get("flags", (f"--{f.name.replace('_', '-')}",))
            target.add_argument(*flags, dest=f.name, **kw)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    for sec, cls in SECTIONS.items():
        g = p.add_argument_group(sec)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            flags = [f"--{f.name.replace('_', '-')}", f"--{sec}.{f.name}"]
            default = f.default
            help_ = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")  # argparse %-formats help
            if isinstance(default, bool):
                # Not BooleanOptionalAction: it treats every flag starting with --no- as "off", so --no-truncate
                # (the field no_truncate) could never be switched on. The off-switch of no_x is --x.
                dashed = f.name.replace("_", "-")
                off = [f"--{dashed[3:]}" if f.name.startswith("no_") else f"--no-{dashed}", f"--no-{sec}.{f.name}"]
                g.add_argument(*flags, dest=f.name, action="store_const", const=True, default=None, help=help_)
                off_help = f"turn {flags[0]} off"
                g.add_argument(*off, dest=f.name, action="store_const", const=False, default=None, help=off_help)
            else:
                g.add_argument(*flags, dest=f.name, default=None, metavar=f.name.upper(), help=help_)


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Flags for `softprompt train`: --distributed, --nproc-per-node, --accelerate-config (TrainCommandConfig)."""
    add_fields(parser, TrainCommandConfig, skip=("config",))


def _add_command(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    cmd = COMMANDS[name]
    kw: dict[str, Any] = {"help": cmd.help}
    if cmd.description is not None:
        kw["description"] = _module_doc(cmd.description) if cmd.raw_description else cmd.description
    if cmd.raw_description:
        kw["formatter_class"] = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(name, **kw)
    if name == "train":
        # No ArgumentDefaultsHelpFormatter: every flag's default is None (so that YAML values are not overridden)
        # and its help already names the dataclass default; the formatter appended a misleading "(default: None)".
        add_fields(p, TrainCommandConfig, only=("config",))
        _add_config_flags(p)
        add_train_flags(p)
    elif name == "distill":  # its own flags, then the student's training flags (train's)
        add_fields(p, cmd.config)
        _add_config_flags(p)
    else:
        add_fields(p, cmd.config)
    return p


def add_interop_parsers(sub: argparse._SubParsersAction) -> None:
    """`softprompt export --to peft|prompt-table ...` and `softprompt import --from peft DIR PROMPT`."""
    _add_command(sub, "export")
    _add_command(sub, "import")


def add_multitask_parser(sub: argparse._SubParsersAction) -> None:
    """`softprompt train-multi --config FILE [overrides]`."""
    _add_command(sub, "train-multi")


def add_similarity_parser(sub: argparse._SubParsersAction) -> None:
    """`softprompt similarity PROMPT [PROMPT ...] --to PROMPT`."""
    _add_command(sub, "similarity")


def build_parser() -> argparse.ArgumentParser:
    """The whole `softprompt` command tree: one subcommand per COMMANDS entry."""
    p = argparse.ArgumentParser(prog="softprompt", description="Prompt tuning on frozen Transformers models.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in COMMANDS:
        _add_command(sub, name)
    return p
