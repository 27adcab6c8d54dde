"""`softprompt train --task image-classify`: what an image prompt run trains, for softprompt.trainer's one loop.

`ImageObjective` is an Objective of softprompt.trainer.fit (which owns the optimiser, schedule, resume, the step
loop, best-prompt keeping, early stopping, rollback and logs, exactly as for text): the images are preprocessed
once (softprompt.vision.images), a micro-batch is a list of row indices into them, its loss is the cross-entropy of
the method's logits:

    vpt, vpt-deep   head(features(pixels, prompt))    a linear head (C, d) on the pooled output, trained with it
    coop            scale * cos(image features, class text features(context)) (+ SigLIP's bias), no head
    (none)          head(features(pixels))            the linear probe (bench/vision.py; nothing is saved)

The prompt file (softprompt.checkpoint.save_prompt: safetensors, atomic) carries the image model's fingerprint
(softprompt.vision.encoder.VisionModel.fingerprint), its processor settings and the class list; eval/predict/serve
refuse it on another image model. Notation: B images, C classes, d width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from softprompt import methods
from softprompt.checkpoint import save_prompt
from softprompt.config import ConfigError, RunConfig, to_dict
from softprompt.evaluate import classification_metrics
from softprompt.runfiles import keeping_mode, run_identity
from softprompt.trainer import Evaluation, scalars
from softprompt.vision.encoder import VisionModel, load_vision_model
from softprompt.vision.images import ImageSet, load_image_set, processor_settings


class ImageHead(nn.Module):
    """A linear head on the pooled image features: `linear` (C, d), saved as head.linear.weight / .bias."""

    def __init__(self, hidden: int, classes: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.linear = nn.Linear(hidden, classes)
        bound = 1.0 / hidden**0.5  # nn.Linear's own init, drawn from the run's seed
        with torch.no_grad():
            self.linear.weight.copy_((torch.rand(classes, hidden, generator=g) * 2 - 1) * bound)
            self.linear.bias.zero_()

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, C)
        return self.linear(feats.to(self.linear.weight.dtype))


def image_logits(vm: VisionModel, prompt: Any, head: nn.Module | None, pixels: torch.Tensor, *, grad: bool) -> Any:
    """(B, C) logits of `pixels` (B, 3, H, W): the method's own scoring, or the linear probe without a prompt."""
    if prompt is None:
        assert head is not None
        return head(vm.features(pixels))
    if hasattr(prompt, "logits"):  # CoOp scores against class text features
        return prompt.logits(vm, pixels, grad=grad)
    vp = prompt.prefix(vm) if grad else prompt.eval_prefix(vm)
    assert head is not None
    return head(vm.features(pixels, vp))


@torch.no_grad()
def predict_logits(vm: VisionModel, prompt: Any, head: nn.Module | None, pixels: torch.Tensor,
                   batch_size: int = 32) -> torch.Tensor:  # fmt: skip
    """(B, C) float32 logits in chunks of batch_size, without gradients."""
    out = [image_logits(vm, prompt, head, pixels[i : i + batch_size], grad=False).float().cpu()
           for i in range(0, pixels.shape[0], batch_size)]  # fmt: skip
    return torch.cat(out)


@dataclass
class ImageObjective:
    """One image task, one prompt (vpt / vpt-deep / coop; None: a linear probe) and its head."""

    cfg: RunConfig
    vm: VisionModel
    prompt: Any  # the method's Trainable (softprompt.vision.vpt.VPTPrompt / coop.CoOpPrompt) or None
    head: nn.Module | None
    train_set: ImageSet
    eval_set: ImageSet | None
    meta: dict[str, Any]
    params: list[nn.Parameter] = field(default_factory=list)
    head_params: list[nn.Parameter] = field(default_factory=list)
    _feats: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)  # CoOp: id(set) -> (B, D)

    @property
    def n_train(self) -> int:
        return len(self.train_set)

    @property
    def has_eval(self) -> bool:
        return self.eval_set is not None and len(self.eval_set) > 0

    @property
    def device(self) -> torch.device:
        return self.vm.device

    def batches(self, step: int) -> list[list[int]]:
        """grad_accum micro-batches of row indices: a pure function of (seed, step), so --resume repeats them."""
        from softprompt.train import batch_schedule

        t = self.cfg.train
        return batch_schedule([1] * self.n_train, t.batch_size, t.seed, step, t.grad_accum, False)

    def loss(self, rows: list[int]) -> torch.Tensor:
        y = torch.tensor([self.train_set.labels[i] for i in rows], device=self.device)
        if hasattr(self.prompt, "score"):  # CoOp: the frozen image tower's features, once per training image
            logits = self.prompt.score(self.vm, self.image_features(self.train_set)[rows], grad=True)
        else:
            px = self.train_set.pixels[rows].to(self.device)  # (B, 3, H, W)
            logits = image_logits(self.vm, self.prompt, self.head, px, grad=True)
        return nn.functional.cross_entropy(logits.float(), y)

    def image_features(self, s: ImageSet) -> torch.Tensor:
        """(B, D) normalised image features of a CoOp run's images, computed once (the image tower is frozen)."""
        from softprompt.vision.coop import image_features

        key = id(s)
        if key not in self._feats:
            bs = self.cfg.train.batch_size
            self._feats[key] = torch.cat([image_features(self.vm, s.pixels[i : i + bs])
                                          for i in range(0, len(s.pixels), bs)])  # fmt: skip
        return self._feats[key]

    def evaluate(self) -> Evaluation:
        assert self.eval_set is not None
        es = self.eval_set
        if hasattr(self.prompt, "score"):
            with torch.no_grad():
                logits = self.prompt.score(self.vm, self.image_features(es), grad=False).float().cpu()
        else:
            logits = predict_logits(self.vm, self.prompt, self.head, es.pixels, self.cfg.train.batch_size)
        gold = torch.tensor(es.labels)
        m = classification_metrics(es.labels, logits.argmax(-1).tolist(), es.classes)
        m["loss"] = float(nn.functional.cross_entropy(logits, gold))
        score = float(m.get(self.cfg.train.metric, m["loss"]))
        return Evaluation(score, {f"eval_{k}": v for k, v in scalars(m).items()}, m)

    def save(self, metrics: Evaluation | dict[str, Any]) -> None:
        if self.prompt is None:  # a linear probe (bench/vision.py): no prompt file
            return
        m = scalars(metrics.metrics if isinstance(metrics, Evaluation) else metrics)
        extra = {}
        if self.head is not None:
            extra = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        tensor, tensors, meta = self.prompt.saved()
        out = self.cfg.train.out
        with keeping_mode(out):
            save_prompt(out, tensor, {**self.meta, **meta, "metrics": m}, {**extra, **tensors})

    def identity(self) -> dict[str, Any]:
        return run_identity(self.cfg, self.vm.fingerprint())


