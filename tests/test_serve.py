"""softprompt.serve in-process: every endpoint and error through httpx's ASGI transport, exactness of mixed-task
batches against `softprompt predict` / Predictor alone, iteration-level generation, the OpenAI API, metrics, errors
and limits, graceful shutdown, and decoder-head tasks beside verbalizer tasks (admin changes, refusals, many tasks
and other backbones: test_serve_tasks.py).

Models are tiny and random (tests/tiny.py), re-drawn at a larger scale so that outputs depend on input and prompt.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_support import (
    assert_same,
    fill,
    make_prompt,
    run,
    served,
    sse_events,
    write_causal_prompts,
)

from softprompt import cli
from softprompt.api import Predictor
from softprompt.evaluate import generate_ids
from softprompt.serve import GenParams, Registry, Scheduler
from softprompt.serve.registry import TaskEntry


# ---- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prompts(serve_llama: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    d, bb = serve_llama
    return write_causal_prompts(tmp_path_factory.mktemp("prompts"), d, bb)


@pytest.fixture(scope="module")
def reg(serve_llama: tuple[Path, Any], prompts: Path) -> Registry:
    return Registry(serve_llama[1], prompts)


CLASSIFY_CASES: list[tuple[str, Any]] = [
    ("sentiment", "a great movie"),
    ("topic", "the match ended in a draw after extra time"),
    ("sentiment", "awful acting, a dull plot and far too long"),
    ("nli", {"premise": "A man sleeps on a bench", "hypothesis": "a person rests"}),
    ("topic", "parliament voted"),
    ("nli", {"premise": "It rains", "hypothesis": "the street is dry"}),
]


# ---- exactness -----------------------------------------------------------------------------------------
def test_mixed_task_classify_batch_equals_predict_alone(
    serve_llama: tuple[Path, Any], prompts: Path, reg: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def go() -> tuple[list[Any], list[Any]]:
        async with served(reg, max_wait_ms=400) as (c, s):
            rs = await asyncio.gather(*[c.post("/v1/classify", json={"task": t, "inputs": [x]})
                                        for t, x in CLASSIFY_CASES])  # fmt: skip
            return [r.json() for r in rs], list(s.history)

    results, history = run(go())
    assert any(b.kind == "classify" and b.tasks == 3 and b.rows == len(CLASSIFY_CASES) for b in history), history
    bb = serve_llama[1]
    for (task, x), res in zip(CLASSIFY_CASES, results, strict=True):
        assert res["task"] == task and len(res["results"]) == 1
        pred = Predictor.load(str(prompts / f"{task}.safetensors"), backbone=bb)
        assert_same(res["results"][0], pred.predict([fill(reg, task, x)])[0])
    # and the command line itself, on a data file holding just that input
    task, x = CLASSIFY_CASES[1]
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"text": x}) + "\n")
    assert cli.main(["predict", "--prompt", str(prompts / f"{task}.safetensors"), "--data", str(data),
                     "--device", "cpu"]) == 0  # fmt: skip
    assert_same(results[1]["results"][0], json.loads(capsys.readouterr().out.strip()))


def test_ensemble_of_tasks_equals_predictor_ensemble(serve_llama: tuple[Path, Any], tmp_path: Path) -> None:
    d, bb = serve_llama
    for k in range(3):  # three prompts of one task (as if trained with different seeds)
        make_prompt(tmp_path / f"s{k}.safetensors", bb, d, tokens=3 + k, seed=10 + k, template="Review: {text} Mood:",
                    labels=["negative", "positive"], words=["bad", "good"])  # fmt: skip
    make_prompt(tmp_path / "topic.safetensors", bb, d, tokens=2, seed=9, template="{text}\nTopic:",
                labels=["sport", "politics"], words=["sports", "politics"])  # fmt: skip
    reg = Registry(bb, tmp_path)
    texts = ["a great movie", "dull and far too long", "fine"]
    names = ["s0", "s1", "s2"]

    async def go() -> tuple[list[httpx.Response], list[Any]]:
        async with served(reg, max_wait_ms=200) as (c, s):
            rs = [await c.post("/v1/classify", json={"task": names, "inputs": texts, "combine": how})
                  for how in ("mean", "vote")]  # fmt: skip
            rs.append(await c.post("/v1/classify", json={"task": ["s0", "topic"], "inputs": ["x"]}))
            rs.append(await c.post("/v1/classify", json={"task": ["s0", "s0"], "inputs": ["x"]}))
            rs.append(await c.post("/v1/classify", json={"task": ["s0", "nope"], "inputs": ["x"]}))
            rs.append(await c.post("/v1/classify", json={"task": names, "inputs": ["x"], "combine": "max"}))
            return rs, list(s.history)

    (mean, vote, mixed, dup, unknown, bad), history = run(go())
    assert mean.status_code == 200 and mean.json()["task"] == names
    assert any(b.kind == "classify" and b.tasks == 3 and b.rows == 3 * len(texts) for b in history), history
    paths = [str(tmp_path / f"{n}.safetensors") for n in names]
    filled = [f"Review: {t} Mood:" for t in texts]
    for resp, how in ((mean, "mean"), (vote, "vote")):
        alone = Predictor.load(paths, backbone=bb, combine=how).predict(filled)
        for server, ref in zip(resp.json()["results"], alone, strict=True):
            assert server["label"] == ref["label"]
            ref_p = ref.get("probs", ref.get("probabilities"))
            total = sum(ref_p.values())
            for lab, v in ref_p.items():
                assert abs(server["probabilities"][lab] - v / total) <= 1e-5, (how, lab)
    assert mixed.status_code == 422 and mixed.json()["error"]["param"] == "task.1"
    assert dup.status_code == 422 and unknown.status_code == 404 and bad.status_code == 422


def test_several_inputs_per_request_and_field_objects(reg: Registry) -> None:
    async def go() -> list[httpx.Response]:
        async with served(reg) as (c, _):
            return [
                await c.post("/v1/classify", json={"task": "sentiment", "inputs": ["good", "bad", {"text": "meh"}]}),
                await c.post("/v1/classify", json={"task": "nli", "inputs": ["It rains Question: wet? Answer:"]}),
            ]

    many, filled = run(go())
    assert many.status_code == 200 and [r["label"] for r in many.json()["results"]]
    assert len(many.json()["results"]) == 3
    assert filled.status_code == 200  # a string for a multi-field template is the filled template, as the CLI


def _greedy_ids(pred: Predictor, text: str, n: int) -> list[int]:
    enc, _ = pred.task.encode_texts([text])
    return generate_ids(pred.pm, pred.prefix, enc, max_new_tokens=n, do_sample=False)[0]


GEN_CASES = [("qa", "what is the capital of france", 24), ("summ", "the cat sat on the mat all day long", 7),
             ("qa", "who", 11), ("summ", "x", 3), ("qa", "name a large river in africa please", 16)]  # fmt: skip


def test_iteration_level_generation_is_token_identical(
    serve_llama: tuple[Path, Any], prompts: Path, reg: Registry
) -> None:
    """Requests join a running decode batch between steps and leave when done; each row's greedy tokens equal
    PromptedModel.generate for that input and prompt alone."""

    async def go() -> tuple[list[dict[str, Any]], list[Any]]:
        s = Scheduler(reg, max_wait_ms=0, max_batch_size=8)
        await s.start()
        ids = {(t, x): reg.encode(reg.get(t), x, "input") for t, x, _ in GEN_CASES}
        token_lists: dict[int, list[int]] = {}

        async def one(i: int) -> dict[str, Any]:
            t, x, n = GEN_CASES[i]
            req = s.submit_stream(reg.get(t), ids[(t, x)], GenParams(max_new_tokens=n))
            async for ev in s.stream(req):
                if ev.get("done"):
                    token_lists[i] = ev["tokens"]
                    return ev
            raise AssertionError("stream ended without a result")

        first = asyncio.create_task(one(0))
        while not any(b.kind == "decode" for b in s.history):  # the first request is decoding ...
            await asyncio.sleep(0.001)
        rest = await asyncio.gather(*(one(i) for i in range(1, len(GEN_CASES))))  # ... when the others join
        out = [await first, *rest]
        await s.stop()
        for i, ev in enumerate(out):
            ev["token_ids"] = token_lists[i]
        return out, list(s.history)

    results, history = run(go())
    kinds = [b.kind for b in history]
    assert "prefill" in kinds[kinds.index("decode") :], kinds  # a prefill after decoding started: a join
    assert any(b.kind == "decode" and b.tasks == 2 and b.rows >= 3 for b in history)
    bb, pad = serve_llama[1], reg.pm.pad_id
    for (task, x, n), res in zip(GEN_CASES, results, strict=True):
        pred = Predictor.load(str(prompts / f"{task}.safetensors"), backbone=bb)
        want = _greedy_ids(pred, fill(reg, task, x), n)
        assert [t for t in res["token_ids"] if t != pad] == want, (task, x)
        assert res["text"] == pred.generate([fill(reg, task, x)], max_new_tokens=n)[0]
        assert len(want) == n or res["finish_reason"] == "stop"


def test_generate_endpoint_stream_sampling_and_stop(
    prompts: Path, serve_llama: tuple[Path, Any], reg: Registry
) -> None:
    body = {"task": "qa", "input": "what is the capital of france", "max_new_tokens": 12}

    async def go() -> dict[str, httpx.Response]:
        async with served(reg) as (c, _):
            out = {"greedy": await c.post("/v1/generate", json=body)}
            out["stream"] = await c.post("/v1/generate", json={**body, "stream": True})
            out["s1"] = await c.post("/v1/generate", json={**body, "temperature": 1.0, "seed": 7})
            out["s2"] = await c.post("/v1/generate", json={**body, "temperature": 1.0, "seed": 7})
            out["s3"] = await c.post("/v1/generate", json={**body, "temperature": 1.0, "seed": 8})
            out["top_p"] = await c.post("/v1/generate", json={**body, "temperature": 1.0, "top_p": 1e-9, "seed": 1})
            words = out["greedy"].json()["output"].split()
            out["stop"] = await c.post("/v1/generate", json={**body, "stop": [words[2]]})
            out["obj"] = await c.post("/v1/generate", json={**body, "input": {"q": body["input"]}})
            return out

    r = run(go())
    greedy = r["greedy"].json()
    pred = Predictor.load(str(prompts / "qa.safetensors"), backbone=serve_llama[1])
    assert greedy["output"] == pred.generate([fill(reg, "qa", body["input"])], max_new_tokens=12)[0]
    assert greedy["usage"]["output_tokens"] == 12 and greedy["finish_reason"] == "length"
    assert r["obj"].json()["output"] == greedy["output"]
    # SSE: deltas, then the final result, then [DONE]
    assert r["stream"].headers["content-type"].startswith("text/event-stream")
    events = sse_events(r["stream"].text)
    assert events[-1] == "[DONE]" and events[-2]["output"] == greedy["output"]
    assert "".join(e["delta"] for e in events[:-1]).strip() == greedy["output"]
    assert len(events) > 3
    # sampling: per-request seed; top_p ~ 0 keeps only the most likely token (greedy)
    assert r["s1"].json()["output"] == r["s2"].json()["output"] != r["s3"].json()["output"]
    assert r["top_p"].json()["output"] == greedy["output"]
    # stop strings end the generation and are cut
    stop = greedy["output"].split()[2]
    assert r["stop"].json()["finish_reason"] == "stop"
    assert r["stop"].json()["output"] == greedy["output"][: greedy["output"].index(stop)].strip()


def test_openai_completions_and_models(reg: Registry) -> None:
    async def go() -> dict[str, httpx.Response]:
        async with served(reg) as (c, _):
            out = {"models": await c.get("/v1/models")}
            base = {"model": "qa", "max_tokens": 8, "temperature": 0}
            out["one"] = await c.post("/v1/completions", json={**base, "prompt": "who"})
            out["many"] = await c.post("/v1/completions", json={**base, "prompt": ["who", "what is it"]})
            out["gen"] = await c.post("/v1/generate", json={"task": "qa", "input": "what is it", "max_new_tokens": 8})
            out["stream"] = await c.post("/v1/completions", json={**base, "prompt": "who", "stream": True})
            out["n2"] = await c.post("/v1/completions", json={**base, "prompt": "who", "n": 2})
            out["label"] = await c.post("/v1/completions", json={"model": "sentiment", "prompt": "great"})
            out["unknown"] = await c.post("/v1/completions", json={"model": "nope", "prompt": "x"})
            out["extra"] = await c.post("/v1/completions", json={**base, "prompt": "who", "presence_penalty": 0})
            return out

    r = run(go())
    models = r["models"].json()
    assert models["object"] == "list" and {m["id"] for m in models["data"]} == set(reg.names())
    one = r["one"].json()
    assert one["object"] == "text_completion" and one["model"] == "qa" and one["id"].startswith("cmpl-")
    assert one["choices"][0]["index"] == 0 and one["choices"][0]["finish_reason"] in ("stop", "length")
    assert one["usage"]["total_tokens"] == one["usage"]["prompt_tokens"] + one["usage"]["completion_tokens"]
    many = r["many"].json()["choices"]
    assert [c["index"] for c in many] == [0, 1] and many[0]["text"] == one["choices"][0]["text"]
    assert many[1]["text"] == r["gen"].json()["output"]
    chunks = sse_events(r["stream"].text)
    assert chunks[-1] == "[DONE]" and chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "".join(ch["choices"][0]["text"] for ch in chunks[:-1]).strip() == one["choices"][0]["text"]
    assert r["n2"].status_code == 422 and r["n2"].json()["error"]["param"] == "n"
    assert r["label"].json()["choices"][0]["text"] in ("negative", "positive")
    assert r["unknown"].status_code == 404 and r["unknown"].json()["error"]["param"] == "model"
    assert r["extra"].status_code == 200


def test_openai_python_client_if_installed(reg: Registry) -> None:
    """The official client, unchanged, against the in-process app (skipped when `openai` is not installed)."""
    openai = pytest.importorskip("openai")

    async def go() -> tuple[Any, Any, list[Any], httpx.Response, Any]:
        async with served(reg) as (c, _):
            client = openai.AsyncOpenAI(base_url="http://softprompt/v1", api_key="unused", http_client=c)
            models = await client.models.list()
            out = await client.completions.create(model="qa", prompt="who", max_tokens=5, temperature=0)
            stream = await client.completions.create(model="qa", prompt="who", max_tokens=5, temperature=0, stream=True)
            chunks = [ch async for ch in stream]
            ref = await c.post("/v1/generate", json={"task": "qa", "input": "who", "max_new_tokens": 5})
            try:
                await client.completions.create(model="nope", prompt="x")
                err = None
            except openai.NotFoundError as e:
                err = e
            return models, out, chunks, ref, err

    models, out, chunks, ref, err = run(go())
    assert {m.id for m in models.data} == set(reg.names())
    assert out.choices[0].text == ref.json()["output"] and out.usage.completion_tokens == 5
    assert "".join(ch.choices[0].text for ch in chunks).strip() == ref.json()["output"]
    assert err is not None and err.status_code == 404


# ---- tasks, health, metrics, openapi -----------------------------------------------------------------------
def test_tasks_health_metrics_openapi(reg: Registry) -> None:
    async def go() -> dict[str, httpx.Response]:
        async with served(reg) as (c, _):
            await c.post("/v1/classify", json={"task": "sentiment", "inputs": ["fine", "ok"]})
            await c.post("/v1/classify", json={"task": "nope", "inputs": ["fine"]})
            await c.post("/v1/generate", json={"task": "qa", "input": "who", "max_new_tokens": 3})
            return {p: await c.get(p) for p in ("/healthz", "/v1/tasks", "/v1/tasks/nli", "/v1/tasks/zzz",
                                                "/metrics", "/openapi.json")}  # fmt: skip

    r = run(go())
    assert r["/healthz"].json()["status"] == "ok" and r["/healthz"].json()["tasks"] == len(reg)
    tasks = {t["name"]: t for t in r["/v1/tasks"].json()["tasks"]}
    assert set(tasks) == {"sentiment", "topic", "nli", "qa", "summ"}
    assert tasks["topic"]["labels"] == ["sport", "politics", "science"] and tasks["topic"]["num_tokens"] == 7
    assert tasks["qa"]["task"] == "generate" and "fingerprint" in tasks["qa"]["metadata"]
    assert r["/v1/tasks/nli"].json()["fields"] == ["premise", "hypothesis"]
    assert r["/v1/tasks/zzz"].status_code == 404
    text = r["/metrics"].text
    assert r["/metrics"].headers["content-type"].startswith("text/plain")
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_]\w*="(\\.|[^"\\])*",?)*\})? (-?[0-9.eE+-]+|\+Inf|NaN)$')
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    assert 'softprompt_requests_total{code="200",endpoint="/v1/classify",task="sentiment"} 1' in text
    assert 'softprompt_request_errors_total{code="404",endpoint="/v1/classify",task="-"} 1' in text
    assert 'softprompt_request_duration_seconds_bucket{endpoint="/v1/classify",task="sentiment",le="+Inf"} 1' in text
    assert 'softprompt_rows_total{task="sentiment"} 2' in text
    assert 'softprompt_generated_tokens_total{task="qa"} 3' in text
    for name in ("softprompt_batch_size_bucket", "softprompt_queue_depth", "softprompt_kv_cache_bytes",
                 "softprompt_batch_tasks_count", "softprompt_queue_wait_seconds_sum", "softprompt_tasks 5"):  # fmt: skip
        assert name in text, name
    paths = r["/openapi.json"].json()["paths"]
    for p in ("/v1/classify", "/v1/generate", "/v1/completions", "/v1/models", "/v1/tasks", "/healthz", "/metrics",
              "/v1/admin/tasks/{name}"):  # fmt: skip
        assert p in paths, p


# ---- errors --------------------------------------------------------------------------------------------
def test_request_errors(reg: Registry) -> None:
    long_text = " ".join(["word"] * 600)

    async def go() -> dict[str, httpx.Response]:
        async with served(reg, app_kw={"max_new_tokens": 64}) as (c, _):
            cl = "/v1/classify"
            return {
                "unknown": await c.post(cl, json={"task": "nope", "inputs": ["x"]}),
                "no_inputs": await c.post(cl, json={"task": "sentiment"}),
                "bad_type": await c.post(cl, json={"task": "sentiment", "inputs": [3]}),
                "empty_list": await c.post(cl, json={"task": "sentiment", "inputs": []}),
                "extra": await c.post(cl, json={"task": "sentiment", "inputs": ["x"], "temprature": 1}),
                "json": await c.post(
                    cl, content=b'{"task": "sentiment", "inputs": [', headers={"content-type": "application/json"}
                ),
                "too_long": await c.post(cl, json={"task": "sentiment", "inputs": ["ok", long_text]}),
                "field": await c.post(cl, json={"task": "nli", "inputs": [{"premise": "p"}]}),
                "wrong_kind": await c.post(cl, json={"task": "qa", "inputs": ["x"]}),
                "gen_kind": await c.post("/v1/generate", json={"task": "sentiment", "input": "x"}),
                "max_new": await c.post("/v1/generate", json={"task": "qa", "input": "x", "max_new_tokens": 65}),
                "temp": await c.post("/v1/generate", json={"task": "qa", "input": "x", "temperature": -1}),
                "gen_long": await c.post("/v1/generate", json={"task": "qa", "input": long_text}),
                "still_ok": await c.post(cl, json={"task": "sentiment", "inputs": ["fine"]}),
            }

    r = run(go())

    def err(name: str, status: int, param: str | None = None, text: str | None = None) -> None:
        resp = r[name]
        assert resp.status_code == status, (name, resp.status_code, resp.text)
        e = resp.json()["error"]
        assert e["code"] == status and e["message"]
        if param is not None:
            assert e["param"] == param, (name, e)
        if text is not None:
            assert text in e["message"], (name, e)

    err("unknown", 404, "task", "nope")
    err("no_inputs", 422, "inputs", "inputs: Field required")
    assert r["no_inputs"].json()["detail"][0]["loc"] == ["body", "inputs"]
    err("bad_type", 422, text="inputs.0")
    err("empty_list", 422, "inputs")
    err("extra", 422, "temprature")
    err("json", 422, "body")
    err("too_long", 413, "inputs.1", "tokens")
    err("field", 422, "inputs.0", "hypothesis")
    err("wrong_kind", 400, "task")
    err("gen_kind", 400, "task")
    err("max_new", 422, "max_new_tokens")
    err("temp", 422, "temperature")
    err("gen_long", 413, "input")
    assert r["still_ok"].status_code == 200


def test_queue_full_429_and_timeout_504(reg: Registry) -> None:
    body = {"task": "sentiment", "inputs": ["x"]}

    def block(s: Scheduler, seconds: float) -> threading.Event:
        """Make each classify batch hold the model thread for `seconds`; the event is set once one started."""
        real, started = s._classify_batch, threading.Event()

        def slow(reqs: Any) -> Any:
            started.set()
            time.sleep(seconds)
            return real(reqs)

        s._classify_batch = slow  # type: ignore[method-assign]
        return started

    async def go() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with served(reg, max_wait_ms=0, max_queue=2) as (c, s):
            started = block(s, 0.4)
            first = asyncio.create_task(c.post("/v1/classify", json=body))
            while not started.is_set():  # the worker holds the first request in the model thread
                await asyncio.sleep(0.005)
            queued = [asyncio.create_task(c.post("/v1/classify", json=body)) for _ in range(2)]
            while s.queue_depth < 2:
                await asyncio.sleep(0.005)
            over = await c.post("/v1/classify", json=body)
            full = [over, *await asyncio.gather(first, *queued)]
        async with served(reg, max_wait_ms=0, timeout_s=0.25) as (c, s):
            block(s, 0.4)
            timed = await asyncio.gather(*(c.post("/v1/classify", json=body) for _ in range(2)))
            after = await c.get("/healthz")
        return full, [*timed, after]

    full, timed = run(go())
    assert full[0].status_code == 429, full[0].text
    assert int(full[0].headers["Retry-After"]) >= 1 and full[0].json()["error"]["code"] == 429
    assert [r.status_code for r in full[1:]] == [200, 200, 200]
    assert [r.status_code for r in timed[:2]] == [504, 504]
    assert timed[0].json()["error"]["type"] == "timeout_error"
    assert timed[2].status_code == 200


def test_a_failing_request_does_not_poison_its_batch(reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    real = reg.prefix

    def broken(entry: TaskEntry, *, kv: bool = True) -> Any:
        if entry.name == "topic":
            raise RuntimeError("boom")
        return real(entry, kv=kv)

    async def go() -> tuple[list[httpx.Response], httpx.Response, list[Any]]:
        async with served(reg, max_wait_ms=300) as (c, s):
            monkeypatch.setattr(reg, "prefix", broken)
            rs = await asyncio.gather(
                c.post("/v1/classify", json={"task": "sentiment", "inputs": ["a great movie"]}),
                c.post("/v1/classify", json={"task": "topic", "inputs": ["parliament voted"]}),
                c.post("/v1/classify", json={"task": "nli", "inputs": [{"premise": "a", "hypothesis": "b"}]}),
            )
            monkeypatch.setattr(reg, "prefix", real)
            again = await c.post("/v1/classify", json={"task": "topic", "inputs": ["parliament voted"]})
            return list(rs), again, list(s.history)

    rs, again, history = run(go())
    assert [r.status_code for r in rs] == [200, 500, 200]
    assert rs[1].json()["error"]["type"] == "server_error"
    assert history[0].rows == 3 and history[0].tasks == 3  # they were one batch
    assert again.status_code == 200


# ---- scheduler settings --------------------------------------------------------------------------------
def test_per_task_and_no_kv_cache_modes_agree(reg: Registry) -> None:
    async def go(**kw: Any) -> tuple[list[Any], list[Any], str]:
        async with served(reg, max_wait_ms=300, **kw) as (c, s):
            rs = await asyncio.gather(*[c.post("/v1/classify", json={"task": t, "inputs": [x]})
                                        for t, x in CLASSIFY_CASES])  # fmt: skip
            g = await c.post("/v1/generate", json={"task": "summ", "input": "the cat sat", "max_new_tokens": 6})
            return [r.json()["results"][0] for r in rs], list(s.history), g.json()["output"]

    mixed, _, g_mixed = run(go())
    per_task, hist, g_per = run(go(mode="per-task"))
    before = reg.cache_info()["hits"] + reg.cache_info()["misses"]
    no_kv, _, g_nokv = run(go(kv_cache=False))
    assert reg.cache_info()["hits"] + reg.cache_info()["misses"] == before  # the cache was not used
    assert all(b.tasks == 1 for b in hist) and sum(b.kind == "classify" for b in hist) >= 3
    for a, b, c in zip(mixed, per_task, no_kv, strict=True):
        assert_same(b, a)
        assert_same(c, a)
    assert g_mixed == g_per == g_nokv


def test_graceful_shutdown_finishes_in_flight_requests(reg: Registry) -> None:
    async def go() -> tuple[httpx.Response, httpx.Response, int]:
        body = {"task": "qa", "input": "tell me a long story", "max_new_tokens": 60}
        async with served(reg) as (c, s):
            app = c.app  # type: ignore[attr-defined]
            async with app.router.lifespan_context(app):  # a nested lifespan we can end while a request runs
                task = asyncio.create_task(c.post("/v1/generate", json=body))
                while s.active_generations == 0:
                    await asyncio.sleep(0.002)
            # lifespan ended: the scheduler drained the running generation, then stopped
            done = await task
            refused = await c.post("/v1/classify", json={"task": "sentiment", "inputs": ["x"]})
            health = await c.get("/healthz")
        return done, refused, health.status_code

    done, refused, health = run(go())
    assert done.status_code == 200 and done.json()["usage"]["output_tokens"] == 60
    assert refused.status_code == 503 and health == 503


def test_decoder_head_tasks_mix_with_verbalizer_tasks(
    serve_llama: tuple[Path, Any], prompts: Path, tmp_path: Path
) -> None:
    """A decoder prompt trained with --head linear is served by its head, in the same batch as verbalizer tasks,
    each row equal to Predictor alone; one without its head tensors is refused."""
    model_dir, bb = serve_llama
    for name in ("sentiment", "topic"):
        (tmp_path / f"{name}.safetensors").write_bytes((prompts / f"{name}.safetensors").read_bytes())
    make_prompt(tmp_path / "headed.safetensors", bb, model_dir, tokens=5, seed=7, head="linear", linear_head=True,
                labels=["x", "y", "z"], template="Text: {text}\nClass:")  # fmt: skip
    make_prompt(tmp_path / "headless.safetensors", bb, model_dir, tokens=5, seed=8, head="linear")
    reg = Registry(bb, tmp_path)
    assert reg.names() == ["headed", "sentiment", "topic"] and "head.linear" in reg.refused["headless"]
    cases = [("headed", "a great movie"), ("sentiment", "a great movie"), ("headed", "parliament voted today"),
             ("topic", "the match ended")]  # fmt: skip

    async def go() -> tuple[list[Any], list[Any]]:
        async with served(reg, max_wait_ms=300) as (c, s):
            rs = await asyncio.gather(*(c.post("/v1/classify", json={"task": t, "inputs": [x]}) for t, x in cases))
            return [r.json()["results"][0] for r in rs], list(s.history)

    results, history = run(go())
    assert history[0].tasks == 3 and history[0].rows == 4
    for (t, x), res in zip(cases, results, strict=True):
        pred = Predictor.load(str(tmp_path / f"{t}.safetensors"), backbone=bb)
        assert_same(res, pred.predict([fill(reg, t, x)])[0])
    assert results[0]["probabilities"].keys() == {"x", "y", "z"}
