"""bench.compile's rows that train weights or another model: LoRA and full fine-tuning as an Objective of the one
trainer (softprompt.trainer.fit), the model's own weights trained with no prompt, on the prompt-tuning objective's
rows, batches and verbalizer loss, scored by the same forward path (a PromptedModel over the trained copy); and the
encoder rows (minilm-l6: no LM head, so no zero-shot, ICL or distillation; a linear head on the mean-pooled output).
`study` is bench.compile's Study (its arguments, samples and models)."""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from bench._common import note
from bench.compile_tasks import TASKS

ENCODER = "minilm-l6"  # an encoder with no LM head: prompt tuning with a linear head, LoRA and full fine-tuning


def lora_model(model: torch.nn.Module) -> tuple[Any, torch.nn.Module]:
    """A copy of `model` with PEFT LoRA (rank 8, alpha 16, no dropout) on the attention projections: the PeftModel
    and the LlamaForCausalLM inside it, its q/k/v/o projections replaced by lora.Linear layers."""
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(0)  # LoRA's A init
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=0.0,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])  # fmt: skip
    peft = get_peft_model(copy.deepcopy(model), cfg)
    return peft, peft.base_model.model


class WeightsObjective:
    """Train the model's own weights (LoRA's or all of them) with no prompt: the prompt-tuning objective's rows,
    batches and verbalizer loss, the same forward path (a PromptedModel over the trained copy)."""

    def __init__(self, base: Any, pm: Any, method: str, out: Path, peft: Any = None) -> None:
        self.base, self.pm, self.method, self.out, self.peft = base, pm, method, out, peft
        self.params = [p for p in pm.model.parameters() if p.requires_grad]
        self.head_params: list[torch.nn.Parameter] = []
        self.bytes = 0

    n_train = property(lambda self: self.base.n_train)
    has_eval = property(lambda self: self.base.has_eval)
    device = property(lambda self: self.base.device)

    def batches(self, step: int) -> list[list[Any]]:
        return self.base.batches(step)

    def loss(self, rows: list[Any]) -> torch.Tensor:
        pm = self.pm
        batch = pm.collate([e.input_ids for e in rows], labels=[int(e.label) for e in rows])
        return pm.loss(pm.build_prefix([None]), batch.to(self.device), self.base.task.label_ids)  # the lead's K/V
        # are recomputed every step: they depend on the trained weights

    def evaluate(self) -> Any:
        from softprompt.evaluate import evaluate_examples
        from softprompt.trainer import Evaluation

        with torch.no_grad():
            b = self.base
            m = evaluate_examples(self.pm, self.pm.build_prefix([None]), b.eval_set, task="classify",
                                  label_ids=b.task.label_ids, labels=b.spec.verbalizer.labels)  # fmt: skip
        return Evaluation(float(m["accuracy"]), {"eval_accuracy": m["accuracy"]}, m)

    def save(self, metrics: Any) -> None:
        from safetensors.torch import save_file

        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True)
        if self.peft is not None:  # lora, lora-long
            self.peft.save_pretrained(str(self.out))  # adapter_config.json + adapter_model.safetensors
        else:
            tensors = {k: v.detach().contiguous() for k, v in self.pm.model.named_parameters()}  # tied: once
            save_file(tensors, str(self.out / "model.safetensors"))
        self.bytes = sum(f.stat().st_size for f in self.out.iterdir() if f.suffix == ".safetensors")

    def saved_bytes(self) -> int:
        return self.bytes

    def identity(self) -> dict[str, Any]:
        return {**self.base.identity(), "--weights": self.method}

    def cleanup(self) -> None:
        if self.peft is None:  # ft, ft-long: 0.5 GB, the size is what the table needs
            shutil.rmtree(self.out, ignore_errors=True)


def encoder_pt(study: Any, key: str, method: str, long: bool) -> dict[str, Any]:
    """Prompt tuning (20 tokens, linear head) through the one trainer, on the same rows (or the long sample)."""
    from softprompt.checkpoint import load_prompt
    from softprompt.train import build_objective

    cfg = study.cfg(key, method, study.a.pt_lr, study.a.long_steps if long else 0, study.long_rows() if long else None)
    cfg.model.model, cfg.data.head, cfg.prompt.init = ENCODER, "linear", "vocab"
    obj: Any = build_objective(cfg, study.encoder(), log=note)
    r = study._fit(obj, cfg)
    m = r.pop("metrics")
    ck = load_prompt(cfg.train.out)
    return {**r, "accuracy": round(100 * m["accuracy"], 2), "model": ENCODER, "train_rows": obj.n_train,
            "trainable": sum(p.numel() for p in obj.params) + sum(p.numel() for p in obj.head_params),
            "checkpoint_bytes": os.path.getsize(cfg.train.out), "num_tokens": int(ck.prompt.shape[0])}  # fmt: skip


def encoder_ft(study: Any, key: str, long: bool, lora: bool = False) -> dict[str, Any]:
    """Full fine-tuning of every weight (lora: PEFT LoRA rank 8 on the attention projections) + a linear head
    (bench.quality_experiments.encoder_reference: AdamW, linear schedule, the batches of this --seed); the
    accuracy of the final weights, as every other row reports its final model's."""
    from types import SimpleNamespace

    from bench.quality_experiments import encoder_reference

    t, train = TASKS[key], study.long_rows() if long else study.train_file
    steps = study.a.long_steps if long else study.a.steps
    shim = SimpleNamespace(backbone=lambda _: study.encoder(), tasks={key: t},
                           files=lambda _: (train, study.eval_file),
                           budget=SimpleNamespace(steps=steps, batch=study.a.batch))  # fmt: skip
    t0 = time.time()
    lr = study.a.lora_lr if lora else study.a.encoder_ft_lr
    r = encoder_reference(shim, key, full=not lora, lora=lora, lr=lr, seed=study.a.seed)
    n_rows = len(Path(train).read_text(encoding="utf-8").splitlines())
    final_step, final_acc = r["curve"][-1]
    assert final_step == steps
    return {"accuracy": round(100 * final_acc, 2), "trainable": r["trainable"], "steps": steps,
            "checkpoint_bytes": r["bytes"], "train_s_per_step": round((time.time() - t0) / steps, 3),
            "lr": lr, "batch_size": study.a.batch, "model": ENCODER, "train_rows": n_rows,
            "best_of_4_evaluations": round(100 * r["accuracy"], 2)}  # fmt: skip
