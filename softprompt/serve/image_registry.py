"""The image server's task table (softprompt.serve.images): every image prompt of the directory is a task on one
image model, validated by the one prompt-file loader and the model's fingerprint; admin add / replace / remove
write a temporary file in the directory, check it, rename it into place and swap the whole table (a request in flight
keeps the task it looked up), as the text server's Registry (softprompt.serve.registry) does.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softprompt.checkpoint import CheckpointError, load_prompt, read_regular
from softprompt.serve.errors import (
    BadRequest,
    Conflict,
    NotFound,
    Unprocessable,
)
from softprompt.serve.registry import _not_a_prompt, validate_name
from softprompt.vision.api import loaded_prompt
from softprompt.vision.encoder import VisionModel

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
            final = self.directory / (name + SUFFIX)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".upload.tmp", dir=self.directory)
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    task = self._make_task(name, final, source=tmp)
                except (CheckpointError, ValueError, RuntimeError, KeyError, OSError) as e:
                    if from_path is not None and (getattr(e, "framing", True) or isinstance(e, OSError)):
                        raise _not_a_prompt(from_path) from None  # never quote bytes or sizes of a server file
                    where = "path" if from_path is not None else "upload"
                    msg = str(e).splitlines()[0].replace(str(tmp), where).replace(str(final), where)
                    raise BadRequest(
                        f"invalid prompt for task {name!r}: {msg}", param="path" if from_path else "body"
                    ) from None
                os.replace(tmp, final)
            finally:
                if tmp.exists():
                    tmp.unlink()
            self.tasks = {**self.tasks, name: task}
            self.refused = [r for r in self.refused if r["file"] != final.name]
            log.info("%s image task %s (%s)", "replaced" if old else "added", name, task.method)
            return task, old is not None

    def add_path(self, name: str, source: str, *, replace: bool, max_bytes: int) -> tuple[ImageTask, bool]:
        """Register a prompt file already on the server (copied into DIR; the source is left alone)."""
        try:
            st = os.stat(source)
            if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
                raise _not_a_prompt(source)
            data = read_regular(source)
        except (CheckpointError, OSError, ValueError):
            raise _not_a_prompt(source) from None
        if len(data) > max_bytes:
            raise _not_a_prompt(source)
        return self.add(name, data, replace=replace, from_path=source)

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
