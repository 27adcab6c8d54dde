"""softprompt.arch, the load-time equivalence guard: refuses architectures softprompt cannot run exactly, refuses each
defect of the architecture matrix when its fix is undone, refuses a deliberately broken model in every command,
and runs once per backbone and forward path."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from archs import REFUSED, arch_model_dir

from softprompt import arch as arch_mod
from softprompt.arch import EquivalenceError
from softprompt.cli import main
from softprompt.models import Backbone
from softprompt.prompted import PromptedModel

BackboneFn = Callable[[str], Backbone]


@pytest.mark.parametrize("arch_id", sorted(REFUSED))
def test_inexact_architectures_are_refused(arch_id: str, arch_backbone: BackboneFn) -> None:
    bb = arch_backbone(arch_id)
    with pytest.raises(EquivalenceError, match=rf"{bb.architecture}.*--skip-equivalence-check"):
        PromptedModel(bb)


@pytest.mark.parametrize(
    ("arch_id", "breaks"),
    [
        ("granite", "output"),  # logits_scaling
        ("cohere", "output"),  # logit_scale
        ("gemma2", "output"),  # final_logit_softcapping
        ("marian", "scale"),  # embed_scale outside the embedding module
        ("pegasus", "scale"),
        ("mistral", "window"),  # sliding window over pad slots
        ("gemma3_text", "window"),
    ],
)
def test_guard_refuses_each_fixed_defect_when_it_comes_back(
    arch_id: str, breaks: str, arch_backbone: BackboneFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Undo one of softprompt.arch's mechanisms (as the code before it did) and the guard must refuse the model."""
    bb = copy.copy(arch_backbone(arch_id))
    bb.verified = {}
    if breaks == "output":  # a re-derived head: lm_head(hidden) only
        monkeypatch.setattr(arch_mod.OutputPath, "__call__", lambda self, h: self.model.lm_head(h).float())
    elif breaks == "scale":
        monkeypatch.setattr(arch_mod, "input_scale", lambda model, family: 1.0)
    else:
        monkeypatch.setattr(arch_mod, "attention_mask", lambda attn, *a: attn)
    with pytest.raises(EquivalenceError, match=rf"{bb.architecture}.*differs from the model's own by"):
        PromptedModel(bb)


def test_deliberately_broken_model_is_refused_in_the_cli(
    arch_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose own forward scales its input embeddings in a way softprompt does not know (here: the decoder
    multiplies embed_tokens(input_ids) by 3 under a private attribute, skipped for inputs_embeds, as Marian does
    under its known name) must be refused at load with one line and exit 2; the flag lets it run."""
    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaModel.forward

    def scaled(self, input_ids=None, inputs_embeds=None, **kw):
        if input_ids is not None:
            inputs_embeds, input_ids = self.embed_tokens(input_ids) * 3.0, None
        return original(self, input_ids=input_ids, inputs_embeds=inputs_embeds, **kw)

    monkeypatch.setattr(modeling_llama.LlamaModel, "forward", scaled)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"w{i}", "label": "p"}) + "\n" for i in range(4)))
    argv = ["train", "--model", str(arch_model_dir("llama", arch_root)), "--train", str(data)]
    argv += ["--out", str(tmp_path / "p.safetensors"), "--labels", "p=good", "--device", "cpu", "--no-progress"]
    argv += ["--num-tokens", "2", "--batch-size", "2", "--max-steps", "1"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "LlamaForCausalLM" in err and "--skip-equivalence-check" in err, err
    assert not (tmp_path / "p.safetensors").exists()
    assert main([*argv, "--skip-equivalence-check"]) == 0  # the override runs it (the user's call)
    assert (tmp_path / "p.safetensors").is_file()
    prompt = ["--prompt", str(tmp_path / "p.safetensors"), "--device", "cpu"]
    for cmd in (["eval", "--data", str(data)], ["predict", "--data", str(data)], ["generate", "--input", "w1"]):
        capsys.readouterr()
        assert main([cmd[0], *prompt, *cmd[1:]]) == 2, cmd  # every command that loads the backbone is guarded
        assert "LlamaForCausalLM" in capsys.readouterr().err
        assert main([cmd[0], *prompt, *cmd[1:], "--skip-equivalence-check"]) == 0, cmd
    from softprompt.serve.server import ServeConfig, build

    with pytest.raises(EquivalenceError, match="LlamaForCausalLM"):  # serve: refused before it binds a port
        build(ServeConfig(prompts=str(tmp_path), device="cpu"))


def test_guard_runs_once_per_backbone_and_path(arch_backbone: BackboneFn, monkeypatch: pytest.MonkeyPatch) -> None:
    bb = copy.copy(arch_backbone("llama"))
    bb.verified = {}
    calls: list[int] = []
    real = arch_mod.measure
    monkeypatch.setattr(arch_mod, "measure", lambda pm: calls.append(1) or real(pm))
    PromptedModel(bb)
    PromptedModel(bb)
    assert len(calls) == 1
    PromptedModel(bb, naive=True)
    assert len(calls) == 2 and set(bb.verified) == {"causal:kv:auto", "causal:concat:auto"}
