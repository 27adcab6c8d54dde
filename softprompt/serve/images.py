"""`softprompt serve` for image prompts: image tasks on one image model, batched across tasks.

When the prompt directory holds image prompts (softprompt.vision: vpt, vpt-deep, coop), `softprompt serve` builds
this app instead of the text one (softprompt.serve.server). Every image prompt in the directory is a task; files
that do not fit the model (another image model's fingerprint, a text prompt) are refused at start and listed.

    POST /v1/images/classify          {"task": NAME, "images": [BASE64, ...]}   (data: URLs accepted)
    POST /v1/images/classify/{task}   multipart/form-data, one file part per image
    GET  /v1/tasks, GET /healthz

Pipeline, as the text server's: decode (base64 / multipart -> bytes -> a checked RGB image, a bad one is a 422
naming its field `images.K`) -> preprocess (the model's own image processor) -> queue -> one batch mixed across
tasks (`classify_rows`) -> per-request results. In a batch, the rows of every CoOp task share ONE plain image
forward (each task then scores its rows against its class text features, computed once per task and class set);
the rows of VPT tasks of one geometry (shallow/deep, P tokens) share one forward with per-row prompt tokens (deep:
per-row keys/values), each row then read by its own task's head. A mixed batch gives each row what its task alone
gives it (tests/test_serve_images.py). Notation: B rows, C classes, P prompt tokens, L' prompt layers, d width.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.parser
import email.policy
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel

from softprompt.checkpoint import CheckpointError, load_prompt
from softprompt.serve.errors import BadRequest, NotFound, ServeError, TooLarge, Unprocessable
from softprompt.serve.http import serve_error, validation_error
from softprompt.vision.api import loaded_prompt, rows_of
from softprompt.vision.encoder import VisionModel, VisualPrompt
from softprompt.vision.images import BadImageError, image_from_bytes, preprocess

SUFFIX = ".safetensors"


@dataclass
class ImageTask:
    name: str
    path: Path
    method: str
    classes: list[str]
    prompt: Any  # a loaded VisualPrompt behind .prefix (vpt) or a frozen CoOp scorer (coop)
    head: Any  # vpt: the ImageHead; coop: None
    created: float = field(default_factory=time.time)

    def group(self) -> tuple[Any, ...]:
        """Rows of tasks with one group share one forward."""
        if self.method == "coop":
            return ("coop",)
        vp = self.prompt.prefix(None)
        return ("vpt", vp.deep, vp.num_tokens)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "labels": self.classes, "kind": "image-classify"}


class ImageRegistry:
    """The image tasks of a directory on one VisionModel."""

    def __init__(self, vm: VisionModel, directory: str | Path, *, allow_other_model: bool = False) -> None:
        self.vm, self.directory = vm, Path(directory)
        self.tasks: dict[str, ImageTask] = {}
        self.refused: list[dict[str, str]] = []
        for path in sorted(self.directory.glob("*" + SUFFIX)):
            if path.name.startswith("."):
                continue
            try:
                ck = load_prompt(path)
                prompt, head = loaded_prompt(vm, ck, allow_other_model=allow_other_model)
            except (CheckpointError, ValueError) as e:
                self.refused.append({"file": path.name, "reason": str(e).splitlines()[0]})
                continue
            name = path.name[: -len(SUFFIX)]
            self.tasks[name] = ImageTask(name, path, str(ck.meta["method"]), list(ck.meta["labels"]["labels"]),
                                         prompt, head)  # fmt: skip

    def get(self, name: str, param: str = "task") -> ImageTask:
        if name not in self.tasks:
            raise NotFound(f"unknown task {name!r} (GET /v1/tasks lists them)", param=param)
        return self.tasks[name]


@torch.no_grad()
def classify_rows(vm: VisionModel, rows: list[tuple[ImageTask, torch.Tensor]]) -> list[torch.Tensor]:
    """Class probabilities (C_task,) of each row (task, pixels (3, H, W)), computed in one batch mixed across
    tasks: one forward per group (module docstring), in row order out."""
    out: list[torch.Tensor | None] = [None] * len(rows)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (task, _) in enumerate(rows):
        groups.setdefault(task.group(), []).append(i)
    for key, idx in groups.items():
        px = torch.stack([rows[i][1] for i in idx]).to(vm.device)  # (B, 3, H, W)
        if key[0] == "coop":
            from softprompt.vision.coop import image_features, scale_logits

            img = image_features(vm, px)  # (B, D): one plain image forward for every CoOp row
            for j, i in enumerate(idx):
                task = rows[i][0]
                out[i] = scale_logits(vm, img[j : j + 1], task.prompt.text_features(vm, grad=False))[0]
            continue
        tokens = torch.cat([rows[i][0].prompt.prefix(vm).tokens for i in idx])  # (B, L', P, d): per-row prompts
        feats = vm.features(px, VisualPrompt(tokens, deep=bool(key[1]), kv=True))  # (B, d)
        for j, i in enumerate(idx):
            out[i] = rows[i][0].head(feats[j : j + 1])[0]
    return [o.float().softmax(-1).cpu() for o in out if o is not None]


class ImageBatcher:
    """Rows of every image task go into one queue; the worker takes up to max_batch_size of them (waiting at most
    max_wait_ms for more) and runs classify_rows in the model thread."""

    def __init__(self, reg: ImageRegistry, *, max_batch_size: int = 32, max_wait_ms: float = 5.0) -> None:
        self.reg, self.max_batch, self.max_wait = reg, max_batch_size, max_wait_ms / 1000
        self.queue: asyncio.Queue[tuple[ImageTask, torch.Tensor, asyncio.Future]] | None = None
        self.worker: asyncio.Task | None = None
        self.batches: list[int] = []  # sizes of the batches run (tests, metrics)

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()

    async def classify(self, task: ImageTask, pixels: torch.Tensor) -> list[torch.Tensor]:
        assert self.queue is not None, "the batcher is not started"
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in range(pixels.shape[0])]
        for k, f in enumerate(futs):
            self.queue.put_nowait((task, pixels[k], f))
        return list(await asyncio.gather(*futs))

    async def _run(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(items) < self.max_batch:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            self.batches.append(len(items))
            try:
                probs = await asyncio.to_thread(classify_rows, self.reg.vm, [(t, px) for t, px, _ in items])
                for (_, _, f), p in zip(items, probs, strict=True):
                    if not f.done():
                        f.set_result(p)
            except Exception as e:  # noqa: BLE001  # every waiting request gets the error
                for _, _, f in items:
                    if not f.done():
                        f.set_exception(e)


class ImageClassifyBody(BaseModel):
    task: str
    images: list[str]


def decode_base64(values: list[str], max_inputs: int) -> list[Any]:
    """Base64 strings (or data: URLs) -> checked RGB images; 413 over max_inputs, 422 naming `images.K`."""
    if not values:
        raise Unprocessable("images: at least one image", param="images")
    if len(values) > max_inputs:
        raise TooLarge(f"images: {len(values)} images, at most {max_inputs} per request", param="images")
    out = []
    for k, v in enumerate(values):
        data = v.split(",", 1)[1] if v.startswith("data:") else v
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise Unprocessable(f"images.{k}: not base64", param=f"images.{k}") from None
        out.append(checked(raw, f"images.{k}"))
    return out


def checked(raw: bytes, param: str) -> Any:
    try:
        return image_from_bytes(raw, param)
    except BadImageError as e:
        raise Unprocessable(str(e), param=param) from None


def decode_multipart(content_type: str, body: bytes, max_inputs: int) -> list[Any]:
    """multipart/form-data -> the images of its file parts, in order (stdlib email parser: no extra package)."""
    if not content_type.startswith("multipart/form-data"):
        raise BadRequest("Content-Type: expected multipart/form-data", param="Content-Type")
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    parts = [p for p in msg.iter_parts() if p.get_filename() is not None] if msg.is_multipart() else []
    if not parts:
        raise Unprocessable("images: no file parts in the multipart body", param="images")
    if len(parts) > max_inputs:
        raise TooLarge(f"images: {len(parts)} images, at most {max_inputs} per request", param="images")
    payloads = [p.get_payload(decode=True) for p in parts]
    return [checked(b if isinstance(b, bytes) else b"", f"images.{k}") for k, b in enumerate(payloads)]


def response(task: ImageTask, probs: list[torch.Tensor]) -> dict[str, Any]:
    return {"task": task.name, "results": rows_of(torch.stack(probs), task.classes, [None] * len(probs))}


def image_router(reg: ImageRegistry, batcher: ImageBatcher, *, max_inputs: int = 256) -> APIRouter:
    router = APIRouter(tags=["images"])

    async def run(task: ImageTask, images: list[Any]) -> dict[str, Any]:
        px = await asyncio.to_thread(preprocess, images, reg.vm.processor)  # (B, 3, H, W)
        return response(task, await batcher.classify(task, px))

    @router.post("/v1/images/classify")
    async def classify(body: ImageClassifyBody) -> dict[str, Any]:
        """Label and class probabilities of each base64 image, batched with every other image task's rows."""
        task = reg.get(body.task)
        return await run(task, decode_base64(body.images, max_inputs))

    @router.post("/v1/images/classify/{task}")
    async def classify_upload(task: str, request: Request) -> dict[str, Any]:
        """The same for a multipart/form-data upload (one file part per image)."""
        t = reg.get(task, "task")
        images = decode_multipart(request.headers.get("content-type", ""), await request.body(), max_inputs)
        return await run(t, images)

    @router.get("/v1/tasks", tags=["tasks"])
    async def tasks() -> dict[str, Any]:
        return {"model": reg.vm.model_id, "tasks": [t.info() for t in reg.tasks.values()], "refused": reg.refused}

    @router.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": reg.vm.model_id, "family": "vision", "tasks": len(reg.tasks)}

    return router


