"""softprompt.interop against the engines themselves: PEFT loads our export (and we import its adapters) with
identical outputs; the prompt table and the vLLM prompt_embeds are exactly what softprompt's own forward uses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tiny_model_dir  # pytest puts tests/ on sys.path

from softprompt.checkpoint import CheckpointError, load_prompt, save_prompt
from softprompt.cli import main
from softprompt.config import DataConfig, ModelConfig
from softprompt.interop import (
    PEFT_KEY,
    InteropError,
    PromptEmbedder,
    decode_prompt_embeds,
    encode_prompt_embeds,
    export_peft,
    export_prompt_table,
    import_peft,
    load_prompt_table,
    prompt_embeds_for,
    table_input_ids,
)
from softprompt.models import Backbone, load_backbone
from softprompt.prompted import PromptedModel
from softprompt.task import TaskSpec

peft = pytest.importorskip("peft")
TEXTS = ["a quiet , moving film", "the plot makes no sense at all"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


_BACKBONES: dict[str, Backbone] = {}


def backbone(kind: str, root: Path) -> Backbone:
    if kind not in _BACKBONES:
        path = tiny_model_dir(kind, root)
        _BACKBONES[kind] = load_backbone(ModelConfig(model=str(path), device="cpu"), progress=False)
    return _BACKBONES[kind]


def make_prompt(
    path: Path,
    bb: Backbone,
    *,
    position: str = "start",
    n: int = 5,
    seed: int = 0,
    task: str = "generate",
    template: str = "{text}",
    labels: str | None = None,
) -> torch.Tensor:
    prompt = torch.randn(n, bb.embed_dim, generator=torch.Generator().manual_seed(seed)) * 0.5
    spec = TaskSpec.from_config(DataConfig(task=task, template=template, labels=labels), position=position)
    meta = {
        "base_model": bb.model_id,
        "architecture": bb.architecture,
        "family": bb.family,
        "fingerprint": bb.fingerprint,
        "init": "random",
        **spec.to_meta(),
    }
    save_prompt(path, prompt, meta)
    return prompt


def sp_causal_logits(bb: Backbone, prompt: torch.Tensor, ids: list[int], position: str, naive: bool) -> torch.Tensor:
    """softprompt's logits at every input position (T, V), through its own forward."""
    pm = PromptedModel(bb, position=position, naive=naive)
    with torch.no_grad():
        prefix = pm.build_prefix([prompt])
        batch = pm.collate([ids])
        pos = torch.arange(len(ids))[None]
        return pm.lm_logits(pm.causal_hidden(prefix, None, batch.ids, batch.mask, pos))[0]


def peft_model(bb: Backbone, adapter: Path, seq2seq: bool = False):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    base = cls.from_pretrained(bb.model_id, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter)).eval()


def peft_causal_logits(model, ids: list[int]) -> torch.Tensor:
    n = model.active_peft_config.num_virtual_tokens
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out.logits[0, n:].float()


# ----- PEFT export -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_export_peft_start_equals_peft(kind: str, tiny_root: Path, tmp_path: Path) -> None:
    bb = backbone(kind, tiny_root)
    prompt = make_prompt(tmp_path / "p.safetensors", bb, position="start")
    res = export_peft(tmp_path / "p.safetensors", tmp_path / "peft", backbone=bb)
    assert res["exact"] and res["num_virtual_tokens"] == 5 and res["task_type"] == "CAUSAL_LM"
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (
        cfg["peft_type"] == "PROMPT_TUNING" and cfg["token_dim"] == 32 and cfg["base_model_name_or_path"] == bb.model_id
    )
    model = peft_model(bb, tmp_path / "peft")
    pm = PromptedModel(bb, position="start")
    for text in TEXTS:
        ids = pm.encode_input(text)  # [BOS] + text: what PEFT users feed (tokenizer(text) for Llama-style tokenizers)
        theirs = peft_causal_logits(model, ids)
        for naive in (True, False):  # concat path and shared-prefix K/V path
            torch.testing.assert_close(sp_causal_logits(bb, prompt, ids, "start", naive), theirs, atol=ATOL, rtol=0)


