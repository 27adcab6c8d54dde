"""The files of a training run: what it reads, what it writes, and the training state that `--resume` reads back.

Before any work starts (before the model loads) `RunFiles.check()` refuses a run that would destroy a user's file:
an output (prompt, metrics log, state directory, plot) that is one of the run's inputs (--train, --eval,
--init file:, --config), two outputs on one path, an existing directory where a file goes, an existing file that
is not what the run would write there (not a softprompt prompt, metrics log, state or PNG; --overwrite replaces
those, never an input), and a `--resume` directory without a training state. An overwritten prompt keeps its
file's permission mode.

The training state is ONE atomically written safetensors file: the trainable tensors, the optimiser's tensors and
the torch RNG state, with every scalar (step, optimiser scalars, schedule, Python RNG, history, the run's identity)
as JSON in its header; state.json beside it is a readable copy that is never read back.
"""

from __future__ import annotations

import ast
import json
import os
import random
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from softprompt.checkpoint import atomic_write
from softprompt.config import ConfigError, RunConfig, to_dict


class StateError(ValueError):
    """A training state that cannot be resumed (truncated, corrupt, not ours); the message names the file."""


# ---- what a run reads and writes ----------------------------------------------------------------------------------
@dataclass
class RunFiles:
    """Every path a run writes, and the files it reads (which it must never write)."""

    where: str  # what messages name as the run's output: --out (train) or the output directory (train-multi)
    prompts: list[tuple[str, Path]]  # (role in messages, path): the prompt file(s) the run keeps
    log: Path  # JSONL metrics, one line per optimiser step
    state: Path  # the training-state directory (--resume, else derived from --out)
    resume: bool  # --resume given: the state must be there
    inputs: list[tuple[str, str]] = field(default_factory=list)  # (flag, path) of every file the run reads
    plot: Path | None = None  # the --plot PNG
    tensorboard: Path | None = None  # TensorBoard's event directory (used when tensorboard is installed)
    overwrite: bool = False  # --overwrite: replace a foreign file at an output path (an input never)

    def outputs(self) -> list[tuple[str, Path, str]]:
        """(role, path, kind) of every output; kind says what an existing file there must be."""
        log_role = f"the metrics log (from {self.where})"
        out = [(role, p, "prompt") for role, p in self.prompts] + [(log_role, self.log, "log")]
        state_role = "the training state (--resume)" if self.resume else f"the training state (from {self.where})"
        out.append((state_role, self.state, "state"))
        if self.plot is not None:
            out.append((f"the --plot image (from {self.where})", self.plot, "png"))
        if self.tensorboard is not None:
            out.append((f"the TensorBoard directory (from {self.where})", self.tensorboard, "dir"))
        return out

    def check(self) -> None:
        """Raise ConfigError (one line naming the path) for a run that would destroy a file; touches nothing."""
        outs = self.outputs()
        for role, path, kind in outs:
            for flag, src in self.inputs:
                if _same_file(path, Path(src)):
                    raise ConfigError(
                        f"{role} {path} is this run's {flag} file: training would overwrite its own input; "
                        "choose another --out"
                    )
            _check_parent(role, path)
            if not (kind == "state" and self.resume):  # a state to resume is read below
                _check_target(role, path, kind, self.overwrite)
        for i, (role_a, a, _) in enumerate(outs):
            for role_b, b, _ in outs[i + 1 :]:
                if _same_file(a, b):
                    raise ConfigError(f"{role_a} and {role_b} are one path ({a}); choose another --out")
        if self.resume:
            if not self.state.exists():
                raise ConfigError(f"--resume {self.state}: no such directory (leave --resume out to start a new run)")
            if not (self.state / "state.safetensors").is_file():
                raise ConfigError(f"--resume {self.state}: no training state there (no state.safetensors)")
            read_state_header(self.state)  # a truncated or corrupt state: StateError naming the file


