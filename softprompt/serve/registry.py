"""The task registry: every prompt file in the prompts directory is a task, resident in memory, on one backbone.

- A task is `DIR/NAME.safetensors`; NAME must match NAME_RE (no path separators, no "..").
- At start every prompt is loaded and checked against the served model (embedding dim and fingerprint); a prompt
  that does not fit is refused with a logged reason (listed under `refused`), never served.
- Prompts stay resident. The per-task Prefix (prompt embeddings and, for decoder-only models, the prompt's
  per-layer keys/values) is computed on first use and kept in an LRU bounded by `kv_cache_mb`, keyed by the
  prompt's content (and position rule), so tasks that share a prompt share its keys/values.
- add / replace / remove change the directory atomically: an upload is written to a temporary file in DIR,
  validated (safetensors framing, softprompt metadata, dim, fingerprint, template, verbalizer, head) and only then
  renamed over `NAME.safetensors`; a restart therefore serves the same tasks. Requests already accepted keep the
  TaskEntry they resolved, so a replace or remove never changes a request in flight.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from softprompt.checkpoint import CheckpointError, PromptCheckpoint, read_regular
from softprompt.data import DataError, Template, _record
from softprompt.loaded import LoadedPrompt, TaskCache, load
from softprompt.models import Backbone
from softprompt.prompted import Prefix, PromptedModel
from softprompt.serve.errors import BadRequest, Conflict, NotFound, TooLarge, Unprocessable
from softprompt.task import TaskSpec

log = logging.getLogger("softprompt.serve")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SUFFIX = ".safetensors"
T = TypeVar("T")
_uids = count(1)


def validate_name(name: str) -> str:
    """A task name usable as a file name in DIR and in a URL: letters, digits, '_', '.', '-', no '..'."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name or name.endswith(SUFFIX):
        raise Unprocessable(
            f"invalid task name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit,"
            " without '..'",
            param="name",
        )
    return name


@dataclass(eq=False)
class TaskEntry:
    """One registered task: its loaded prompt (softprompt.loaded: resident checkpoint, spec, bound task, head),
    template and limits."""

    name: str
    path: Path
    prompt: LoadedPrompt
    template: Template
    max_input_tokens: int
    prefix_len: int  # BOS/CLS kept in front + prompt tokens
    created: float
    prefix_key: tuple[str, ...] = ("", "")  # (position rule, prompt content digest): identifies the Prefix
    max_input_chars: int = 1 << 30  # checked before tokenising: the token limit x the tokenizer's longest token
    uid: int = field(default_factory=lambda: next(_uids))

    @property
    def ckpt(self) -> PromptCheckpoint:
        return self.prompt.ckpt

    @property
    def spec(self) -> TaskSpec:
        return self.prompt.spec

    @property
    def pm(self) -> PromptedModel:  # shares the backbone; one per prompt position rule (auto/start)
        return self.prompt.pm

    @property
    def label_ids(self) -> list[list[int]]:
        return self.prompt.label_ids

    @property
    def head(self) -> nn.Module | None:
        return self.prompt.head

    @property
    def kind(self) -> str:
        return self.spec.task

    @property
    def labels(self) -> list[str] | None:
        return self.spec.verbalizer.labels if self.spec.verbalizer else None

    def fill(self, value: str | dict[str, Any], param: str) -> str:
        """A string fills the template's single field (a template with several fields takes it as already filled,
        as `softprompt generate --input` does); an object supplies the fields by name."""
        fields = self.template.fields
        if isinstance(value, str):
            if len(fields) == 1:
                return self.template.fill({fields[0]: value}, param)
            return value
        record = _record(value)
        missing = [f for f in fields if f not in record]
        if missing:
            raise Unprocessable(
                f"{param}: missing field {missing[0]!r} (task {self.name!r} has template fields {', '.join(fields)})",
                param=param,
            )
        return self.template.fill(record, param)

    def info(self) -> dict[str, Any]:
        meta = {k: v for k, v in self.ckpt.meta.items() if k != "train_config"}
        return {
            "name": self.name,
            "task": self.spec.task,
            "template": self.template.text,
            "fields": self.template.fields,
            "labels": self.labels,
            "head": self.spec.head,
            "num_tokens": self.ckpt.num_tokens,
            "embed_dim": self.ckpt.embed_dim,
            "max_input_tokens": self.max_input_tokens,
            "created": int(self.created),
            "metadata": meta,
        }