def test_export_auto_refused_then_fold_bos_is_exact(tiny_root: Path, tmp_path: Path) -> None:
    bb = backbone("llama", tiny_root)
    prompt = make_prompt(tmp_path / "p.safetensors", bb, position="auto")
    with pytest.raises(InteropError, match="--fold-bos"):
        export_peft(tmp_path / "p.safetensors", tmp_path / "peft", backbone=bb)
    assert not (tmp_path / "peft" / "adapter_model.safetensors").exists()
    res = export_peft(tmp_path / "p.safetensors", tmp_path / "peft", backbone=bb, fold_bos=True)
    assert res["exact"] and res["folded_prefix"] == 1 and res["num_virtual_tokens"] == 6
    model = peft_model(bb, tmp_path / "peft")
    pm = PromptedModel(bb, position="auto")
    for text in TEXTS:
        ids = pm.encode_input(text)  # no BOS: it is virtual token 0 now
        assert ids == bb.tokenizer(text, add_special_tokens=False)["input_ids"]
        for naive in (True, False):
            torch.testing.assert_close(
                sp_causal_logits(bb, prompt, ids, "auto", naive), peft_causal_logits(model, ids), atol=ATOL, rtol=0
            )


def test_export_force_warns_and_is_marked_inexact(tiny_root: Path, tmp_path: Path) -> None:
    bb = backbone("llama", tiny_root)
    make_prompt(tmp_path / "p.safetensors", bb, position="auto")
    with pytest.warns(UserWarning, match="outputs differ"):
        res = export_peft(tmp_path / "p.safetensors", tmp_path / "peft", backbone=bb, force=True)
    assert not res["exact"] and res["num_virtual_tokens"] == 5


def test_export_peft_seq2seq_equals_peft(tiny_root: Path, tmp_path: Path) -> None:
    bb = backbone("t5", tiny_root)
    prompt = make_prompt(tmp_path / "p.safetensors", bb, position="start")
    res = export_peft(tmp_path / "p.safetensors", tmp_path / "peft", backbone=bb)
    assert res["task_type"] == "SEQ_2_SEQ_LM"
    model = peft_model(bb, tmp_path / "peft", seq2seq=True)
    pm = PromptedModel(bb, position="start")
    labels = torch.tensor([pm.encode_target("good")])
    for text in TEXTS:
        ids = pm.encode_input(text)
        with torch.no_grad():
            prefix = pm.build_prefix([prompt])
            batch = pm.collate([ids])
            h, attn, _ = pm.encoder_hidden(prefix, None, batch.ids, batch.mask)
            ours = pm._decoder_logp(h, attn, labels)
            dec = model.base_model.prepare_decoder_input_ids_from_labels(labels=labels)
            out = model(input_ids=batch.ids, attention_mask=batch.mask, decoder_input_ids=dec)
        torch.testing.assert_close(ours, out.logits.float().log_softmax(-1), atol=ATOL, rtol=0)


