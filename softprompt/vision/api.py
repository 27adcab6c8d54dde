"""Using a trained image prompt: the Python `ImagePredictor`, and what `softprompt eval|predict` run for one.

    from softprompt.vision.api import ImagePredictor
    pred = ImagePredictor.load("cats.safetensors")             # the image model named in the file
    pred.predict(["a.png", PIL.Image.open("b.jpg")])            # [{"label": "cat", "probs": {...}}, ...]
    pred.evaluate("val/")                                       # a class-folder tree or a CSV/JSONL list

A prompt file is loaded by softprompt.checkpoint.load_prompt (the one loader and its validation) and refused, in
one line, on an image model whose fingerprint differs from the one it was trained on (--allow-other-model
overrides). Images are preprocessed by the model's own image processor (softprompt.vision.images); bad images
stop with one line naming the file unless skip_bad_images (then counted in the result).
Notation: B images, C classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from softprompt import methods
from softprompt.checkpoint import CheckpointError, PromptCheckpoint, check_compatible, load_prompt
from softprompt.evaluate import classification_metrics
from softprompt.vision.encoder import VisionModel, load_vision_model
from softprompt.vision.images import as_image, load_image_set, preprocess
from softprompt.vision.objective import ImageHead, predict_logits


def is_image_prompt(path: str) -> bool:
    """The prompt file at `path` is an image prompt (its method is one of softprompt.methods.IMAGE_METHODS)."""
    return str(load_prompt(path).meta.get("method")) in methods.IMAGE_METHODS


def loaded_prompt(vm: VisionModel, ckpt: PromptCheckpoint, *, allow_other_model: bool = False) -> tuple[Any, Any]:
    """(prompt, head) of a saved image prompt on `vm`, for image_logits: a VisualPrompt and its ImageHead (vpt,
    vpt-deep), or a CoOp scorer with its class text features computed once (coop). Refuses another image model."""
    name = str(ckpt.meta.get("method"))
    if name not in methods.IMAGE_METHODS:
        raise CheckpointError(f"{ckpt.path}: a {name} prompt is a text prompt, not an image prompt")
    width = vm.text_hidden() if name == "coop" else vm.hidden
    check_compatible(ckpt, width, vm.fingerprint(), allow_other_model=allow_other_model)
    classes = list(ckpt.meta["labels"]["labels"])
    if name == "coop":
        from softprompt.vision.coop import saved_scorer

        return saved_scorer(vm, ckpt, classes), None
    m = methods.get(name)
    w = ckpt.extra["head.linear.weight"]  # (C, d)
    if tuple(w.shape) != (len(classes), vm.hidden):
        raise CheckpointError(f"{ckpt.path}: head.linear.weight {tuple(w.shape)} does not fit ({len(classes)}, "
                              f"{vm.hidden})")  # fmt: skip
    head = ImageHead(vm.hidden, len(classes)).to(vm.device)
    with torch.no_grad():
        head.linear.weight.copy_(w)
        head.linear.bias.copy_(ckpt.extra.get("head.linear.bias", torch.zeros(len(classes))))
    return _Fixed(m.load_prefix(vm, ckpt, kv=None)), head  # type: ignore[arg-type]  # an image method


class _Fixed:
    """A loaded VisualPrompt behind the Trainable interface image_logits reads (nothing trains)."""

    def __init__(self, vp: Any) -> None:
        self.vp = vp

    def prefix(self, vm: VisionModel) -> Any:
        return self.vp

    eval_prefix = prefix


@dataclass
class ImagePredictor:
    """One image model with one trained image prompt."""

    vm: VisionModel
    prompt: Any
    head: nn.Module | None
    checkpoint: PromptCheckpoint
    batch_size: int = 32
    skip_bad_images: bool = False

    @classmethod
    def load(
        cls,
        prompts: str | list[str],
        *,
        model: str | None = None,
        vision_model: VisionModel | None = None,
        allow_other_model: bool = False,
        batch_size: int = 32,
        device: str = "auto",
        dtype: str = "float32",
        skip_bad_images: bool = False,
        skip_equivalence_check: bool = False,
        **_: Any,
    ) -> ImagePredictor:
        paths = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(paths) != 1:
            raise ValueError("--prompt: an image prompt is used alone (ensembles of image prompts: not supported)")
        ckpt = load_prompt(paths[0])
        if vision_model is None:
            name = model or ckpt.meta.get("base_model")
            if not name:
                raise ValueError(f"{paths[0]}: no base_model in its metadata; pass --model")
            vision_model = load_vision_model(str(name), device=device, dtype=dtype, check=not skip_equivalence_check)
        prompt, head = loaded_prompt(vision_model, ckpt, allow_other_model=allow_other_model)
        return cls(vision_model, prompt, head, ckpt, batch_size, skip_bad_images)

    @property
    def labels(self) -> list[str]:
        return list(self.checkpoint.meta["labels"]["labels"])

    def probs(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C) class probabilities."""
        return predict_logits(self.vm, self.prompt, self.head, pixels, self.batch_size).softmax(-1)

    def predict(self, inputs: Any, **_: Any) -> list[dict[str, Any]]:
        """Label and class probabilities of each image: a list of PIL images or paths, one image, or a folder tree /
        CSV / JSONL list (its rows' paths go in the output)."""
        names: list[str | None]
        if isinstance(inputs, str) and not _is_image_file(inputs):
            s = load_image_set(inputs, self.vm.processor, classes=self.labels, skip_bad=self.skip_bad_images,
                               labelled=False)  # fmt: skip
            pixels, names = s.pixels, list(s.paths)
        else:
            items = inputs if isinstance(inputs, list) else [inputs]
            pixels = preprocess([as_image(x, f"image {i}") for i, x in enumerate(items)], self.vm.processor)
            names = [str(x) if isinstance(x, str) else None for x in items]
        return rows_of(self.probs(pixels), self.labels, names)

    def evaluate(self, path: str, **_: Any) -> dict[str, Any]:
        """accuracy, macro_f1, per-class F1, confusion, n (and skipped_images with skip_bad_images)."""
        s = load_image_set(path, self.vm.processor, classes=self.labels, skip_bad=self.skip_bad_images)
        pred = self.probs(s.pixels).argmax(-1).tolist()
        m = classification_metrics(s.labels, pred, self.labels)
        if s.skipped:
            m["skipped_images"] = len(s.skipped)
        return m


def rows_of(probs: torch.Tensor, labels: list[str], names: list[str | None]) -> list[dict[str, Any]]:
    """One output row per image: {"image"?, "label", "probs": {class: p}}."""
    out = []
    for p, name in zip(probs.tolist(), names):
        row: dict[str, Any] = {"image": name} if name is not None else {}
        row["label"] = labels[max(range(len(p)), key=p.__getitem__)]
        row["probs"] = dict(zip(labels, p))
        out.append(row)
    return out


def _is_image_file(path: str) -> bool:
    from softprompt.vision.images import EXTENSIONS

    return path.lower().endswith(EXTENSIONS)
