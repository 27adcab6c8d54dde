"""Command line: `softprompt train|eval|predict|generate|info|models|serve|export|import|similarity`.

`train`'s flags are generated from the config dataclasses (softprompt.config): each field is `--field-name`
and `--section.field_name`, with its docstring as help; `--config FILE.yaml` supplies any of them (flags win).
Errors print one line `softprompt: error: ...` and exit 2, leaving no partial output file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from softprompt.config import SECTIONS, ConfigError, RunConfig, apply_options, field_docs, load_yaml


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


def build_config(args: argparse.Namespace) -> RunConfig:
    """Defaults, then the YAML file, then flags given on the command line."""
    cfg = RunConfig()
    if args.config:
        apply_options(cfg, load_yaml(args.config), args.config)
    given = {f.name: getattr(args, f.name) for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
    apply_options(cfg, {k: v for k, v in given.items() if v is not None}, "command line")
    cfg.validate()
    return cfg


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="softprompt", description="Prompt tuning on frozen Transformers models.")
    sub = p.add_subparsers(dest="cmd", required=True)

    # No ArgumentDefaultsHelpFormatter: every flag's default is None (so that YAML values are not overridden) and
    # its help already names the dataclass default; the formatter appended a misleading "(default: None)".
    t = sub.add_parser("train", help="train a soft prompt")
    t.add_argument("--config", help="YAML file with any of the options below (flags given here win)")
    _add_config_flags(t)
    from softprompt import interop, multitask, transfer
    from softprompt.distributed import add_train_flags

    add_train_flags(t)
    for mod in (interop, multitask, transfer):
        mod.add_parsers(sub)

    def prompt_cmd(name: str, help_: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--prompt", action="append", required=True, help="prompt .safetensors (repeat for an ensemble)")
        s.add_argument("--model", help="backbone (default: the base model recorded in the prompt)")
        s.add_argument("--allow-other-model", action="store_true", help="skip the base-model fingerprint check")
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
    sub.add_parser("models", help="list the built-in model aliases and whether each is installed")

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
        "--scheduler",
        default="mixed",
        choices=["mixed", "per-task"],
        help="mixed-task batches or one task per batch (default: mixed)",
    )
    sv.add_argument("--no-kv-cache", action="store_true", help="run the prompt with every request (the PEFT way)")
    sv.add_argument("--allow-other-model", action="store_true", help="skip the base-model fingerprint check")
    sv.add_argument("--device", default="auto", help="(default: auto)")
    sv.add_argument("--dtype", default="float32", help="(default: float32)")
    sv.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    sv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _fill_single(pred, text: str) -> str:
    """`--input` may be the value of the template's single field rather than the filled template."""
    fields = pred.task.spec.fields
    if len(fields) == 1 and "{" + fields[0] + "}" in pred.task.spec.template:
        from softprompt.data import Template

        return Template(pred.task.spec.template).fill({fields[0]: text}, "--input")
    return text


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("softprompt: interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as e:  # our errors are ValueError/RuntimeError subclasses
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"softprompt: error: {msg}", file=sys.stderr)
        if os.environ.get("SOFTPROMPT_DEBUG"):
            raise
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "models":
        from softprompt.models import list_models

        for m in list_models():
            state = "installed" if m["installed"] else f"not installed ({m.get('install', '')})"
            cached = ", cached" if m.get("cached") and m["installed"] else ""
            print(f"{m['alias']:<14} {m['family']:<8} {state}{cached}  {m.get('description', '')}")
        return 0
    if args.cmd == "info":
        from softprompt.api import dumps, info

        print(dumps(info(args.path)))
        return 0
    if args.cmd == "train":
        from softprompt.distributed import run_train

        return run_train(args)
    from softprompt import interop, multitask, transfer

    for mod in (interop, multitask, transfer):
        code = mod.run(args)
        if code is not None:
            return code

    if args.cmd == "serve":
        from softprompt.serve.server import ServeConfig, serve

        keys = ServeConfig.__dataclass_fields__
        return serve(ServeConfig(**{k: v for k, v in vars(args).items() if k in keys}))

    from softprompt.api import Predictor, dumps

    pred = Predictor.load(
        args.prompt,
        model=args.model,
        allow_other_model=args.allow_other_model,
        combine=args.combine,
        batch_size=args.batch_size,
        device=args.device,
    )
    if args.cmd == "eval":
        m = pred.evaluate(args.data, max_new_tokens=args.max_new_tokens)
        print(dumps(m))
        return 0
    if args.cmd == "predict":
        rows = pred.predict(args.data)
        text = "".join(dumps(r) + "\n" for r in rows)
        if args.output:
            from pathlib import Path

            from softprompt.checkpoint import atomic_write

            atomic_write(args.output, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        else:
            sys.stdout.write(text)
        return 0
    if args.cmd == "generate":
        import torch

        torch.manual_seed(args.seed)
        kw: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
        if args.do_sample:
            kw.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
            if args.top_k:
                kw["top_k"] = args.top_k
        inputs = [_fill_single(pred, args.input)] if args.input is not None else args.data
        outs = pred.generate(inputs, **kw)
        texts = [args.input] if args.input is not None else [None] * len(outs)
        for t, o in zip(texts, outs):
            print(dumps({"input": t, "output": o} if t is not None else {"output": o}))
        return 0
    raise ConfigError(f"unknown command {args.cmd}")


if __name__ == "__main__":
    sys.exit(main())