def input_paths(flag: str, *, train: str | None, eval: str | None, init: str | None) -> list[tuple[str, str]]:
    """(flag, path) of the data files and an --init file:PATH prompt (hf: datasets are no local files)."""
    from softprompt.prompt import InitError, InitSpec

    out = [(f"{flag}train", p) for p in (train,) if p] + [(f"{flag}eval", p) for p in (eval,) if p]
    try:
        spec = InitSpec.parse(init) if init else None
    except InitError:  # reported, with its flag, when the prompt is initialised
        spec = None
    if spec is not None and spec.kind == "file":
        out.append((f"{flag}init", spec.arg))  # file:PATH
    return [(f, p) for f, p in out if not p.startswith("hf:")]


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):  # also ./x and /abs/x, and a symlink to the other
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:  # one of them does not exist
        return False


def _check_parent(role: str, path: Path) -> None:
    """The nearest existing ancestor must be a directory (else the first write fails after the model loaded)."""
    for parent in Path(os.path.abspath(path)).parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{role} {path}: {parent} is a file, not a directory")
            return


def _check_target(role: str, path: Path, kind: str, overwrite: bool) -> None:
    if not path.exists():
        return
    if kind in ("state", "dir"):
        if not path.is_dir():
            raise ConfigError(f"{role} {path} exists and is a file, not a directory; choose another --out")
        if kind == "state" and not overwrite:
            for name in ("state.safetensors", "state.json"):
                f = path / name
                if f.exists() and not _is_state(f):
                    raise ConfigError(
                        f"{role}: {f} exists and is not a softprompt training state; pass --overwrite to "
                        "replace it, or choose another --out"
                    )
        return
    if path.is_dir():
        raise ConfigError(f"{role} {path} is a directory; a file is written there (e.g. {path / 'prompt.safetensors'})")
    if overwrite or path.stat().st_size == 0:  # an empty file holds nothing to lose
        return
    ours = {"prompt": (_is_prompt, "a softprompt prompt"), "log": (_is_log, "a softprompt metrics log"),
            "png": (_is_png, "a PNG image")}[kind]  # fmt: skip
    if not ours[0](path):
        raise ConfigError(
            f"{role} {path} exists and is not {ours[1]}; pass --overwrite to replace it, or choose another --out"
        )


