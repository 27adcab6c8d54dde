"""Python API, mirroring the CLI: train, load a trained prompt, evaluate, predict, generate, info.

    import softprompt as sp
    result = sp.train(sp.RunConfig(...))            # or the CLI: softprompt train ...
    pred = sp.Predictor.load("prompt.safetensors")  # base model, template and verbalizer come from the file
    pred.predict(["a great film"])                  # [{"label": "positive", "probs": {...}}]
    pred.evaluate("dev.tsv")                        # {"accuracy": ..., "macro_f1": ..., "confusion": ...}
    pred.generate(["Question: ..."], max_new_tokens=20)

Several prompt files make an ensemble: each input runs under every prompt in one batched forward pass
(one row per (input, prompt)), and the class probabilities are averaged or majority-voted.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from softprompt.checkpoint import PromptCheckpoint, load_prompt
from softprompt.config import DataConfig, ModelConfig
from softprompt.data import Encoded
from softprompt.dynamic import PromptSet
from softprompt.evaluate import (
    class_probs,
    classification_metrics,
    combine_probs,
    evaluate_examples,
    generate_ids,
    generation_metrics,
)
from softprompt.loaded import LoadedPrompt, ensemble_head, load
from softprompt.methods import IMAGE_METHODS, checkpoint_prompts
from softprompt.models import Backbone, load_backbone
from softprompt.prompted import Prefix, PromptedModel
from softprompt.task import BoundTask, TaskSpec


@dataclass
class Predictor:
    """One backbone with one or more trained prompts of the same task (several = an ensemble)."""

    pm: PromptedModel
    task: BoundTask
    prefix: Prefix | PromptSet  # a PromptSet when a member is input-dependent (softprompt.dynamic)
    checkpoints: list[PromptCheckpoint]
    combine: str = "mean"  # mean (probabilities) | vote (majority of argmax)
    batch_size: int = 32
    head: nn.Module | None = None  # what rows are scored with (softprompt.loaded.ensemble_head); None: verbalizer
    members: list[LoadedPrompt] = field(default_factory=list)  # the loaded prompts, in order

    @classmethod
    def load(
        cls,
        prompts: str | list[str],
        *,
        model: str | None = None,
        backbone: Backbone | None = None,
        allow_other_model: bool = False,
        combine: str = "mean",
        batch_size: int = 32,
        device: str = "auto",
        dtype: str = "float32",
        skip_equivalence_check: bool = False,
    ) -> Predictor:
        paths = [prompts] if isinstance(prompts, str) else list(prompts)
        if not paths:
            raise ValueError("--prompt: at least one prompt file is required")
        if combine not in ("mean", "vote"):
            raise ValueError(f"--combine must be mean or vote, got {combine!r}")
        ckpts = [load_prompt(p) for p in paths]
        for c in ckpts:
            if str(c.meta.get("method")) in IMAGE_METHODS:
                raise ValueError(f"{c.path}: an image prompt: load it with softprompt.vision.api.ImagePredictor")
        specs = [TaskSpec.from_meta(c.meta) for c in ckpts]
        spec = specs[0]
        for c, other in zip(ckpts[1:], specs[1:]):  # one task; each member may score with its own head
            if (other.task, other.template, other.verbalizer) != (spec.task, spec.template, spec.verbalizer):
                raise ValueError(
                    f"{c.path}: an ensemble needs prompts of one task (template/labels differ from {paths[0]})"
                )
        if backbone is None:
            name = model or ckpts[0].meta.get("base_model")
            if not name:
                raise ValueError(f"{paths[0]}: no base_model in its metadata; pass --model")
            mcfg = ModelConfig(model=name, device=device, dtype=dtype, skip_equivalence_check=skip_equivalence_check)
            backbone = load_backbone(mcfg, progress=False)
        pm = PromptedModel(backbone, position=spec.position)
        first = load(ckpts[0], backbone, pm, allow_other_model=allow_other_model,
                     num_tokens=max(c.num_tokens for c in ckpts))  # fmt: skip
        members = [first] + [
            load(c, backbone, pm, allow_other_model=allow_other_model, task=first.task) for c in ckpts[1:]
        ]  # one task; each member may score with its own head
        with torch.no_grad():  # once per prompt, any method (softprompt.methods); input-dependent: a PromptSet
            prefix = checkpoint_prompts(pm, ckpts)
        return cls(pm, first.task, prefix, ckpts, combine, batch_size, ensemble_head(members), members)

    @property
    def labels(self) -> list[str]:
        assert self.task.spec.verbalizer is not None
        return self.task.spec.verbalizer.labels

    # ---- classification ---------------------------------------------------------------------------------
    def probs(self, examples: list[Encoded]) -> torch.Tensor:
        """(N, L) class probabilities, combined over the ensemble's K prompts in one batched pass."""
        K = len(self.checkpoints)
        rep = [e for e in examples for _ in range(K)]
        rows = [k for _ in examples for k in range(K)]
        p = class_probs(
            self.pm, self.prefix, rep, self.task.label_ids, batch_size=self.batch_size, rows=rows, head=self.head
        )
        return combine_probs(p.view(len(examples), K, -1), self.combine)

    def predict(self, inputs: list[str] | str, *, columns: str | None = None) -> list[dict[str, Any]]:
        """Label and probabilities per input: texts (template already filled) or a data file path."""
        examples, texts = self._examples(inputs, columns)
        if self.task.spec.task != "classify":
            return [{"input": t, "output": g} for t, g in zip(texts, self._generate(examples))]
        probs = self.probs(examples)
        return [
            {"input": t, "label": self.labels[int(p.argmax())], "probs": dict(zip(self.labels, map(float, p)))}
            for t, p in zip(texts, probs)
        ]

    def evaluate(self, path: str, *, max_new_tokens: int = 32, columns: str | None = None) -> dict[str, Any]:
        """Metrics on a labelled file; `columns` names the cells of a headerless CSV/TSV."""
        examples, _, _ = self.task.encode_file(path, columns=columns)
        if self.task.spec.task == "classify":
            probs = self.probs(examples)
            m = classification_metrics(
                [int(e.label) for e in examples if e.label is not None], probs.argmax(-1).tolist(), self.labels
            )
        else:
            preds = self._generate(examples, max_new_tokens=max_new_tokens)
            golds = [self.pm.decode(e.target_ids or []) for e in examples]
            m = generation_metrics(preds, golds)
        m["prompts"] = [c.path for c in self.checkpoints]
        return m

    # ---- generation -------------------------------------------------------------------------------------
    def generate(self, inputs: list[str] | str, **gen_kwargs: Any) -> list[str]:
        examples, _ = self._examples(inputs)
        return self._generate(examples, **gen_kwargs)

    def _generate(self, examples: list[Encoded], **gen_kwargs: Any) -> list[str]:
        gen_kwargs.setdefault("max_new_tokens", 32)
        if not gen_kwargs.get("do_sample"):
            gen_kwargs["do_sample"] = False
        check_generation(gen_kwargs)
        if not isinstance(self.prefix, Prefix):
            raise ValueError("an input-dependent prompt (routed, conditioned) serves classification tasks only")
        limit = position_limit(self.pm)
        if limit is not None and examples:
            need = int((self.prefix.lengths + self.prefix.gaps()).max()) + max(len(e.input_ids) for e in examples)
            if need + gen_kwargs["max_new_tokens"] > limit:
                raise ValueError(
                    f"--max-new-tokens {gen_kwargs['max_new_tokens']}: prompt and input take {need} of the model's "
                    f"{limit} positions, so at most {max(limit - need, 0)} new tokens fit"
                )
        ids = generate_ids(self.pm, self.prefix, examples, batch_size=self.batch_size, **gen_kwargs)
        return [self.pm.decode(g) for g in ids]

    # ---- inputs -----------------------------------------------------------------------------------------
    def _examples(self, inputs: list[str] | str, columns: str | None = None) -> tuple[list[Encoded], list[str]]:
        if isinstance(inputs, str) and (inputs == "-" or os.path.exists(inputs)):
            enc, _, texts = self.task.encode_file(inputs, require_targets=False, columns=columns)
            return enc, texts
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        enc, _ = self.task.encode_texts(texts)
        return enc, texts


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.manual_seed takes


