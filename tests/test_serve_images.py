"""Image tasks in `softprompt serve` (softprompt.serve.images): a batch mixed across vpt, vpt-deep and coop tasks
gives every row what its task's ImagePredictor gives it alone; the HTTP routes (base64 JSON and multipart) through
FastAPI's TestClient; bad images and unknown tasks answered with the field named."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from tiny_vision import quadrant_image, save_tiny_vision

from softprompt.checkpoint import save_prompt
from softprompt.config import PromptConfig
from softprompt.serve.images import ImageRegistry, classify_rows, create_image_app
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
    app = build_image_app(ServeConfig(prompts=str(reg.directory), device="cpu"))
    with TestClient(app) as client:
        h = client.get("/healthz").json()
        assert h["family"] == "vision" and h["tasks"] == 6


def test_a_body_over_the_limit_is_413_and_requests_are_counted(served):
    _, reg = served
    with TestClient(create_image_app(reg, max_body_bytes=2000)) as client:
        r = client.post("/v1/images/classify", json={"task": "s1", "images": ["A" * 4000]})
        assert r.status_code == 413 and r.json()["error"]["param"] == "body"
        assert client.get("/healthz").status_code == 200
        assert "softprompt_requests_total" in client.get("/metrics").text
