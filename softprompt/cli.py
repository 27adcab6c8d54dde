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

from softprompt.config import SECTIONS, ConfigError, RunConfig, apply_options, load_yaml
from softprompt.parsers import build_parser


def build_config(args: argparse.Namespace) -> RunConfig:
    """Defaults, then the YAML file, then flags given on the command line."""
    cfg = RunConfig()
    if args.config:
        apply_options(cfg, load_yaml(args.config), args.config)
    given = {f.name: getattr(args, f.name) for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
    apply_options(cfg, {k: v for k, v in given.items() if v is not None}, "command line")
    cfg.validate()
    return cfg


def _fill_single(pred, text: str) -> str:
    """`--input` may be the value of the template's single field rather than the filled template."""
    fields = pred.task.spec.fields
    if len(fields) == 1 and "{" + fields[0] + "}" in pred.task.spec.template:
        from softprompt.data import Template

        return Template(pred.task.spec.template).fill({fields[0]: text}, "--input")
    return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    if args.cmd == "models" and args.architectures:
        from softprompt.support import markdown

        print(markdown())
        return 0
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

    from softprompt.api import Predictor, check_generation, dumps

    if args.cmd == "generate":  # before the model loads: a bad value is refused at once
        check_generation(
            {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "top_k": args.top_k,
             "top_p": args.top_p, "seed": args.seed, **({"temperature": args.temperature} if args.do_sample else {})}
        )  # fmt: skip
    pred = Predictor.load(
        args.prompt,
        model=args.model,
        allow_other_model=args.allow_other_model,
        skip_equivalence_check=args.skip_equivalence_check,
        combine=args.combine,
        batch_size=args.batch_size,
        device=args.device,
    )
    if args.cmd == "eval":
        m = pred.evaluate(args.data, max_new_tokens=args.max_new_tokens, columns=args.columns)
        print(dumps(m))
        return 0
    if args.cmd == "predict":
        rows = pred.predict(args.data, columns=args.columns)
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