def create_image_app(reg: ImageRegistry, *, max_batch_size: int = 32, max_wait_ms: float = 5.0,
                     max_inputs: int = 256, max_body_bytes: int = 64 * 2**20) -> FastAPI:  # fmt: skip
    """The image app; the text server's request middleware (softprompt.serve.http.Observe) counts every request
    and answers a body over max_body_bytes with 413 while it is read."""
    from fastapi.responses import Response

    from softprompt.serve.http import Observe
    from softprompt.serve.metrics import server_metrics

    batcher = ImageBatcher(reg, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
    metrics = server_metrics()

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="softprompt (images)", version="1", lifespan=lifespan)
    app.add_exception_handler(ServeError, serve_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_middleware(Observe, metrics=metrics, max_body_bytes=max_body_bytes, max_admin_bytes=max_body_bytes)  # type: ignore[arg-type]
    app.state.registry, app.state.batcher, app.state.metrics = reg, batcher, metrics
    app.include_router(image_router(reg, batcher, max_inputs=max_inputs))

    @app.get("/metrics", tags=["ops"])
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def image_prompts_in(directory: str | Path) -> str | None:
    """The base_model of the first image prompt in `directory` (sorted by name), or None: a text directory."""
    for path in sorted(Path(directory).glob("*" + SUFFIX)):
        try:
            meta = load_prompt(path).meta
        except CheckpointError:
            continue
        if meta.get("task") == "image-classify":
            return str(meta.get("base_model") or "")
    return None


def build_image_app(cfg: Any) -> FastAPI:
    """The image app for a ServeConfig whose prompt directory holds image prompts."""
    from softprompt.vision.encoder import load_vision_model

    model = cfg.model or image_prompts_in(cfg.prompts)
    vm = load_vision_model(str(model), device=cfg.device, dtype=cfg.dtype, check=not cfg.skip_equivalence_check)
    reg = ImageRegistry(vm, cfg.prompts, allow_other_model=cfg.allow_other_model)
    return create_image_app(reg, max_batch_size=cfg.max_batch_size, max_wait_ms=cfg.max_wait_ms,
                            max_inputs=cfg.max_inputs, max_body_bytes=int(cfg.max_body_mb * 2**20))  # fmt: skip
