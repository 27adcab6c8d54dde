"""VPT-shallow and VPT-deep (softprompt.vision.encoder, softprompt.vision.vpt) on tiny random ViT, DeiT, DINOv2, CLIP
and SigLIP vision towers, against a hand-built forward on an unwrapped copy of the same model: the embedding output
computed by the model's own embeddings module, the prompt tokens inserted by hand after the leading tokens, each
layer called by hand (deep: the prompt slots overwritten by hand before every layer), the slots dropped, the
model's own final norm and pooling."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_vision import VISION_KINDS, tiny_vision

from softprompt.checkpoint import save_prompt
from softprompt.vision.encoder import VisionModel, VisualPrompt
from softprompt.vision.vpt import DEEP, SHALLOW, InitError, init_tokens, vpt_bound

P = 3
LEAD = {"vit": 1, "deit": 2, "dinov2": 1, "clip": 1, "siglip": 0}  # [CLS] (DeiT: + [DIST]); SigLIP: none


def _layers(m):
    if hasattr(m, "layers"):
        return list(m.layers)
    return list(getattr(m.encoder, "layers", None) or m.encoder.layer)


def reference(kind: str, m, px: torch.Tensor, tokens: torch.Tensor, deep: bool) -> torch.Tensor:
    """The hand-built forward: tokens (L', P, d)."""
    s = LEAD[kind]
    h = m.embeddings(px)  # (B, S+N, d): patches + position embeddings + [CLS]
    if kind == "clip":
        h = m.pre_layrnorm(h)
    b = h.shape[0]
    for i, layer in enumerate(_layers(m)):
        if i == 0 or deep:
            t = tokens[i if deep else 0].expand(b, -1, -1)
            rest = h[:, s:] if i == 0 else h[:, s + P :]
            h = torch.cat([h[:, :s], t, rest], dim=1)  # (B, S+P+N, d)
        out = layer(h, None)
        h = out[0] if isinstance(out, tuple) else out
    h = torch.cat([h[:, :s], h[:, s + P :]], dim=1)  # drop the prompt slots
    if kind in ("vit", "deit", "dinov2"):
        return m.layernorm(h)[:, 0]
    if kind == "clip":
        return m.post_layernorm(h[:, 0])
    return m.head(m.post_layernorm(h))  # SigLIP: attention pooling over the patches


def _pair(kind):
    m = tiny_vision(kind)
    return VisionModel(copy.deepcopy(m)), m


def _px(b=3, seed=1):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", VISION_KINDS)
def test_no_prompt_is_the_models_own_forward(kind):
    vm, m = _pair(kind)
    px = _px()
    out = m(pixel_values=px)
    own = out.last_hidden_state[:, 0] if kind in ("vit", "deit") else out.pooler_output
    torch.testing.assert_close(vm.features(px), own, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", VISION_KINDS)
def test_shallow_equals_hand_built(kind):
    vm, m = _pair(kind)
    tokens = torch.randn(1, P, 32, generator=torch.Generator().manual_seed(2))
    px = _px()
    got = vm.features(px, VisualPrompt(tokens[None], deep=False))
    torch.testing.assert_close(got, reference(kind, m, px, tokens, deep=False), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, vm.features(px), atol=1e-4)  # the prompt changes the output


@pytest.mark.parametrize("kind", VISION_KINDS)
@pytest.mark.parametrize("kv", [False, True])
def test_deep_equals_per_layer_overwrite(kind, kv):
    """Token path and shared key/value path both equal the reference that overwrites the slots per layer."""
    vm, m = _pair(kind)
    tokens = torch.randn(2, P, 32, generator=torch.Generator().manual_seed(3))
    px = _px()
    got = vm.features(px, VisualPrompt(tokens[None], deep=True, kv=kv))
    torch.testing.assert_close(got, reference(kind, m, px, tokens, deep=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", VISION_KINDS)
@pytest.mark.parametrize("method", [SHALLOW, DEEP])
def test_gradients_reach_only_prompt_and_head(kind, method):
    vm, _ = _pair(kind)
    init = init_tokens("vpt", vm, P, deep=method.deep, seed=0)
    prompt = method.create(vm, init, None)
    head = torch.nn.Linear(32, 4)
    logits = head(vm.features(_px(), prompt.prefix(vm)))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is None for p in vm.model.parameters())
    assert prompt.tokens.grad is not None and prompt.tokens.grad.abs().sum() > 0
    if method.deep:  # every layer's tokens learn
        assert all(prompt.tokens.grad[i].abs().sum() > 0 for i in range(2))
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["vit", "siglip"])
@pytest.mark.parametrize("deep,kv", [(False, False), (True, False), (True, True)])
def test_batch_equals_alone(kind, deep, kv):
    vm, _ = _pair(kind)
    tokens = torch.randn(1, 2 if deep else 1, P, 32, generator=torch.Generator().manual_seed(4))
    px = _px(4)
    pr = VisualPrompt(tokens, deep=deep, kv=kv)
    batch = vm.features(px, pr)
    alone = torch.cat([vm.features(px[i : i + 1], pr) for i in range(4)])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)


def test_per_row_prompts_equal_each_prompt_alone():
    """A batch whose rows carry different prompts (a server batch mixed across tasks) = each prompt on its rows."""
    vm, _ = _pair("vit")
    t = torch.randn(2, 2, P, 32, generator=torch.Generator().manual_seed(5))
    px = _px(2)
    mixed = vm.features(px, VisualPrompt(t, deep=True, kv=True))
    for i in range(2):
        alone = vm.features(px[i : i + 1], VisualPrompt(t[i : i + 1], deep=True, kv=True))
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_vpt_init_bound():
    vm, _ = _pair("vit")
    v = vpt_bound(8, 32)
    assert v == pytest.approx(math.sqrt(6 / (3 * 8 * 8 + 32)))  # VPT's code: val = sqrt(6 / (3*patch^2 + d))
    t = init_tokens("vpt", vm, 50, deep=True, seed=0)
    assert t.shape == (2, 50, 32)
    assert t.abs().max() <= v and t.abs().max() > 0.95 * v  # uniform over (-v, v)
    assert torch.equal(t, init_tokens("vpt", vm, 50, deep=True, seed=0))


def test_patch_statistics_init():
    """Layer l's tokens ~ N(mean, std) of the patch tokens at layer l's input, recomputed here by hand."""
    vm, m = _pair("vit")
    px = _px(5)
    t = init_tokens("patches", vm, 4, deep=True, seed=7, pixels=px)
    with torch.no_grad():
        h0 = m.embeddings(px)[:, 1:].reshape(-1, 32)  # layer 0's input patches
        h1 = m.layers[0](m.embeddings(px), None)[:, 1:].reshape(-1, 32)
    gen = torch.Generator().manual_seed(7)
    want0 = h0.mean(0) + h0.std(0) * torch.randn(4, 32, generator=gen)
    want1 = h1.mean(0) + h1.std(0) * torch.randn(4, 32, generator=gen)
    torch.testing.assert_close(t, torch.stack([want0, want1]), rtol=1e-5, atol=1e-5)


def test_prompt_of_wrong_width_is_refused():
    vm, _ = _pair("vit")
    with pytest.raises(ValueError, match="do not fit this encoder"):
        vm.features(_px(), VisualPrompt(torch.zeros(1, 1, P, 16), deep=False))


def test_init_from_a_saved_prompt(tmp_path):
    """--init file:PATH: a vpt-deep file's tokens start a vpt-deep run; into vpt, its first layer's tokens."""
    vm, _ = _pair("vit")
    t = torch.randn(2, P, 32, generator=torch.Generator().manual_seed(9))
    path = tmp_path / "d.safetensors"
    meta = {"method": "vpt-deep", "task": "image-classify", "fingerprint": vm.fingerprint(), "vision": {"layers": 2},
            "labels": {"labels": ["a", "b"], "words": ["a", "b"]}}  # fmt: skip
    head = {"head.linear.weight": torch.zeros(2, 32)}
    save_prompt(path, t[0], meta, {"vpt.deep": t[1:], **head})
    torch.testing.assert_close(init_tokens(f"file:{path}", vm, P, deep=True), t)
    torch.testing.assert_close(init_tokens(f"file:{path}", vm, P, deep=False), t[:1])
    with pytest.raises(InitError, match="do not fit"):
        init_tokens(f"file:{path}", vm, P + 1, deep=False)
    with pytest.raises(InitError, match="must be one of vpt, patches, random or file:PATH, got 'vocab'"):
        init_tokens("vocab", vm, P, deep=False)


@pytest.mark.parametrize("kind", VISION_KINDS)
def test_the_load_time_guard_passes_and_catches_a_wrong_path(kind):
    vm, _ = _pair(kind)
    assert vm.check_paths() < 1e-5
    vm.norms = [torch.nn.Identity() for _ in vm.norms]  # the K/V path now misses the pre-attention norm
    with pytest.raises(ValueError, match="key/value path differs from its token path by .*pass --skip-equivalence"):
        vm.check_paths()


def test_prompt_similarity_and_export_of_image_prompts(tmp_path):
    """`softprompt similarity` compares VPT prompts slot by slot over their layers; export refuses them in a line."""
    from softprompt.checkpoint import load_prompt
    from softprompt.methods import MethodError, check_export
    from softprompt.transfer import similarity

    vm, _ = _pair("vit")
    meta = {"method": "vpt-deep", "task": "image-classify", "fingerprint": vm.fingerprint(), "vision": {"layers": 2},
            "labels": {"labels": ["a", "b"], "words": ["a", "b"]}}  # fmt: skip
    head = {"head.linear.weight": torch.zeros(2, 32)}
    t = torch.randn(2, P, 32, generator=torch.Generator().manual_seed(11))
    for name, x in (("a", t), ("neg", -t), ("b", torch.randn(2, P, 32))):
        save_prompt(tmp_path / f"{name}.safetensors", x[0], meta, {"vpt.deep": x[1:], **head})
    rows = similarity([str(tmp_path / f"{n}.safetensors") for n in ("neg", "b")], str(tmp_path / "a.safetensors"))
    neg = next(r for r in rows if r["source"].endswith("neg.safetensors"))
    assert neg["flat_cosine"] == pytest.approx(-1.0) and rows[-1] is neg and neg["same_model"]
    with pytest.raises(MethodError, match="a vpt-deep prompt cannot be exported to peft"):
        check_export(load_prompt(tmp_path / "a.safetensors"), "peft")
