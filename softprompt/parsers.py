"""The `softprompt` command tree (argparse), kept apart from the commands' code: building it imports neither torch
nor transformers, so `softprompt --help` and a mistyped flag answer at once.

`train`'s flags are generated from the config dataclasses (softprompt.config): each field is `--field-name`
and `--section.field_name`, with its docstring as help.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
from pathlib import Path

from softprompt.config import SECTIONS, field_docs


def _module_doc(name: str) -> str:
    """A softprompt module's docstring, read from its source without importing it (and torch with it)."""
    spec = importlib.util.find_spec(f"softprompt.{name}")
    assert spec is not None and spec.origin is not None
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) or ""


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
    """Flags for `softprompt train`: --distributed, --nproc-per-node, --accelerate-config."""
    g = parser.add_argument_group("distributed")
    g.add_argument(
        "--distributed",
        action="store_true",
        help="data-parallel training: re-run this command under `accelerate launch` (see docs/distributed.md)",
    )
    g.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="processes for --distributed; when not given: the number of GPUs, or 2 on a CPU-only machine",
    )
    g.add_argument(
        "--accelerate-config",
        default=None,
        help="an `accelerate config` YAML for --distributed (e.g. FSDP or DeepSpeed; see docs/distributed.md)",
    )


def add_interop_parsers(sub: argparse._SubParsersAction) -> None:
    """`softprompt export --to peft|prompt-table ...` and `softprompt import --from peft DIR PROMPT`."""
    e = sub.add_parser(
        "export",
        help="write a prompt for another engine: a PEFT adapter or a TensorRT-LLM/NeMo prompt table",
        description="export --to peft PROMPT DIR | export --to prompt-table PROMPT [PROMPT ...] DIR",
    )
    e.add_argument("--to", required=True, choices=["peft", "prompt-table"], dest="export_to")
    e.add_argument("paths", nargs="+", metavar="PATH", help="prompt file(s), then the output directory")
    e.add_argument("--model", help="base model (default: the one recorded in the prompt)")
    e.add_argument("--allow-other-model", action="store_true", help="skip the base-model fingerprint check")
    e.add_argument("--base-model", help="peft: base_model_name_or_path to write (default: a loadable path/name)")
    e.add_argument(
        "--fold-bos",
        action="store_true",
        help="peft: a --position auto prompt behind a BOS/CLS gets that token as virtual token 0 (exact)",
    )
    e.add_argument("--force", action="store_true", help="peft: export even when PEFT's outputs would differ")
    e.add_argument("--task-names", help="prompt-table: comma-separated task names (default: the file stems)")
    e.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="prompt-table: array dtype")
    i = sub.add_parser("import", help="convert a PEFT prompt-tuning adapter into a softprompt prompt file")
    i.add_argument("--from", required=True, choices=["peft"], dest="import_from")
    i.add_argument("adapter_dir", metavar="DIR")
    i.add_argument("out", metavar="PROMPT", help="the .safetensors prompt file to write")
    i.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    i.add_argument("--allow-other-model", action="store_true", help="skip the base-model fingerprint check")
    i.add_argument("--task", choices=["classify", "generate"], help="task of a PEFT-trained adapter")
    i.add_argument("--template", help="input template of a PEFT-trained adapter (default {text})")
    i.add_argument("--labels", help='verbalizer "label=word,..." of a PEFT-trained classification adapter')


