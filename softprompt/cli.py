"""Command line: `softprompt train|eval|predict|generate|info|models|serve|export|import|similarity|train-multi|
distill`.

Every command's flags come from typed config dataclasses (softprompt.config; the tree is softprompt.parsers):
`train`'s fields are `--field-name` and `--section.field_name`, with their docstrings as help, and `--config
FILE.yaml` supplies any of them (flags win). COMMANDS maps each command to the function that runs it; a handler
imports its own (heavy) modules, so `--help` stays instant.
Errors print one line `softprompt: error: ...` and exit 2, leaving no partial output file.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from softprompt.commands import (
    EvalConfig,
    GenerateConfig,
    InfoConfig,
    ModelsConfig,
    PredictConfig,
    PromptCommandConfig,
    ServeConfig,
    from_args,
)
from softprompt.config import ConfigError, build_config
from softprompt.parsers import build_parser

__all__ = ["COMMANDS", "build_config", "build_parser", "main"]


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
    handler = COMMANDS.get(args.cmd)
    if handler is None:
        raise ConfigError(f"unknown command {args.cmd}")
    return handler(args)


# ---- the handlers: one per command ---------------------------------------------------------------------------
def _train(args: argparse.Namespace) -> int:
    from softprompt.distributed import run_train

    return run_train(args)


def _distill(args: argparse.Namespace) -> int:
    from softprompt import distill

    return distill.run(args)


def _train_multi(args: argparse.Namespace) -> int:
    from softprompt import multitask

    return multitask.run(args) or 0


def _interop(args: argparse.Namespace) -> int:  # export and import
    from softprompt import interop

    return interop.run(args) or 0


def _similarity(args: argparse.Namespace) -> int:
    from softprompt import transfer

    return transfer.run(args) or 0


def _models(args: argparse.Namespace) -> int:
    cfg: ModelsConfig = from_args(ModelsConfig, args)
    if cfg.architectures:
        from softprompt.arch import markdown

        print(markdown())
        return 0
    from softprompt.models import list_models

    for m in list_models():
        state = "installed" if m["installed"] else f"not installed ({m.get('install', '')})"
        cached = ", cached" if m.get("cached") and m["installed"] else ""
        print(f"{m['alias']:<14} {m['family']:<8} {state}{cached}  {m.get('description', '')}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from softprompt.api import dumps, info

    cfg: InfoConfig = from_args(InfoConfig, args)
    print(dumps(info(cfg.path)))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from softprompt.serve.server import serve

    return serve(from_args(ServeConfig, args))


def _predictor(cfg: PromptCommandConfig) -> Any:
    from softprompt.api import Predictor
    from softprompt.vision.api import ImagePredictor, is_image_prompt

    if is_image_prompt(cfg.prompt[0]):  # an image prompt (softprompt.vision): images in, labels out
        if isinstance(cfg, GenerateConfig):
            raise ConfigError(f"{cfg.prompt[0]}: an image prompt classifies images; generate is for text prompts")
        return ImagePredictor.load(cfg.prompt, model=cfg.model, allow_other_model=cfg.allow_other_model,
                                   batch_size=cfg.batch_size, device=cfg.device,
                                   skip_bad_images=getattr(cfg, "skip_bad_images", False),
                                   skip_equivalence_check=cfg.skip_equivalence_check)  # fmt: skip

    return Predictor.load(
        cfg.prompt,
        model=cfg.model,
        allow_other_model=cfg.allow_other_model,
        skip_equivalence_check=cfg.skip_equivalence_check,
        combine=cfg.combine,
        batch_size=cfg.batch_size,
        device=cfg.device,
    )


def _eval(args: argparse.Namespace) -> int:
    from softprompt.api import dumps

    cfg: EvalConfig = from_args(EvalConfig, args)
    cfg.validate()
    if cfg.icl_demos is not None:  # the in-context baseline: k demonstrations instead of a prompt
        from pathlib import Path

        from softprompt.config import DataConfig, ModelConfig
        from softprompt.icl import icl_evaluate
        from softprompt.models import load_backbone
        from softprompt.task import TaskSpec

        assert cfg.model is not None
        mcfg = ModelConfig(model=cfg.model, device=cfg.device, skip_equivalence_check=cfg.skip_equivalence_check)
        spec = TaskSpec.from_config(DataConfig(train=cfg.icl_demos, template=cfg.template, labels=cfg.labels,
                                               columns=cfg.columns))  # fmt: skip
        text = Path(cfg.icl_instructions).read_text(encoding="utf-8") if cfg.icl_instructions else ""
        m = icl_evaluate(load_backbone(mcfg, progress=False), spec, cfg.data, cfg.icl_demos, cfg.k,
                         seed=cfg.icl_seed, balanced=cfg.icl_balanced, batch_size=cfg.batch_size,
                         columns=cfg.columns, instructions=text)  # fmt: skip
    else:
        m = _predictor(cfg).evaluate(cfg.data, max_new_tokens=cfg.max_new_tokens, columns=cfg.columns)
    print(dumps(m))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from softprompt.api import dumps

    cfg: PredictConfig = from_args(PredictConfig, args)
    rows = _predictor(cfg).predict(cfg.data, columns=cfg.columns)
    text = "".join(dumps(r) + "\n" for r in rows)
    if cfg.output:
        from pathlib import Path

        from softprompt.checkpoint import atomic_write

        atomic_write(cfg.output, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    else:
        sys.stdout.write(text)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from softprompt.api import check_generation, dumps

    cfg: GenerateConfig = from_args(GenerateConfig, args)
    check_generation(  # before the model loads: a bad value is refused at once
        {"max_new_tokens": cfg.max_new_tokens, "num_beams": cfg.num_beams, "top_k": cfg.top_k, "top_p": cfg.top_p,
         "seed": cfg.seed, **({"temperature": cfg.temperature} if cfg.do_sample else {})}
    )  # fmt: skip
    pred = _predictor(cfg)
    import torch

    torch.manual_seed(cfg.seed)
    kw: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "num_beams": cfg.num_beams}
    if cfg.do_sample:
        kw.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p)
        if cfg.top_k:
            kw["top_k"] = cfg.top_k
    inputs = [_fill_single(pred, cfg.input)] if cfg.input is not None else cfg.data
    outs = pred.generate(inputs, **kw)
    texts = [cfg.input] if cfg.input is not None else [None] * len(outs)
    for t, o in zip(texts, outs):
        print(dumps({"input": t, "output": o} if t is not None else {"output": o}))
    return 0


# The command table: `softprompt NAME` runs COMMANDS[NAME](args) (the names are softprompt.parsers.COMMANDS').
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _train,
    "export": _interop,
    "import": _interop,
    "train-multi": _train_multi,
    "similarity": _similarity,
    "distill": _distill,
    "eval": _eval,
    "predict": _predict,
    "generate": _generate,
    "info": _info,
    "models": _models,
    "serve": _serve,
}


if __name__ == "__main__":
    sys.exit(main())
