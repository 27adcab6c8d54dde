"""Shared, session-scoped fixtures: tiny random models (tests/tiny.py) written once and loaded once per session.

`tiny_dir(kind)` and `tiny_backbone(kind)` are the plain tiny models (gpt2 | llama | qwen2 | t5 | bert).
`sharp_backbone(kind)` is the same architecture with every 2-D weight (embeddings and projections) scaled by
SHARP_SCALE and saved as its own model directory: the plain tiny models (init std 0.02, hidden 32) have nearly
uniform next-token distributions and greedy generations that mostly repeat the last input token, so a test that
compares scores or generations between two code paths could pass against a bug. The sharp copies give varied,
prompt-dependent generations and score differences well above the tolerances.

Backbones are shared across tests: never modify one in place (deepcopy `backbone.model` first).

Torch runs single-threaded unless OMP_NUM_THREADS is set: the models here are tiny, and on a loaded machine
intra-op threads that spin-wait make a 32x64 matmul hundreds of times slower than one thread.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from archs import arch_model_dir
from serve_support import lively_model_dir, load
from tiny import tiny_model_dir

from softprompt.models import Backbone, load_backbone

SHARP_SCALE = 8.0

if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_dir(tiny_models_root: Path) -> Callable[[str], Path]:
    """tiny_dir(kind) -> the model directory, written on first use."""

    def get(kind: str) -> Path:
        return tiny_model_dir(kind, tiny_models_root)

    return get


@pytest.fixture(scope="session")
def tiny_backbone(tiny_dir: Callable[[str], Path]) -> Callable[[str], Backbone]:
    """tiny_backbone(kind) -> the frozen Backbone loaded with load_backbone (cached for the session)."""
    cache: dict[str, Backbone] = {}

    def get(kind: str) -> Backbone:
        if kind not in cache:
            cache[kind] = load_backbone(str(tiny_dir(kind)), progress=False)
        return cache[kind]

    return get


def _sharp_dir(src: Path, out: Path) -> Path:
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if out.is_dir():
        return out
    tmp = out.with_name("." + out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    kind = src.name
    cls = {"t5": AutoModelForSeq2SeqLM, "bert": AutoModel}.get(kind, AutoModelForCausalLM)
    model = cls.from_pretrained(str(src))
    with torch.no_grad():
        for p in model.parameters():  # tied embeddings appear once
            if p.ndim == 2:
                p.mul_(SHARP_SCALE)
    model.save_pretrained(str(tmp))
    tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def sharp_backbone(tiny_dir: Callable[[str], Path], tiny_models_root: Path) -> Callable[[str], Backbone]:
    """sharp_backbone(kind) -> a Backbone of the tiny `kind` with its 2-D weights scaled by SHARP_SCALE."""
    cache: dict[str, Backbone] = {}

    def get(kind: str) -> Backbone:
        if kind not in cache:
            path = _sharp_dir(tiny_dir(kind), tiny_models_root / f"sharp-{kind}")
            cache[kind] = load_backbone(str(path), progress=False)
        return cache[kind]

    return get


# ----- the architecture matrix's tiny models (tests/archs.py), built once per session -------------------------------
@pytest.fixture(scope="session")
def arch_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("archs")


@pytest.fixture(scope="session")
def arch_backbone(arch_root: Path) -> Callable[[str], Backbone]:
    cache: dict[str, Backbone] = {}

    def get(arch_id: str) -> Backbone:
        if arch_id not in cache:
            cache[arch_id] = load_backbone(str(arch_model_dir(arch_id, arch_root)), progress=False)
        return cache[arch_id]

    return get


@pytest.fixture(scope="session")
def serve_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the serve tests' models (tests/test_serve*.py)."""
    return tmp_path_factory.mktemp("serve-models")


@pytest.fixture(scope="session")
def serve_llama(serve_root: Path) -> tuple[Path, Backbone]:
    """The serve tests' tiny llama, re-drawn so that outputs depend on input and prompt: (its folder, backbone)."""
    d = lively_model_dir("llama", serve_root)
    return d, load(d)
