"""Quantized frozen backbones (softprompt.quant, ModelConfig.quantize): int8/int4 through optimum-quanto on any
device, bnb8/bnb4 through bitsandbytes on CUDA (skipped here without a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import tiny_model_dir

from softprompt import quant
from softprompt.checkpoint import load_prompt
from softprompt.config import ConfigError, ModelConfig, RunConfig, apply_options
from softprompt.models import Backbone, load_backbone
from softprompt.prompted import PromptedModel
from softprompt.train import train

needs_quanto = pytest.mark.skipif(
    not quant._available("optimum.quanto"), reason="needs optimum-quanto (softprompt[quant])"
)
needs_cuda_bnb = pytest.mark.skipif(
    not (torch.cuda.is_available() and quant._available("bitsandbytes")),
    reason="bitsandbytes quantization needs a CUDA GPU and the bitsandbytes package",
)
TEXTS = ["good movie 1", "awful plot, dull acting", "a fine and nice film"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny llama with its 2-D weights scaled up: varied, input-dependent outputs (the plain init is near uniform)."""
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir("llama", tmp_path_factory.mktemp("tiny"))
    model = AutoModelForCausalLM.from_pretrained(str(src))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(8.0)
    out = src.parent / "llama-sharp"
    model.save_pretrained(str(out))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def load(path: Path, q: str, device: str = "cpu") -> Backbone:
    return load_backbone(ModelConfig(model=str(path), device=device, quantize=q), progress=False)