def add_multitask_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-multi",
        help="multi-task prompt tuning: shared + per-task prompts, one file per task",
        description=_module_doc("multitask"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML file with top-level options and a `tasks:` list")
    p.add_argument("--shared-tokens", type=int, default=None, help="tokens of the shared prompt (default 10)")
    p.add_argument("--num-tokens", type=int, default=None, help="tokens of each task's own prompt")
    p.add_argument("--out", default=None, help="output directory (default: `out` in the config, else multitask/)")
    p.add_argument("--model", default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--resume", default=None, help="state directory to resume from (default OUT/state)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)


def add_similarity_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("similarity", help="rank source prompts by cosine similarity to a target prompt (SPoT)")
    s.add_argument("sources", nargs="+", metavar="PROMPT", help="source prompt files")
    s.add_argument("--to", required=True, metavar="PROMPT", help="the target task's prompt")
    s.add_argument(
        "--by",
        default="mean",
        choices=["mean", "flat"],
        help="rank by the cosine of the mean token (any lengths) or of the flattened prompt",
    )
    s.add_argument("--json", action="store_true", help="one JSON object per source instead of a table")


SKIP_CHECK_HELP = "skip the load-time check that softprompt's forward equals the model's own (exit 2 on a mismatch)"


def build_parser() -> argparse.ArgumentParser:
    """The whole `softprompt` command tree."""
    p = argparse.ArgumentParser(prog="softprompt", description="Prompt tuning on frozen Transformers models.")
    sub = p.add_subparsers(dest="cmd", required=True)

    # No ArgumentDefaultsHelpFormatter: every flag's default is None (so that YAML values are not overridden) and
    # its help already names the dataclass default; the formatter appended a misleading "(default: None)".
    t = sub.add_parser("train", help="train a soft prompt")
    t.add_argument("--config", help="YAML file with any of the options below (flags given here win)")
    _add_config_flags(t)
    add_train_flags(t)
    for add in (add_interop_parsers, add_multitask_parser, add_similarity_parser):
        add(sub)

    def prompt_cmd(name: str, help_: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--prompt", action="append", required=True, help="prompt .safetensors (repeat for an ensemble)")
        s.add_argument("--model", help="backbone (default: the base model recorded in the prompt)")
        s.add_argument("--allow-other-model", action="store_true", help="skip the base-model fingerprint check")
        s.add_argument("--skip-equivalence-check", action="store_true", help=SKIP_CHECK_HELP)
        s.add_argument("--combine", default="mean", choices=["mean", "vote"], help="ensemble combination")
        s.add_argument("--batch-size", type=int, default=32)
        s.add_argument("--device", default="auto")
        return s

    e = prompt_cmd("eval", "evaluate a prompt on a labelled file; prints one JSON object")
    e.add_argument("--data", required=True, help="labelled file (jsonl/csv/tsv)")
    e.add_argument("--max-new-tokens", type=int, default=32)
    pr = prompt_cmd("predict", "labels and probabilities per input, JSONL out")
    pr.add_argument("--data", required=True, help="file, or - for JSONL on stdin")
    pr.add_argument("--output", help="write JSONL here (atomically) instead of stdout")
    for s in (e, pr):  # the file-reading option of `train --columns`, for the files these two read
        s.add_argument("--columns", help="comma-separated column names of a headerless CSV/TSV (e.g. text,label)")
    g = prompt_cmd("generate", "generate text with a prompt")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="one input text (the filled template, or the value of its single field)")
    src.add_argument("--data", help="file, or - for JSONL on stdin")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)

    i = sub.add_parser("info", help="metadata and size of a prompt file (JSON)")
    i.add_argument("path")
    mo = sub.add_parser("models", help="list the built-in model aliases and whether each is installed")
    mo.add_argument("--architectures", action="store_true", help="the supported-architectures table instead")

    sv = sub.add_parser("serve", help="HTTP server: every prompt in --prompts DIR is a task on one model")
    sv.add_argument("--prompts", required=True, metavar="DIR", help="directory of prompt files (task = file name)")
    sv.add_argument("--model", help="backbone (default: the base model recorded in the first prompt)")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, loopback only)")
    sv.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    sv.add_argument(
        "--admin-token",
        help="bearer token of the admin endpoints (default: $SOFTPROMPT_ADMIN_TOKEN; "
        "neither: admin endpoints disabled)",
    )
    sv.add_argument("--max-batch-size", type=int, default=32, help="rows per forward pass (default: 32)")
    sv.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait for a batch to fill (default: 5)")
    sv.add_argument("--max-queue", type=int, default=1024, help="queued requests before 429 (default: 1024)")
    sv.add_argument("--timeout-s", type=float, default=60.0, help="request timeout, 504 (default: 60)")
    sv.add_argument(
        "--kv-cache-mb", type=float, default=1024.0, help="memory for per-task prompt keys/values (default: 1024)"
    )
    sv.add_argument("--max-input-tokens", type=int, help="longest input, 413 (default: each task's own limit)")
    sv.add_argument("--max-new-tokens", type=int, default=512, help="largest max_new_tokens allowed (default: 512)")
    sv.add_argument("--max-upload-mb", type=float, default=16.0, help="largest prompt upload (default: 16)")
    sv.add_argument(
        "--max-body-mb",
        type=float,
        default=8.0,
        help="largest request body of the inference endpoints, chunked or not, 413 (default: 8)",
    )
    sv.add_argument(
        "--max-input-chars",
        type=int,
        help="longest input in characters, 413 before tokenising (default: the task's token limit x the "
        "tokenizer's longest token)",
    )
    sv.add_argument(
        "--max-connections",
        type=int,
        default=1000,
        help="open connections; beyond, the longest-idle one is closed (408) or the new one refused (503) "
        "(default: 1000)",
    )
    sv.add_argument(
        "--header-timeout-s", type=float, default=10.0, help="a request's headers must arrive within this, 408 "
        "(default: 10)"
    )  # fmt: skip
    sv.add_argument(
        "--body-timeout-s", type=float, default=30.0, help="its body must arrive within this after them, 408 "
        "(default: 30)"
    )  # fmt: skip
    sv.add_argument(
        "--keep-alive-s", type=float, default=5.0, help="idle kept-alive connections are closed after this (default: 5)"
    )
    sv.add_argument(
        "--scheduler",
        default="mixed",
        choices=["mixed", "per-task"],
        help="mixed-task batches or one task per batch (default: mixed)",
    )
    sv.add_argument("--no-kv-cache", action="store_true", help="run the prompt with every request (the PEFT way)")
    sv.add_argument("--allow-other-model", action="store_true", help="skip the base-model fingerprint check")
    sv.add_argument("--skip-equivalence-check", action="store_true", help=SKIP_CHECK_HELP)
    sv.add_argument("--device", default="auto", help="(default: auto)")
    sv.add_argument("--dtype", default="float32", help="(default: float32)")
    sv.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    sv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p
