"""Helpers shared by the serve tests (no tests here): tiny backbones with input-dependent outputs, prompt files
with proper metadata, and an in-process client over httpx's ASGI transport."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import torch
from tiny import tiny_model_dir

from softprompt.checkpoint import save_prompt
from softprompt.config import ModelConfig
from softprompt.models import Backbone, load_backbone
from softprompt.serve import Registry, Scheduler, create_app

ADMIN = "s3cret-token"


def lively_model_dir(kind: str, root: Path) -> Path:
    """The tiny `kind` model with its matrices re-drawn at std 0.3: a random model whose greedy generations and
    class probabilities depend visibly on the input and the prompt (the stock tiny models, at std 0.02, repeat one
    token), so exactness tests compare something."""
    out = root / f"{kind}-lively"
    if out.is_dir():
        return out
    import transformers as tf

    src = tiny_model_dir(kind, root)
    cls = {"llama": tf.AutoModelForCausalLM, "qwen2": tf.AutoModelForCausalLM, "gpt2": tf.AutoModelForCausalLM,
           "t5": tf.AutoModelForSeq2SeqLM}[kind]  # fmt: skip
    model = cls.from_pretrained(str(src))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    tmp = root / f".{kind}-lively.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    for f in src.iterdir():
        if f.is_file() and not (tmp / f.name).exists():
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out


def load(path: Path) -> Backbone:
    return load_backbone(ModelConfig(model=str(path), device="cpu"), progress=False)


def base_meta(bb: Backbone, path: Path | str) -> dict[str, Any]:
    return {"base_model": str(path), "architecture": bb.architecture, "family": bb.family,
            "fingerprint": bb.fingerprint}  # fmt: skip


def make_prompt(
    path: Path,
    bb: Backbone,
    model_dir: Path | str,
    *,
    tokens: int = 4,
    seed: int = 0,
    task: str = "classify",
    template: str = "{text}",
    labels: list[str] | None = None,
    words: list[str] | None = None,
    head: str = "lm",
    linear_head: bool = False,
    scale: float = 1.0,
) -> Path:
    """A prompt file as training writes it (random values, full metadata)."""
    gen = torch.Generator().manual_seed(seed)
    meta = {**base_meta(bb, model_dir), "task": task, "template": template, "position": "auto", "head": head,
            "init": "random"}  # fmt: skip
    if task == "classify":
        labels = labels or ["neg", "pos"]
        meta["labels"] = {"labels": labels, "words": words or labels}
    extra = None
    if linear_head:
        n = len(labels or [])
        extra = {"head.linear.weight": torch.randn(n, bb.embed_dim, generator=gen),
                 "head.linear.bias": torch.randn(n, generator=gen)}  # fmt: skip
    save_prompt(path, torch.randn(tokens, bb.embed_dim, generator=gen) * scale, meta, extra)
    return path


@contextlib.asynccontextmanager
async def served(
    registry: Registry, *, admin_token: str | None = ADMIN, app_kw: dict[str, Any] | None = None, **sched_kw: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Scheduler]]:
    """An app over `registry` with a fresh scheduler, its lifespan running, and a client bound to it in-process."""
    sched_kw.setdefault("max_wait_ms", 20)
    scheduler = Scheduler(registry, **sched_kw)
    app = create_app(registry, scheduler, admin_token=admin_token, **(app_kw or {}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://softprompt", timeout=60) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client, scheduler


def sse_events(text: str) -> list[Any]:
    """The `data:` payloads of a server-sent event stream (JSON decoded; "[DONE]" kept as a string)."""
    out: list[Any] = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = line[6:]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out
