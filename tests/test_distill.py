"""softprompt.distill: a soft prompt learns the class distribution of the same model with a hard prompt in context,
through the one trainer; the loss is the KL of the model's own forwards."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from softprompt.checkpoint import load_prompt
from softprompt.config import RunConfig
from softprompt.data import load_samples
from softprompt.distill import DistillObjective
from softprompt.icl import build_context, choose_demos
from softprompt.models import Backbone
from softprompt.task import BoundTask
from softprompt.train import build_objective, run_files
from softprompt.trainer import fit

WORDS = ["good", "great", "bad", "awful", "fine", "nice", "poor", "dull"]


def write(path: Path, n: int, offset: int = 0) -> Path:
    rows = [{"text": f"{WORDS[(i * 3) % 8]} film {i + offset}", "label": "a" if i % 3 else "b"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def setup(tmp_path: Path, bb: Backbone, model_dir: Path) -> tuple[RunConfig, DistillObjective]:
    cfg = RunConfig()
    cfg.model.model, cfg.model.device = str(model_dir), "cpu"
    cfg.data.train, cfg.data.eval = str(write(tmp_path / "t.jsonl", 16)), str(write(tmp_path / "e.jsonl", 6, 50))
    cfg.data.template, cfg.data.labels = "Review: {text}\nAnswer:", "a=yes,b=no"
    cfg.prompt.num_tokens, cfg.prompt.init = 3, "vocab"
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_steps = 6, 8, 0.05, 0
    cfg.train.eval_every, cfg.train.progress, cfg.train.out = 3, False, str(tmp_path / "s.safetensors")
    base = build_objective(cfg, bb, log=lambda *a: None)
    demos_file = write(tmp_path / "demos.jsonl", 8, 100)
    pool = load_samples(str(demos_file), base.spec.data_config(), base.spec.verbalizer)
    ctx = build_context(BoundTask(base.spec, base.pm, num_tokens=0), choose_demos(pool, 4, balanced=True))
    return cfg, DistillObjective(base, ctx)


def test_loss_is_the_kl_of_the_models_own_forwards(
    tmp_path: Path, sharp_backbone: Callable[[str], Backbone], tiny_models_root: Path
) -> None:
    bb = sharp_backbone("llama")
    _, obj = setup(tmp_path, bb, tiny_models_root / "sharp-llama")
    rows = obj.base.train_set[:4]
    got = obj.loss(rows)
    pm, words = obj.base.pm, [v[0] for v in obj.base.task.label_ids]
    prompt = obj.base.prompt.embedding.detach()
    want = []
    with torch.no_grad():
        for e in rows:  # teacher: [BOS][context tokens][input] as ids; student: hand-built embeddings
            ids = torch.tensor([pm.prefix_ids + obj.teacher.token_ids + e.input_ids])
            t = bb.model(input_ids=ids).logits[0, -1].float().log_softmax(-1)[words].log_softmax(-1)
            emb = bb.model.get_input_embeddings()
            x = torch.cat([emb(torch.tensor(pm.prefix_ids)), prompt, emb(torch.tensor(e.input_ids))])[None]
            s = bb.model(inputs_embeds=x).logits[0, -1].float().log_softmax(-1)[words].log_softmax(-1)
            want.append((t.exp() * (t - s)).sum())
    torch.testing.assert_close(got.detach(), torch.stack(want).mean(), rtol=1e-4, atol=1e-6)


def test_distillation_trains_through_the_one_trainer_and_records_its_teacher(
    tmp_path: Path, sharp_backbone: Callable[[str], Backbone], tiny_models_root: Path
) -> None:
    bb = sharp_backbone("llama")
    cfg, obj = setup(tmp_path, bb, tiny_models_root / "sharp-llama")
    rows = obj.base.train_set[:8]
    before = float(obj.loss(rows))
    res = fit(obj, cfg, run_files(cfg), log=lambda *a: None)
    assert res.steps == 6 and float(obj.loss(rows)) < before  # the student moved towards the teacher
    ck = load_prompt(tmp_path / "s.safetensors")  # an ordinary prompt file
    d = ck.meta["distill"]
    assert d["k"] == 4 and d["context_tokens"] == len(obj.teacher.token_ids) and d["student_tokens"] == 3
    assert d["context_sha256"] == obj.teacher.sha256 and d["compression"] == round(d["context_tokens"] / 3, 2)
    assert 0.0 <= d["agreement"] <= 1.0 and "eval_agreement" in res.history[2]
