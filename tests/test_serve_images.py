"""Image tasks in `softprompt serve` (softprompt.serve.images): a batch mixed across vpt, vpt-deep and coop tasks
gives every row what its task's ImagePredictor gives it alone; the HTTP routes (base64 JSON and multipart) through
FastAPI's TestClient; bad images and unknown tasks answered with the field named."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import shutil
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from tiny_vision import quadrant_image, save_tiny_vision

from softprompt.checkpoint import load_prompt, save_prompt
from softprompt.config import PromptConfig
from softprompt.serve.image_tasks import ImageRegistry
from softprompt.serve.images import classify_rows, create_image_app
from softprompt.vision.api import ImagePredictor
from softprompt.vision.coop import METHOD as COOP
from softprompt.vision.encoder import load_vision_model
from softprompt.vision.images import preprocess
from softprompt.vision.objective import vision_meta

CLASSES = ["red", "green", "blue", "yellow"]


def _write(vm, path: Path, method: str, p: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    meta = {**vision_meta(vm, CLASSES), "method": method}
    if method == "coop":
        cfg = PromptConfig(context_tokens=p)
        prompt = COOP.create(vm, torch.randn(1, p, 32, generator=g), cfg, classes=CLASSES)
        t, extra, m = prompt.saved()
        save_prompt(path, t, {**meta, **m, "head": "cosine"}, extra)
        return
    layers = 2 if method == "vpt-deep" else 1
    tokens = torch.randn(layers, p, 32, generator=g)
    head = {"head.linear.weight": torch.randn(4, 32, generator=g), "head.linear.bias": torch.randn(4, generator=g)}
    extra = {"vpt.deep": tokens[1:]} if layers == 2 else {}
    save_prompt(path, tokens[0], {**meta, "head": "linear"}, {**head, **extra})


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    vm = load_vision_model(str(save_tiny_vision("clip-full", root / "model")))
    tasks = root / "tasks"
    tasks.mkdir()
    for name, method, p, seed in [("s1", "vpt", 3, 1), ("s2", "vpt", 3, 2), ("s3", "vpt", 5, 3),
                                  ("d1", "vpt-deep", 3, 4), ("c1", "coop", 2, 5), ("c2", "coop", 4, 6)]:  # fmt: skip
        _write(vm, tasks / f"{name}.safetensors", method, p, seed)
    (tasks / "junk.safetensors").write_bytes(b"not a prompt")
    return vm, ImageRegistry(vm, tasks)


def _images(n: int, seed: int = 0):
    return [quadrant_image(k % 4, seed + k) for k in range(n)]


def test_a_batch_mixed_across_tasks_equals_each_task_alone(served):
    vm, reg = served
    assert sorted(reg.tasks) == ["c1", "c2", "d1", "s1", "s2", "s3"]
    assert [r["file"] for r in reg.refused] == ["junk.safetensors"]
    px = preprocess(_images(12), vm.processor)
    names = ["s1", "c1", "s2", "d1", "s3", "c2", "s1", "d1", "c1", "s2", "c2", "s3"]
    mixed = classify_rows(vm, [(reg.tasks[n], px[i]) for i, n in enumerate(names)])
    for i, n in enumerate(names):
        alone = ImagePredictor.load(str(reg.tasks[n].path), vision_model=vm).probs(px[i : i + 1])[0]
        torch.testing.assert_close(mixed[i], alone, rtol=1e-5, atol=1e-6)


def _b64(im) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_http_base64_and_multipart(served):
    vm, reg = served
    ims = _images(3, seed=10)
    want = ImagePredictor.load(str(reg.tasks["d1"].path), vision_model=vm).predict(ims)
    with TestClient(create_image_app(reg)) as client:
        r = client.post("/v1/images/classify", json={"task": "d1", "images": [_b64(im) for im in ims]})
        assert r.status_code == 200, r.text
        got = r.json()["results"]
        assert [g["label"] for g in got] == [w["label"] for w in want]
        for g, w in zip(got, want):
            assert g["probs"] == pytest.approx(w["probs"], abs=1e-5)
        files = [("file", (f"{i}.png", base64.b64decode(_b64(im)), "image/png")) for i, im in enumerate(ims)]
        r = client.post("/v1/images/classify/d1", files=files)
        assert r.status_code == 200, r.text
        assert [g["label"] for g in r.json()["results"]] == [w["label"] for w in want]
        # a data: URL is accepted; a bad image is a 422 naming its field
        r = client.post(
            "/v1/images/classify",
            json={
                "task": "c1",
                "images": ["data:image/png;base64," + _b64(ims[0]), base64.b64encode(b"junk").decode()],
            },
        )
        assert r.status_code == 422 and r.json()["error"]["param"] == "images.1"
        assert "not an image" in r.json()["error"]["message"]
        r = client.post("/v1/images/classify", json={"task": "nope", "images": [_b64(ims[0])]})
        assert r.status_code == 404 and r.json()["error"]["param"] == "task"
        assert {t["name"] for t in client.get("/v1/tasks").json()["tasks"]} == set(reg.tasks)


def test_softprompt_serve_builds_the_image_app_for_a_directory_of_image_prompts(served):
    from softprompt.commands import ServeConfig
    from softprompt.serve.images import build_image_app, image_prompts_in

    vm, reg = served
    assert image_prompts_in(reg.directory) == vm.model_id
    app = build_image_app(ServeConfig(prompts=str(reg.directory), device="cpu", max_queue=3, timeout_s=7.5,
                                      admin_token="t"))  # fmt: skip
    with TestClient(app) as client:
        h = client.get("/healthz").json()
        assert h["family"] == "vision" and h["tasks"] == 6
        assert (app.state.batcher.max_queue, app.state.batcher.timeout_s) == (3, 7.5)
        r = client.delete("/v1/admin/tasks/nope", headers={"Authorization": "Bearer t"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "task"


def test_a_body_over_the_limit_is_413_and_requests_are_counted(served):
    _, reg = served
    with TestClient(create_image_app(reg, max_body_bytes=2000)) as client:
        r = client.post("/v1/images/classify", json={"task": "s1", "images": ["A" * 4000]})
        assert r.status_code == 413 and r.json()["error"]["param"] == "body"
        assert client.get("/healthz").status_code == 200
        assert "softprompt_requests_total" in client.get("/metrics").text


# ---- the text server's limits, errors, metrics and admin endpoints on the image app ------------------------
ADMIN = "image-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


@contextlib.asynccontextmanager
async def _client(reg: ImageRegistry, **kw: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The image app over `reg`, its lifespan running, and an in-process client (one event loop: a decode on the
    loop would hold every other request)."""
    app = create_image_app(reg, **kw)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://softprompt", timeout=30) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client, app.state.batcher


