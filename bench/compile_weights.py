"""LoRA and full fine-tuning as an Objective of the one trainer (softprompt.trainer.fit), for bench.compile: the model's
own weights trained with no prompt, on the prompt-tuning objective's rows, batches and verbalizer loss, scored by the
same forward path (a PromptedModel over the trained copy)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch


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
        if self.method == "lora":
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
        if self.method == "ft":  # 0.5 GB: the size is what the table needs
            shutil.rmtree(self.out, ignore_errors=True)
