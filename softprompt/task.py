"""A task: template, verbalizer and head, bound to a PromptedModel; turns files into encoded examples.

The same TaskSpec is written into a prompt's metadata at save and read back by eval/predict/generate/serve,
so a checkpoint carries everything needed to use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from softprompt.checkpoint import CheckpointError, PromptCheckpoint
from softprompt.config import DataConfig
from softprompt.data import DataError, Encoded, Verbalizer, encode_samples, load_samples, seen_labels
from softprompt.prompted import LinearHead, PromptedModel, SimilarityHead, VerbalizerHead, label_text


@dataclass
class TaskSpec:
    task: str = "classify"  # classify | generate
    template: str = "{text}"
    verbalizer: Verbalizer | None = None
    label_field: str = "label"
    target_field: str = "target"
    head: str = "lm"  # lm | linear | similarity
    position: str = "auto"
    max_length: int = 512
    max_target_length: int = 64
    fields: list[str] = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg: DataConfig, position: str = "auto") -> TaskSpec:
        verb = None
        if cfg.task == "classify":
            labels = seen_labels(cfg.train, cfg) if (cfg.train and not cfg.labels) else None
            verb = Verbalizer.parse(cfg.labels, labels)
        from softprompt.data import Template

        return cls(
            task=cfg.task,
            template=cfg.template,
            verbalizer=verb,
            label_field=cfg.label_field,
            target_field=cfg.target_field,
            head=cfg.head,
            position=position,
            max_length=cfg.max_length,
            max_target_length=cfg.max_target_length,
            fields=Template(cfg.template).fields,
        )

    def to_meta(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "template": self.template,
            "labels": self.verbalizer.to_meta() if self.verbalizer else None,
            "label_field": self.label_field,
            "target_field": self.target_field,
            "head": self.head,
            "position": self.position,
            "max_length": str(self.max_length),
            "fields": self.fields,
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> TaskSpec:
        labels = meta.get("labels")
        return cls(
            task=meta.get("task", "classify"),
            template=meta.get("template", "{text}"),
            verbalizer=Verbalizer.from_meta(labels) if isinstance(labels, dict) else None,
            label_field=meta.get("label_field", "label"),
            target_field=meta.get("target_field", "target"),
            head=meta.get("head", "lm"),
            position=meta.get("position", "auto"),
            max_length=int(meta.get("max_length", 512)),
            fields=list(meta.get("fields") or []),
        )

    def data_config(self, **over: Any) -> DataConfig:
        cfg = DataConfig(
            task=self.task,
            template=self.template,
            label_field=self.label_field,
            target_field=self.target_field,
            head=self.head,
            max_length=self.max_length,
            max_target_length=self.max_target_length,
        )
        for k, v in over.items():
            setattr(cfg, k, v)
        return cfg


class BoundTask:
    """A TaskSpec on a PromptedModel: verbalizer token ids, head, and file → encoded examples."""

    def __init__(self, spec: TaskSpec, pm: PromptedModel, *, num_tokens: int) -> None:
        self.spec = spec
        self.pm = pm
        self.num_tokens = num_tokens
        self.label_ids: list[list[int]] = []
        if spec.task == "classify":
            if spec.verbalizer is None:
                raise DataError("--labels: a classification task needs a verbalizer")
            if pm.family != "encoder" or spec.head == "lm":
                if pm.family == "encoder":
                    raise DataError("--head: an encoder backbone needs --head linear or --head similarity")
                allowed = ("lm", "linear") if pm.family == "causal" else ("lm",)
                if spec.head not in allowed:
                    raise DataError(f"--head {spec.head}: a {pm.family} model takes --head {' or '.join(allowed)}")
                self.label_ids = pm.verbalizer_ids(spec.verbalizer.words, spec.template)
                for w, ids in zip(spec.verbalizer.words, self.label_ids):
                    if not ids:
                        raise DataError(f"--labels: verbalizer word {w!r} tokenises to nothing")
        elif pm.family == "encoder":
            raise DataError("--task generate needs a causal or encoder-decoder model, not an encoder")

    def label_words(self) -> list[str]:
        """The verbalizer words as they follow the template (what `--init labels` embeds)."""
        assert self.spec.verbalizer is not None
        return [label_text(w, self.spec.template, self.pm.family) for w in self.spec.verbalizer.words]

    def max_input_length(self) -> int:
        """--max-length, capped by the model's position limit minus prompt, BOS and target room."""
        limit = getattr(self.pm.model.config, "max_position_embeddings", None) or getattr(
            self.pm.model.config, "n_positions", None
        )
        n = self.spec.max_length
        if limit and self.pm.family != "seq2seq":
            room = max(len(v) for v in self.label_ids) if self.label_ids else 0
            if self.spec.task == "generate":
                room = self.spec.max_target_length + 1
            n = min(n, int(limit) - self.num_tokens - len(self.pm.prefix_ids) - room)
        if n < 1:
            raise DataError(f"--num-tokens {self.num_tokens}: leaves no room for input within the model's limit")
        return n

    def encode_file(
        self, path: str, *, require_targets: bool = True, truncate: bool = True, columns: str | None = None
    ) -> tuple[list[Encoded], int, list[str]]:
        """Encoded examples of a file (labels mapped through this task's verbalizer), number truncated, texts.
        `columns` (--columns) names the cells of a headerless CSV/TSV: a property of the file, not of the task."""
        cfg = self.spec.data_config(columns=columns)
        samples = load_samples(path, cfg, self.spec.verbalizer, require_targets=require_targets)
        enc, n_cut = encode_samples(
            samples,
            self.pm.encode_input,
            max_length=self.max_input_length(),
            truncate=truncate,
            encode_target=self.pm.encode_target if self.pm.family == "seq2seq" else self._causal_target,
            max_target_length=self.spec.max_target_length,
        )
        return enc, n_cut, [s.text for s in samples]

    def encode_texts(self, texts: list[str], *, truncate: bool = True) -> tuple[list[Encoded], int]:
        from softprompt.data import Sample

        samples = [Sample(t, where=f"input {i + 1}") for i, t in enumerate(texts)]
        return encode_samples(samples, self.pm.encode_input, max_length=self.max_input_length(), truncate=truncate)

    def _causal_target(self, text: str) -> list[int]:
        return self.pm.encode_target(label_text(text, self.spec.template, "causal"))

    def saved_head(self, ckpt: PromptCheckpoint, *, path: str = "", required: bool | None = None) -> LinearHead | None:
        """The linear head trained with `ckpt` (head.linear.*, or head.* as train.py once named it), checked
        against this backbone's width and the label count; None when the file has none; an error when the prompt
        was trained with --head linear (`required`; default: this task's --head), since a fresh head would give
        untrained labels. `path` names the file."""
        path = path or ckpt.path
        legacy = {"head.weight": "head.linear.weight", "head.bias": "head.linear.bias"}
        state = {legacy.get(k, k)[5:]: v for k, v in ckpt.extra.items() if k.startswith("head.")}
        w = state.get("linear.weight")
        if w is None:
            if (self.spec.head == "linear" if required is None else required) and self.spec.task == "classify":
                raise CheckpointError(f"{path}: a --head linear prompt without its head.linear.* tensors")
            return None
        assert self.spec.verbalizer is not None
        d, L = self.pm.backbone.hidden_dim, len(self.spec.verbalizer.labels)  # heads read hidden states
        if w.ndim != 2 or tuple(w.shape) != (L, d):
            raise CheckpointError(f"{path}: head.linear.weight has shape {tuple(w.shape)}, expected ({L}, {d})")
        head = LinearHead(d, L).to(self.pm.backbone.device)
        try:
            head.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: bad head tensors ({str(e).splitlines()[0]})") from None
        return head

    def make_head(self, *, seed: int = 0) -> torch.nn.Module | None:
        """The classification head: an encoder's linear (trainable) or similarity (frozen label-description
        encodings) head, or a decoder's --head linear, which starts as its verbalizer: row l is the output
        embedding of label word l's first token, bias 0, so step 0 gives verbalizer scoring's class
        probabilities (for one-token words, exactly) and training moves on from there."""
        if self.spec.task != "classify" or (self.pm.family != "encoder" and self.spec.head != "linear"):
            return None
        assert self.spec.verbalizer is not None
        d, L = self.pm.backbone.hidden_dim, len(self.spec.verbalizer.labels)  # heads read hidden states
        if self.spec.head == "linear":
            torch.manual_seed(seed)
            head = LinearHead(d, L).to(self.pm.backbone.device)
            if self.pm.family == "causal":
                # the model's own output path at 0 and at each basis vector: its affine part (exact for a linear
                # head, with any logit scaling; the tangent at 0 of a soft-capped one), label columns only
                first = [ids[0] for ids in self.label_ids]
                dev = self.pm.backbone.device
                with torch.no_grad():
                    basis = torch.cat([torch.zeros(1, d), torch.eye(d)]).to(dev, self.pm.embedding_matrix().dtype)
                    out = self.pm.lm_logits(basis)[:, first]  # (1 + d, L)
                    head.linear.weight.copy_((out[1:] - out[:1]).T)
                    head.linear.bias.copy_(out[0])
            return head
        return self._similarity_head()

    def scoring_head(self, head: str, *, path: str = "") -> torch.nn.Module:
        """How a prompt without trained head tensors scores, as a head over `pm.pooled`, so that it can join
        --head linear prompts in one ensemble (PerPromptHeads): a decoder's verbalizer (one-token label words;
        the same class probabilities as verbalizer scoring) or an encoder's similarity head. `path` names it."""
        if self.pm.family == "encoder" and head == "similarity":
            return self._similarity_head()
        if self.pm.family == "causal" and head == "lm" and self.label_ids:
            if any(len(ids) != 1 for ids in self.label_ids):
                raise CheckpointError(
                    f"{path}: a verbalizer prompt joins --head linear prompts in an ensemble only with one-token"
                    " label words"
                )
            return VerbalizerHead(self.pm.lm_logits, [ids[0] for ids in self.label_ids]).to(self.pm.backbone.device)
        raise CheckpointError(f"{path}: a --head {head} prompt cannot join --head linear prompts in an ensemble")

    def _similarity_head(self) -> SimilarityHead:
        """Each label description encoded once, without a prompt."""
        assert self.spec.verbalizer is not None
        L = len(self.spec.verbalizer.labels)
        none = self.pm.build_prefix([None])
        ids = [self.pm.encode_input(w) for w in self.spec.verbalizer.words]
        with torch.no_grad():
            pooled = self.pm.pooled(none, torch.zeros(L, dtype=torch.long), self.pm.collate(ids).to(none.mask.device))
        return SimilarityHead(pooled).to(self.pm.backbone.device)