def check_generation(kw: dict[str, Any]) -> None:
    """ValueError naming the flag unless the generation settings are finite and in range."""

    def bad(flag: str, want: str) -> ValueError:
        return ValueError(f"--{flag.replace('_', '-')} must be {want}, got {kw[flag]!r}")

    def integer(flag: str, lo: int) -> None:
        v = kw.get(flag)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise bad(flag, f"an integer >= {lo}")

    integer("max_new_tokens", 1)
    integer("num_beams", 1)
    integer("top_k", 0)
    t, p = kw.get("temperature"), kw.get("top_p")
    if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
        raise bad("temperature", "a finite number > 0")
    if p is not None and not (isinstance(p, (int, float)) and math.isfinite(p) and 0 < p <= 1):
        raise bad("top_p", "in (0, 1]")
    seed = kw.get("seed")
    if seed is not None and not (isinstance(seed, int) and SEED_MIN <= seed <= SEED_MAX):
        raise bad("seed", f"an integer in [{SEED_MIN}, {SEED_MAX}]")


def position_limit(pm: PromptedModel) -> int | None:
    """Positions a decoder-only model has (prompt + input + new tokens must fit); None when unbounded or not
    decoder-only."""
    if pm.family != "causal":
        return None
    cfg = pm.model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(limit) if limit else None


def zero_shot(backbone: Backbone, data: DataConfig, path: str) -> dict[str, Any]:
    """Metrics of the backbone with no prompt at all (same template and verbalizer) on a labelled file."""
    pm = PromptedModel(backbone)
    task = BoundTask(TaskSpec.from_config(data), pm, num_tokens=0)
    examples, _, _ = task.encode_file(path, columns=data.columns)
    labels = task.spec.verbalizer.labels if task.spec.verbalizer else None
    return evaluate_examples(
        pm, pm.build_prefix([None]), examples, task=data.task, label_ids=task.label_ids, labels=labels
    )


def info(path: str) -> dict[str, Any]:
    """A prompt file's metadata, tensor shapes and size (what `softprompt info` prints)."""
    ck = load_prompt(path)
    return {
        "path": path,
        "bytes": os.path.getsize(path),
        "tensors": {"prompt": list(ck.prompt.shape), **{k: list(v.shape) for k, v in ck.extra.items()}},
        **ck.meta,
    }


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, default=str)