def _slow_rows(monkeypatch, seconds: float, fail_task: str | None = None) -> threading.Event:
    """Every batch holds the model thread for `seconds` (rows of `fail_task` make it raise); set once one started."""
    import softprompt.serve.images as images

    real, started = images.classify_rows, threading.Event()

    def slow(vm, rows):
        started.set()
        time.sleep(seconds)
        if fail_task is not None and any(t.name == fail_task for t, _ in rows):
            raise RuntimeError("boom")
        return real(vm, rows)

    monkeypatch.setattr(images, "classify_rows", slow)
    return started


def _body(task: str, n: int = 1, seed: int = 0) -> dict[str, Any]:
    return {"task": task, "images": [_b64(im) for im in _images(n, seed)]}


def test_queue_full_is_429_with_retry_after_and_a_slow_batch_is_504(served, monkeypatch):
    _, reg = served

    async def go():
        started = _slow_rows(monkeypatch, 0.4)
        async with _client(reg, max_wait_ms=0, max_queue=2) as (c, b):
            first = asyncio.create_task(c.post("/v1/images/classify", json=_body("s1")))
            while not started.is_set():  # the worker holds the first request in the model thread
                await asyncio.sleep(0.005)
            queued = [asyncio.create_task(c.post("/v1/images/classify", json=_body(t))) for t in ("c1", "d1")]
            while b.queue_depth < 2:
                await asyncio.sleep(0.005)
            over = await c.post("/v1/images/classify", json=_body("s2"))
            full = [over, *await asyncio.gather(first, *queued)]
        async with _client(reg, max_wait_ms=0, timeout_s=0.25) as (c, _):
            timed = await asyncio.gather(*(c.post("/v1/images/classify", json=_body(t)) for t in ("s1", "c2")))
            after = await c.get("/healthz")
        return full, [*timed, after]

    full, timed = asyncio.run(go())
    assert full[0].status_code == 429, full[0].text
    assert int(full[0].headers["Retry-After"]) >= 1
    assert full[0].json()["error"] == {"message": "queue full (2 requests waiting); retry later",
                                       "type": "rate_limit_error", "param": None, "code": 429}  # fmt: skip
    assert [r.status_code for r in full[1:]] == [200, 200, 200]
    assert [r.status_code for r in timed[:2]] == [504, 504]
    assert timed[0].json()["error"]["type"] == "timeout_error"
    assert timed[2].status_code == 200


