"""Tiny random image models for the vision tests (hidden 32, 2 layers, 4 heads, 32x32 images, patch 8: 16 patches),
built from their config classes, and tiny image folders drawn with Pillow. Independent of softprompt on purpose.

    tiny_vision(kind)         a fresh model (torch.manual_seed(0)): vit, deit, dinov2, clip (vision tower),
                              siglip (vision tower), clip-full / siglip-full (CLIPModel / SiglipModel, text tower too)
    save_tiny_vision(kind, d) the model, its image processor (and for *-full the MiniLM tokenizer) saved into d
    image_folder(root, ...)   root/CLASS/i.png: class k is a square of colour k in a random quadrant, on dark noise
"""

from __future__ import annotations

from pathlib import Path

import torch

VISION_KINDS = ("vit", "deit", "dinov2", "clip", "siglip")
_KW = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
           patch_size=8)  # fmt: skip


def _text_kw(vocab: int, eos: int, pad: int) -> dict:
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=vocab,
                max_position_embeddings=32, eos_token_id=eos, pad_token_id=pad, bos_token_id=eos)  # fmt: skip


def tiny_vision(kind: str, *, vocab: int = 30522, eos: int = 102, pad: int = 0):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "vit":
        return tf.ViTModel(tf.ViTConfig(**_KW)).eval()
    if kind == "deit":
        return tf.DeiTModel(tf.DeiTConfig(**_KW)).eval()
    if kind == "dinov2":
        return tf.Dinov2Model(tf.Dinov2Config(**_KW)).eval()
    if kind == "clip":
        return tf.CLIPVisionModel(tf.CLIPVisionConfig(**_KW)).eval()
    if kind == "siglip":
        return tf.SiglipVisionModel(tf.SiglipVisionConfig(**_KW)).eval()
    if kind == "clip-full":
        cfg = tf.CLIPConfig(text_config=_text_kw(vocab, eos, pad), vision_config=_KW, projection_dim=16)
        return tf.CLIPModel(cfg).eval()
    if kind == "siglip-full":
        cfg = tf.SiglipConfig(text_config=_text_kw(vocab, eos, pad), vision_config=_KW)
        return tf.SiglipModel(cfg).eval()
    raise ValueError(kind)


def tiny_processor(kind: str):
    import transformers as tf

    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    if kind.startswith("clip"):
        return tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                     image_mean=mean, image_std=std)  # fmt: skip
    if kind.startswith("siglip"):
        return tf.SiglipImageProcessor(size={"height": 32, "width": 32})
    return tf.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=mean, image_std=std)


def save_tiny_vision(kind: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if kind.endswith("-full"):
        from tiny import tiny_tokenizer  # the MiniLM tokenizer (skips when it is not installed)

        tok = tiny_tokenizer(out)
        model = tiny_vision(kind, vocab=len(tok), eos=tok.sep_token_id, pad=tok.pad_token_id)
    else:
        model = tiny_vision(kind)
    model.save_pretrained(str(out))
    tiny_processor(kind).save_pretrained(str(out))
    return out


def quadrant_image(k: int, seed: int, size: int = 32):
    """A dark noisy image with a square of class k's colour (red, green, blue, yellow) in a random quadrant: an
    easy 4-class task even for a random frozen encoder (the colour moves the patches' mean)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    px = (torch.rand(size, size, 3, generator=g) * 60).to(torch.uint8)
    h = size // 2
    r, c = divmod(int(torch.randint(0, 4, (1,), generator=g)), 2)
    colour = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20)][k % 4]
    px[r * h : r * h + h, c * h : c * h + h] = torch.tensor(colour, dtype=torch.uint8)
    return Image.fromarray(px.numpy(), "RGB")


def image_folder(root: Path, classes: tuple[str, ...] = ("a", "b", "c", "d"), per_class: int = 4,
                 seed: int = 0) -> Path:  # fmt: skip
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            quadrant_image(k, seed * 1000 + k * 100 + i).save(root / name / f"{i}.png")
    return root
