"""softprompt.checkpoint: round trip, exact file layout, atomic writes, and refusal of anything that is not ours.

Files are inspected with the standard library (struct + json) rather than through the module under test.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from softprompt import checkpoint
from softprompt.checkpoint import CheckpointError, check_compatible, file_size_formula, load_prompt, save_prompt

P, D = 20, 576  # SmolLM2-135M-sized prompt


def realistic_meta() -> dict[str, Any]:
    """What `softprompt train` writes: model identity, task spec, the whole train config and metrics."""
    train_config = {
        "model": {
            "model": "smollm2-135m",
            "dtype": "float32",
            "device": "auto",
            "dropout": False,
            "attn_implementation": "sdpa",
        },
        "prompt": {"num_tokens": P, "init": "labels", "init_scale": 0.5, "position": "auto"},
        "data": {
            "train": "data/sst2/train.jsonl",
            "dev": "data/sst2/dev.jsonl",
            "test": None,
            "task": "classify",
            "template": "Review: {text}\nSentiment:",
            "labels": "0=negative,1=positive",
            "label_field": "label",
            "target_field": "target",
            "head": "lm",
            "max_length": 256,
            "max_target_length": 64,
        },
        "train": {
            "lr": 0.3,
            "optimizer": "adafactor",
            "weight_decay": 1e-5,
            "warmup_steps": 100,
            "max_steps": 3000,
            "batch_size": 32,
            "grad_accum": 1,
            "eval_every": 200,
            "patience": 5,
            "seed": 0,
            "clip_grad": 1.0,
            "out": "runs/sst2-smollm2/prompt.safetensors",
            "resume": True,
            "log_every": 10,
            "tensorboard": False,
            "max_grad_norm": 1.0,
            "precision": "fp32",
        },
    }
    return {
        "base_model": "smollm2-135m",
        "architecture": "LlamaForCausalLM",
        "family": "causal",
        "fingerprint": "sha256:0123456789abcdef",
        "init": "labels",
        "task": "classify",
        "template": "Review: {text}\nSentiment:",
        "labels": {"labels": ["0", "1"], "words": ["negative", "positive"]},
        "label_field": "label",
        "target_field": "target",
        "head": "lm",
        "position": "auto",
        "max_length": "256",
        "fields": ["text"],
        "train_config": train_config,
        "metrics": {"accuracy": 0.9128, "macro_f1": 0.9127, "loss": 0.2314, "step": 2400},
    }


def header_of(path: Path) -> tuple[int, dict[str, Any]]:
    """(header length, header JSON) read with the standard library."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    path = tmp_path / "prompt.safetensors"
    prompt = rand(P, D)
    save_prompt(path, prompt, realistic_meta())
    return path, prompt


# ----- round trip and layout ---------------------------------------------------------------------------------
def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "p.safetensors"  # parent directories are created
    prompt, w, b = rand(P, D), rand(2, D, seed=1), rand(2, seed=2)
    meta = realistic_meta()
    save_prompt(path, prompt, meta, {"head.weight": w, "head.bias": b})
    ck = load_prompt(path)
    assert ck.path == str(path) and (ck.num_tokens, ck.embed_dim) == (P, D)
    assert ck.prompt.dtype == torch.float32 and torch.equal(ck.prompt, prompt)
    assert set(ck.extra) == {"head.weight", "head.bias"}
    assert torch.equal(ck.extra["head.weight"], w) and torch.equal(ck.extra["head.bias"], b)
    for k, v in meta.items():
        assert ck.meta[k] == v, k
    assert ck.meta["format"] == "softprompt" and ck.meta["format_version"] == "1" and ck.meta["method"] == "prompt"
    assert ck.meta["num_tokens"] == P and ck.meta["embed_dim"] == D
    assert set(ck.meta) == set(meta) | {"format", "format_version", "method", "num_tokens", "embed_dim"}
    _, header = header_of(path)  # the header holds strings only (a safetensors requirement)
    assert all(isinstance(v, str) for v in header["__metadata__"].values())
    assert json.loads(header["__metadata__"]["train_config"]) == meta["train_config"]


