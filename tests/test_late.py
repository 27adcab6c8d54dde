"""Late prompts (softprompt.late, `--method late --layer L`): P hidden states entering at layer L.

Independent reference: the model's own decoder layers run one by one by hand (`model.model.layers[i]` with its rotary
embedding and norms on Llama, `transformer.h[i]` with wte/wpe/ln_f on GPT-2): layers < L on [lead; input] with the
input at positions p0+P+t, then the P states put between the lead token and the input, layers >= L on
[lead; states; input] with a causal mask, the final norm. softprompt's path (shared-prefix K/V, per-layer key
visibility, the training cache) must give the same hidden states, scores, gradients and greedy generations.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers_train import assert_ensemble_is_the_mean
from serve_support import lively_model_dir
from tiny import tiny_model_dir

from softprompt import late, methods
from softprompt.api import Predictor
from softprompt.checkpoint import load_prompt
from softprompt.cli import main
from softprompt.config import ConfigError, DataConfig, ModelConfig, PromptConfig, RunConfig, TrainConfig
from softprompt.models import Backbone, load_backbone
from softprompt.prompted import PromptedModel
from softprompt.runfiles import run_identity
from softprompt.train import build_objective, train

TEXTS = ["hello world how are you", "hi", "a b c d e f g"]
ROWS = [("a great film", "pos"), ("dull and slow", "neg"), ("loved every minute", "pos"), ("a waste", "neg"),
        ("superb acting", "pos"), ("boring plot", "neg"), ("wonderful music", "pos"), ("awful script", "neg")]  # fmt: skip
TEMPLATE, LABELS = "Review: {text} Sentiment:", "neg=bad,pos=good"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("late")
    (r / "train.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in ROWS))
    return r


def backbone(kind: str, root: Path) -> Backbone:
    return load_backbone(ModelConfig(model=str(lively_model_dir(kind, root / "tiny")), device="cpu"), progress=False)


def states(P: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(P, 32, generator=torch.Generator().manual_seed(seed))


# ---- the hand-built reference -------------------------------------------------------------------------------------
def causal_mask(S: int) -> torch.Tensor:
    """(1, 1, S, S) additive: 0 where a query sees the key, the float minimum elsewhere."""
    return torch.full((S, S), torch.finfo(torch.float32).min).triu(1)[None, None]


def reference_hidden(bb: Backbone, lead: list[int], S: torch.Tensor, ids: list[int], L: int) -> torch.Tensor:
    """Final hidden states (T, d) of the input tokens `ids`, the late prompt S (P, d) entering at layer L."""
    p0, P, T = len(lead), S.shape[0], len(ids)
    tok = torch.tensor([lead + ids])
    pos_low = torch.tensor([list(range(p0)) + list(range(p0 + P, p0 + P + T))])  # the input's positions: shifted by P
    pos_high = torch.arange(p0 + P + T)[None]
    model = bb.model
    if hasattr(model, "transformer"):  # GPT-2: wte + wpe, blocks h[i], ln_f
        base = model.transformer
        h = base.wte(tok) + base.wpe(pos_low)
        for i, block in enumerate(base.h):
            if i == L:
                h = torch.cat([h[:, :p0], S[None], h[:, p0:]], 1)
            h = block(h, None, causal_mask(h.shape[1]))
        return base.ln_f(h)[0, p0 + P :]
    base = model.model  # Llama: embed_tokens, layers[i] with the rotary embedding, norm
    h, pos = base.embed_tokens(tok), pos_low
    for i, layer in enumerate(base.layers):
        if i == L:
            h, pos = torch.cat([h[:, :p0], S[None], h[:, p0:]], 1), pos_high
        rot = base.rotary_emb(h, position_ids=pos)
        h = layer(h, attention_mask=causal_mask(h.shape[1]), position_embeddings=rot, position_ids=pos)
    return base.norm(h)[0, p0 + P :]


@pytest.mark.parametrize("kind, position", [("llama", "auto"), ("gpt2", "auto"), ("qwen2", "auto"), ("llama", "start")])
def test_hidden_states_match_the_hand_built_reference(kind: str, position: str, root: Path) -> None:
    """--position auto: [BOS][S][input]; start: no lead token, the BOS stays with the input ([S][BOS input])."""
    bb = backbone(kind, root)
    pm = PromptedModel(bb, position=position)
    S = states()
    prefix = late.late_prefix(pm, S, 1)
    for text in TEXTS:
        ids = pm.encode_input(text)
        b = pm.collate([ids])
        with torch.no_grad():
            ours = pm.run_decoder(prefix, None, b.ids, b.mask, keep_cache=False).hidden[0]
            ref = reference_hidden(bb, pm.prefix_ids, S, ids, 1)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        # the prompt matters: without it (a plain run) the states differ
        plain = pm.run_decoder(pm.build_prefix([None]), None, b.ids, b.mask, keep_cache=False).hidden[0]
        assert (plain - ours).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batch_equals_each_row_alone_and_cached_start_is_exact(kind: str, root: Path) -> None:
    bb = backbone(kind, root)
    pm = PromptedModel(bb)
    prefix = late.late_prefix(pm, states(seed=1), 1)
    ids = [pm.encode_input(t) for t in TEXTS]
    b = pm.collate(ids)  # left-padded, rows of different lengths
    with torch.no_grad():
        both = pm.run_decoder(prefix, None, b.ids, b.mask, keep_cache=False).hidden
        entering = late.layer_input(pm, prefix, b.ids, b.mask, 1)  # what layer 1 receives (N, T, d)
        started = pm.run_decoder(prefix, None, b.ids, b.mask, keep_cache=False, start=(1, entering)).hidden
        for i, row in enumerate(ids):
            one = pm.collate([row])
            alone = pm.run_decoder(prefix, None, one.ids, one.mask, keep_cache=False).hidden[0]
            torch.testing.assert_close(both[i, -len(row) :], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(started[i, -len(row) :], alone, atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_the_prompt_and_match_the_reference(root: Path) -> None:
    bb = backbone("llama", root)
    pm = PromptedModel(bb)
    S = states(seed=2).requires_grad_()
    ids = pm.encode_input(TEXTS[0])
    b = pm.collate([ids])
    ours = pm.run_decoder(late.late_prefix(pm, S, 1), None, b.ids, b.mask, keep_cache=False).hidden[0, -1].sum()
    (g_ours,) = torch.autograd.grad(ours, S)
    S_ref = S.detach().clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(reference_hidden(bb, pm.prefix_ids, S_ref, ids, 1)[-1].sum(), S_ref)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-5, rtol=1e-4)
    assert g_ours.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in bb.model.parameters())


def test_greedy_generation_matches_the_reference(root: Path) -> None:
    bb = backbone("llama", root)
    pm = PromptedModel(bb)
    S = states(seed=3)
    prefix = late.late_prefix(pm, S, 1)
    rows = [pm.encode_input(t) for t in TEXTS[:2]]
    b = pm.collate(rows)
    out = pm.generate(prefix, None, b, max_new_tokens=3, do_sample=False)
    for i, row in enumerate(rows):
        seq = list(row)
        with torch.no_grad():
            for _ in range(3):  # each next token: argmax of the LM head on the reference's last hidden state
                seq.append(int(bb.model.lm_head(reference_hidden(bb, pm.prefix_ids, S, seq, 1)[-1]).argmax()))
        assert out[i].tolist() == seq[len(row) :]


# ---- training: the cache, the CLI, resume ----------------------------------------------------------------------------
def run_config(root: Path, out: str, **kw) -> RunConfig:
    return RunConfig(
        model=ModelConfig(model=str(lively_model_dir(kw.pop("kind", "llama"), root / "tiny")), device="cpu"),
        prompt=PromptConfig(num_tokens=3, init="vocab", method="late", layer=1, late_cache_mb=kw.pop("cache", 64)),
        data=DataConfig(
            train=str(root / "train.jsonl"),
            eval=str(root / "train.jsonl"),
            template=TEMPLATE,
            labels=LABELS,
            head=kw.pop("head", "lm"),
        ),  # fmt: skip
        train=TrainConfig(
            max_steps=4, batch_size=4, lr=0.05, warmup_steps=0, progress=False, save_every=2, out=str(root / out), **kw
        ),  # fmt: skip
    )


@pytest.mark.parametrize("head", ["lm", "linear"])
def test_cached_training_loss_equals_uncached(head: str, root: Path) -> None:
    cfg = run_config(root, f"cache-{head}.safetensors", head=head)
    bb = backbone("llama", root)
    obj = build_objective(cfg, bb, log=lambda s: None)
    assert isinstance(obj.prompt, late.LatePrompt) and obj.prompt.cache is not None
    rows = obj.batches(0)[0]
    params = [p for p in obj.params + obj.head_params if p.requires_grad]  # the late prompt's scale is fixed
    losses, grads = [], []
    for use in (True, True, False):  # a miss (fills the cache), a hit, then no cache
        cache = obj.prompt.cache
        if not use:
            obj.prompt.cache = None
        loss = obj.loss(rows)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, params))
        obj.prompt.cache = cache
    assert obj.prompt.cache.hits == len(rows) and obj.prompt.cache.misses == len(rows)
    for lo, gr in zip(losses[1:], grads[1:]):
        torch.testing.assert_close(lo, losses[0], atol=1e-6, rtol=1e-5)
        for a, b in zip(gr, grads[0]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in bb.model.parameters())


def test_cached_generation_loss_equals_uncached(root: Path) -> None:
    """--task generate: the cache holds input + target rows; the token-level loss is the same."""
    gen = root / "gen.jsonl"
    gen.write_text("".join(json.dumps({"text": t, "target": y}) + "\n" for t, y in ROWS))
    cfg = run_config(root, "gen.safetensors")
    cfg.data.task, cfg.data.train, cfg.data.eval, cfg.data.labels = "generate", str(gen), None, None
    obj = build_objective(cfg, backbone("llama", root), log=lambda s: None)
    rows = obj.batches(0)[0]
    cached = obj.loss(rows)
    assert obj.prompt.cache is not None and len(obj.prompt.cache.states) == len(rows)
    obj.prompt.cache = None
    torch.testing.assert_close(cached, obj.loss(rows), atol=1e-6, rtol=1e-5)


def test_cache_budget_bounds_memory(root: Path) -> None:
    bb = backbone("llama", root)
    pm = PromptedModel(bb)
    prefix = late.late_prefix(pm, states(), 1)
    b = pm.collate([pm.encode_input(t) for t in TEXTS])
    one_row = 4 * 32 * len(pm.encode_input(TEXTS[0]))  # float32 (T_0, d)
    cache = late.InputCache(1, budget=one_row)
    full = cache.batch(pm, prefix, b.ids, b.mask)
    assert len(cache.states) == 1 and cache.used == one_row  # the first row fits, the others are recomputed
    again = cache.batch(pm, prefix, b.ids, b.mask)
    torch.testing.assert_close(again, full)
    assert cache.hits == 1 and cache.misses == 5


@pytest.mark.slow
def test_cli_train_eval_predict_round_trip(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = lively_model_dir("llama", root / "tiny")
    out = tmp_path / "late.safetensors"
    argv = ["train", "--model", str(model), "--train", str(root / "train.jsonl"), "--eval", str(root / "train.jsonl"),
            "--out", str(out), "--template", TEMPLATE, "--labels", LABELS, "--device", "cpu", "--no-progress",
            "--num-tokens", "3", "--batch-size", "4", "--max-steps", "3", "--method", "late", "--layer", "1"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ck = load_prompt(str(out))
    assert ck.meta["method"] == "late" and ck.meta["late"] == {"layer": 1, "layers": 2, "tokens": 3}
    assert ck.prompt.shape == (0, 32) and ck.extra["late.states"].shape == (3, 32) and ck.num_tokens == 3
    assert main(["eval", "--prompt", str(out), "--data", str(root / "train.jsonl")]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["accuracy"] == pytest.approx(summary["accuracy"])
    for fmt, dst in (("peft", tmp_path / "adapter"), ("prompt-table", tmp_path / "table")):
        assert main(["export", "--to", fmt, str(out), str(dst)]) == 2
        assert f"a late prompt cannot be exported to {fmt} (formats for late: none)" in capsys.readouterr().err
    assert main(["predict", "--prompt", str(out), "--data", str(root / "train.jsonl")]) == 0
    preds = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    pred = Predictor.load(str(out))
    assert [p["label"] for p in preds] == [d["label"] for d in pred.predict(str(root / "train.jsonl"))]
    # the saved states give exactly the reference's class probabilities
    pm, bb = pred.pm, pred.pm.backbone
    text = TEMPLATE.format(text=ROWS[0][0])
    ids = pm.encode_input(text)
    with torch.no_grad():
        h = reference_hidden(bb, pm.prefix_ids, ck.extra["late.states"], ids, 1)[-1]
        logp = bb.model.lm_head(h).log_softmax(-1)
    words = [w[0] for w in pm.verbalizer_ids(["bad", "good"], TEMPLATE)]
    got = pred.probs(pred.task.encode_texts([text])[0])[0]
    torch.testing.assert_close(got, logp[words].softmax(-1), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_prompt(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    tr = importlib.import_module("softprompt.train")
    full = train(run_config(root, "full.safetensors"), log=lambda s: None)
    orig = tr.batch_schedule

    def killed_at_step_3(lengths, batch_size, seed, step, accum, *rest):
        if step >= 2:
            raise KeyboardInterrupt
        return orig(lengths, batch_size, seed, step, accum, *rest)

    cfg = run_config(root, "part.safetensors")
    monkeypatch.setattr(tr, "batch_schedule", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=lambda s: None)
    monkeypatch.setattr(tr, "batch_schedule", orig)
    cfg.train.resume = cfg.train.out + ".state"
    part = train(cfg, log=lambda s: None)
    torch.testing.assert_close(load_prompt(part.out).extra["late.states"], load_prompt(full.out).extra["late.states"])
    assert run_identity(cfg, "x")["--prompt.layer"] == 1  # a resume that changes --layer is refused, naming it


# ---- serving, ensembles, exports ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_served_mixed_with_a_plain_prompt_equals_each_alone(root: Path, tmp_path: Path) -> None:
    import asyncio

    from serve_support import served

    from softprompt.serve.registry import Registry

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name, method in (("late", "late"), ("plain", "prompt")):
        cfg = run_config(root, str(tmp_path / f"{name}.safetensors"))
        cfg.prompt.method, cfg.prompt.layer = method, 1 if method == "late" else 0
        if name == "plain":
            cfg.data.template, cfg.prompt.num_tokens = "Text: {text} Mood:", 5  # another task, another width
        shutil.copy(train(cfg, log=lambda s: None).out, prompts / f"{name}.safetensors")
    bb = backbone("llama", root)
    reg = Registry(bb, prompts)
    names = ["late", "plain", "late", "plain"]

    async def go() -> list:
        async with served(reg, max_wait_ms=300) as (c, _):
            rs = await asyncio.gather(*(c.post("/v1/classify", json={"task": n, "inputs": TEXTS}) for n in names))
            return [r.json() for r in rs]

    results = asyncio.run(go())
    for name, res in zip(names, results, strict=True):
        pred = Predictor.load(str(prompts / f"{name}.safetensors"), backbone=bb)
        alone = pred.predict([pred.task.spec.template.format(text=t) for t in TEXTS])
        for got, ref in zip(res["results"], alone, strict=True):
            assert got["label"] == ref["label"]
            for k, v in ref.get("probs", ref.get("probabilities")).items():
                assert abs(got["probabilities"][k] - v) <= 1e-5


def test_ensemble_of_late_and_plain_prompts(root: Path, tmp_path: Path) -> None:
    """One Predictor, a late and a plain prompt of different lengths: the mean of each prompt's probabilities alone."""
    from softprompt.checkpoint import save_prompt

    bb = backbone("llama", root)
    meta = {"base_model": "x", "family": "causal", "fingerprint": bb.fingerprint, "template": "{text}",
            "labels": {"labels": ["n", "p"], "words": ["bad", "good"]}}  # fmt: skip
    lp, pp = tmp_path / "l.safetensors", tmp_path / "p.safetensors"
    save_prompt(lp, torch.zeros(0, 32), {**meta, "method": "late", "late": {"layer": 1, "layers": 2, "tokens": 3}},
                {"late.states": states(seed=4)})  # fmt: skip
    save_prompt(pp, states(5, seed=5), meta)
    assert_ensemble_is_the_mean(bb, [lp, pp], TEXTS)


