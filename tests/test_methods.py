"""softprompt.methods: the prompt-method protocol. Every registered method is complete; a new method plugs into
training, resume state, evaluation, prediction and serving with its own file and one registry line; methods that
a format cannot hold are refused by export."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from softprompt import methods
from softprompt.api import Predictor
from softprompt.checkpoint import load_prompt
from softprompt.cli import main
from softprompt.config import ConfigError, RunConfig
from softprompt.models import Backbone
from softprompt.prompted import PromptedModel
from softprompt.train import train

TEXTS = ["good movie", "bad film", "a fine day", "dull"]


def write_data(path: Path) -> Path:
    rows = [{"text": t, "label": "a" if i % 2 == 0 else "b"} for i, t in enumerate(TEXTS * 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_registered_method_is_complete() -> None:
    assert methods.names() == ("prompt", "deep", "routed", "conditioned", "late", "vpt", "vpt-deep", "coop")
    for name in [n for n in methods.names() if n != "coop"]:  # coop: tests/test_vision_coop.py
        m = methods.get(name)
        assert m.name == name and isinstance(m.needs_kv, bool) and isinstance(m.per_row, bool)
        for attr in ("create", "load_prefix", "vectors") + (("rows",) if m.per_row else ()):
            assert callable(getattr(m, attr))
    assert methods.get("prompt").exports == {"peft", "prompt-table"} and methods.get("deep").exports == frozenset()
    assert methods.get("late").exports == frozenset()
    with pytest.raises(methods.MethodError, match="--method must be one of prompt, deep, .*late.*coop, got 'nope'"):
        methods.get("nope")
    cfg = RunConfig()
    cfg.data.train, cfg.prompt.method = "x.jsonl", "nope"
    with pytest.raises(ConfigError, match="--method must be one of prompt, deep"):
        cfg.validate()


def test_a_new_method_is_its_file_and_one_registry_line(
    tmp_path: Path, tiny_dir: Callable[[str], Path], tiny_backbone: Callable[[str], Backbone],
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setitem(methods.REGISTRY, "gain", "toy_method")  # tests/toy_method.py: the only other change
    data = write_data(tmp_path / "d.jsonl")
    cfg = RunConfig()
    cfg.model.model, cfg.model.device = str(tiny_dir("llama")), "cpu"
    cfg.data.train, cfg.data.eval, cfg.data.labels = str(data), str(data), "a=yes,b=no"
    cfg.prompt.method, cfg.prompt.num_tokens, cfg.prompt.init = "gain", 3, "vocab"
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_steps = 3, 4, 0.05, 0
    cfg.train.out, cfg.train.progress, cfg.train.eval_every, cfg.train.save_every = (
        str(tmp_path / "g.safetensors"), False, 3, 1,
    )  # fmt: skip
    train(cfg, backbone=tiny_backbone("llama"), log=lambda *a: None)
    ck = load_prompt(tmp_path / "g.safetensors")
    assert ck.meta["method"] == "gain" and float(ck.extra["gain.value"]) != 1.0  # the gain trained and was saved
    state = tmp_path / "g.safetensors.state" / "state.safetensors"
    assert state.is_file()  # the resume state holds both of its tensors (trainable() order)
    # evaluation / prediction load it through the method: scores = a hand-built prefix [lead][gain * prompt]
    pred = Predictor.load(str(tmp_path / "g.safetensors"), backbone=tiny_backbone("llama"))
    enc, _ = pred.task.encode_texts(TEXTS)
    got = pred.probs(enc)
    pm = PromptedModel(tiny_backbone("llama"))
    with torch.no_grad():
        prefix = pm.build_prefix([ck.prompt * ck.extra["gain.value"]])
        batch = pm.collate([e.input_ids for e in enc])
        want = pm.label_scores(prefix, None, batch, pred.task.label_ids).softmax(-1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert main(["export", "--to", "peft", str(tmp_path / "g.safetensors"), str(tmp_path / "peft")]) == 2
    assert "a gain prompt cannot be exported to peft (formats for gain: none)" in capsys.readouterr().err


def test_deep_prompts_are_refused_by_formats_that_cannot_hold_them(
    tmp_path: Path, tiny_dir: Callable[[str], Path], tiny_backbone: Callable[[str], Backbone],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    data = write_data(tmp_path / "d.jsonl")
    cfg = RunConfig()
    cfg.model.model, cfg.model.device = str(tiny_dir("llama")), "cpu"
    cfg.data.train, cfg.data.labels = str(data), "a=yes,b=no"
    cfg.prompt.method, cfg.prompt.num_tokens = "deep", 2
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.progress = 1, 4, False
    cfg.train.out = str(tmp_path / "deep.safetensors")
    train(cfg, backbone=tiny_backbone("llama"), log=lambda *a: None)
    for fmt in ("peft", "prompt-table"):
        capsys.readouterr()
        assert main(["export", "--to", fmt, str(tmp_path / "deep.safetensors"), str(tmp_path / fmt)]) == 2
        err = capsys.readouterr().err
        assert f"deep.safetensors: a deep prompt cannot be exported to {fmt} (formats for deep: none)" in err
        assert not (tmp_path / fmt).exists()
