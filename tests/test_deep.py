"""Deep prompts (softprompt.deep, `--method deep`): learned keys/values at every layer.

Independent reference: PEFT's prefix tuning (PrefixTuningConfig) given the same key/value values, on tiny llama
(grouped-query attention), gpt2, qwen2 and bert: outputs, gradients and greedy generations must agree. PEFT puts the
virtual tokens in front of everything, so the causal comparisons use --position start (the BOS stays with the
input); encoders give the same sequence either way.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers_train import assert_ensemble_is_the_mean
from tiny import tiny_model_dir  # pytest puts tests/ on sys.path

from softprompt.api import Predictor
from softprompt.checkpoint import CheckpointError, load_prompt, save_prompt
from softprompt.config import DataConfig, ModelConfig, PromptConfig, RunConfig, TrainConfig
from softprompt.deep import DeepPrompt, checkpoint_prefix, deep_prefix, geometry, make_deep_prompt
from softprompt.models import Backbone, load_backbone
from softprompt.prompted import Prefix, PromptedModel
from softprompt.train import train

peft = pytest.importorskip("peft")

TEXTS = ["hello world how are you", "hi", "a b c d e f g"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("deep")
    rows = [
        ("a great film", "pos"),
        ("dull and slow", "neg"),
        ("loved every minute", "pos"),
        ("a waste", "neg"),
        ("superb acting", "pos"),
        ("boring plot", "neg"),
        ("wonderful music", "pos"),
        ("awful script", "neg"),
    ]
    (r / "train.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return r


def backbone(kind: str, root: Path) -> Backbone:
    return load_backbone(str(tiny_model_dir(kind, root / "tiny")), progress=False)


def peft_model(bb: Backbone, kv: torch.Tensor, task_type: str):
    """PEFT prefix tuning on a copy of the backbone, its prefix set to kv (L, 2, H_kv, P, dh)."""
    from peft import PrefixTuningConfig, get_peft_model

    P = kv.shape[3]
    model = get_peft_model(copy.deepcopy(bb.model), PrefixTuningConfig(task_type=task_type, num_virtual_tokens=P))
    emb = model.prompt_encoder["default"].embedding
    # PEFT's layout: (P, L * 2 * H * dh), viewed as (P, L*2, H, dh) with layer l's keys at 2l and values at 2l+1
    assert emb.weight.shape == (P, kv.numel() // P)
    with torch.no_grad():
        emb.weight.copy_(kv.permute(3, 0, 1, 2, 4).reshape(P, -1))
    model.eval()
    return model, emb


def random_kv(pm: PromptedModel, P: int, seed: int = 0) -> torch.Tensor:
    L, H, dh = geometry(pm)
    return torch.randn(L, 2, H, P, dh, generator=torch.Generator().manual_seed(seed))


# ---- against PEFT -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_causal_matches_peft_prefix_tuning(kind: str, root: Path) -> None:
    bb = backbone(kind, root)
    pm = PromptedModel(bb, position="start")
    kv = random_kv(pm, 4)
    ref_model, emb = peft_model(bb, kv, "CAUSAL_LM")
    mine_kv = kv.clone().requires_grad_()
    prefix = deep_prefix(pm, mine_kv)
    for i, text in enumerate(TEXTS):
        ids = pm.encode_input(text)
        x = torch.tensor([ids])
        ref = ref_model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float().log_softmax(-1)
        b = pm.collate([ids])
        mine = pm.lm_logits(pm.causal_hidden(prefix, None, b.ids, b.mask, torch.arange(len(ids))[None]))[0]
        mine = mine.log_softmax(-1)
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
        if i == 0:  # gradients: the same loss through both, d/d(kv) against d/d(PEFT's prefix embedding)
            tgt = torch.tensor(ids[1:] + [ids[0]])
            ref[torch.arange(len(ids)), tgt].sum().backward()
            mine[torch.arange(len(ids)), tgt].sum().backward()
            assert mine_kv.grad is not None and emb.weight.grad is not None
            want = emb.weight.grad.view(kv.shape[3], kv.shape[0], 2, kv.shape[2], kv.shape[4]).permute(1, 2, 3, 0, 4)
            torch.testing.assert_close(mine_kv.grad, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_causal_padded_batch_matches_peft_rows(kind: str, root: Path) -> None:
    """A left-padded batch of several rows behind one deep prefix: each row as PEFT computes it alone."""
    bb = backbone(kind, root)
    pm = PromptedModel(bb, position="start")
    kv = random_kv(pm, 3, seed=1)
    ref_model, _ = peft_model(bb, kv, "CAUSAL_LM")
    words = [["bad"], ["very", "good"]]
    label_ids = pm.verbalizer_ids([" ".join(w) for w in words], "{text}")
    with torch.no_grad():
        got = pm.label_scores(deep_prefix(pm, kv), None, pm.collate([pm.encode_input(t) for t in TEXTS]), label_ids)
        for i, text in enumerate(TEXTS):
            ids = pm.encode_input(text)
            for j, lab in enumerate(label_ids):  # mean log-likelihood of the label tokens after the input
                x = torch.tensor([ids + lab])
                logp = ref_model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float().log_softmax(-1)
                want = torch.stack([logp[len(ids) - 1 + m, t] for m, t in enumerate(lab)]).mean()
                torch.testing.assert_close(got[i, j], want, atol=1e-5, rtol=1e-5)


def test_generation_matches_peft_greedy(root: Path) -> None:
    """Greedy generation behind a deep prefix against a hand-rolled greedy loop over PEFT's full forward."""
    bb = backbone("llama", root)
    pm = PromptedModel(bb, position="start")
    kv = random_kv(pm, 5, seed=2) * 3  # larger values: generations that depend on the prefix
    ref_model, _ = peft_model(bb, kv, "CAUSAL_LM")
    prefix = deep_prefix(pm, kv).detach()
    with torch.no_grad():
        for text in TEXTS[:2]:
            ids = pm.encode_input(text)
            seq = list(ids)
            for _ in range(6):
                x = torch.tensor([seq])
                seq.append(int(ref_model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax()))
            got = pm.generate(prefix, None, pm.collate([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None)
            assert got[0].tolist() == seq[len(ids) :]


def test_encoder_matches_peft_prefix_tuning(root: Path) -> None:
    bb = backbone("bert", root)
    for position in ("start", "auto"):  # the CLS is packed from the prefix (auto) or from the input (start)
        pm = PromptedModel(bb, position=position)
        kv = random_kv(pm, 4, seed=3)
        ref_model, emb = peft_model(bb, kv, "FEATURE_EXTRACTION")
        enc = bb.tokenizer(TEXTS, padding=True, return_tensors="pt")
        ref = ref_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mine_kv = kv.clone().requires_grad_()
        batch = pm.collate([pm.encode_input(t) for t in TEXTS])
        h, attn, _ = pm.encoder_hidden(deep_prefix(pm, mine_kv), None, batch.ids, batch.mask)
        assert torch.equal(attn, enc["attention_mask"])  # same right-padded sequence: [CLS] input [SEP]
        torch.testing.assert_close(h * attn[..., None], ref * attn[..., None], atol=1e-5, rtol=1e-5)
        w = torch.randn(h.shape, generator=torch.Generator().manual_seed(0)) * attn[..., None]
        (ref * w).sum().backward()
        (h * w).sum().backward()
        want = emb.weight.grad.view(kv.shape[3], kv.shape[0], 2, kv.shape[2], kv.shape[4]).permute(1, 2, 3, 0, 4)
        torch.testing.assert_close(mine_kv.grad, want, atol=1e-5, rtol=1e-4)


def test_encoder_decoder_is_refused(root: Path) -> None:
    pm = PromptedModel(backbone("t5", root))
    with pytest.raises(ValueError, match="not encoder-decoder"):
        geometry(pm)


# ---- initialisation and reparameterisation -----------------------------------------------------------------------
def test_init_reproduces_the_plain_prompt(root: Path) -> None:
    """Initialised from a plain prompt's keys/values, a deep prompt computes exactly what that prompt computes."""
    bb = backbone("llama", root)
    pm = PromptedModel(bb)  # position auto: [BOS][prompt or deep slots][input]
    init = torch.randn(4, bb.embed_dim, generator=torch.Generator().manual_seed(4))
    deep = make_deep_prompt(pm, init)
    assert deep().shape == (*geometry(pm)[:1], 2, geometry(pm)[1], 4, geometry(pm)[2])
    batch = pm.collate([pm.encode_input(t) for t in TEXTS])
    labels = pm.verbalizer_ids(["bad", "very good"], "{text}")
    with torch.no_grad():
        plain = pm.label_scores(pm.build_prefix([init]), None, batch, labels)
        mine = pm.label_scores(deep.prefix(pm), None, batch, labels)
    torch.testing.assert_close(mine, plain, atol=1e-5, rtol=1e-5)


def test_reparameterisation(root: Path) -> None:
    bb = backbone("llama", root)
    pm = PromptedModel(bb)
    init = torch.randn(3, bb.embed_dim, generator=torch.Generator().manual_seed(5))
    direct = make_deep_prompt(pm, init)
    rep = make_deep_prompt(pm, init, reparam=16)
    torch.testing.assert_close(rep(), direct())  # the MLP's last layer starts at zero
    assert not rep.kv0.requires_grad and rep.kv0 is rep.trainable()[-1]
    opt = torch.optim.SGD([p for p in rep.trainable() if p.requires_grad], lr=0.1)
    batch = pm.collate([pm.encode_input(t) for t in TEXTS], labels=[0, 1, 0])
    for _ in range(2):
        opt.zero_grad()
        pm.loss(rep.prefix(pm), batch, pm.verbalizer_ids(["bad", "good"], "{text}")).backward()
        opt.step()
    kv = rep()
    L, two, H, P, dh = kv.shape
    by_hand = rep.kv0 + rep.mlp(rep.embedding).view(P, L, two, H, dh).permute(1, 2, 3, 0, 4)
    torch.testing.assert_close(kv, by_hand)
    assert not torch.allclose(kv, direct())  # it moved
    t = rep.tensors()
    assert set(t) == {"deep.keys", "deep.values"}  # the MLP is not saved
    torch.testing.assert_close(t["deep.keys"], kv[:, 0].detach())


# ---- training, checkpoint, serving --------------------------------------------------------------------------------
def run_config(root: Path, model: Path, out: str, **kw) -> RunConfig:
    return RunConfig(
        model=ModelConfig(model=str(model), device="cpu"),
        prompt=PromptConfig(num_tokens=3, init="vocab", method="deep", deep_reparam=kw.pop("reparam", 0)),
        data=DataConfig(
            train=str(root / "train.jsonl"),
            eval=str(root / "train.jsonl"),
            template="Review: {text} Sentiment:",
            labels="neg=bad,pos=good",
            head=kw.pop("head", "lm"),
        ),
        train=TrainConfig(
            max_steps=4, batch_size=4, lr=0.05, warmup_steps=0, progress=False, save_every=2, out=str(root / out), **kw
        ),
    )


@pytest.mark.parametrize("kind, reparam", [("llama", 0), ("llama", 16), ("bert", 0)])
def test_train_save_and_serve(kind: str, reparam: int, root: Path) -> None:
    model = tiny_model_dir(kind, root / "tiny")
    cfg = run_config(
        root, model, f"{kind}-{reparam}.safetensors", reparam=reparam, head="linear" if kind == "bert" else "lm"
    )
    res = train(cfg, log=lambda s: None)
    ck = load_prompt(res.out)
    bb = backbone(kind, root)
    L, H, dh = geometry(PromptedModel(bb))
    assert ck.meta["method"] == "deep" and ck.is_deep and ck.prompt.shape == (0, bb.embed_dim)
    assert ck.extra["deep.keys"].shape == ck.extra["deep.values"].shape == (L, H, 3, dh)
    assert ck.num_tokens == 3 and ck.meta["num_tokens"] == 3
    assert ck.meta["deep"] == {"layers": L, "kv_heads": H, "head_dim": dh, "tokens": 3, "reparam": reparam}
    assert not any(k.startswith(("deep.mlp", "mlp", "deep.embedding")) for k in ck.extra)  # MLP dropped
    pred = Predictor.load(res.out, backbone=bb)
    m = pred.evaluate(str(root / "train.jsonl"))
    assert m["accuracy"] == pytest.approx(res.metrics["accuracy"])


def test_resume_with_reparameterisation(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    tr = importlib.import_module("softprompt.train")  # `softprompt.train` the attribute is the function

    model = tiny_model_dir("llama", root / "tiny")
    full = train(run_config(root, model, "full.safetensors", reparam=8), log=lambda s: None)
    orig = tr.batch_schedule

    def killed_at_step_3(lengths, batch_size, seed, step, accum, *rest):
        if step >= 2:
            raise KeyboardInterrupt
        return orig(lengths, batch_size, seed, step, accum, *rest)

    cfg = run_config(root, model, "part.safetensors", reparam=8)
    monkeypatch.setattr(tr, "batch_schedule", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=lambda s: None)
    monkeypatch.setattr(tr, "batch_schedule", orig)
    cfg.train.resume = cfg.train.out + ".state"
    part = train(cfg, log=lambda s: None)
    a, b = load_prompt(full.out), load_prompt(part.out)
    for k in ("deep.keys", "deep.values"):
        torch.testing.assert_close(b.extra[k], a.extra[k])


def test_ensemble_of_deep_and_plain_prompts(root: Path) -> None:
    """One Predictor, a deep and a plain prompt of different lengths: each prompt's probabilities as alone."""
    bb = backbone("llama", root)
    pm = PromptedModel(bb)
    meta = {
        "base_model": "x",
        "family": "causal",
        "fingerprint": bb.fingerprint,
        "template": "{text}",
        "labels": {"labels": ["n", "p"], "words": ["bad", "good"]},
    }
    deep = root / "d.safetensors"
    kv = random_kv(pm, 3, seed=6)
    save_prompt(
        deep, torch.zeros(0, bb.embed_dim), {**meta, "method": "deep"}, {"deep.keys": kv[:, 0], "deep.values": kv[:, 1]}
    )
    plain = root / "p.safetensors"
    save_prompt(plain, torch.randn(5, bb.embed_dim, generator=torch.Generator().manual_seed(7)), meta)
    assert_ensemble_is_the_mean(bb, [deep, plain], TEXTS)


def test_checkpoint_errors(root: Path, tmp_path: Path) -> None:
    bb = backbone("llama", root)
    pm = PromptedModel(bb)
    L, H, dh = geometry(pm)
    k = torch.zeros(L, H, 2, dh)
    with pytest.raises(CheckpointError, match="both"):
        save_prompt(tmp_path / "a.safetensors", torch.zeros(0, 32), {}, {"deep.keys": k})
        load_prompt(tmp_path / "a.safetensors")
    save_prompt(tmp_path / "b.safetensors", torch.zeros(0, 32), {}, {"deep.keys": k, "deep.values": k[:, :1]})
    with pytest.raises(CheckpointError, match="must both be"):
        load_prompt(tmp_path / "b.safetensors")
    save_prompt(tmp_path / "c.safetensors", torch.zeros(0, 32), {}, {"deep.keys": k, "deep.values": k * float("nan")})
    with pytest.raises(CheckpointError, match="NaN"):
        load_prompt(tmp_path / "c.safetensors")
    wrong = torch.zeros(L + 1, H, 2, dh)
    deep = {"method": "deep"}  # a deep file's metadata names its method (load_prompt checks it against the tensors)
    save_prompt(
        tmp_path / "d.safetensors", torch.zeros(0, 32), deep, {"deep.keys": wrong, "deep.values": wrong.clone()}
    )
    with pytest.raises(CheckpointError, match="layers, kv heads, head dim"):
        checkpoint_prefix(pm, [load_prompt(tmp_path / "d.safetensors")])


def test_deep_prompt_module_shapes() -> None:
    kv0 = torch.randn(2, 2, 3, 4, 5)
    d = DeepPrompt(kv0)
    assert d.num_tokens == 4 and d.trainable() == [d.kv]
    assert d.meta() == {
        "method": "deep",
        "deep": {"layers": 2, "kv_heads": 3, "head_dim": 5, "tokens": 4, "reparam": 0},
    }
    with pytest.raises(ValueError, match="embeddings"):
        DeepPrompt(kv0, reparam=8)


def test_encoder_ensemble_of_deep_prompts(root: Path) -> None:
    """Two deep prompts on an encoder in one Prefix (rows pick their prompt): each as alone; mixing is refused."""
    bb = backbone("bert", root)
    pm = PromptedModel(bb)
    a, b = random_kv(pm, 3, seed=8), random_kv(pm, 3, seed=9)
    batch = pm.collate([pm.encode_input(t) for t in TEXTS])
    both = Prefix.stack([deep_prefix(pm, a), deep_prefix(pm, b)])
    assert both.deep and both.kv is not None and both.kv[0][0].shape[0] == 2
    with torch.no_grad():
        got = pm.pooled(both, torch.tensor([0, 1, 1]), batch)
        for i, kv in enumerate([a, b, b]):
            one = pm.collate([batch.ids[i][batch.mask[i].bool()].tolist()])
            torch.testing.assert_close(got[i : i + 1], pm.pooled(deep_prefix(pm, kv), None, one), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="different lengths"):
        Prefix.stack([deep_prefix(pm, a), deep_prefix(pm, random_kv(pm, 4))])
    with pytest.raises(ValueError, match="no keys/values"):
        Prefix.stack([deep_prefix(pm, a), pm.build_prefix([torch.zeros(3, bb.embed_dim)])])


def test_causal_deep_refuses_a_prefix_without_kv(root: Path) -> None:
    bb = backbone("llama", root)
    pm = PromptedModel(bb)
    deep = deep_prefix(pm, random_kv(pm, 2))
    with pytest.raises(ValueError, match="no keys/values"):
        Prefix.stack([deep, pm.build_prefix([torch.zeros(2, bb.embed_dim)], kv=False)])
    mixed = Prefix.stack([deep, pm.build_prefix([torch.zeros(4, bb.embed_dim)])])  # with keys/values: fine
    assert mixed.deep and mixed.width == 5 and mixed.kv is not None and mixed.kv[0][0].shape[2] == 5


def test_encoder_server_mixes_deep_and_plain_prompts(
    root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An encoder server with deep prompts of two lengths and a plain prompt: concurrent requests are grouped into
    batches that can stack (no failed batch retried row by row), and each result equals the Predictor alone."""
    import asyncio
    import logging
    import shutil

    from serve_support import served

    from softprompt.serve.registry import Registry

    model = tiny_model_dir("bert", root / "tiny")
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name, method, n in (("deep3", "deep", 3), ("deep4", "deep", 4), ("plain", "prompt", 5)):
        cfg = run_config(root, model, str(tmp_path / f"{name}.safetensors"), head="linear")
        cfg.prompt.method, cfg.prompt.num_tokens = method, n
        shutil.copy(train(cfg, log=lambda s: None).out, prompts / f"{name}.safetensors")
    bb = backbone("bert", root)
    reg = Registry(bb, prompts)
    names = ["deep3", "plain", "deep4", "deep3"]

    async def go() -> list:
        async with served(reg, max_wait_ms=300) as (c, _):
            rs = await asyncio.gather(*(c.post("/v1/classify", json={"task": n, "inputs": TEXTS}) for n in names))
            return [r.json() for r in rs]

    with caplog.at_level(logging.WARNING, logger="softprompt.serve"):
        results = asyncio.run(go())
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]
    for name, res in zip(names, results, strict=True):
        alone = Predictor.load(str(prompts / f"{name}.safetensors"), backbone=bb).predict(
            [f"Review: {t} Sentiment:" for t in TEXTS]
        )
        for got, ref in zip(res["results"], alone, strict=True):
            ref_p = ref.get("probs", ref.get("probabilities"))
            assert got["label"] == ref["label"]
            for k, v in ref_p.items():
                assert abs(got["probabilities"][k] - v) <= 1e-5


# ---- a position gap (softprompt.distill --student-positions teacher) ----------------------------------------------
def test_a_position_gap_moves_the_input_and_survives_the_file(root: Path, tmp_path: Path) -> None:
    """gap g: the input's positions start g after the deep slots. Reference: the model's own forward of [BOS][the
    init's embeddings][input] with the input's position_ids moved by g (the deep prompt initialised from that plain
    prompt holds its keys/values); in a padded batch, in greedy generation, and loaded back from its file."""
    bb = backbone("llama", root)
    pm = PromptedModel(bb)
    init = torch.randn(3, bb.embed_dim, generator=torch.Generator().manual_seed(5)) * 3
    deep = make_deep_prompt(pm, init)
    deep.gap = 40
    rows = [pm.encode_input(t) for t in TEXTS]
    emb = bb.model.get_input_embeddings()
    with torch.no_grad():
        got = pm.next_token_logp(deep.prefix(pm), None, pm.collate(rows))  # (B, V)
        for i, ids in enumerate(rows):
            x = torch.cat([emb(torch.tensor(pm.prefix_ids)), init, emb(torch.tensor(ids))])[None]
            pos = torch.arange(x.shape[1])
            pos[1 + 3 :] += 40
            want = bb.model(inputs_embeds=x, position_ids=pos[None]).logits[0, -1].float().log_softmax(-1)
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-4)
        no_gap = pm.next_token_logp(make_deep_prompt(pm, init).prefix(pm), None, pm.collate(rows))
        assert float((got - no_gap).abs().max()) > 1e-3  # the gap matters
        seq = list(rows[0])  # greedy decoding continues the moved positions
        for _ in range(4):
            x = torch.cat([emb(torch.tensor(pm.prefix_ids)), init, emb(torch.tensor(seq))])[None]
            pos = torch.arange(x.shape[1])
            pos[1 + 3 :] += 40
            seq.append(int(bb.model(inputs_embeds=x, position_ids=pos[None]).logits[0, -1].argmax()))
        gen = pm.generate(deep.eval_prefix(pm), None, pm.collate([rows[0]]), max_new_tokens=4, do_sample=False,
                          eos_token_id=None)  # fmt: skip
        assert gen[0].tolist() == seq[len(rows[0]) :]
    prompt, tensors, meta = deep.saved()
    path = tmp_path / "gap.safetensors"
    save_prompt(str(path), prompt, meta, extra=tensors)
    assert load_prompt(str(path)).meta["deep"]["position_gap"] == 40
    with torch.no_grad():
        again = pm.next_token_logp(checkpoint_prefix(pm, [load_prompt(str(path))]), None, pm.collate(rows))
    torch.testing.assert_close(again, got, rtol=1e-5, atol=1e-5)