def vision_meta(vm: VisionModel, classes: list[str]) -> dict[str, Any]:
    """The metadata every image prompt file holds besides its method's own: model, fingerprint, processor, classes."""
    return {
        "base_model": vm.model_id,
        "architecture": vm.architecture,
        "family": "vision",
        "fingerprint": vm.fingerprint(),
        "task": "image-classify",
        "labels": {"labels": classes, "words": classes},
        "vision": {
            "family": vm.family,
            "layers": vm.num_layers,
            "hidden": vm.hidden,
            "patch": vm.patch,
            "image_size": vm.image_size,
            "processor": processor_settings(vm.processor) if vm.processor is not None else {},
        },
    }


def build_image_objective(cfg: RunConfig, vm: VisionModel, log=print) -> ImageObjective:
    """Data, the initial prompt and head: everything fit() trains."""
    from softprompt.vision import coop, vpt

    d, p, t = cfg.data, cfg.prompt, cfg.train
    assert d.train
    kw: dict[str, Any] = {"image_field": d.image_field, "label_field": d.label_field, "skip_bad": d.skip_bad_images}
    train_set = load_image_set(d.train, vm.processor, **kw)
    classes = train_set.classes
    if len(classes) < 2:
        raise ConfigError(f"--train {d.train}: image classification needs at least 2 classes, found {len(classes)}")
    eval_set = load_image_set(d.eval, vm.processor, classes=classes, **kw) if d.eval else None
    for name, s in (("--train", train_set), ("--eval", eval_set)):
        if s is not None and s.skipped:
            log(f"note: {name}: skipped {len(s.skipped)} bad image(s) (--skip-bad-images); first: {s.skipped[0]}")
    if eval_set is not None and t.eval_max:
        eval_set.pixels, eval_set.labels = eval_set.pixels[: t.eval_max], eval_set.labels[: t.eval_max]
    m = methods.get(p.method)
    rule = "vpt" if p.init.strip() == "labels" else p.init  # the text default means: the method's own init
    head: nn.Module | None = None
    if p.method == "coop":
        rule = "normal" if p.init.strip() == "labels" else p.init
        prompt: Any = coop.METHOD.create(vm, coop.init_context(rule, vm, p, len(classes), seed=t.seed), p,
                                         classes=classes, template=d.template)  # fmt: skip
        if eval_set is not None:  # the baseline: zero-shot with the hand-written template
            zs = predict_zero_shot(vm, classes, d.template, eval_set.pixels, t.batch_size)
            acc = sum(int(a == b) for a, b in zip(zs, eval_set.labels)) / len(eval_set)
            log(f"zero-shot ({d.template if '{}' in d.template else coop.DEFAULT_TEMPLATE!r}): eval accuracy {acc:.4f}")
    else:
        assert isinstance(m, vpt.VPTMethod)
        init = vpt.init_tokens(rule, vm, p.num_tokens, deep=m.deep, seed=t.seed, scale=p.init_scale,
                               pixels=train_set.pixels[:256].to(vm.device))  # fmt: skip
        prompt = m.create(vm, init, p, kv=not t.naive)
        head = ImageHead(vm.hidden, len(classes), seed=t.seed).to(vm.device)
    prompt.to(vm.device)
    meta = {**vision_meta(vm, classes), "init": rule, "train_config": to_dict(cfg), "head": prompt_head(p.method)}
    return ImageObjective(cfg, vm, prompt, head, train_set, eval_set, meta, params=prompt.trainable(),
                          head_params=list(head.parameters()) if head is not None else [])  # fmt: skip


def predict_zero_shot(vm: VisionModel, classes: list[str], template: str, pixels: torch.Tensor,
                      batch_size: int = 32) -> list[int]:  # fmt: skip
    """Zero-shot predictions (class indices) of a CLIP/SigLIP model with a hand-written template."""
    from softprompt.vision.coop import zero_shot_logits

    return [int(i) for b in range(0, pixels.shape[0], batch_size)
            for i in zero_shot_logits(vm, classes, template, pixels[b : b + batch_size]).argmax(-1)]  # fmt: skip


def prompt_head(method: str) -> str:
    return "cosine" if method == "coop" else "linear"


def image_objective(cfg: RunConfig, log=print) -> ImageObjective:
    """`softprompt train --task image-classify`'s objective (softprompt.train.train runs it on fit): the image
    model loaded (its load-time guard included) and the objective built as configured."""
    m = cfg.model
    vm = load_vision_model(m.model, device=m.device, dtype=m.dtype, progress=cfg.train.progress,
                           check=not m.skip_equivalence_check)  # fmt: skip
    return build_image_objective(cfg, vm, log)
