"""A prompt file ready to run: the one loader behind the Python API (softprompt.api.Predictor) and the server.

`load` is the one sequence every consumer runs: read the file (softprompt.checkpoint.load_prompt, all of its
checks), check it against the backbone (dimension, fingerprint, family), read its task (TaskSpec), bind the task
to a PromptedModel (verbalizer token ids, length limits), load or build its head, and say how to build its
Prefix. The result, a LoadedPrompt, is passed around whole; a head is handed to the forward path as an argument
(`PromptedModel.label_scores(..., head=)`, `row_scores(..., heads=)`), never set on the shared PromptedModel.

    lp = load("sst2.safetensors", backbone, pm)
    scores = pm.label_scores(lp.prefix(), None, batch, lp.label_ids, head=lp.head)

Ensembles (several files of one task) share one BoundTask (`task=`) and combine their heads with `ensemble_head`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from softprompt import methods
from softprompt.checkpoint import CheckpointError, PromptCheckpoint, check_compatible, load_prompt
from softprompt.methods import checkpoint_prefix
from softprompt.models import Backbone
from softprompt.prefix import PerPromptHeads
from softprompt.prompt import tensor_digest
from softprompt.prompted import Prefix, PromptedModel
from softprompt.task import BoundTask, TaskSpec

__all__ = ["LoadedPrompt", "TaskCache", "ensemble_head", "load"]


@dataclass(eq=False)
class LoadedPrompt:
    """One prompt file on one backbone: checkpoint, task spec, bound task, head, and its Prefix on demand."""

    ckpt: PromptCheckpoint
    spec: TaskSpec
    task: BoundTask  # on the PromptedModel of the prompt's position rule (shared by an ensemble's members)
    head: nn.Module | None  # what its rows are scored with: a trained or similarity head; None = its verbalizer
    saved_head: nn.Module | None = None  # the head tensors the file carries (None: none)

    @property
    def pm(self) -> PromptedModel:
        return self.task.pm

    @property
    def path(self) -> str:
        return self.ckpt.path

    @property
    def kind(self) -> str:
        return self.spec.task

    @property
    def label_ids(self) -> list[list[int]]:
        return self.task.label_ids

    @property
    def labels(self) -> list[str] | None:
        return self.spec.verbalizer.labels if self.spec.verbalizer else None

    @property
    def prefix_key(self) -> tuple[str, ...]:
        """What identifies its Prefix: position rule and the digest of every prompt tensor (equal keys, one Prefix)."""
        # every tensor of the method (deep keys/values, a router, a generator), the head's excepted
        extra = [tensor_digest(v) for k, v in sorted(self.ckpt.extra.items()) if not k.startswith("head.")]
        return (self.spec.position, tensor_digest(self.ckpt.prompt), *extra)

    @property
    def per_row(self) -> bool:
        """Its prompt depends on the input (softprompt.dynamic): prefix() is then its input-independent entries."""
        return bool(methods.of(self.ckpt).per_row)

    @torch.no_grad()
    def prefix(self, *, kv: bool | None = None) -> Prefix:
        """Its Prefix, any method (softprompt.methods); kv=False: concatenated in front of the input where the
        method allows (a deep prompt is keys/values whatever kv says). An input-dependent prompt: its static
        entries (a routed prompt's K routes; none for a conditioned one), which softprompt.dynamic.resolve maps
        each row onto."""
        if self.per_row:
            return methods.of(self.ckpt).load_prefix(self.pm, self.ckpt, kv=kv).detach()
        return checkpoint_prefix(self.pm, [self.ckpt], kv=kv).detach()

    def member_head(self) -> nn.Module:
        """How it scores as a member of a mixed-head ensemble: its trained head, else its scoring as a head."""
        if self.saved_head is not None:
            return self.saved_head
        return self.task.scoring_head(self.spec.head, path=self.path)


class TaskCache:
    """BoundTasks shared by prompts of equal task spec and prompt length (their tokenisation is done once); `lock`
    guards the tokenizer (fast tokenizers must not be used from two threads at once)."""

    def __init__(self, lock: threading.Lock | None = None) -> None:
        self.lock: AbstractContextManager = lock if lock is not None else nullcontext()
        self._tasks: dict[tuple[str, int], BoundTask] = {}

    def bind(self, spec: TaskSpec, pm: PromptedModel, num_tokens: int) -> BoundTask:
        key = (repr(spec), num_tokens)  # every field of the spec, the position rule (hence the pm) included
        task = self._tasks.get(key)
        if task is None:
            with self.lock:
                task = self._tasks[key] = BoundTask(spec, pm, num_tokens=num_tokens)  # validates verbalizer and head
        return task


def load(
    source: str | Path | PromptCheckpoint,
    backbone: Backbone,
    pm: PromptedModel | Callable[[str], PromptedModel],
    *,
    allow_other_model: bool = False,
    path: str | Path | None = None,
    task: BoundTask | None = None,
    num_tokens: int | None = None,
    tasks: TaskCache | None = None,
) -> LoadedPrompt:
    """A prompt file (or an already read checkpoint) ready to run on `backbone`.

    `pm`: the PromptedModel, or a function giving the one for a position rule (the prompt's own). `path`: the name
    the prompt is known by (e.g. the final name of an upload read from a temporary file). `task`: a BoundTask to
    share (an ensemble's); else one is bound with `num_tokens` (default: the prompt's), through `tasks` when given.
    Raises CheckpointError / DataError / ValueError naming the file."""
    ckpt = source if isinstance(source, PromptCheckpoint) else load_prompt(source)
    if path is not None:
        ckpt.path = str(path)
    check_compatible(ckpt, backbone.embed_dim, backbone.fingerprint, allow_other_model=allow_other_model)
    fam = ckpt.meta.get("family")
    if fam and fam != backbone.family:
        raise CheckpointError(f"{ckpt.path}: trained on a {fam} model, the served model is a {backbone.family} model")
    spec = TaskSpec.from_meta(ckpt.meta)
    if spec.task not in ("classify", "generate"):
        raise CheckpointError(f"{ckpt.path}: unknown task {spec.task!r} in its metadata")
    if spec.position not in ("auto", "start"):
        raise CheckpointError(f"{ckpt.path}: unknown prompt position {spec.position!r} in its metadata")
    if methods.of(ckpt).per_row and spec.task != "classify":
        raise CheckpointError(f"{ckpt.path}: a {methods.of(ckpt).name} prompt serves classification tasks only")
    if task is None:
        model = pm if isinstance(pm, PromptedModel) else pm(spec.position)
        n = ckpt.num_tokens if num_tokens is None else num_tokens
        task = tasks.bind(spec, model, n) if tasks is not None else BoundTask(spec, model, num_tokens=n)
    saved: nn.Module | None = None
    head: nn.Module | None = None
    if spec.task == "classify" and (task.pm.family == "encoder" or spec.head == "linear"):
        lock = tasks.lock if tasks is not None else nullcontext()
        with torch.no_grad(), lock:
            # a --head linear prompt must carry its head (saved_head raises otherwise); an encoder's similarity
            # head is built from its label words
            saved = task.saved_head(ckpt, required=spec.head == "linear")
            if saved is not None:
                head = saved
            elif spec.head == task.spec.head:
                head = task.make_head()
            else:  # an ensemble member scoring unlike the task it shares (e.g. similarity among linear heads)
                head = task.scoring_head(spec.head, path=ckpt.path)
        if head is not None:
            head.eval()
    ckpt.prompt = ckpt.prompt.to(backbone.device)
    return LoadedPrompt(ckpt, spec, task, head, saved)


def ensemble_head(members: Sequence[LoadedPrompt]) -> nn.Module | None:
    """The head an ensemble's rows (row k of each input: member k) are scored with: none when every member scores
    with its verbalizer, the one head when they all score alike (one member, or a shared similarity head), else each
    member's own (PerPromptHeads; a member without head tensors keeps its scoring, as a head)."""
    if len(members) == 1:
        return members[0].head
    if all(m.saved_head is None for m in members):
        return members[0].head  # verbalizer (None) or the similarity head of the shared task: alike for every row
    return PerPromptHeads([m.member_head() for m in members])
