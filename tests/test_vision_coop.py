"""CoOp and zero-shot (softprompt.vision.coop) on tiny random CLIP and SigLIP models (with the MiniLM tokenizer),
against a hand-built forward of the text encoder: the token embeddings looked up by hand, the context vectors
written over the placeholder slots by hand, position embeddings, each layer (CLIP: causal mask), the final norm,
the model's pooling (CLIP: first [EOS]; SigLIP: last position and its head) and projection, scored as the model's
own logits_per_image; zero-shot = the model's own forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_vision import image_folder, save_tiny_vision

from softprompt.checkpoint import load_prompt
from softprompt.cli import main
from softprompt.config import PromptConfig
from softprompt.vision.coop import METHOD, init_context, placeholder_slots, zero_shot_logits
from softprompt.vision.encoder import load_vision_model

CLASSES = ["cat", "dog", "red car"]


@pytest.fixture(scope="module", params=["clip-full", "siglip-full"])
def vm(request, tmp_path_factory):
    d = save_tiny_vision(request.param, tmp_path_factory.mktemp(request.param))
    return load_vision_model(str(d))


def _px(b=2):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def reference_text(vm, texts: list[str], ctx: torch.Tensor | None, slot: tuple[int, int] | None) -> torch.Tensor:
    """(C, D) normalised text features, hand-built."""
    m, tok = vm.model, vm.tokenizer
    if vm.family == "siglip":
        ids = tok(texts, padding="max_length", max_length=32, return_tensors="pt")["input_ids"]
    else:
        ids = tok(texts, padding=True, return_tensors="pt")["input_ids"]
    tm = m.text_model
    e = tm.embeddings.token_embedding.weight[ids]  # (C, T, d) by hand
    if ctx is not None:
        a, b = slot
        e = e.clone()
        e[:, a:b] = ctx.expand(e.shape[0], -1, -1)
    h = e + tm.embeddings.position_embedding.weight[: ids.shape[1]]
    t = ids.shape[1]
    mask = None
    if vm.family == "clip":
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None]  # causal
    for layer in tm.encoder.layers:
        out = layer(h, mask)
        h = out[0] if isinstance(out, tuple) else out
    h = tm.final_layer_norm(h)
    if vm.family == "clip":
        eos = (ids == m.config.text_config.eos_token_id).int().argmax(-1)
        f = m.text_projection(h[torch.arange(h.shape[0]), eos])
    else:
        f = tm.head(h[:, -1])
    return f / f.norm(dim=-1, keepdim=True)


def own_logits(vm, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    m = vm.model
    out = m.get_image_features(pixel_values=img)
    f = out if isinstance(out, torch.Tensor) else out.pooler_output
    f = f / f.norm(dim=-1, keepdim=True)
    logits = m.logit_scale.exp() * f @ txt.t()
    return logits + m.logit_bias if getattr(m, "logit_bias", None) is not None else logits


@pytest.mark.parametrize("class_specific", [False, True])
def test_coop_logits_equal_hand_built(vm, class_specific):
    cfg = PromptConfig(context_tokens=4, class_specific=class_specific)
    init = init_context("normal", vm, cfg, len(CLASSES), seed=3) * 50  # large enough to matter
    p = METHOD.create(vm, init, cfg, classes=CLASSES)
    px = _px()
    got = p.logits(vm, px, grad=False)
    texts, slot = placeholder_slots(vm, CLASSES, 4)
    assert texts[0] == "X X X X cat." and slot[1] - slot[0] == 4
    with torch.no_grad():
        want = own_logits(vm, px, reference_text(vm, texts, p.context, slot))
        plain = own_logits(vm, px, reference_text(vm, texts, None, None))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-4)  # the context is really written in


def test_zero_shot_equals_the_models_own_forward(vm):
    px = _px()
    texts = [f"a photo of a {c}." for c in CLASSES]
    if vm.family == "siglip":
        inputs = vm.tokenizer(texts, padding="max_length", max_length=32, return_tensors="pt")
        inputs = {"input_ids": inputs["input_ids"]}
    else:
        inputs = dict(vm.tokenizer(texts, padding=True, return_tensors="pt"))
        inputs.pop("token_type_ids", None)
    with torch.no_grad():
        own = vm.model(pixel_values=px, **inputs).logits_per_image
    torch.testing.assert_close(zero_shot_logits(vm, CLASSES, "a photo of a {}.", px), own, rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_the_context_and_text_features_are_cached(vm):
    cfg = PromptConfig(context_tokens=2)
    p = METHOD.create(vm, init_context("normal", vm, cfg, 3, seed=0), cfg, classes=CLASSES)
    loss = torch.nn.functional.cross_entropy(p.logits(vm, _px(), grad=True), torch.tensor([0, 2]))
    loss.backward()
    assert all(q.grad is None for q in vm.model.parameters())
    assert p.context.grad is not None and p.context.grad.abs().sum() > 0
    p.requires_grad_(False)  # a loaded (frozen) prompt: class text features once per class set
    a = p.text_features(vm, grad=False)
    assert p.text_features(vm, grad=False) is a
    p.classes = ["cat", "dog"]
    assert p.text_features(vm, grad=False).shape[0] == 2


@pytest.mark.slow
def test_coop_train_eval_predict(tmp_path, capsys):
    d = save_tiny_vision("clip-full", tmp_path / "clip")
    train = image_folder(tmp_path / "train", classes=("red", "green", "blue", "yellow"), per_class=3)
    out = tmp_path / "c.safetensors"
    rc = main(["train", "--task", "image-classify", "--method", "coop", "--context-tokens", "3", "--class-specific",
               "--model", str(d), "--train", str(train), "--eval", str(train), "--out", str(out), "--max-steps", "5",
               "--batch-size", "4", "--no-progress", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    captured = capsys.readouterr()
    assert "zero-shot ('a photo of a {}.'): eval accuracy" in captured.err
    res = json.loads(captured.out.strip().splitlines()[-1])
    ck = load_prompt(out)
    assert ck.meta["method"] == "coop" and ck.prompt.shape == (4 * 3, 32)
    assert ck.meta["coop"] == {"context_tokens": 3, "class_specific": True} and ck.meta["head"] == "cosine"
    assert main(["eval", "--prompt", str(out), "--data", str(train), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(res["accuracy"])
    # a vision-only model cannot take a coop prompt: one line
    v = save_tiny_vision("clip", tmp_path / "clipv")
    assert main(["eval", "--prompt", str(out), "--data", str(train), "--model", str(v), "--device", "cpu"]) == 2
    assert "--method coop needs a CLIP or SigLIP model with its text tower" in capsys.readouterr().err


def test_siglip_pools_the_last_position(tmp_path):
    """SigLIP text has no [EOS] pooling: the class prompt is padded to max_position_embeddings (no mask) and the
    last position is pooled, so the context slots sit right after the tokenizer's start token."""
    d = save_tiny_vision("siglip-full", tmp_path / "s")
    vm = load_vision_model(str(d))
    _, (a, b) = placeholder_slots(vm, ["cat"], 5)
    ids = vm.tokenizer(["X X X X X cat."], add_special_tokens=True)["input_ids"][0]
    assert ids[a:b] == [vm.tokenizer.convert_tokens_to_ids("x")] * 5 and a == 1  # after [CLS]
    assert Path(d, "tokenizer_config.json").exists()
