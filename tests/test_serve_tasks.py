"""softprompt.serve in-process, the registry's life: admin add/replace/remove with persistence, auth and limits,
prompts refused at start, a 1,000-task registry with a bounded K/V cache, and encoder and encoder-decoder
backbones, each against Predictor / `softprompt predict` alone (the rest: test_serve.py).

Models are tiny and random (tests/tiny.py), re-drawn at a larger scale so that outputs depend on input and prompt.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save_file
from serve_support import (
    ADMIN,
    AUTH,
    TOL,
    assert_same,
    fill,
    lively_model_dir,
    load,
    make_prompt,
    run,
    served,
    write_causal_prompts,
)
from tiny import tiny_model_dir

from softprompt.api import Predictor
from softprompt.checkpoint import _encode_meta, load_prompt
from softprompt.serve import Registry


# ---- admin ---------------------------------------------------------------------------------------------
@pytest.fixture
def admin_reg(serve_llama: tuple[Path, Any], tmp_path: Path) -> Registry:
    d = tmp_path / "prompts"
    d.mkdir()
    write_causal_prompts(d, serve_llama[0], serve_llama[1])
    return Registry(serve_llama[1], d)


def test_admin_add_replace_remove_persist(admin_reg: Registry, serve_llama: tuple[Path, Any], tmp_path: Path) -> None:
    model_dir, bb = serve_llama
    v1 = make_prompt(tmp_path / "v1.safetensors", bb, model_dir, tokens=6, seed=11, template="Mood: {text}",
                     labels=["sad", "happy"])  # fmt: skip
    v2 = make_prompt(tmp_path / "v2.safetensors", bb, model_dir, tokens=2, seed=12, template="Mood: {text}",
                     labels=["sad", "happy"], scale=3.0)  # fmt: skip
    d = admin_reg.dir
    url = "/v1/admin/tasks/mood"
    body = {"task": "mood", "inputs": ["what a day"]}

    async def go() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with served(admin_reg) as (c, _):
            out["add"] = await c.post(url, content=v1.read_bytes(), headers=AUTH)
            out["dup"] = await c.post(url, content=v1.read_bytes(), headers=AUTH)
            out["c1"] = await c.post("/v1/classify", json=body)
            out["listed"] = await c.get("/v1/tasks")
            out["replace"] = await c.put(url, content=v2.read_bytes(), headers=AUTH)
            out["c2"] = await c.post("/v1/classify", json=body)
            out["garbage"] = await c.put(url, content=b"\x00" * 100, headers=AUTH)
            out["c3"] = await c.post("/v1/classify", json=body)
            out["by_path"] = await c.post("/v1/admin/tasks/mood.copy", json={"path": str(v1)}, headers=AUTH)
            out["no_path"] = await c.post("/v1/admin/tasks/x", json={"file": "a"}, headers=AUTH)
            out["bad_path"] = await c.post("/v1/admin/tasks/x", json={"path": str(tmp_path / "none")}, headers=AUTH)
            out["delete"] = await c.delete(url, headers=AUTH)
            out["gone"] = await c.post("/v1/classify", json=body)
            out["delete2"] = await c.delete(url, headers=AUTH)
        return out

    r = run(go())
    assert r["add"].status_code == 201 and r["add"].json()["replaced"] is False
    assert r["add"].json()["task"]["name"] == "mood"
    assert r["dup"].status_code == 409
    assert "mood" in {t["name"] for t in r["listed"].json()["tasks"]}
    assert_same(r["c1"].json()["results"][0], Predictor.load(str(v1), backbone=bb).predict(["Mood: what a day"])[0])
    assert r["replace"].status_code == 200 and r["replace"].json()["replaced"] is True
    assert_same(r["c2"].json()["results"][0], Predictor.load(str(v2), backbone=bb).predict(["Mood: what a day"])[0])
    assert r["c1"].json() != r["c2"].json()
    assert r["garbage"].status_code == 400 and r["garbage"].json()["error"]["param"] == "body"
    assert r["c3"].json() == r["c2"].json()  # a refused upload changes nothing
    assert r["by_path"].status_code == 201
    assert (d / "mood.copy.safetensors").read_bytes() == v1.read_bytes()
    assert r["no_path"].status_code == 422 and r["no_path"].json()["error"]["param"] == "path"
    assert r["bad_path"].status_code == 400
    assert r["delete"].status_code == 200 and r["gone"].status_code == 404 and r["delete2"].status_code == 404
    assert not (d / "mood.safetensors").exists()
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temporary files left behind
    # a restart serves the same tasks
    assert Registry(bb, d).names() == admin_reg.names()
    assert "mood.copy" in admin_reg.names()


def test_admin_validation_auth_and_limits(admin_reg: Registry, serve_llama: tuple[Path, Any], serve_root: Path,
                                          tmp_path: Path) -> None:  # fmt: skip
    model_dir, bb = serve_llama
    good = make_prompt(tmp_path / "good.safetensors", bb, model_dir, tokens=3, seed=1)
    other_bb = load(tiny_model_dir("qwen2", serve_root))  # same dim, another model: fingerprint differs
    foreign = make_prompt(tmp_path / "foreign.safetensors", other_bb, "qwen2", tokens=3)
    big = make_prompt(tmp_path / "big.safetensors", bb, model_dir, tokens=600)
    before = sorted(p.name for p in admin_reg.dir.iterdir())

    async def go() -> dict[str, httpx.Response]:
        out: dict[str, httpx.Response] = {}
        async with served(admin_reg, app_kw={"max_upload_bytes": 64 * 1024}) as (c, _):
            url = "/v1/admin/tasks/"
            out["no_token"] = await c.post(url + "a", content=good.read_bytes())
            out["bad_token"] = await c.post(url + "a", content=good.read_bytes(), headers={"Authorization": "Bearer x"})
            out["basic"] = await c.delete(url + "qa", headers={"Authorization": f"Basic {ADMIN}"})
            out["dots"] = await c.post(url + "..evil", content=good.read_bytes(), headers=AUTH)
            out["hidden"] = await c.post(url + ".hidden", content=good.read_bytes(), headers=AUTH)
            out["slash"] = await c.post(url + "a%2F..%2Fb", content=good.read_bytes(), headers=AUTH)
            out["long"] = await c.post(url + "a" * 65, content=good.read_bytes(), headers=AUTH)
            out["foreign"] = await c.post(url + "f", content=foreign.read_bytes(), headers=AUTH)
            out["big"] = await c.post(url + "b", content=big.read_bytes(), headers=AUTH)
            out["empty"] = await c.post(url + "e", content=b"", headers=AUTH)
            out["truncated"] = await c.post(url + "t", content=good.read_bytes()[:-10], headers=AUTH)
        async with served(admin_reg, admin_token=None) as (c, _):
            out["disabled"] = await c.post(url + "a", content=good.read_bytes(), headers=AUTH)
        return out

    r = run(go())
    for name in ("no_token", "bad_token", "basic"):
        assert r[name].status_code == 401, name
        assert r[name].headers["WWW-Authenticate"] == "Bearer"
    for name in ("dots", "hidden", "long"):
        assert r[name].status_code == 422 and r[name].json()["error"]["param"] == "name", name
    assert r["slash"].status_code in (404, 422)
    assert r["foreign"].status_code == 400 and "fingerprint" in r["foreign"].json()["error"]["message"]
    assert r["big"].status_code == 413
    assert r["empty"].status_code == 422
    assert r["truncated"].status_code == 400
    assert r["disabled"].status_code == 403
    assert sorted(p.name for p in admin_reg.dir.iterdir()) == before  # nothing written, nothing removed
    assert "qa" in admin_reg.names()


def test_refused_prompts_at_start(serve_llama: tuple[Path, Any], serve_root: Path, tmp_path: Path,
                                  caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    model_dir, bb = serve_llama
    make_prompt(tmp_path / "ok.safetensors", bb, model_dir)
    make_prompt(tmp_path / "foreign.safetensors", load(tiny_model_dir("qwen2", serve_root)), "qwen2")
    bert = load(tiny_model_dir("bert", serve_root))
    from softprompt.checkpoint import save_prompt

    save_prompt(
        tmp_path / "wrongdim.safetensors",
        torch.randn(3, 48),
        {"task": "classify", "labels": {"labels": ["a"], "words": ["a"]}},
    )
    make_prompt(tmp_path / "encoderhead.safetensors", bert, "bert", head="linear", linear_head=True)
    (tmp_path / "garbage.safetensors").write_bytes(b"not a prompt")
    make_prompt(tmp_path / "bad name.safetensors", bb, model_dir)
    with caplog.at_level(logging.WARNING, logger="softprompt.serve"):
        r = Registry(bb, tmp_path)
    assert r.names() == ["ok"]
    assert set(r.refused) == {"foreign", "wrongdim", "encoderhead", "garbage", "bad name"}
    assert "fingerprint" in r.refused["foreign"] and "dim" in r.refused["wrongdim"]
    assert "refusing prompt" in caplog.text

    async def go() -> tuple[httpx.Response, httpx.Response]:
        async with served(r) as (c, _):
            return await c.get("/v1/tasks"), await c.post("/v1/classify", json={"task": "foreign", "inputs": ["x"]})

    tasks, refused = run(go())
    assert {x["name"] for x in tasks.json()["refused"]} == set(r.refused)
    assert refused.status_code == 404


# ---- scale ---------------------------------------------------------------------------------------------
def test_thousand_tasks_with_a_bounded_kv_cache(serve_root: Path, tmp_path: Path) -> None:
    d = tiny_model_dir("llama", serve_root)
    bb = load(d)
    src = make_prompt(tmp_path / "src.bin", bb, d, tokens=2, template="Q: {text}", labels=["a", "b", "c"])
    meta = {k: v for k, v in load_prompt(src).meta.items() if k not in ("format", "format_version")}
    prompts = tmp_path / "many"
    prompts.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(1000):  # 1,000 distinct prompts (written without fsync: fast)
        prompt = torch.randn(2, bb.embed_dim, generator=gen) if i % 250 else load_prompt(src).prompt
        save_file({"prompt": prompt}, str(prompts / f"task-{i:04d}.safetensors"), metadata=_encode_meta(meta))
    reg = Registry(bb, prompts, kv_cache_mb=0.02)
    assert len(reg) == 1000
    one = reg.build_prefix(reg.get("task-0000")).nbytes()
    names = [f"task-{i:04d}" for i in [*range(0, 1000, 13), 500]]  # 78 tasks, more than the cache holds

    async def go() -> tuple[httpx.Response, httpx.Response, list[httpx.Response]]:
        async with served(reg, max_wait_ms=50, max_batch_size=64) as (c, _):
            rs = await asyncio.gather(*(c.post("/v1/classify", json={"task": n, "inputs": ["hello"]}) for n in names))
            return await c.get("/v1/tasks"), await c.get("/v1/models"), list(rs)

    tasks, models, rs = run(go())
    assert len(tasks.json()["tasks"]) == 1000 and len(models.json()["data"]) == 1000
    assert all(r.status_code == 200 for r in rs)
    same = [r.json()["results"][0]["probabilities"] for n, r in zip(names, rs, strict=True) if int(n[5:]) % 250 == 0]
    assert len(same) == 2 and all(abs(same[0][k] - same[1][k]) <= TOL for k in same[0])  # one prompt, two tasks
    info = reg.cache_info()
    assert info["bytes"] <= info["limit_bytes"] and info["entries"] <= 0.02 * 2**20 // one
    assert info["evictions"] > 0


# ---- other model families ------------------------------------------------------------------------------
def test_encoder_mixed_heads_equal_predict(serve_root: Path, tmp_path: Path) -> None:
    d = tiny_model_dir("bert", serve_root)
    bb = load(d)
    make_prompt(
        tmp_path / "lin2.safetensors", bb, d, tokens=3, seed=1, head="linear", linear_head=True, labels=["n", "p"]
    )
    make_prompt(tmp_path / "lin3.safetensors", bb, d, tokens=6, seed=2, head="linear", linear_head=True,
                labels=["a", "b", "c"], template="Topic: {text}")  # fmt: skip
    make_prompt(tmp_path / "sim.safetensors", bb, d, tokens=4, seed=3, head="similarity",
                labels=["sport", "science"], words=["a football match", "a physics paper"])  # fmt: skip
    reg = Registry(bb, tmp_path)
    assert reg.names() == ["lin2", "lin3", "sim"]
    cases = [("lin2", "great film"), ("lin3", "the election results"), ("sim", "goal in the last minute"),
             ("lin2", "a long and boring film with bad actors"), ("sim", "quarks")]  # fmt: skip

    async def go() -> tuple[list[Any], httpx.Response, list[Any]]:
        async with served(reg, max_wait_ms=300) as (c, s):
            rs = await asyncio.gather(*(c.post("/v1/classify", json={"task": t, "inputs": [x]}) for t, x in cases))
            gen = await c.post("/v1/generate", json={"task": "lin2", "input": "x"})
            return [r.json()["results"][0] for r in rs], gen, list(s.history)

    results, gen, history = run(go())
    assert history[0].tasks == 3 and history[0].rows == 5
    for (t, x), res in zip(cases, results, strict=True):
        pred = Predictor.load(str(tmp_path / f"{t}.safetensors"), backbone=bb)
        assert_same(res, pred.predict([fill(reg, t, x)])[0])
    assert gen.status_code == 400


def test_encoder_decoder_classify_and_generate(serve_root: Path, tmp_path: Path) -> None:
    d = lively_model_dir("t5", serve_root)
    bb = load(d)
    make_prompt(tmp_path / "yn.safetensors", bb, d, tokens=3, seed=1, labels=["yes", "no"], template="{text} ?")
    make_prompt(tmp_path / "topic.safetensors", bb, d, tokens=5, seed=2, labels=["s", "p"],
                words=["sports", "world politics"])  # fmt: skip
    make_prompt(tmp_path / "gen.safetensors", bb, d, tokens=4, seed=3, task="generate", template="say: {text}")
    reg = Registry(bb, tmp_path)
    cases = [("yn", "is it raining"), ("topic", "the match"), ("yn", "really")]

    async def go() -> tuple[list[Any], list[httpx.Response]]:
        async with served(reg, max_wait_ms=300) as (c, _):
            rs = await asyncio.gather(*(c.post("/v1/classify", json={"task": t, "inputs": [x]}) for t, x in cases))
            gens = await asyncio.gather(*(c.post("/v1/generate", json={"task": "gen", "input": x, "max_new_tokens": 8})
                                          for x in ("hello there", "a b c")))  # fmt: skip
            return [r.json()["results"][0] for r in rs], list(gens)

    results, gens = run(go())
    for (t, x), res in zip(cases, results, strict=True):
        pred = Predictor.load(str(tmp_path / f"{t}.safetensors"), backbone=bb)
        assert_same(res, pred.predict([fill(reg, t, x)])[0])
    pred = Predictor.load(str(tmp_path / "gen.safetensors"), backbone=bb)
    for x, g in zip(("hello there", "a b c"), gens, strict=True):
        assert g.status_code == 200
        assert g.json()["output"] == pred.generate([f"say: {x}"], max_new_tokens=8)[0]