# ----- PEFT import -----------------------------------------------------------------------------------------------
def peft_trained_adapter(bb: Backbone, out: Path, n: int = 4) -> torch.Tensor:
    """An adapter made by PEFT itself (get_peft_model + save_pretrained), with known prompt values."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(bb.model_id, dtype=torch.float32)
    model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n))
    values = torch.randn(n, bb.embed_dim, generator=torch.Generator().manual_seed(7)) * 0.5
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(values)
    model.save_pretrained(str(out))
    return values


def test_import_peft_trained_adapter_equals_peft(tiny_root: Path, tmp_path: Path) -> None:
    bb = backbone("qwen2", tiny_root)
    values = peft_trained_adapter(bb, tmp_path / "adapter")
    ck = import_peft(tmp_path / "adapter", tmp_path / "imported.safetensors")  # base model from adapter_config.json
    assert torch.equal(ck.prompt, values)
    assert ck.meta["fingerprint"] == bb.fingerprint and ck.meta["base_model"] == bb.model_id
    assert ck.meta["position"] == "start" and ck.meta["task"] == "generate" and ck.meta["family"] == "causal"
    model = peft_model(bb, tmp_path / "adapter")
    pm = PromptedModel(bb, position="start")
    for text in TEXTS:
        ids = pm.encode_input(text)
        torch.testing.assert_close(
            sp_causal_logits(bb, ck.prompt, ids, "start", False), peft_causal_logits(model, ids), atol=ATOL, rtol=0
        )


def test_import_with_labels_makes_a_classifier(tiny_root: Path, tmp_path: Path) -> None:
    bb = backbone("qwen2", tiny_root)
    peft_trained_adapter(bb, tmp_path / "adapter")
    ck = import_peft(
        tmp_path / "adapter", tmp_path / "c.safetensors", backbone=bb, template="Review: {text}", labels="0=bad,1=good"
    )
    assert ck.meta["task"] == "classify" and ck.meta["labels"] == {"labels": ["0", "1"], "words": ["bad", "good"]}
    from softprompt.api import Predictor

    out = Predictor.load(str(tmp_path / "c.safetensors"), backbone=bb).predict(["Review: fine"])
    assert out[0]["label"] in ("0", "1")


def test_round_trip_is_lossless(tiny_root: Path, tmp_path: Path) -> None:
    bb = backbone("llama", tiny_root)
    src = tmp_path / "p.safetensors"
    make_prompt(src, bb, position="auto", task="classify", template="Q: {text} A:", labels="0=no,1=yes")
    export_peft(src, tmp_path / "peft", backbone=bb, fold_bos=True)
    with torch.no_grad():  # the header carries our metadata; PEFT sees a plain prompt_embeddings tensor
        from safetensors import safe_open

        with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as f:
            assert list(f.keys()) == [PEFT_KEY] and f.get_tensor(PEFT_KEY).shape == (6, 32)
    back = import_peft(tmp_path / "peft", tmp_path / "back.safetensors")
    orig = load_prompt(src)
    assert torch.equal(back.prompt, orig.prompt)
    for k in ("base_model", "fingerprint", "position", "task", "template", "labels", "init"):
        assert back.meta[k] == orig.meta[k], k


def test_import_refuses_other_model_and_bad_adapters(tiny_root: Path, tmp_path: Path) -> None:
    bb = backbone("llama", tiny_root)
    make_prompt(tmp_path / "p.safetensors", bb)
    export_peft(tmp_path / "p.safetensors", tmp_path / "peft", backbone=bb)
    other = backbone("qwen2", tiny_root)
    with pytest.raises(CheckpointError, match="allow-other-model"):
        import_peft(tmp_path / "peft", tmp_path / "x.safetensors", backbone=other)
    import_peft(tmp_path / "peft", tmp_path / "x.safetensors", backbone=other, allow_other_model=True)

    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(InteropError, match="adapter_config.json"):
        import_peft(bad, tmp_path / "y.safetensors", backbone=bb)
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "P_TUNING", "num_virtual_tokens": 4}))
    with pytest.raises(InteropError, match="PROMPT_TUNING"):
        import_peft(bad, tmp_path / "y.safetensors", backbone=bb)
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}))
    (bad / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(InteropError, match="pickle"):
        import_peft(bad, tmp_path / "y.safetensors", backbone=bb)
    from safetensors.torch import save_file

    save_file({PEFT_KEY: torch.zeros(4, 16)}, str(bad / "adapter_model.safetensors"))
    with pytest.raises(InteropError, match="dim 16"):
        import_peft(bad, tmp_path / "y.safetensors", backbone=bb)
    assert not (tmp_path / "y.safetensors").exists()


def test_cli_export_and_import(tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bb = backbone("gpt2", tiny_root)  # GPT-2's tokenizer here adds [CLS]; position start exports as is
    make_prompt(tmp_path / "p.safetensors", bb)
    assert main(["export", "--to", "peft", str(tmp_path / "p.safetensors"), str(tmp_path / "peft")]) == 0
    assert json.loads(capsys.readouterr().out)["num_virtual_tokens"] == 5
    assert main(["import", "--from", "peft", str(tmp_path / "peft"), str(tmp_path / "back.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["fingerprint"] == bb.fingerprint
    assert main(["export", "--to", "peft", str(tmp_path / "p.safetensors")]) == 2
    assert "output directory" in capsys.readouterr().err


# ----- prompt table ---------------------------------------------------------------------------------------------
def test_prompt_table_shapes_index_and_padding(tiny_root: Path, tmp_path: Path) -> None:
    bb = backbone("llama", tiny_root)
    a = make_prompt(tmp_path / "a.safetensors", bb, position="auto", n=4, seed=1)
    b = make_prompt(tmp_path / "b.safetensors", bb, position="start", n=6, seed=2)
    idx = export_prompt_table(
        [tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "table", names=["sst2", "qa"], backbone=bb
    )
    table, index = load_prompt_table(tmp_path / "table")
    assert index == json.loads(json.dumps(idx))
    assert table.shape == (2, 6, 32) and table.dtype == np.float32
    assert np.array_equal(table[0, :4], a.numpy()) and not table[0, 4:].any() and np.array_equal(table[1], b.numpy())
    assert (
        index["task_ids"] == {"sst2": 0, "qa": 1}
        and index["vocab_size"] == bb.model.get_input_embeddings().weight.shape[0]
    )
    assert [t["num_virtual_tokens"] for t in index["tasks"]] == [4, 6]
    assert (
        index["tasks"][0]["prefix_token_ids"] == [bb.tokenizer.cls_token_id]
        and index["tasks"][1]["prefix_token_ids"] == []
    )
    half = export_prompt_table([tmp_path / "a.safetensors"], tmp_path / "t16", backbone=bb, dtype="float16")
    assert np.load(tmp_path / "t16" / "prompt_table.npy").dtype == np.float16 and half["dtype"] == "float16"
    with pytest.raises(InteropError, match="bfloat16"):
        export_prompt_table([tmp_path / "a.safetensors"], tmp_path / "t", backbone=bb, dtype="bfloat16")
    with pytest.raises(InteropError, match="distinct"):
        export_prompt_table([tmp_path / "a.safetensors"] * 2, tmp_path / "t", backbone=bb)


def test_prompt_table_lookup_equals_softprompt_embeddings(tiny_root: Path, tmp_path: Path) -> None:
    """What a prompt-table engine computes (ids >= vocab_size looked up in the task's row) equals our embeddings."""
    bb = backbone("llama", tiny_root)
    paths = {"a": tmp_path / "a.safetensors", "b": tmp_path / "b.safetensors"}
    make_prompt(paths["a"], bb, position="auto", n=4, seed=1)
    make_prompt(paths["b"], bb, position="start", n=6, seed=2)
    export_prompt_table(list(paths.values()), tmp_path / "table", names=list(paths), backbone=bb)
    table, index = load_prompt_table(tmp_path / "table")
    emb = PromptEmbedder(bb, paths)
    V, W = index["vocab_size"], bb.model.get_input_embeddings().weight.detach()
    for task in paths:
        ids = table_input_ids(index, task, emb.input_ids(task, TEXTS[0]))
        rows = [torch.from_numpy(table[index["task_ids"][task], i - V]) if i >= V else W[i] for i in ids]
        torch.testing.assert_close(torch.stack(rows), emb(task, TEXTS[0]), atol=0, rtol=0)
    with pytest.raises(InteropError, match="unknown task"):
        table_input_ids(index, "nope", [1])


# ----- vLLM prompt_embeds ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("position", ["auto", "start"])
def test_prompt_embeds_equal_softprompt_forward(position: str, tiny_root: Path, tmp_path: Path) -> None:
    bb = backbone("llama", tiny_root)
    prompt = make_prompt(
        tmp_path / "p.safetensors",
        bb,
        position=position,
        task="classify",
        template="Review: {text}",
        labels="0=bad,1=good",
    )
    x = prompt_embeds_for(tmp_path / "p.safetensors", "Review: " + TEXTS[0], bb)
    pm = PromptedModel(bb, position=position)
    ids = pm.encode_input("Review: " + TEXTS[0])
    assert x.shape == (len(pm.prefix_ids) + 5 + len(ids), 32) and x.dtype == torch.float32 and x.device.type == "cpu"
    with torch.no_grad():
        prefix = pm.build_prefix([prompt])
        concat = torch.cat([prefix.embeds[0], pm.embed(torch.tensor([ids]))[0]])  # softprompt's concat-path rows
        torch.testing.assert_close(x, concat, atol=0, rtol=0)
        # and the model run on them (as vLLM would) scores like softprompt's shared-prefix path
        pos = torch.tensor([[len(ids) - 1]])
        batch = pm.collate([ids])
        ours = pm.lm_logits(pm.causal_hidden(prefix, None, batch.ids, batch.mask, pos))[0, 0]
        theirs = bb.model(inputs_embeds=x[None]).logits[0, -1].float()
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    # the template's fields can be given instead of the filled text; dtype on request
    emb = PromptEmbedder(bb, [tmp_path / "p.safetensors"])
    torch.testing.assert_close(emb("p", {"text": TEXTS[0]}), x, atol=0, rtol=0)
    assert emb("p", TEXTS[0], dtype=torch.bfloat16).dtype == torch.bfloat16


def test_prompt_embeds_base64_round_trip_and_errors(tiny_root: Path, tmp_path: Path) -> None:
    bb = backbone("llama", tiny_root)
    make_prompt(tmp_path / "p.safetensors", bb)
    x = prompt_embeds_for(tmp_path / "p.safetensors", TEXTS[1], bb)
    s = encode_prompt_embeds(x)
    assert isinstance(s, str) and torch.equal(decode_prompt_embeds(s), x)
    with pytest.raises(InteropError, match="2-D"):
        encode_prompt_embeds(x[None])
    with pytest.raises(InteropError, match="unknown task"):
        PromptEmbedder(bb, {"a": tmp_path / "p.safetensors"})("b", "x")
    t5 = backbone("t5", tiny_root)
    with pytest.raises(InteropError, match="decoder-only"):
        PromptEmbedder(t5, {})
