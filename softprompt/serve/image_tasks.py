"""The image server's tasks (softprompt.serve.images): the task table and how a batch of their rows is classified.

Every image prompt of the directory is a task on one image model, validated by the one prompt-file loader and the
model's fingerprint; admin add / replace / remove write a temporary file in the directory, check it, rename it into
place and swap the whole table (a request in flight keeps the task it looked up), as the text server's Registry
(softprompt.serve.registry) does. `classify_rows` runs one batch mixed across tasks: every CoOp row shares ONE plain
image forward; VPT rows of one geometry share one forward with per-row prompt tokens.
Notation: B rows, C classes, P prompt tokens, L' prompt layers, d width.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from softprompt.checkpoint import CheckpointError, load_prompt
from softprompt.serve.errors import (
    Conflict,
    NotFound,
    Unprocessable,
)
from softprompt.serve.registry import persist_task, read_server_prompt, validate_name
from softprompt.vision.api import loaded_prompt
from softprompt.vision.encoder import VisionModel, VisualPrompt

log = logging.getLogger("softprompt.serve")
SUFFIX = ".safetensors"


@dataclass
class ImageTask:
    name: str
    path: Path
    method: str
    classes: list[str]
    prompt: Any  # a loaded VisualPrompt behind .prefix (vpt) or a frozen CoOp scorer (coop)
    head: Any  # vpt: the ImageHead; coop: None
    created: float = field(default_factory=time.time)

    def group(self) -> tuple[Any, ...]:
        """Rows of tasks with one group share one forward."""
        if self.method == "coop":
            return ("coop",)
        vp = self.prompt.prefix(None)
        return ("vpt", vp.deep, vp.num_tokens)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "labels": self.classes, "kind": "image-classify",
                "created": int(self.created)}  # fmt: skip


class ImageRegistry:
    """The image tasks of a directory on one VisionModel. add / replace / remove (the admin endpoints) change the
    directory as the text Registry does: an upload is written to a temporary file in DIR, validated by the one
    prompt-file loader (softprompt.checkpoint.load_prompt) and the image model's fingerprint (loaded_prompt), and
    only then renamed over NAME.safetensors; a bad file changes nothing. The task table is replaced, never changed
    in place, so readers on the event loop see one table; a request in flight keeps the ImageTask it resolved."""

    def __init__(self, vm: VisionModel, directory: str | Path, *, allow_other_model: bool = False) -> None:
        self.vm, self.directory = vm, Path(directory)
        self.allow_other_model = allow_other_model
        self.tasks: dict[str, ImageTask] = {}
        self.refused: list[dict[str, str]] = []
        self._admin = threading.Lock()
        for path in sorted(self.directory.glob("*" + SUFFIX)):
            if path.name.startswith("."):
                continue
            try:
                task = self._make_task(validate_name(path.name[: -len(SUFFIX)]), path)
            except (Unprocessable, CheckpointError, ValueError) as e:
                reason = getattr(e, "message", None) or str(e).splitlines()[0]
                self.refused.append({"file": path.name, "reason": reason})
                log.warning("refusing image prompt %s: %s", path, reason)
                continue
            self.tasks[task.name] = task

    def _make_task(self, name: str, path: Path, *, source: Path | None = None) -> ImageTask:
        ck = load_prompt(source or path)
        prompt, head = loaded_prompt(self.vm, ck, allow_other_model=self.allow_other_model)
        return ImageTask(name, path, str(ck.meta["method"]), list(ck.meta["labels"]["labels"]), prompt, head)

    def get(self, name: str, param: str = "task") -> ImageTask:
        task = self.tasks.get(name)
        if task is None:
            raise NotFound(f"unknown task {name!r} (GET /v1/tasks lists them)", param=param)
        return task

    def __len__(self) -> int:
        return len(self.tasks)

    # ---- admin (softprompt.serve.app.task_admin_router; runs in a worker thread) ------------------------
    def add(self, name: str, data: bytes, *, replace: bool, from_path: str | None = None) -> tuple[ImageTask, bool]:
        """Register `data` (a prompt file's bytes) as task `name`, persisted as DIR/name.safetensors; 409 for an
        existing name unless `replace`; 400 (nothing changed) when the file is not an image prompt for this model."""
        validate_name(name)
        with self._admin:
            old = self.tasks.get(name)
            if old is not None and not replace:
                raise Conflict(f"task {name!r} already exists (PUT replaces it)", param="name")
            task = persist_task(self.directory, name, data, lambda final, tmp: self._make_task(name, final, source=tmp),
                                from_path=from_path)  # fmt: skip
            final = self.directory / (name + SUFFIX)
            self.tasks = {**self.tasks, name: task}
            self.refused = [r for r in self.refused if r["file"] != final.name]
            log.info("%s image task %s (%s)", "replaced" if old else "added", name, task.method)
            return task, old is not None

    def add_path(self, name: str, source: str, *, replace: bool, max_bytes: int) -> tuple[ImageTask, bool]:
        """Register a prompt file already on the server (copied into DIR; the source is left alone)."""
        return self.add(name, read_server_prompt(source, max_bytes), replace=replace, from_path=source)

    def remove(self, name: str) -> ImageTask:
        validate_name(name)
        with self._admin:
            task = self.tasks.get(name)
            if task is None:
                raise NotFound(f"unknown task {name!r}", param="task")  # the text Registry's words
            try:
                task.path.unlink()
            except FileNotFoundError:
                pass
            self.tasks = {k: v for k, v in self.tasks.items() if k != name}
            log.info("removed image task %s", name)
            return task


@torch.no_grad()
def classify_rows(vm: VisionModel, rows: list[tuple[ImageTask, torch.Tensor]]) -> list[torch.Tensor]:
    """Class probabilities (C_task,) of each row (task, pixels (3, H, W)), computed in one batch mixed across
    tasks: one forward per group (module docstring), in row order out."""
    out: list[torch.Tensor | None] = [None] * len(rows)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (task, _) in enumerate(rows):
        groups.setdefault(task.group(), []).append(i)
    for key, idx in groups.items():
        px = torch.stack([rows[i][1] for i in idx]).to(vm.device)  # (B, 3, H, W)
        if key[0] == "coop":
            from softprompt.vision.coop import image_features, scale_logits

            img = image_features(vm, px)  # (B, D): one plain image forward for every CoOp row
            for j, i in enumerate(idx):
                task = rows[i][0]
                out[i] = scale_logits(vm, img[j : j + 1], task.prompt.text_features(vm, grad=False))[0]
            continue
        tokens = torch.cat([rows[i][0].prompt.prefix(vm).tokens for i in idx])  # (B, L', P, d): per-row prompts
        feats = vm.features(px, VisualPrompt(tokens, deep=bool(key[1]), kv=True))  # (B, d)
        for j, i in enumerate(idx):
            out[i] = rows[i][0].head(feats[j : j + 1])[0]
    return [o.float().softmax(-1).cpu() for o in out if o is not None]