def _is_prompt(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == "softprompt"
    except Exception:  # not safetensors at all: safetensors raises its own error types
        return False


def _is_state(path: Path) -> bool:
    try:
        if path.suffix == ".json":
            return "step" in json.loads(path.read_text(encoding="utf-8"))
        with safe_open(str(path), framework="pt") as f:
            return "state" in (f.metadata() or {})
    except Exception:
        return False


def _is_log(path: Path) -> bool:
    """A metrics log: its first line is a JSON object with "step" and "loss" (what fit() writes)."""
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.loads(f.readline())
        return isinstance(rec, dict) and "step" in rec and "loss" in rec
    except (OSError, ValueError):
        return False


def _is_png(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


@contextmanager
def keeping_mode(path: str | Path) -> Iterator[None]:
    """Rewrite `path` in the block and give it back the permission mode it had (atomic_write's temporary file is
    created 0600, and the rename carries that mode over the old file)."""
    try:
        mode: int | None = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = None
    yield
    if mode is not None:
        os.chmod(path, mode)


def remove_stale_temps(files: RunFiles) -> None:
    """Temp files of atomic writes cut short by a kill (atomic_write's names: .NAME.XXXX.tmp)."""
    outs = [p for _, p in files.prompts] + [files.log] + ([files.plot] if files.plot is not None else [])
    for folder, prefix in [(files.state, ".state.")] + [(p.parent, f".{p.name}.") for p in outs]:
        for f in folder.glob(".*.tmp"):
            if f.name.startswith(prefix):
                f.unlink(missing_ok=True)


# ---- the training state -------------------------------------------------------------------------------------------
# What fixes a run's trajectory: resuming with any of these changed would splice two different runs together.
RUN_FIELDS = {
    "data": ("train", "template", "labels", "head", "task"),
    "prompt": ("num_tokens", "init", "init_scale", "position", "method", "deep_reparam", "reparam", "reparam_hidden",
               "routes", "balance_weight", "rank", "layer", "context_tokens", "class_specific"),
    "train": (
        "optimizer", "lr", "head_lr", "weight_decay", "schedule", "warmup_steps", "batch_size", "grad_accum",
        "group_by_length", "max_steps", "epochs", "max_grad_norm", "seed", "precision",
    ),
}  # fmt: skip


def run_identity(cfg: RunConfig, fingerprint: str, sections: tuple[str, ...] = ("data", "prompt", "train")) -> dict:
    """The flags (and the base model's fingerprint) a resumed run must share with the run that wrote the state."""
    d = to_dict(cfg)
    if d["data"].get("train") and Path(d["data"]["train"]).exists():  # ./a.tsv and /abs/a.tsv are one file
        d["data"]["train"] = str(Path(d["data"]["train"]).resolve())
    out: dict[str, Any] = {"fingerprint": fingerprint}
    for sect in sections:
        out.update({f"--{sect}.{n}": d[sect][n] for n in RUN_FIELDS[sect] if n in d[sect]})
    return json.loads(json.dumps(out, default=str))  # as it reads back from the state file


def check_resumable(saved: dict[str, Any] | None, now: dict[str, Any], state_dir: Path) -> None:
    """Raise ConfigError naming the first flag that differs from the run that wrote the state."""
    if saved is None:  # a state written before run identities were stored
        return
    for k, v in now.items():
        if k in saved and saved[k] != v:
            what = "the base model (fingerprint)" if k == "fingerprint" else k
            raise ConfigError(
                f"--resume {state_dir}: {what} was {saved[k]!r} in the interrupted run, now {v!r}; "
                "resume with the same flags, or delete the state directory to start over"
            )


def save_state(path: Path, params: list[torch.nn.Parameter], opt, sched, step: int, extra: dict[str, Any]) -> None:
    """Training state in ONE atomically written safetensors file: tensors, with the scalars as JSON in its header
    (a kill between two files could otherwise pair step k's scalars with step k+1's tensors). state.json, a
    readable copy of the scalars, is written after it and is not read back."""
    tensors: dict[str, torch.Tensor] = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
    opt_sd = opt.state_dict()
    scalars: dict[str, Any] = {}
    for pid, st in opt_sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    tensors["rng.torch"] = torch.get_rng_state()
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "step": step,
        "param_groups": opt_sd["param_groups"],
        "opt_scalars": scalars,
        "sched": sched.state_dict(),
        "python_rng": repr(random.getstate()),
        **extra,
    }
    meta_json = json.dumps(meta, default=str)
    atomic_write(path / "state.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"state": meta_json}))
    atomic_write(path / "state.json", lambda tmp: Path(tmp).write_text(meta_json))


def _unreadable(f: Path, e: BaseException) -> StateError:
    why = str(e).splitlines()[0] if str(e) else type(e).__name__
    return StateError(
        f"--resume: {f} is not a readable training state (truncated or corrupt: {why}); delete {f.parent} to start over"
    )


def read_state_header(path: Path) -> dict[str, Any]:
    """The scalars of the state in directory `path` (StateError naming the file when it is unreadable)."""
    f = path / "state.safetensors"
    try:
        with safe_open(str(f), framework="pt") as h:
            header = (h.metadata() or {}).get("state")
        meta = json.loads(header if header is not None else (path / "state.json").read_text())
        if not isinstance(meta, dict) or "step" not in meta:
            raise ValueError("no step in its header")
    except Exception as e:  # safetensors raises its own error types
        raise _unreadable(f, e) from None
    return meta


def load_state(
    path: Path, params: list[torch.nn.Parameter], opt, sched, run: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Restore the training state; with `run` (the identity of this run), first refuse a state that another
    configuration wrote, before anything is touched. A truncated or corrupt state is a StateError naming the file."""
    f = path / "state.safetensors"
    meta = read_state_header(path)
    if run is not None:
        check_resumable(meta.get("run"), run, path)
    try:
        tensors = load_file(str(f))
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(tensors[f"param.{i}"])
        state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        for k, v in meta["opt_scalars"].items():
            pid, name = k.split(".", 1)
            state.setdefault(int(pid), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        sched.load_state_dict(meta["sched"])
        torch.set_rng_state(tensors["rng.torch"])
        random.setstate(ast.literal_eval(meta["python_rng"]))
    except Exception as e:
        raise _unreadable(f, e) from None
    return meta
