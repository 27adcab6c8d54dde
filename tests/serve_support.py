"""Helpers shared by the serve tests (no tests here): tiny backbones with input-dependent outputs, prompt files
with proper metadata, and an in-process client over httpx's ASGI transport."""

from __future__ import annotations

import asyncio
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
from softprompt.data import Template
from softprompt.models import Backbone, load_backbone
from softprompt.serve import Registry, Scheduler, create_app

ADMIN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
TOL = 1e-5  # served probabilities vs Predictor alone


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


def write_causal_prompts(d: Path, model_dir: Path, bb: Any) -> Path:
    """Five prompts in `d` for a causal backbone: three classify tasks (2, 3, 2 labels) and two generate tasks."""
    make_prompt(d / "sentiment.safetensors", bb, model_dir, tokens=4, seed=1, template="Review: {text} Sentiment:",
                labels=["negative", "positive"], words=["bad", "good"])  # fmt: skip
    make_prompt(d / "topic.safetensors", bb, model_dir, tokens=7, seed=2, template="{text}\nTopic:",
                labels=["sport", "politics", "science"], words=["sports", "world politics", "science"])  # fmt: skip
    make_prompt(d / "nli.safetensors", bb, model_dir, tokens=3, seed=3,
                template="{premise} Question: {hypothesis}? Answer:", labels=["yes", "no"])  # fmt: skip
    make_prompt(d / "qa.safetensors", bb, model_dir, tokens=5, seed=4, task="generate", template="Q: {q} A:")
    make_prompt(d / "summ.safetensors", bb, model_dir, tokens=9, seed=5, task="generate",
                template="Text: {text}\nSummary:")  # fmt: skip
    return d


def fill(reg: Registry, task: str, x: str | dict[str, str]) -> str:
    """The text the server builds for `x` (one field's value, or every field) in `task`'s template."""
    template = Template(reg.get(task).spec.template)
    return template.fill(x if isinstance(x, dict) else {template.fields[0]: x}, "test")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def assert_same(server: dict[str, Any], alone: dict[str, Any]) -> None:
    """A served classify result equals Predictor's alone: the label, and every probability within TOL."""
    assert server["label"] == alone["label"]
    probs = alone.get("probs", alone.get("probabilities"))
    assert server["probabilities"].keys() == probs.keys()
    for k, v in probs.items():
        assert abs(server["probabilities"][k] - v) <= TOL, (k, server["probabilities"][k], v)