class Registry:
    """Tasks of one backbone, loaded from (and persisted to) one directory of prompt files."""

    def __init__(
        self,
        backbone: Backbone,
        directory: str | Path,
        *,
        kv_cache_mb: float = 1024,
        max_input_tokens: int | None = None,
        max_input_chars: int | None = None,
        allow_other_model: bool = False,
        load: bool = True,
    ) -> None:
        self.backbone = backbone
        self.dir = Path(directory)
        self.kv_cache_bytes = int(kv_cache_mb * 2**20)
        self.max_input_tokens = max_input_tokens
        self.max_input_chars = max_input_chars
        self.chars_per_token = _longest_token(backbone.tokenizer)
        self.allow_other_model = allow_other_model
        self.tok_lock = threading.Lock()  # fast tokenizers must not be used from two threads at once
        self._lock = threading.RLock()
        self._admin = threading.Lock()
        self._tasks: dict[str, TaskEntry] = {}
        self._lru: OrderedDict[tuple[str, ...], Prefix] = OrderedDict()
        self._lru_bytes = 0
        self._pms: dict[str, PromptedModel] = {}
        self._bound = TaskCache(self.tok_lock)  # tasks sharing spec and prompt length share their tokenisation
        self.refused: dict[str, str] = {}
        self.stats = {"hits": 0, "misses": 0, "evictions": 0}
        self.pm = self._pm("auto")
        limit = getattr(backbone.model.config, "max_position_embeddings", None) or getattr(
            backbone.model.config, "n_positions", None
        )
        self.position_limit: int | None = int(limit) if limit and backbone.family == "causal" else None
        if load:
            self.load_all()

    # ---- loading ---------------------------------------------------------------------------------------
    def _pm(self, position: str) -> PromptedModel:
        if position not in self._pms:
            self._pms[position] = PromptedModel(self.backbone, position=position)
        return self._pms[position]

    def load_all(self) -> None:
        if not self.dir.is_dir():
            raise FileNotFoundError(f"--prompts: {self.dir} is not a directory")
        t0 = time.perf_counter()
        for path in sorted(self.dir.glob("*" + SUFFIX)):
            name = path.name[: -len(SUFFIX)]
            if name.startswith("."):
                continue  # temporary files of an interrupted write
            try:
                validate_name(name)
                entry = self._make_entry(name, path)
            except (Unprocessable, CheckpointError, DataError, ValueError, RuntimeError, OSError) as e:
                reason = getattr(e, "message", None) or str(e).splitlines()[0]
                self.refused[name] = reason
                log.warning("refusing prompt %s: %s", path, reason)
                continue
            self._tasks[name] = entry
        log.info(
            "loaded %d task(s) from %s in %.1f s (%d refused)",
            len(self._tasks),
            self.dir,
            time.perf_counter() - t0,
            len(self.refused),
        )

    def _make_entry(self, name: str, path: Path, *, source: Path | None = None) -> TaskEntry:
        """Load and validate a prompt file (read from `source` when given, e.g. an upload's temporary file) through
        softprompt.loaded, the loader the Python API uses."""
        prompt = load(
            source or path, self.backbone, self._pm, allow_other_model=self.allow_other_model, path=path,
            tasks=self._bound,
        )  # fmt: skip
        template = Template(prompt.spec.template, flag="template")
        max_in = prompt.task.max_input_length()
        if self.max_input_tokens:
            max_in = min(max_in, self.max_input_tokens)
        try:
            created = os.path.getmtime(path)
        except OSError:
            created = time.time()
        return TaskEntry(
            name=name,
            path=path,
            prompt=prompt,
            template=template,
            max_input_tokens=max_in,
            prefix_len=len(prompt.pm.prefix_ids) + prompt.ckpt.num_tokens,
            max_input_chars=self.max_input_chars or max_in * self.chars_per_token,
            created=created,
            prefix_key=prompt.prefix_key,
        )

    # ---- lookup ----------------------------------------------------------------------------------------
    def get(self, name: str) -> TaskEntry:
        entry = self._tasks.get(name)
        if entry is None:
            raise NotFound(f"unknown task {name!r}", param="task")
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def names(self) -> list[str]:
        with self._lock:  # admin changes run in another thread
            return sorted(self._tasks)

    def refused_list(self) -> list[dict[str, str]]:
        with self._lock:
            return [{"name": n, "reason": r} for n, r in sorted(self.refused.items())]

    def entries(self) -> list[TaskEntry]:
        with self._lock:
            return [self._tasks[n] for n in sorted(self._tasks)]

    def encode(self, entry: TaskEntry, value: str | dict[str, Any], param: str) -> list[int]:
        """Token ids of one request input for `entry`: 422 when it does not fit the template or is empty,
        413 when it is longer than the task allows."""
        values = [value] if isinstance(value, str) else list(value.values())
        if sum(len(v) if isinstance(v, str) else 32 for v in values) > entry.max_input_chars:
            raise TooLarge(
                f"{param}: input longer than the {entry.max_input_chars} characters task {entry.name!r} allows",
                param=param,
            )
        try:
            text = entry.fill(value, param)
        except DataError as e:
            raise Unprocessable(
                str(e).replace("(needed by template)", f"(needed by task {entry.name!r})"), param=param
            ) from None
        if len(text) > entry.max_input_chars + len(entry.template.text):
            raise TooLarge(
                f"{param}: input longer than the {entry.max_input_chars} characters task {entry.name!r} allows",
                param=param,
            )
        check_text(text, param)
        with self.tok_lock:
            ids = entry.pm.encode_input(text)
        if not ids:
            raise Unprocessable(f"{param}: input is empty after tokenisation", param=param)
        if len(ids) > entry.max_input_tokens:
            raise TooLarge(
                f"{param}: input has {len(ids)} tokens, more than the {entry.max_input_tokens} task {entry.name!r} "
                "allows",
                param=param,
            )
        return ids

    # ---- prefixes (LRU) --------------------------------------------------------------------------------
    @torch.no_grad()
    def build_prefix(self, entry: TaskEntry, *, kv: bool = True) -> Prefix:
        """The task's prompt as a Prefix, any method (softprompt.methods); kv=False: concatenated, where the method
        allows (a deep prompt is keys/values whatever kv says)."""
        return entry.prompt.prefix(kv=kv)

    def prefix(self, entry: TaskEntry, *, kv: bool = True) -> Prefix:
        """The task's Prefix: cached in the LRU (kv=True), or rebuilt every call (kv=False: the prompt goes through
        the model with every batch, as PEFT does)."""
        if not kv:
            return self.build_prefix(entry, kv=False)
        key = entry.prefix_key
        with self._lock:
            p = self._lru.get(key)
            if p is not None:
                self._lru.move_to_end(key)
                self.stats["hits"] += 1
                return p
            self.stats["misses"] += 1
        p = self.build_prefix(entry, kv=True)
        nbytes = p.nbytes()
        with self._lock:
            if nbytes <= self.kv_cache_bytes and self._tasks.get(entry.name) is entry and key not in self._lru:
                self._lru[key] = p
                self._lru_bytes += nbytes
                while self._lru_bytes > self.kv_cache_bytes:
                    _, old = self._lru.popitem(last=False)
                    self._lru_bytes -= old.nbytes()
                    self.stats["evictions"] += 1
        return p

    def _drop_cached(self, entry: TaskEntry | None) -> None:
        """Free a removed/replaced task's cached prefix unless another task uses the same prompt."""
        if entry is None:
            return
        with self._lock:
            if any(e.prefix_key == entry.prefix_key for e in self._tasks.values()):
                return
            p = self._lru.pop(entry.prefix_key, None)
            if p is not None:
                self._lru_bytes -= p.nbytes()

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._lru),
                "bytes": self._lru_bytes,
                "limit_bytes": self.kv_cache_bytes,
                **self.stats,
            }

    # ---- admin -----------------------------------------------------------------------------------------
    def add(self, name: str, data: bytes, *, replace: bool, from_path: str | None = None) -> tuple[TaskEntry, bool]:
        """Register `data` (a prompt file's bytes) as task `name`, persisting it as DIR/name.safetensors.

        replace=False refuses an existing name (409). The bytes are validated before anything is replaced; on any
        failure DIR and the served tasks are unchanged. Returns the entry and whether it replaced one.
        """
        validate_name(name)
        with self._admin:
            old = self._tasks.get(name)
            if old is not None and not replace:
                raise Conflict(f"task {name!r} already exists (PUT replaces it)", param="name")
            entry = persist_task(self.dir, name, data, lambda final, tmp: self._make_entry(name, final, source=tmp),
                                 from_path=from_path)  # fmt: skip
            entry.created = time.time()
            with self._lock:
                self._tasks[name] = entry
                self.refused.pop(name, None)
            self._drop_cached(old)
            log.info("%s task %s (%d prompt tokens)", "replaced" if old else "added", name, entry.ckpt.num_tokens)
            return entry, old is not None

    def add_path(self, name: str, source: str, *, replace: bool, max_bytes: int) -> tuple[TaskEntry, bool]:
        """Register a prompt file that is already on the server (copied into DIR; the source is left alone)."""
        return self.add(name, read_server_prompt(source, max_bytes), replace=replace, from_path=source)

    def remove(self, name: str) -> TaskEntry:
        validate_name(name)
        with self._admin:
            entry = self.get(name)
            try:
                entry.path.unlink()
            except FileNotFoundError:
                pass
            _fsync_dir(self.dir)
            with self._lock:
                del self._tasks[name]
            self._drop_cached(entry)
            log.info("removed task %s", name)
            return entry


