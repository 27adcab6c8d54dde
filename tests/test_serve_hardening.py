"""softprompt.serve under hostile or broken input, in-process (the probes that depend on real HTTP connections,
chunked bodies, stalled and vanished clients, run against a real server in test_serve_e2e.py): bounded work
before validation, a failing row failing alone, every invalid value a 422 in the error shape, bounded metrics
labels, a prompt directory with a symlink loop / FIFO / broken files, and admin path errors that quote nothing."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from serve_support import ADMIN, lively_model_dir, load, make_prompt, served

from softprompt.checkpoint import load_prompt, save_prompt
from softprompt.serve import Registry
from softprompt.serve.generation import GenRow

AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    d = lively_model_dir("llama", tmp_path_factory.mktemp("hard-models"))
    return d, load(d)


@pytest.fixture(scope="module")
def reg(llama: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> Registry:
    d, bb = llama
    out = tmp_path_factory.mktemp("hard-prompts")
    for k in range(3):
        make_prompt(out / f"s{k}.safetensors", bb, d, tokens=2 + k, seed=k, template="Review: {text} Mood:",
                    labels=["negative", "positive"], words=["bad", "good"])  # fmt: skip
    make_prompt(out / "qa.safetensors", bb, d, tokens=3, seed=7, task="generate", template="Q: {q} A:")
    return Registry(bb, out)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:300])
    e = json.loads(r.content.decode("utf-8"))["error"]  # valid JSON in the documented shape
    assert e["code"] == status and e["message"] and "type" in e, e
    if param is not None:
        assert e["param"] == param, e
    return e


# ---- (1) bounded work before validation ------------------------------------------------------------------
def test_long_input_refused_on_characters_and_tokenised_off_the_event_loop(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    pm = reg.get("s0").pm
    real, seen = pm.encode_input, []

    def spy(text: str) -> list[int]:
        seen.append((len(text), threading.current_thread().name))
        return real(text)

    monkeypatch.setattr(pm, "encode_input", spy)
    huge = "word " * 200_000  # 1 MB: within the body limit, far past the task's characters

    async def go() -> tuple[httpx.Response, ...]:
        async with served(reg) as (c, _):
            big = await c.post("/v1/classify", json={"task": "s0", "inputs": ["fine", huge]})
            gen = await c.post("/v1/generate", json={"task": "qa", "input": {"q": huge}})
            ok = await c.post("/v1/classify", json={"task": "s0", "inputs": ["fine"]})
            over = await c.post("/v1/classify", content=b"[" + b" " * (9 * 2**20) + b"]",
                                headers={"content-type": "application/json"})  # fmt: skip
            return big, gen, ok, over

    big, gen, ok, over = run(go())
    e = assert_error(big, 413, "inputs.1")
    assert "characters" in e["message"]
    assert_error(gen, 413, "input")
    assert_error(over, 413, "body")  # the 8 MiB default body limit
    assert ok.status_code == 200
    assert all(n < 10_000 for n, _ in seen), seen  # the huge input never reached the tokenizer
    assert seen and all(name.startswith("softprompt-tokenize") for _, name in seen), seen


def test_chunked_body_over_the_limit_is_cut_while_reading(reg: Registry) -> None:
    sent = [0]

    async def chunks() -> Any:  # no Content-Length: the limit must count what arrives
        for _ in range(64):
            sent[0] += 1
            yield b" " * 65536

    async def go() -> tuple[httpx.Response, httpx.Response]:
        async with served(reg, app_kw={"max_body_bytes": 2**20}) as (c, _):
            r = await c.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
            return r, await c.get("/healthz")

    r, health = run(go())
    assert_error(r, 413, "body")
    assert r.headers["connection"] == "close"
    assert sent[0] <= 20, sent  # it stopped reading soon after 1 MiB (16 chunks)
    assert health.status_code == 200


# ---- (3) a failing row fails alone ---------------------------------------------------------------------
def test_a_failing_row_fails_alone_and_its_batch_mates_finish(reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    good = [{"task": "qa", "input": {"q": f"question {i}"}, "max_new_tokens": 6} for i in range(4)]
    tiny_t = {"task": "qa", "input": {"q": "hot"}, "max_new_tokens": 6, "temperature": 1e-40, "seed": 1}
    bad = {"task": "qa", "input": {"q": "doomed"}, "max_new_tokens": 6, "temperature": 0.5, "seed": 666}
    real = GenRow.choose

    def choose(self: GenRow, logits: torch.Tensor) -> int:
        if self.params.seed == 666 and len(self.tokens) == 2:  # fails mid-generation, in a decoding step
            raise RuntimeError("sampling exploded")
        return real(self, logits)

    async def go() -> tuple[list[httpx.Response], list[httpx.Response], list[Any]]:
        async with served(reg) as (c, _):
            alone = [await c.post("/v1/generate", json=b) for b in good]
        monkeypatch.setattr(GenRow, "choose", choose)
        async with served(reg, max_wait_ms=300) as (c, s):
            together = await asyncio.wait_for(
                asyncio.gather(*(c.post("/v1/generate", json=b) for b in [good[0], tiny_t, good[1], bad, *good[2:]])),
                30,
            )
            return alone, list(together), list(s.history)

    alone, together, history = run(go())
    assert any(b.kind == "prefill" and b.rows == 6 for b in history), history  # one batch
    e = assert_error(together[3], 500)
    assert e["type"] == "server_error" and "RuntimeError" in e["message"]
    assert together[1].status_code == 200, together[1].text  # 1e-40: sampled without overflow (as greedy)
    outs = [r.json()["output"] for i, r in enumerate(together) if i not in (1, 3)]
    assert outs == [r.json()["output"] for r in alone]  # batch-mates finished, exactly as alone


# ---- (7) every invalid value: 422 in the documented shape ---------------------------------------------------
def test_invalid_values_are_422_in_the_error_shape(reg: Registry) -> None:
    def raw(obj: str) -> dict[str, Any]:
        return {"content": obj.encode(), "headers": {"content-type": "application/json"}}

    async def go() -> dict[str, httpx.Response]:
        async with served(reg) as (c, _):
            g, cl, co = "/v1/generate", "/v1/classify", "/v1/completions"
            return {
                "surrogate": await c.post(cl, **raw('{"task": "s0", "inputs": ["ok", "a\\ud800b"]}')),
                "surrogate_field": await c.post(g, **raw('{"task": "qa", "input": {"q": "\\udfff"}}')),
                "surrogate_prompt": await c.post(co, **raw('{"model": "qa", "prompt": "x\\ud800"}')),
                "surrogate_stop": await c.post(g, **raw('{"task": "qa", "input": "x", "stop": ["\\ud800"]}')),
                "surrogate_task": await c.post(cl, **raw('{"task": "\\ud800", "inputs": ["x"]}')),
                "nan": await c.post(g, **raw('{"task": "qa", "input": "x", "temperature": NaN}')),
                "inf": await c.post(g, **raw('{"task": "qa", "input": "x", "temperature": Infinity}')),
                "top_p_nan": await c.post(g, **raw('{"task": "qa", "input": "x", "top_p": NaN}')),
                "cmpl_nan": await c.post(co, **raw('{"model": "qa", "prompt": "x", "temperature": NaN}')),
                "seed": await c.post(g, json={"task": "qa", "input": "x", "temperature": 1, "seed": 2**70}),
                "cmpl_seed": await c.post(co, json={"model": "qa", "prompt": "x", "seed": -(2**70)}),
                "still_ok": await c.post(g, json={"task": "qa", "input": "x", "max_new_tokens": 2}),
            }

    r = run(go())
    for name in ("surrogate", "surrogate_field", "surrogate_prompt"):
        assert "surrogate" in assert_error(r[name], 422)["message"], name
    assert_error(r["surrogate"], 422, "inputs.1")
    assert_error(r["surrogate_prompt"], 422, "prompt")
    assert_error(r["surrogate_stop"], 422, "stop")
    assert_error(r["surrogate_task"], 404, "task")
    for name, param in (("nan", "temperature"), ("inf", "temperature"), ("top_p_nan", "top_p"),
                        ("cmpl_nan", "temperature"), ("seed", "seed"), ("cmpl_seed", "seed")):  # fmt: skip
        assert_error(r[name], 422, param)
    assert r["still_ok"].status_code == 200


# ---- (8) metrics labels bounded by the tasks -----------------------------------------------------------------
def test_ensembles_in_any_order_share_one_metrics_label(reg: Registry) -> None:
    orders = [["s0", "s1"], ["s1", "s0"], ["s0", "s1", "s2"], ["s2", "s0", "s1"], ["s1", "s2", "s0"], ["s2", "s1"]]

    async def go() -> tuple[list[httpx.Response], str]:
        async with served(reg) as (c, _):
            rs = [await c.post("/v1/classify", json={"task": o, "inputs": ["fine"]}) for o in orders]
            return rs, (await c.get("/metrics")).text

    rs, metrics = run(go())
    assert all(r.status_code == 200 for r in rs)
    tasks = {line.split('task="')[1].split('"')[0] for line in metrics.splitlines() if 'task="' in line}
    assert tasks <= {"s0", "s1", "s2", "qa", "-", "+ensemble"}, tasks
    assert 'softprompt_requests_total{code="200",endpoint="/v1/classify",task="+ensemble"} 6' in metrics


def test_a_removed_tasks_metrics_series_go_with_it(llama: tuple[Path, Any], tmp_path: Path) -> None:
    d, bb = llama
    for k in range(2):
        make_prompt(tmp_path / f"t{k}.safetensors", bb, d, seed=k)
    reg = Registry(bb, tmp_path)

    async def go() -> tuple[str, str]:
        async with served(reg) as (c, _):
            for k in range(2):
                assert (await c.post("/v1/classify", json={"task": f"t{k}", "inputs": ["x"]})).status_code == 200
            before = (await c.get("/metrics")).text
            assert (await c.delete("/v1/admin/tasks/t1", headers=AUTH)).status_code == 200
            return before, (await c.get("/metrics")).text

    before, after = run(go())
    assert 'task="t1"' in before and 'task="t1"' not in after and 'task="t0"' in after


# ---- (6, 10, 13) prompt files the registry refuses, the rest served ------------------------------------------
def test_prompt_dir_with_a_symlink_loop_a_fifo_and_invalid_tensors(llama: tuple[Path, Any], tmp_path: Path) -> None:
    d, bb = llama
    make_prompt(tmp_path / "ok.safetensors", bb, d)
    (tmp_path / "loop.safetensors").symlink_to(tmp_path / "loop.safetensors")
    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "nowhere")
    os.mkfifo(tmp_path / "fifo.safetensors")
    meta = {"base_model": str(d), "architecture": bb.architecture, "family": bb.family,
            "fingerprint": bb.fingerprint, "task": "classify", "head": "linear", "position": "auto",
            "labels": {"labels": ["a", "b"], "words": ["a", "b"]}}  # fmt: skip
    w = torch.randn(2, bb.embed_dim)
    w[0, 0] = float("inf")
    save_prompt(tmp_path / "infhead.safetensors", torch.randn(3, bb.embed_dim), meta,
                {"head.linear.weight": w, "head.linear.bias": torch.zeros(2)})  # fmt: skip
    save_prompt(tmp_path / "middle.safetensors", torch.randn(3, bb.embed_dim), {**meta, "head": "lm",
                "position": "middle"})  # fmt: skip
    r = Registry(bb, tmp_path)  # neither hangs nor raises
    assert r.names() == ["ok"]
    assert set(r.refused) == {"loop", "dangling", "fifo", "infhead", "middle"}, r.refused
    assert "not a regular file" in r.refused["fifo"]
    assert "symbolic links" in r.refused["loop"]
    assert "NaN or inf" in r.refused["infhead"] and "position" in r.refused["middle"]


# ---- (12) admin path errors quote nothing of the file ---------------------------------------------------------
def test_admin_path_errors_say_only_not_a_valid_prompt(llama: tuple[Path, Any], tmp_path: Path) -> None:
    d, bb = llama
    pdir = tmp_path / "prompts"
    pdir.mkdir()
    make_prompt(pdir / "ok.safetensors", bb, d)
    reg = Registry(bb, pdir)
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:$6$saltsalt$hashhashhash:19000:0:99999:7:::\n" * 20)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    paths = [str(secret), str(fifo), str(tmp_path / "missing"), str(tmp_path), "/dev/zero"]

    w = torch.randn(2, bb.embed_dim)
    w[0, 0] = float("inf")
    infhead = tmp_path / "infhead.safetensors"
    make_prompt(infhead, bb, d, head="linear", linear_head=True)
    ck = load_prompt(infhead)
    meta = {k: v for k, v in ck.meta.items() if k not in ("format", "format_version")}
    save_prompt(infhead, ck.prompt, meta, {**ck.extra, "head.linear.weight": w})

    async def go() -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
        async with served(reg) as (c, _):
            rs = [
                await asyncio.wait_for(c.post(f"/v1/admin/tasks/t{i}", json={"path": p}, headers=AUTH), 10)
                for i, p in enumerate(paths)
            ]
            up = await c.post("/v1/admin/tasks/inf", content=infhead.read_bytes(), headers=AUTH)
            by_path = await c.post("/v1/admin/tasks/inf", json={"path": str(infhead)}, headers=AUTH)
            return rs, up, by_path

    rs, up, by_path = run(go())
    assert "NaN or inf" in assert_error(up, 400, "body")["message"]  # (6) an inf head is refused, not registered
    assert "NaN or inf" in assert_error(by_path, 400, "path")["message"]  # a softprompt file: the reason is given
    messages = {assert_error(r, 400, "path")["message"].replace(p, "PATH") for r, p in zip(rs, paths, strict=True)}
    assert messages == {"path 'PATH': not a valid prompt file on the server"}, messages
    assert reg.names() == ["ok"] and sorted(x.name for x in pdir.iterdir()) == ["ok.safetensors"]


# ---- the new limits are flags of `softprompt serve`, checked at start ------------------------------------------
def test_limit_flags_parse_into_serve_config_and_are_checked(tmp_path: Path) -> None:
    from softprompt.config import ConfigError
    from softprompt.parsers import build_parser
    from softprompt.serve import ServeConfig

    args = build_parser().parse_args(["serve", "--prompts", str(tmp_path), "--max-body-mb", "2", "--max-input-chars",
                                      "100", "--max-connections", "5", "--header-timeout-s", "1.5",
                                      "--body-timeout-s", "3", "--keep-alive-s", "2"])  # fmt: skip
    cfg = ServeConfig(**{k: v for k, v in vars(args).items() if k in ServeConfig.__dataclass_fields__})
    assert (cfg.max_body_mb, cfg.max_input_chars, cfg.max_connections) == (2.0, 100, 5)
    assert (cfg.header_timeout_s, cfg.body_timeout_s, cfg.keep_alive_s) == (1.5, 3.0, 2.0)
    cfg.validate()
    for field, bad in (("max_connections", 0), ("header_timeout_s", 0.0), ("body_timeout_s", float("nan")),
                       ("max_body_mb", -1.0), ("max_input_chars", 0), ("timeout_s", float("inf"))):  # fmt: skip
        with pytest.raises(ConfigError):
            ServeConfig(prompts=str(tmp_path), **{field: bad}).validate()