def test_a_failing_request_fails_alone_and_its_batch_mates_finish(served, monkeypatch):
    _, reg = served
    bad = {"task": "c1", "images": [_b64(_images(1)[0]), base64.b64encode(b"junk").decode()]}

    async def go():
        _slow_rows(monkeypatch, 0.0, fail_task="s2")
        async with _client(reg, max_wait_ms=300) as (c, b):
            rs = await asyncio.gather(
                c.post("/v1/images/classify", json=_body("s1", 2)),
                c.post("/v1/images/classify", json=_body("s2")),  # its rows make the model raise
                c.post("/v1/images/classify", json=bad),  # a bad image: its own 422, before the queue
                c.post("/v1/images/classify", json=_body("d1")),
            )
            return rs, list(b.batches)

    rs, batches = asyncio.run(go())
    assert [r.status_code for r in rs] == [200, 500, 422, 200], [r.text for r in rs]
    assert rs[1].json()["error"]["type"] == "server_error" and "boom" in rs[1].json()["error"]["message"]
    assert rs[2].json()["error"]["param"] == "images.1"
    assert len(rs[0].json()["results"]) == 2 and len(rs[3].json()["results"]) == 1
    assert batches[0] == 4  # they were one batch (then retried request by request)


def test_decoding_and_preprocessing_run_off_the_event_loop(served, monkeypatch):
    import softprompt.serve.images as images

    _, reg = served
    threads: list[str] = []
    real_decode, real_pre = images.image_from_bytes, images.preprocess

    def slow_decode(raw, where):
        threads.append(threading.current_thread().name)
        time.sleep(0.6)  # on the event loop this would hold /healthz
        return real_decode(raw, where)

    def pre(ims, processor):
        threads.append(threading.current_thread().name)
        return real_pre(ims, processor)

    monkeypatch.setattr(images, "image_from_bytes", slow_decode)
    monkeypatch.setattr(images, "preprocess", pre)

    async def go():
        async with _client(reg, max_inputs=3) as (c, _):
            files = [("file", (f"{i}.png", base64.b64decode(_b64(im)), "image/png")) for i, im in enumerate(_images(2))]
            work = [asyncio.create_task(c.post("/v1/images/classify", json=_body("s1", 3))),
                    asyncio.create_task(c.post("/v1/images/classify/c1", files=files))]  # fmt: skip
            while not threads:
                await asyncio.sleep(0.002)
            t0 = time.perf_counter()
            health = await c.get("/healthz")
            waited = time.perf_counter() - t0
            rs = await asyncio.gather(*work)
            over = await c.post("/v1/images/classify", json=_body("s1", 4))  # over --max-inputs: nothing decoded
            return rs, health, waited, over

    rs, health, waited, over = asyncio.run(go())
    assert [r.status_code for r in rs] == [200, 200]
    assert health.status_code == 200 and waited < 0.5, waited
    assert len(threads) == 7 and all(t.startswith("softprompt-decode") for t in threads), threads
    assert over.status_code == 413 and over.json()["error"]["param"] == "images"


def test_graceful_shutdown_finishes_in_flight_requests(served, monkeypatch):
    _, reg = served

    async def go():
        started = _slow_rows(monkeypatch, 0.3)
        async with _client(reg, max_wait_ms=0) as (c, _):
            app = c.app  # type: ignore[attr-defined]
            async with app.router.lifespan_context(app):  # a nested lifespan we can end while a request runs
                task = asyncio.create_task(c.post("/v1/images/classify", json=_body("d1", 2)))
                while not started.is_set():
                    await asyncio.sleep(0.002)
            done = await asyncio.wait_for(task, 10)
            refused = await c.post("/v1/images/classify", json=_body("s1"))
            health = await c.get("/healthz")
        return done, refused, health

    done, refused, health = asyncio.run(go())
    assert done.status_code == 200 and len(done.json()["results"]) == 2
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "unavailable_error"
    assert health.status_code == 503


def test_metrics_per_task_in_the_text_servers_names(served):
    _, reg = served

    async def go():
        async with _client(reg) as (c, _):
            assert (await c.post("/v1/images/classify", json=_body("s1", 2))).status_code == 200
            assert (await c.post("/v1/images/classify", json={"task": "s1", "images": ["@@"]})).status_code == 422
            return (await c.get("/metrics")).text

    text = asyncio.run(go())
    ok = 'softprompt_requests_total{code="200",endpoint="/v1/images/classify",task="s1"} 1'
    err = 'softprompt_request_errors_total{code="422",endpoint="/v1/images/classify",task="s1"} 1'
    for line in (ok, err, 'softprompt_rows_total{task="s1"} 2', "softprompt_tasks 6", "softprompt_queue_depth 0",
                 'softprompt_request_duration_seconds_count{endpoint="/v1/images/classify",task="s1"} 2',
                 'softprompt_queue_wait_seconds_count{task="s1"} 1', 'softprompt_batch_size_count{kind="classify"} 1'):  # fmt: skip
        assert line in text, line


