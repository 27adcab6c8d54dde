"""Routed prompts (softprompt.routed, `--method routed`): K prompts and a router, each input under exactly one.

Independent reference: each row by hand, alone: its summary (the mean of its token embeddings read off the model's
embedding matrix, float64, layer-normalised), its route (argmax of W x + b), then the model's own forward on
`inputs_embeds` = [lead token][that route's prompt, unscaled][input tokens], scored as the family scores (decoder:
next-token log-probs of the verbalizer; encoder: mean-pooled output through the linear head; encoder-decoder: the
decoder's mean log-prob of each label). The helpers here are shared with tests/test_conditioned.py.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers_train import assert_cli_error, assert_ensemble_is_the_mean, log_records, run

from softprompt import methods
from softprompt.api import Predictor
from softprompt.checkpoint import load_prompt, save_prompt
from softprompt.config import DataConfig, ModelConfig, PromptConfig, RunConfig, TrainConfig
from softprompt.dynamic import input_summary
from softprompt.models import Backbone
from softprompt.prompted import PromptedModel
from softprompt.routed import RoutedPrompt
from softprompt.train import train

TEXTS = ["the film was a delight from start to finish", "dull", "an honest quiet story", "not good", "fine i guess"]
WORDS = ["good", "bad"]
BackboneFn = Callable[[str], Backbone]


# ---- independent reference --------------------------------------------------------------------------------
def input_ids(bb: Backbone, text: str) -> list[int]:
    """The input's tokens after the lead token: decoders without special tokens, encoders without [CLS]."""
    if bb.family == "causal":
        return list(bb.tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(bb.tokenizer(text)["input_ids"])[1:]


def summary(bb: Backbone, ids: list[int]) -> torch.Tensor:
    """(d,) layer-normalised float64 mean of the rows of the embedding matrix for `ids`."""
    w = bb.model.get_input_embeddings().weight.detach().double()
    m = w[torch.tensor(ids)].mean(0)
    return F.layer_norm(m, m.shape).float()


def ref_probs(
    bb: Backbone, prompt: torch.Tensor, text: str, head: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """(L,) class probabilities of one input alone behind [lead][prompt]: the model's own forward on embeddings."""
    emb = bb.model.get_input_embeddings()
    lead = torch.tensor([bb.tokenizer.cls_token_id])
    ids = input_ids(bb, text)
    x = torch.cat([emb(lead), prompt.float(), emb(torch.tensor(ids))])[None]  # (1, 1+P+T, d)
    P = prompt.shape[0]
    if bb.family == "encoder":
        h = bb.model(inputs_embeds=x).last_hidden_state[0]  # (1+P+T, d)
        keep = torch.ones(h.shape[0], dtype=torch.bool)
        keep[1 : 1 + P] = False  # pooling: [CLS] and the input, not the prompt slots
        assert head is not None
        return (head[0] @ h[keep].mean(0) + head[1]).softmax(-1)
    words = [list(bb.tokenizer(w, add_special_tokens=False)["input_ids"]) for w in WORDS]
    if bb.family == "causal":
        logp = bb.model(inputs_embeds=x).logits[0, -1].float().log_softmax(-1)
        assert all(len(w) == 1 for w in words)
        return torch.stack([logp[w[0]] for w in words]).softmax(-1)
    scores = []  # encoder-decoder: mean log-prob of the label's tokens then EOS
    for w in words:
        lab = torch.tensor([w + [bb.tokenizer.eos_token_id]])
        logp = bb.model(inputs_embeds=x, labels=lab).logits[0].float().log_softmax(-1)
        scores.append(torch.stack([logp[j, t] for j, t in enumerate(lab[0].tolist())]).mean())
    return torch.stack(scores).softmax(-1)


def file_meta(bb: Backbone, head: str = "lm") -> dict:
    return {
        "base_model": "tiny",
        "family": bb.family,
        "fingerprint": bb.fingerprint,
        "template": "{text}",
        "head": head,
        "labels": {"labels": ["p", "n"], "words": WORDS},
    }


def random_head(bb: Backbone, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, bb.embed_dim, generator=g), torch.randn(2, generator=g)


def routed_file(
    bb: Backbone, path: Path, k: int = 3, p: int = 3, seed: int = 0
) -> tuple[Path, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A routed prompt file with random routes (K, P, d) and router (K, d), (K,); its head for an encoder."""
    g = torch.Generator().manual_seed(seed)
    d = bb.embed_dim
    routes = torch.randn(k, p, d, generator=g) * 0.5
    w, b = torch.randn(k, d, generator=g) * 3, torch.randn(k, generator=g) * 0.1
    extra = {"routed.router.weight": w, "routed.router.bias": b}
    head = "lm"
    if bb.family == "encoder":
        hw, hb = random_head(bb, seed + 1)
        extra |= {"head.linear.weight": hw, "head.linear.bias": hb}
        head = "linear"
    meta = {**file_meta(bb, head), "method": "routed", "routed": {"routes": k, "tokens": p}}
    save_prompt(path, routes.reshape(k * p, d), meta, extra)
    return path, routes, w, b


# ---- the forward is exact ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "bert", "t5"])
def test_scores_match_the_hand_built_route(kind: str, tiny_backbone: BackboneFn, tmp_path: Path) -> None:
    bb = tiny_backbone(kind)
    path, routes, w, b = routed_file(bb, tmp_path / "r.safetensors")
    pred = Predictor.load(str(path), backbone=bb)
    enc, _ = pred.task.encode_texts(TEXTS)
    assert [e.input_ids for e in enc] == [input_ids(bb, t) for t in TEXTS]
    with torch.no_grad():
        got = pred.probs(enc)  # one batch, padded, several routes
        chosen = [int((w @ summary(bb, input_ids(bb, t)) + b).argmax()) for t in TEXTS]
        head = (
            (load_prompt(path).extra["head.linear.weight"], load_prompt(path).extra["head.linear.bias"])
            if kind == "bert"
            else None
        )
        want = torch.stack([ref_probs(bb, routes[k], t, head) for k, t in zip(chosen, TEXTS, strict=True)])
    assert len(set(chosen)) >= 2  # the batch mixes routes
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert pred.prefix.routes[0].tolist() == [chosen.count(k) for k in range(3)]  # type: ignore[union-attr]
    # each row alone: the same probabilities (the route does not depend on the batch)
    for i, e in enumerate(enc):
        torch.testing.assert_close(pred.probs([e])[0], got[i], rtol=0, atol=1e-5)


def test_an_ensemble_mixes_routed_and_plain_prompts(tiny_backbone: BackboneFn, tmp_path: Path) -> None:
    bb = tiny_backbone("llama")
    routed, *_ = routed_file(bb, tmp_path / "r.safetensors", seed=3)
    plain = tmp_path / "p.safetensors"
    save_prompt(plain, torch.randn(5, bb.embed_dim, generator=torch.Generator().manual_seed(4)), file_meta(bb))
    assert_ensemble_is_the_mean(bb, [routed, plain], TEXTS)


# ---- training ------------------------------------------------------------------------------------------------
def test_training_forward_is_the_route_and_gradients_reach_only_prompt_and_router(tiny_backbone: BackboneFn) -> None:
    bb = tiny_backbone("llama")
    pm = PromptedModel(bb)
    torch.manual_seed(0)
    rp_mod = RoutedPrompt(torch.randn(3, bb.embed_dim) * 0.3, 4, balance_weight=0.5)
    with torch.no_grad():  # distinct routes and a non-trivial router
        rp_mod.routes.add_(torch.randn_like(rp_mod.routes) * 0.3)
        rp_mod.router.weight.normal_()
    batch = pm.collate([pm.encode_input(t) for t in TEXTS], labels=[0, 1, 0, 1, 0])
    out = rp_mod.row_prefix(pm, batch.ids, batch.mask, train=True)
    assert out.routes is not None and out.rows is not None and out.aux is not None
    lead = len(pm.prefix_ids)
    # value: exactly the chosen route's prompt (no gate scaling)
    assert torch.equal(out.prefix.embeds[:, lead:].float(), rp_mod.routes.detach()[out.routes])
    label_ids = [[bb.tokenizer.convert_tokens_to_ids(w)] for w in WORDS]
    loss = pm.loss(out.prefix, batch, label_ids, rows=out.rows) + out.aux
    loss.backward()
    assert all(p.grad is None for p in bb.model.parameters())  # the backbone stays frozen
    g = rp_mod.routes.grad
    assert g is not None
    taken = set(out.routes.tolist())
    for k in range(4):  # a route's tensor learns only from the rows that took it
        assert (g[k].abs().sum() > 0) == (k in taken)
    assert rp_mod.router.weight.grad is not None and rp_mod.router.weight.grad.abs().sum() > 0


def test_routes_start_distinct_seeded_and_the_router_random() -> None:
    """Route k = the --init prompt + seeded Gaussian noise (--route-noise, relative to the init's RMS); the router's
    weight ~ N(0, 0.1 / d) (Switch's scale-0.1 init), bias 0; the same seed gives the same tensors."""
    init = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    a, b = RoutedPrompt(init, 4, 0.1, noise=0.1, seed=7), RoutedPrompt(init, 4, 0.1, noise=0.1, seed=7)
    assert torch.equal(a.routes, b.routes) and torch.equal(a.router.weight, b.router.weight)
    c = RoutedPrompt(init, 4, 0.1, noise=0.1, seed=8)
    assert not torch.equal(a.routes, c.routes) and not torch.equal(a.router.weight, c.router.weight)
    rms = float(init.pow(2).mean().sqrt())
    for i in range(4):
        dev = float((a.routes[i].detach() - init).pow(2).mean().sqrt()) / rms
        assert 0.05 < dev < 0.2  # near the init, 0.1 of its RMS away
        for j in range(i):
            assert not torch.allclose(a.routes[i], a.routes[j])
    assert a.router.weight.abs().sum() > 0 and float(a.router.weight.detach().std()) == pytest.approx(
        (0.1 / 16) ** 0.5, rel=0.3
    )
    assert torch.equal(a.router.bias, torch.zeros(4))
    same = RoutedPrompt(init, 4, 0.1, noise=0.0, seed=7)
    assert all(torch.equal(r, init) for r in same.routes)  # --route-noise 0: every route is the init


def test_the_router_centre_folds_into_the_saved_bias(tiny_backbone: BackboneFn) -> None:
    """The router scores x - c (c: the mean training summary); the file holds W and b - W c, so the saved router's
    argmax W x + b' is the trained one's and a row's route needs no centre at inference. At init, a random router
    through the centre already splits inputs that share most of their summary (a long common template)."""
    bb = tiny_backbone("llama")
    pm = PromptedModel(bb)
    rp = RoutedPrompt(torch.randn(2, bb.embed_dim) * 0.3, 3, 0.1, noise=0.1, seed=0)
    common = "the following is a short review of a film and the sentiment of the review : "
    texts = [common + t for t in TEXTS * 4]
    inputs = [pm.encode_input(t) for t in texts]
    rp.fit_inputs(pm, inputs)
    batch = pm.collate(inputs)
    x = input_summary(pm, batch.ids, batch.mask)
    torch.testing.assert_close(rp.center, x.double().mean(0).float())
    _, tensors, _ = rp.saved()
    w, b = tensors["routed.router.weight"], tensors["routed.router.bias"]
    torch.testing.assert_close(x @ w.T + b, (x - rp.center) @ rp.router.weight.T + rp.router.bias)
    out = rp.row_prefix(pm, batch.ids, batch.mask, train=False)
    assert out.routes is not None and torch.equal(out.routes, (x @ w.T + b).argmax(-1))
    assert len(set(out.routes.tolist())) >= 2


def test_routes_follow_the_input_when_the_right_route_depends_on_it(
    sharp_backbone: BackboneFn, tiny_models_root: Path, tmp_path: Path
) -> None:
    """Two clusters of inputs (fruit words: label good; landscape words: label bad) behind a long common template:
    trained with the defaults, the router sends each cluster to its own route (both routes used on the evaluation
    rows, each cluster's rows >= 15 of 16 to one route). Before the route-collapse fix (identical routes, a zero
    router on the uncentred summary, balance weight 0.01) this ended with the clusters mixed over the routes."""
    import random

    bb = sharp_backbone("llama")
    fruit = "apple banana cherry grape lemon mango peach pear plum melon".split()
    land = "river mountain ocean forest desert valley island canyon glacier meadow".split()
    rng = random.Random(0)
    clusters = [[" ".join(rng.choice(words) for _ in range(4)) for _ in range(16)] for words in (fruit, land)]
    rows = [{"text": t, "label": lab} for a, b in zip(*clusters, strict=True) for t, lab in ((a, "p"), (b, "n"))]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = ("the following is a short review of a film , and the sentiment of the review , written by a critic for "
                "a newspaper in the city : {text} . the sentiment of this review is")  # fmt: skip
    cfg = RunConfig(
        model=ModelConfig(model=str(tiny_models_root / "sharp-llama"), device="cpu"),
        data=DataConfig(train=str(data), eval=str(data), template=template, labels="p=good,n=bad"),
        prompt=PromptConfig(num_tokens=2, init="labels", method="routed", routes=2),
        train=TrainConfig(
            max_steps=30,
            batch_size=8,
            lr=0.3,
            warmup_steps=0,
            progress=False,
            eval_every=30,
            out=str(tmp_path / "c.safetensors"),
        ),  # fmt: skip
    )
    res = train(cfg, backbone=bb, log=lambda s: None)
    per = []
    for texts in clusters:
        pred = Predictor.load(res.out, backbone=bb)
        pred.predict(texts)
        per.append(pred.prefix.routes[0].tolist())  # type: ignore[union-attr]
    assert sum(1 for k in range(2) if per[0][k] + per[1][k] > 0) == 2  # both routes used on the evaluation rows
    a, b = (max(range(2), key=lambda k: c[k]) for c in per)  # each cluster's main route
    assert a != b and per[0][a] >= 15 and per[1][b] >= 15, per
    assert res.metrics["accuracy"] >= 0.9


def run_config(model: Path, data: Path, out: Path, **prompt: object) -> RunConfig:
    return RunConfig(
        model=ModelConfig(model=str(model), device="cpu"),
        data=DataConfig(train=str(data), eval=str(data), template="{text}", labels="p=good,n=bad"),
        prompt=PromptConfig(num_tokens=3, init="vocab", method="routed", routes=2, **prompt),  # type: ignore[arg-type]
        train=TrainConfig(
            max_steps=4, batch_size=4, lr=0.05, warmup_steps=0, progress=False, save_every=2, eval_every=2, out=str(out)
        ),  # fmt: skip
    )


def write_data(path: Path) -> Path:
    rows = [{"text": t, "label": "p" if i % 2 == 0 else "n"} for i, t in enumerate(TEXTS * 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_resume_gives_the_uninterrupted_prompt(
    tiny_dir: Callable[[str], Path], tiny_backbone: BackboneFn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tr = importlib.import_module("softprompt.train")
    data = write_data(tmp_path / "d.jsonl")
    bb = tiny_backbone("llama")
    full = train(run_config(tiny_dir("llama"), data, tmp_path / "full.safetensors"), backbone=bb, log=lambda s: None)
    orig = tr.batch_schedule

    def killed(lengths, batch_size, seed, step, accum, *rest):  # type: ignore[no-untyped-def]
        if step >= 3:
            raise KeyboardInterrupt
        return orig(lengths, batch_size, seed, step, accum, *rest)

    cfg = run_config(tiny_dir("llama"), data, tmp_path / "part.safetensors")
    monkeypatch.setattr(tr, "batch_schedule", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, backbone=bb, log=lambda s: None)
    monkeypatch.setattr(tr, "batch_schedule", orig)
    cfg.train.resume = cfg.train.out + ".state"
    part = train(cfg, backbone=bb, log=lambda s: None)
    a, b = load_prompt(full.out), load_prompt(part.out)
    torch.testing.assert_close(b.prompt, a.prompt)
    for k in ("routed.router.weight", "routed.router.bias"):
        torch.testing.assert_close(b.extra[k], a.extra[k])
    assert not torch.equal(a.prompt[:3], a.prompt[3:])  # the two routes trained apart


def test_cli_train_eval_predict_info_and_export(
    tiny_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "r.safetensors"
    argv = ["train", "--model", str(tiny_dir("bert")), "--train", str(data), "--eval", str(data), "--out", str(out),
            "--labels", "p=good,n=bad", "--head", "linear", "--method", "routed", "--routes", "3",
            "--balance-weight", "0.1", "--route-noise", "0.2", "--num-tokens", "2", "--max-steps", "3", "--batch-size", "4",
            "--warmup-steps", "0", "--device", "cpu", "--no-progress"]  # fmt: skip
    rc, _, err = run(capsys, argv)
    assert rc == 0, err
    ck = load_prompt(out)
    assert ck.meta["method"] == "routed" and ck.prompt.shape == (6, ck.embed_dim)
    assert ck.meta["routed"]["routes"] == 3 and ck.meta["routed"]["balance_weight"] == 0.1
    assert ck.meta["train_config"]["prompt"]["route_noise"] == 0.2
    rc, info, _ = run(capsys, ["info", str(out)])
    routes = json.loads(info)["routed"]["eval_routes"]  # rows per route in the evaluation at save
    assert rc == 0 and sum(routes) == len(TEXTS) * 2 and len(routes) == 3
    logged = [r for r in log_records(out) if "eval_route0_rows" in r][-1]  # and in the training log
    assert [logged[f"eval_route{k}_rows"] for k in range(3)] == routes
    rc, ev, err = run(capsys, ["eval", "--prompt", str(out), "--data", str(data)])
    assert rc == 0, err
    assert json.loads(ev)["accuracy"] == pytest.approx(ck.meta["metrics"]["accuracy"])
    rc, pr, err = run(capsys, ["predict", "--prompt", str(out), "--data", str(data)])
    assert rc == 0, err
    want = [r["label"] for r in Predictor.load(str(out)).predict(str(data))]
    assert [json.loads(line)["label"] for line in pr.splitlines()] == want
    for fmt in ("peft", "prompt-table"):
        rc, o, e = run(capsys, ["export", "--to", fmt, str(out), str(tmp_path / f"x-{fmt}")])
        assert_cli_error(rc, o, e, f"a routed prompt cannot be exported to {fmt} (formats for routed: none)")
    assert methods.get("routed").exports == frozenset()


def test_generation_tasks_are_refused(tiny_dir: Callable[[str], Path], tmp_path: Path) -> None:
    from softprompt.config import ConfigError

    data = tmp_path / "g.jsonl"
    data.write_text("".join(json.dumps({"text": t, "target": "x"}) + "\n" for t in TEXTS))
    cfg = run_config(tiny_dir("llama"), data, tmp_path / "g.safetensors")
    cfg.data.task, cfg.data.labels, cfg.data.eval = "generate", None, None
    with pytest.raises(ConfigError, match="--method routed: classification tasks only"):
        train(cfg, log=lambda s: None)


# ---- served in a mixed batch -----------------------------------------------------------------------------------
def test_served_in_a_batch_mixed_with_a_plain_prompt(tiny_backbone: BackboneFn, tmp_path: Path) -> None:
    from softprompt.serve import pipeline as pl
    from softprompt.serve.registry import Registry

    bb = tiny_backbone("llama")
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    routed_file(bb, prompts / "routed.safetensors", seed=5)
    save_prompt(prompts / "plain.safetensors", torch.randn(4, bb.embed_dim, generator=torch.Generator().manual_seed(6)),
                {**file_meta(bb), "labels": {"labels": ["x", "y"], "words": ["bad", "good"]}})  # fmt: skip
    reg = Registry(bb, prompts)
    rows = [(reg.get(n), reg.encode(reg.get(n), t, "input")) for t in TEXTS for n in ("routed", "plain")]
    counted: list[tuple[str, list[int]]] = []
    got = pl.classify_rows(reg, rows, max_batch_size=64, routes=lambda e, r: counted.append((e.name, r.tolist())))
    for name in ("routed", "plain"):
        pred = Predictor.load(str(prompts / f"{name}.safetensors"), backbone=bb)
        alone = pred.predict(TEXTS)
        mine = [g for g, (e, _) in zip(got, rows, strict=True) if e.name == name]
        for g, a in zip(mine, alone, strict=True):
            assert g["label"] == a["label"]
            for lab, v in a["probs"].items():
                assert abs(g["probabilities"][lab] - v) <= 1e-5
    assert [n for n, _ in counted] == ["routed"] and len(counted[0][1]) == len(TEXTS)
    assert len(set(counted[0][1])) >= 2


def test_the_server_counts_routes_taken(tiny_backbone: BackboneFn, tmp_path: Path) -> None:
    """POST /v1/classify on a routed task, mixed with a plain task: /metrics counts its rows per route, the route
    each input's own summary picks (computed by hand)."""
    import asyncio
    import re

    from serve_support import served

    from softprompt.serve.registry import Registry

    bb = tiny_backbone("llama")
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    _, _, w, b = routed_file(bb, prompts / "routed.safetensors", seed=5)
    save_prompt(prompts / "plain.safetensors", torch.randn(4, bb.embed_dim), file_meta(bb))
    reg = Registry(bb, prompts)

    async def go() -> str:
        async with served(reg, max_wait_ms=200) as (c, _):
            rs = await asyncio.gather(*(c.post("/v1/classify", json={"task": n, "inputs": TEXTS})
                                        for n in ("routed", "plain")))  # fmt: skip
            assert all(r.status_code == 200 for r in rs)
            return (await c.get("/metrics")).text

    text = asyncio.run(go())
    want = [int((w @ summary(bb, input_ids(bb, t)) + b).argmax()) for t in TEXTS]
    got = {
        int(m[1]): float(m[2])
        for m in re.finditer(r'softprompt_routes_total\{route="(\d+)",task="routed"\} (\S+)', text)
    }
    assert got == {k: float(want.count(k)) for k in set(want)}
    assert 'task="plain"' not in "".join(line for line in text.splitlines() if "routes_total{" in line)