def test_round_trip_converts_to_float32(tmp_path: Path) -> None:
    path = tmp_path / "bf16.safetensors"
    prompt = rand(3, 8).bfloat16().requires_grad_(True)
    save_prompt(path, prompt, {})
    ck = load_prompt(path)
    assert ck.prompt.dtype == torch.float32 and torch.equal(ck.prompt, prompt.detach().float())


def test_file_size_and_header_overhead(saved: tuple[Path, torch.Tensor]) -> None:
    path, _ = saved
    n, header = header_of(path)
    assert path.stat().st_size == 8 + n + 4 * P * D == 8 + n + file_size_formula(P, D)
    assert n <= 8 * 1024, f"header is {n} bytes"
    assert header["prompt"]["dtype"] == "F32" and header["prompt"]["shape"] == [P, D]
    assert header["prompt"]["data_offsets"] == [0, 4 * P * D]


def test_file_size_with_head(tmp_path: Path) -> None:
    path = tmp_path / "head.safetensors"
    save_prompt(path, rand(P, D), realistic_meta(), {"head.weight": rand(3, D), "head.bias": rand(3)})
    n, _ = header_of(path)
    assert path.stat().st_size == 8 + n + file_size_formula(P, D, extra_elems=3 * D + 3)


# ----- atomic write ------------------------------------------------------------------------------------------
def test_atomic_write_leaves_no_temp_file(saved: tuple[Path, torch.Tensor]) -> None:
    path, _ = saved
    save_prompt(path, rand(P, D, seed=5), realistic_meta())  # overwrite
    assert os.listdir(path.parent) == [path.name]
    assert torch.equal(load_prompt(path).prompt, rand(P, D, seed=5))