def prompt_grad(bb: Backbone, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-position logits and the gradient of a fixed loss with respect to the prompt."""
    pm = PromptedModel(bb)
    p = prompt.clone().to(bb.device).requires_grad_(True)
    batch = pm.collate([pm.encode_input(t) for t in TEXTS]).to(bb.device)
    pos = torch.full((len(TEXTS), 1), batch.ids.shape[1] - 1, device=bb.device)
    logits = pm.lm_logits(pm.causal_hidden(pm.build_prefix([p]), None, batch.ids, batch.mask, pos))[:, 0]
    logits.log_softmax(-1)[:, :50].mean().backward()
    assert p.grad is not None
    return logits.detach().cpu(), p.grad.detach().cpu()


def test_check_rejects_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="--quantize must be one of"):
        quant.check("int3", torch.device("cpu"))
    with pytest.raises(ConfigError, match="CUDA"):
        quant.check("bnb4", torch.device("cpu"))
    quant.check("none", torch.device("cpu"))
    monkeypatch.setattr(quant, "_available", lambda module: False)
    with pytest.raises(ConfigError, match="pip install optimum-quanto"):
        quant.check("int8", torch.device("cpu"))
    assert quant.load_kwargs("none", torch.device("cpu"), torch.float32) == {}


def test_quantize_is_a_config_option() -> None:
    cfg = RunConfig()
    assert cfg.model.quantize == "none"
    apply_options(cfg, {"quantize": "int8"}, "test")
    assert cfg.model.quantize == "int8"


@needs_quanto
@pytest.mark.parametrize("q", ["int8", "int4"])
def test_linear_layers_quantized_embeddings_and_fingerprint_kept(q: str, model_dir: Path) -> None:
    ref, bb = load(model_dir, "none"), load(model_dir, q)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in ref.model.model.layers.modules())
    assert quant.quantized_modules(bb.model) == n_linear == 14  # every projection of the 2 decoder layers
    assert quant.quantized_modules(ref.model) == 0
    assert (
        type(bb.model.lm_head) is torch.nn.Linear and bb.model.lm_head.weight is bb.model.get_input_embeddings().weight
    )
    assert bb.fingerprint == ref.fingerprint  # embeddings untouched: a prompt moves freely between the two
    assert not any(p.requires_grad for p in bb.model.parameters())
    layer_bytes = lambda b: sum(quant._tensor_bytes(p) for p in b.model.model.layers.parameters())  # noqa: E731
    ratio = layer_bytes(bb) / layer_bytes(ref)
    assert ratio < (0.45 if q == "int8" else 0.40), ratio  # int8: 1/4 + scales and norms; int4 packed
    assert quant.weight_bytes(bb.model)["quantized"] > 0 == quant.weight_bytes(ref.model)["quantized"]


@needs_quanto
def test_int8_backward_through_frozen_layers_matches_fp32(model_dir: Path) -> None:
    ref, bb = load(model_dir, "none"), load(model_dir, "int8")
    prompt = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    (l32, g32), (l8, g8) = prompt_grad(ref, prompt), prompt_grad(bb, prompt)
    assert g8.abs().sum() > 0
    cos = torch.nn.functional.cosine_similarity(g8.flatten(), g32.flatten(), dim=0).item()
    assert cos > 0.99, cos
    spread = (l32.max() - l32.min()).item()
    assert (l8 - l32).abs().max().item() < 0.05 * spread
    assert (l8.argmax(-1) == l32.argmax(-1)).all()


@needs_quanto
@pytest.mark.parametrize("q", ["int8", "int4"])
def test_training_on_a_quantized_backbone_learns(q: str, model_dir: Path, tmp_path: Path) -> None:
    from softprompt.prompt import init_prompt
    from softprompt.task import BoundTask, TaskSpec

    data = tmp_path / "train.jsonl"
    words = ["good", "great", "bad", "awful", "fine", "nice", "poor", "dull"]
    rows = [{"text": f"{words[i % 8]} movie {i}", "label": "a" if i % 8 in (0, 1, 4, 5) else "b"} for i in range(32)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RunConfig()
    apply_options(cfg, {
        "model": str(model_dir), "device": "cpu", "quantize": q, "train": str(data), "out": str(tmp_path / "p.safetensors"),
        "labels": "a=yes,b=no", "template": "{text} ->", "num_tokens": 4, "batch_size": 8, "max_steps": 25,
        "warmup_steps": 0, "lr": 0.3, "progress": False, "init": "random", "seed": 0,
    }, "test")  # fmt: skip
    bb = load_backbone(cfg.model, progress=False)
    state = {k: v.clone() for k, v in bb.model.state_dict().items() if isinstance(v, torch.Tensor)}
    pm = PromptedModel(bb)
    task = BoundTask(TaskSpec.from_config(cfg.data), pm, num_tokens=4)
    examples, _, _ = task.encode_file(str(data))
    batch = pm.collate([e.input_ids for e in examples], labels=[int(e.label or 0) for e in examples])

    def full_loss(prompt: torch.Tensor) -> float:  # the whole training set, deterministic
        with torch.no_grad():
            return pm.loss(pm.build_prefix([prompt]), batch, task.label_ids).item()

    before = full_loss(init_prompt("random", 4, torch.zeros(8, 32), None, seed=0))  # what training starts from
    train(cfg, backbone=bb, log=lambda *_: None)
    ck = load_prompt(tmp_path / "p.safetensors")
    assert full_loss(ck.prompt) < 0.9 * before, (before, full_loss(ck.prompt))  # fp32 here: 0.81 -> 0.66
    assert ck.meta["train_config"]["model"]["quantize"] == q and ck.meta["fingerprint"] == bb.fingerprint
    after = bb.model.state_dict()  # the frozen (quantized) weights did not move
    for k, v in state.items():
        a = after[k]
        if hasattr(v, "dequantize"):
            v, a = v.dequantize(), a.dequantize()
        assert torch.equal(v, a), k


@needs_cuda_bnb
@pytest.mark.parametrize("q", ["bnb8", "bnb4"])
def test_bitsandbytes_backbone_trains_the_prompt(q: str, model_dir: Path) -> None:
    ref, bb = load(model_dir, "none", "cuda"), load(model_dir, q, "cuda")
    assert quant.quantized_modules(bb.model) > 0 and bb.fingerprint == ref.fingerprint
    prompt = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    (_, g), (_, g32) = prompt_grad(bb, prompt), prompt_grad(ref, prompt)
    cos = torch.nn.functional.cosine_similarity(g.flatten(), g32.flatten(), dim=0).item()
    assert cos > (0.98 if q == "bnb8" else 0.8), cos