def test_exports_are_refused_naming_the_formats(root: Path, tmp_path: Path) -> None:
    from softprompt.checkpoint import PromptCheckpoint

    ck = PromptCheckpoint(torch.zeros(0, 32), {"method": "late"}, {"late.states": states()}, path="x.safetensors")
    for fmt in ("peft", "prompt-table"):
        with pytest.raises(methods.MethodError, match=f"a late prompt cannot be exported to {fmt}"):
            methods.check_export(ck, fmt)


# ---- refusals -----------------------------------------------------------------------------------------------------
def test_bad_layer_and_families_are_refused(root: Path) -> None:
    with pytest.raises(ConfigError, match="--layer L .* is required by --method late"):
        RunConfig(prompt=PromptConfig(method="late"), data=DataConfig(train="x")).validate()
    with pytest.raises(ConfigError, match="--layer is for --method late"):
        RunConfig(prompt=PromptConfig(layer=2), data=DataConfig(train="x")).validate()
    pm = PromptedModel(backbone("llama", root))
    init = pm.embedding_matrix()[:3].detach()
    for bad in (0, 2, 5):
        with pytest.raises(ValueError, match=f"--layer must satisfy 0 < L < 2 .* got {bad}"):
            late.make_late_prompt(pm, init, bad)
    prefix = late.late_prefix(pm, states(), 1)
    b = pm.collate([pm.encode_input(TEXTS[0])])
    with pytest.raises(ValueError, match="a late prompt needs the K/V path, not a decode loop's cache"):
        pm.run_decoder(prefix, None, b.ids, b.mask, keep_cache=True)  # the serving decode loop's prefill
    for kind, family in (("bert", "encoder"), ("t5", "seq2seq")):
        other = PromptedModel(load_backbone(str(tiny_model_dir(kind, root / "tiny")), progress=False))
        with pytest.raises(ValueError, match=f"--method late: supported for decoder-only models, not {family}"):
            late.make_late_prompt(other, init, 1)