def test_admin_add_replace_remove_image_tasks(served, tmp_path):
    vm, reg = served
    d = tmp_path / "tasks"
    d.mkdir()
    shutil.copy(reg.tasks["s1"].path, d / "s1.safetensors")
    mine = ImageRegistry(vm, d)
    _write(vm, tmp_path / "coop.safetensors", "coop", 2, 7)
    _write(vm, tmp_path / "vpt.safetensors", "vpt", 3, 8)
    ck = load_prompt(tmp_path / "vpt.safetensors")
    save_prompt(tmp_path / "foreign.safetensors", ck.prompt, {**ck.meta, "fingerprint": "sha256:another"}, ck.extra)
    coop, vpt = (tmp_path / "coop.safetensors").read_bytes(), (tmp_path / "vpt.safetensors").read_bytes()
    url = "/v1/admin/tasks/"

    async def go():
        out = {}
        async with _client(mine, admin_token=ADMIN) as (c, _):
            out["no_token"] = await c.post(url + "new", content=coop)
            out["bad_token"] = await c.post(url + "new", content=coop, headers={"Authorization": "Bearer x"})
            out["junk"] = await c.post(url + "new", content=b"not a prompt", headers=AUTH)
            out["foreign"] = await c.post(url + "new", content=(tmp_path / "foreign.safetensors").read_bytes(),
                                          headers=AUTH)  # fmt: skip
            out["bad_name"] = await c.post(url + "..x", content=coop, headers=AUTH)
            out["unchanged"] = sorted(p.name for p in d.iterdir())
            out["add"] = await c.post(url + "new", content=coop, headers=AUTH)
            out["again"] = await c.post(url + "new", content=vpt, headers=AUTH)
            out["use"] = await c.post("/v1/images/classify", json=_body("new", 2))
            out["put"] = await c.put(url + "new", content=vpt, headers=AUTH)
            out["method"] = (await c.get("/v1/tasks/new")).json()["method"]
            out["path"] = await c.post(url + "frompath", json={"path": str(tmp_path / "vpt.safetensors")}, headers=AUTH)
            out["delete"] = await c.delete(url + "new", headers=AUTH)
            out["gone"] = await c.post("/v1/images/classify", json=_body("new"))
            out["delete_again"] = await c.delete(url + "new", headers=AUTH)
            out["delete_no_token"] = await c.delete(url + "s1")
            out["tasks"] = sorted(t["name"] for t in (await c.get("/v1/tasks")).json()["tasks"])
        async with _client(mine) as (c, _):
            out["disabled"] = await c.post(url + "x", content=coop, headers=AUTH)
        return out

    r = asyncio.run(go())
    for k in ("no_token", "bad_token", "delete_no_token"):
        assert r[k].status_code == 401 and r[k].headers["WWW-Authenticate"] == "Bearer", k
    assert r["junk"].status_code == 400 and r["junk"].json()["error"]["param"] == "body"
    assert r["junk"].json()["error"]["message"].startswith("invalid prompt for task 'new': upload: ")
    assert r["foreign"].status_code == 400 and "fingerprint" in r["foreign"].json()["error"]["message"]
    assert r["bad_name"].status_code == 422 and r["bad_name"].json()["error"]["param"] == "name"
    assert r["unchanged"] == ["s1.safetensors"]  # nothing written by the refused uploads
    assert r["add"].status_code == 201 and r["add"].json()["task"]["method"] == "coop"
    assert r["again"].status_code == 409
    assert r["use"].status_code == 200 and len(r["use"].json()["results"]) == 2
    assert r["put"].status_code == 200 and r["put"].json()["replaced"] is True and r["method"] == "vpt"
    assert r["path"].status_code == 201
    assert r["delete"].status_code == 200 and r["delete"].json() == {"deleted": "new"}
    assert r["gone"].status_code == 404 and r["delete_again"].status_code == 404
    assert r["tasks"] == ["frompath", "s1"]
    assert sorted(p.name for p in d.iterdir()) == ["frompath.safetensors", "s1.safetensors"]
    assert r["disabled"].status_code == 403
    assert sorted(ImageRegistry(vm, d).tasks) == ["frompath", "s1"]  # a restart serves the same tasks