def test_failed_write_keeps_previous_file(saved: tuple[Path, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> None:
    path, prompt = saved
    before = path.read_bytes()
    tmp_names: list[str] = []

    def half_written(tensors, filename, metadata=None):
        tmp_names.append(filename)
        Path(filename).write_bytes(before[: len(before) // 2])  # a partial file, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_prompt(path, rand(P, D, seed=6), realistic_meta())
    assert tmp_names and Path(tmp_names[0]).parent == path.parent and tmp_names[0] != str(path)
    assert os.listdir(path.parent) == [path.name]  # the temp file is gone
    assert path.read_bytes() == before
    assert torch.equal(load_prompt(path).prompt, prompt)


def test_interrupted_write_keeps_previous_file(
    saved: tuple[Path, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = saved
    before = path.read_bytes()

    def interrupted(tensors, filename, metadata=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_prompt(path, rand(P, D, seed=6), {})
    assert os.listdir(path.parent) == [path.name] and path.read_bytes() == before


# ----- corrupt and foreign files ------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [-1, -4 * D, 100, 8, 3, 0])
def test_truncated_file(saved: tuple[Path, torch.Tensor], keep: int) -> None:
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[:keep])  # cut bytes off the end (or keep only the first few)
    with pytest.raises(CheckpointError, match=str(path)):
        load_prompt(path)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.safetensors"
    rng = random.Random(0)
    for size in (1, 7, 8, 100, 10_000):
        path.write_bytes(rng.randbytes(size))
        with pytest.raises(CheckpointError, match=str(path)):
            load_prompt(path)
    path.write_bytes(struct.pack("<Q", 64) + rng.randbytes(200))  # plausible header length, garbage header
    with pytest.raises(CheckpointError, match=str(path)):
        load_prompt(path)


@pytest.mark.parametrize(
    "header",
    [
        b"[1, 2, 3]",
        b'"text"',
        b'{"prompt": 5}',
        b'{"prompt": {}}',
        b'{"prompt": {"data_offsets": "x"}}',
        b'{"prompt": {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4]}}',
    ],  # the last one: no data follows
)
def test_malformed_header(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match=str(path)):
        load_prompt(path)


class SideEffect:
    """Unpickling this creates `marker` (pickle calls open(marker, "w"))."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_is_never_unpickled(tmp_path: Path) -> None:
    control = tmp_path / "control-ran"
    pickle.loads(pickle.dumps(SideEffect(control)))  # the payload does have a side effect when unpickled
    assert control.exists()

    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"prompt": SideEffect(marker)}))
    with pytest.raises(CheckpointError, match=str(path)):
        load_prompt(path)
    torch.save({"prompt": SideEffect(marker)}, path)  # a torch .pt zip (pickle inside) under a .safetensors name
    with pytest.raises(CheckpointError, match=str(path)):
        load_prompt(path)
    assert not marker.exists()


def test_safetensors_file_without_our_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"prompt": rand(4, 8)}, str(path))
    with pytest.raises(CheckpointError, match=f"{path}.*not a softprompt prompt file"):
        load_prompt(path)
    save_file({"prompt": rand(4, 8)}, str(path), metadata={"format": "softprompt", "format_version": "99"})
    with pytest.raises(CheckpointError, match=f"{path}.*format_version"):
        load_prompt(path)
    save_file({"other": rand(4, 8)}, str(path), metadata={"format": "softprompt", "format_version": "1"})
    with pytest.raises(CheckpointError, match=f"{path}.*no 'prompt'"):
        load_prompt(path)
    save_file({"prompt": rand(8)}, str(path), metadata={"format": "softprompt", "format_version": "1"})
    with pytest.raises(CheckpointError, match=f"{path}.*2-D"):
        load_prompt(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope.safetensors.*not found"):
        load_prompt(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match=f"{tmp_path}.*directory"):
        load_prompt(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_prompt(tmp_path: Path, bad: float) -> None:
    path = tmp_path / "nan.safetensors"
    prompt = rand(4, 8)
    prompt[2, 3] = bad
    save_prompt(path, prompt, {})
    with pytest.raises(CheckpointError, match=f"{path}.*NaN or inf"):
        load_prompt(path)


# ----- compatibility -----------------------------------------------------------------------------------------
def test_check_compatible(saved: tuple[Path, torch.Tensor]) -> None:
    path, _ = saved
    ck = load_prompt(path)
    fp = realistic_meta()["fingerprint"]
    check_compatible(ck, D, fp)  # the model it was trained on
    for allow in (False, True):
        with pytest.raises(CheckpointError, match=f"{path}.*dim {D}.*{D + 1}"):
            check_compatible(ck, D + 1, fp, allow_other_model=allow)  # another dim never fits
    with pytest.raises(CheckpointError, match=f"{path}.*another model.*--allow-other-model"):
        check_compatible(ck, D, "sha256:ffffffffffffffff")
    check_compatible(ck, D, "sha256:ffffffffffffffff", allow_other_model=True)


def test_check_compatible_without_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "nofp.safetensors"
    save_prompt(path, rand(4, 8), {"base_model": "x"})
    ck = load_prompt(path)
    check_compatible(ck, 8, "sha256:ffffffffffffffff")  # nothing to compare against: accepted
    with pytest.raises(CheckpointError, match="dim"):
        check_compatible(ck, 9, "sha256:ffffffffffffffff", allow_other_model=True)


# ----- every tensor and metadata field validated by the one loader ----------------------------------------------
def _write_raw(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """A file with our format marker but tensors/metadata as given (save_prompt would normalise them)."""
    save_file(tensors, str(path), metadata=checkpoint._encode_meta(meta))
    return path


LABELS_META = {"task": "classify", "labels": {"labels": ["a", "b"], "words": ["x", "y"]}}
INF_HEAD = rand(2, 8)
INF_HEAD[1, 1] = float("inf")
BAD_FILES: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any], str]] = {
    "inf head": ({"prompt": rand(3, 8), "head.linear.weight": INF_HEAD, "head.linear.bias": torch.zeros(2)},
                 {**LABELS_META, "head": "linear"}, "head.linear.weight.*NaN or inf"),
    "nan bias": ({"prompt": rand(3, 8), "head.linear.weight": rand(2, 8), "head.linear.bias": torch.tensor([0.0, float("nan")])},
                 {**LABELS_META, "head": "linear"}, "head.linear.bias.*NaN or inf"),
    "int64 prompt": ({"prompt": torch.ones(3, 8, dtype=torch.int64)}, LABELS_META, "dtype int64"),
    "zero rows": ({"prompt": torch.zeros(0, 8)}, LABELS_META, "0 rows"),
    "3-D prompt": ({"prompt": rand(2, 3, 8)}, LABELS_META, "2-D"),
    "head 1-D": ({"prompt": rand(3, 8), "head.linear.weight": rand(8)}, LABELS_META, r"must be \(labels, hidden"),
    "head rows": ({"prompt": rand(3, 8), "head.linear.weight": rand(3, 8)}, LABELS_META, r"shape \(3, 8\), expected \(2,"),
    "bias shape": ({"prompt": rand(3, 8), "head.linear.weight": rand(2, 8), "head.linear.bias": rand(3)},
                   LABELS_META, "bias.*must be"),
    "position": ({"prompt": rand(3, 8)}, {**LABELS_META, "position": "middle"}, "unknown position 'middle'"),
    "method": ({"prompt": rand(3, 8)}, {**LABELS_META, "method": "lora"}, "unknown method"),
    "family": ({"prompt": rand(3, 8)}, {**LABELS_META, "family": "rnn"}, "unknown family"),
    "task": ({"prompt": rand(3, 8)}, {**LABELS_META, "task": "translate"}, "unknown task"),
    "head name": ({"prompt": rand(3, 8)}, {**LABELS_META, "head": "mlp"}, "unknown head"),
    "embed_dim": ({"prompt": rand(3, 8)}, {**LABELS_META, "embed_dim": 16}, "embed_dim 16 does not match"),
    "num_tokens": ({"prompt": rand(3, 8)}, {**LABELS_META, "num_tokens": 5}, "num_tokens 5 does not match"),
    "labels": ({"prompt": rand(3, 8)}, {"task": "classify", "labels": {"labels": ["a"], "words": []}}, "labels"),
    "max_length": ({"prompt": rand(3, 8)}, {**LABELS_META, "max_length": "-3"}, "max_length"),
    "deep method": ({"prompt": rand(3, 8)}, {**LABELS_META, "method": "deep"}, "method 'deep' does not match"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_invalid_tensors_and_metadata_are_refused(tmp_path: Path, case: str) -> None:
    tensors, meta, pattern = BAD_FILES[case]
    path = _write_raw(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(CheckpointError, match=f"{path}.*{pattern}"):
        load_prompt(path)


def test_valid_head_and_deep_prompts_still_load(tmp_path: Path) -> None:
    ok = _write_raw(tmp_path / "head.safetensors",
                    {"prompt": rand(3, 8), "head.linear.weight": rand(2, 8), "head.linear.bias": rand(2)},
                    {**LABELS_META, "head": "linear", "embed_dim": 8, "num_tokens": 3, "method": "prompt"})  # fmt: skip
    assert load_prompt(ok).extra["head.linear.weight"].shape == (2, 8)
    deep = _write_raw(tmp_path / "deep.safetensors",
                      {"prompt": torch.zeros(0, 8), "deep.keys": rand(2, 2, 4, 4), "deep.values": rand(2, 2, 4, 4)},
                      {**LABELS_META, "method": "deep", "num_tokens": 4})  # fmt: skip
    assert load_prompt(deep).num_tokens == 4


def test_non_regular_files_are_never_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    with pytest.raises(CheckpointError, match="not a regular file") as e:
        load_prompt(fifo)
    assert e.value.framing
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    with pytest.raises(CheckpointError, match="symbolic links"):
        load_prompt(loop)
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_prompt("/dev/null")
    link = tmp_path / "link.safetensors"  # a symlink to a good file is fine
    save_prompt(tmp_path / "real.safetensors", rand(2, 8), {})
    link.symlink_to(tmp_path / "real.safetensors")
    assert load_prompt(link).num_tokens == 2


def test_atomic_writes_give_the_mode_an_ordinary_write_would(tmp_path: Path) -> None:
    """A new file: 0666 less the umask (not mkstemp's 0600); an overwritten file keeps its own mode."""
    import os
    import stat

    from softprompt.checkpoint import save_prompt

    old = os.umask(0o027)
    try:
        save_prompt(tmp_path / "new.safetensors", torch.zeros(2, 4), {})
        assert stat.S_IMODE(os.stat(tmp_path / "new.safetensors").st_mode) == 0o640
        kept = tmp_path / "kept.safetensors"
        save_prompt(kept, torch.zeros(2, 4), {})
        os.chmod(kept, 0o604)
        save_prompt(kept, torch.ones(2, 4), {})
        assert stat.S_IMODE(os.stat(kept).st_mode) == 0o604
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    finally:
        os.umask(old)