def test_an_architecture_that_cannot_run_in_parts_is_refused(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-2 entered at layer 1 without zeroing its position embeddings would add them twice: the load-time check
    sees the parts differ from the whole and refuses, naming the architecture."""
    from softprompt import layers
    from softprompt.arch import ArchitectureError

    pm = PromptedModel(backbone("gpt2", root))
    monkeypatch.setattr(layers, "ABSOLUTE_POSITIONS", ())
    with pytest.raises(ArchitectureError, match="--method late: GPT2LMHeadModel run from layer 1 on differs"):
        late.make_late_prompt(pm, pm.embedding_matrix()[:3].detach(), 1)


def test_init_is_the_plain_prompts_states_and_training_is_scale_aware(root: Path) -> None:
    """A fresh late prompt holds what layer L receives at a plain prompt's positions (the model's own hidden
    states, output_hidden_states); it trains as states = c * unit with c fixed (the median row RMS)."""
    bb = backbone("llama", root)
    pm = PromptedModel(bb)
    init = pm.embedding_matrix()[[5, 9, 11]].detach()
    lp = late.make_late_prompt(pm, init, 1)
    seq = torch.cat([pm.embed(torch.tensor(pm.prefix_ids)), init])[None]
    with torch.no_grad():
        hs = bb.model(inputs_embeds=seq, output_hidden_states=True).hidden_states  # hs[1]: what enters layer 1
    torch.testing.assert_close(lp.states.detach(), hs[1][0, -3:], atol=1e-5, rtol=1e-5)
    unit, scale = lp.trainable()
    assert unit.requires_grad and not scale.requires_grad
    torch.testing.assert_close(scale, hs[1][0, -3:].pow(2).mean(1).sqrt().median().reshape(1))
    torch.testing.assert_close(lp.saved()[1]["late.states"], lp.states.detach())