def _not_a_prompt(source: str) -> BadRequest:
    return BadRequest(f"path {source!r}: not a valid prompt file on the server", param="path")


def check_text(text: str, param: str) -> None:
    """422 unless `text` is valid Unicode (JSON can carry lone surrogates such as \\ud800, which no tokenizer and no
    UTF-8 encoder takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Unprocessable(f"{param}: not valid Unicode text (it holds a lone surrogate)", param=param) from None


def _longest_token(tok: Any) -> int:
    """Characters of the tokenizer's longest vocabulary entry (a token never covers more, except an unknown-word
    token): with the token limit it bounds the characters of an input that can fit, checked before tokenising."""
    try:
        vocab = tok.get_vocab()
        return max(8, max((len(t) for t in vocab), default=8))
    except Exception:  # a tokenizer without get_vocab: a generous bound
        return 64


def read_server_prompt(source: str, max_bytes: int) -> bytes:
    """The bytes of a prompt file already on the server (admin `{"path"}`): a regular file of at most `max_bytes`,
    never a FIFO or device (checked again on the open file); anything else is "not a valid prompt file"."""
    try:
        st = os.stat(source)
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
            raise _not_a_prompt(source)
        data = read_regular(source)
    except (CheckpointError, OSError, ValueError):
        raise _not_a_prompt(source) from None
    if len(data) > max_bytes:
        raise _not_a_prompt(source)
    return data


def persist_task(directory: Path, name: str, data: bytes, make: Callable[[Path, Path], T], *,
                 from_path: str | None) -> T:  # fmt: skip
    """An admin upload made durable (text and image registries): `data` written to a temp file in `directory`,
    `make(final, tmp)` builds (and so validates) the task from it, then the file is renamed to DIR/name.safetensors
    and the directory fsynced. On any failure the directory is unchanged; a bad file is a 400 naming the upload (a
    server path: only that it is not a valid prompt file, never its bytes or size)."""
    final = directory / (name + SUFFIX)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".upload.tmp", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            made = make(final, tmp)
        except (CheckpointError, DataError, ValueError, RuntimeError, KeyError, OSError) as e:
            if from_path is not None and (getattr(e, "framing", True) or isinstance(e, OSError)):
                raise _not_a_prompt(from_path) from None  # never quote bytes or sizes of a server file
            where = "path" if from_path is not None else "upload"
            msg = str(e).splitlines()[0].replace(str(tmp), where).replace(str(final), where)
            raise BadRequest(
                f"invalid prompt for task {name!r}: {msg}", param="path" if from_path else "body"
            ) from None
        os.replace(tmp, final)
        _fsync_dir(directory)
        return made
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
