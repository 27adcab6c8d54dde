"""`softprompt serve` for image prompts: image tasks on one image model, batched across tasks.

When the prompt directory holds image prompts (softprompt.vision: vpt, vpt-deep, coop), `softprompt serve` builds
this app instead of the text one (softprompt.serve.server). Every image prompt in the directory is a task; files
that do not fit the model (another image model's fingerprint, a text prompt, a name that is not a task name) are
refused at start and listed.

    POST /v1/images/classify          {"task": NAME, "images": [BASE64, ...]}   (data: URLs accepted)
    POST /v1/images/classify/{task}   multipart/form-data, one file part per image
    GET  /v1/tasks[/{name}], GET /healthz, GET /metrics
    POST|PUT|DELETE /v1/admin/tasks/{name}   the text server's admin endpoints (softprompt.serve.app), same token

Pipeline, as the text server's: count check (413 over --max-inputs, before anything is decoded; the body size is
the middleware's) -> decode (base64 / multipart -> bytes -> a checked RGB image, a bad one is a 422 naming its
field `images.K`) and preprocess (the model's own image processor), both in a decode thread off the event loop ->
bounded queue (429 + Retry-After at --max-queue; 504 at --timeout-s, queued or running) -> one batch mixed across
tasks (`classify_rows`, in the model thread; a failing batch is retried request by request) -> per-request
results. Errors have the text server's shape (softprompt.serve.http), requests and rows are counted in its metrics.
In a batch, the rows of every CoOp task share ONE plain image forward (each task then scores its rows against its
class text features, computed once per task and class set); the rows of VPT tasks of one geometry (shallow/deep,
P tokens) share one forward with per-row prompt tokens (deep: per-row keys/values), each row then read by its own
task's head. A mixed batch gives each row what its task alone gives it (tests/test_serve_images.py). Notation: B
rows, C classes, P prompt tokens, L' prompt layers, d width.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.parser
import email.policy
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel

from softprompt.checkpoint import CheckpointError, load_prompt
from softprompt.serve.app import task_admin_router
from softprompt.serve.errors import (
    BadRequest,
    ServeError,
    Timeout,
    TooLarge,
    Unavailable,
    Unprocessable,
)
from softprompt.serve.http import INFERENCE_ERRORS, serve_app, until_disconnect
from softprompt.serve.image_tasks import SUFFIX, ImageRegistry, ImageTask, classify_rows
from softprompt.serve.limits import RateLimitedLog
from softprompt.serve.metrics import Metrics, server_metrics
from softprompt.serve.scheduler import check_room, finish_worker, wait_for_result
from softprompt.vision.api import rows_of
from softprompt.vision.encoder import VisionModel
from softprompt.vision.images import BadImageError, image_from_bytes, preprocess

log = logging.getLogger("softprompt.serve")
_notes = RateLimitedLog(log)
T = TypeVar("T")


@dataclass(eq=False)
class ImageRequest:
    """One request's rows in the queue: its task (resolved at arrival) and preprocessed pixels (B, 3, H, W)."""

    task: ImageTask
    pixels: torch.Tensor
    deadline: float  # time.monotonic()
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # its waiter timed out or left: skipped


class ImageBatcher:
    """The image scheduler, with the text scheduler's rules (softprompt.serve.scheduler): requests of every image
    task go into one bounded queue (QueueFull, 429 with Retry-After, at `max_queue`); the worker takes requests up to
    `max_batch_size` rows (waiting at most `max_wait_ms` for more) and runs them in one model thread, `max_batch_size`
    rows a forward; a request still queued or running at its deadline is a Timeout (504); a failing batch is retried
    request by request, so one bad request fails alone; `stop()` finishes every accepted request first (Unavailable,
    503, for new ones). Decoding and preprocessing run in the decode threads (`run_cpu`), off the event loop."""

    def __init__(
        self,
        reg: ImageRegistry,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        timeout_s: float = 60.0,
        metrics: Metrics | None = None,
        decode_threads: int = 2,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0 or timeout_s <= 0:
            raise ValueError("--max-batch-size and --max-queue must be >= 1, --max-wait-ms >= 0, --timeout-s > 0")
        self.reg, self.max_batch, self.max_wait = reg, max_batch_size, max_wait_ms / 1000
        self.max_queue, self.timeout_s, self.metrics = max_queue, timeout_s, metrics
        self.decode_threads = decode_threads
        self.run_rows: Callable[[VisionModel, list[tuple[ImageTask, torch.Tensor]]], list[torch.Tensor]] = classify_rows
        self.batches: list[int] = []  # rows of each batch tried, failed ones too (tests)
        self._queue: deque[ImageRequest] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._model: ThreadPoolExecutor | None = None
        self._cpu: ThreadPoolExecutor | None = None
        self._closing = False
        self._batch_s = 0.5  # running mean of a batch, for Retry-After
        self._idle_since = 0.0

    # ---- lifecycle -------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    async def start(self) -> None:
        if self.running:
            return
        self._closing = False
        self._wakeup = asyncio.Event()
        self._model = ThreadPoolExecutor(1, thread_name_prefix="softprompt-model")
        self._cpu = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="softprompt-decode")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="softprompt-image-scheduler")

    async def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; with drain, finish every request already accepted, then stop the worker."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            await finish_worker(self._task, drain=drain, timeout=timeout)
            self._task = None
        for req in list(self._queue):
            self._fail(req, Unavailable("server shut down before the request ran"))
        self._queue.clear()
        for pool in (self._model, self._cpu):
            if pool is not None:
                pool.shutdown(wait=False)
        self._model = self._cpu = None

    async def run_cpu(self, fn: Callable[[], T]) -> T:
        """Run `fn` (decoding, preprocessing) in a decode thread, off the event loop."""
        if self._cpu is None:
            raise Unavailable("server is not running")
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn)

    # ---- submission ------------------------------------------------------------------------------------
    def check_room(self) -> None:
        """Unavailable (503) while shutting down, QueueFull (429) when the queue is full: checked again at submit."""
        if self._closing:
            raise Unavailable("server is shutting down")
        check_room(len(self._queue), self.max_queue, self.max_batch, self._batch_s)
        if not self.running:
            raise Unavailable("scheduler is not running")

    async def classify(
        self, task: ImageTask, pixels: torch.Tensor, *, timeout: float | None = None
    ) -> list[torch.Tensor]:
        """Class probabilities (C,) of each image of `pixels` (B, 3, H, W) under `task`."""
        self.check_room()
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout_s)
        req = ImageRequest(task, pixels, deadline, asyncio.get_running_loop().create_future())
        self._queue.append(req)
        assert self._wakeup is not None
        self._wakeup.set()
        return list(await wait_for_result(req, self.timeout_s))

    # ---- worker ----------------------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            reqs: list[ImageRequest] = []
            try:
                if not self._queue:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                if self.max_wait > 0:
                    await self._gather()
                reqs = self._take()
                if reqs:
                    t0 = time.perf_counter()
                    results = await loop.run_in_executor(self._model, self._run_batch, reqs)
                    dt = time.perf_counter() - t0
                    self._batch_s = 0.8 * self._batch_s + 0.2 * dt
                    for req, res in zip(reqs, results, strict=True):
                        if isinstance(res, BaseException):
                            self._fail(req, res)
                        elif not req.future.done():
                            req.future.set_result(res)
                self._idle_since = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # never let the worker die, nor leave a request waiting
                _notes("iteration", logging.ERROR, "image scheduler iteration failed: %s", e, exc_info=e)
                for req in reqs:
                    self._fail(req, e)
                await asyncio.sleep(0.01)

    async def _gather(self) -> None:
        """Wait until max_batch_size rows are queued or max_wait has passed since the oldest request arrived (or
        since the model became free), as the text scheduler does."""
        assert self._wakeup is not None
        while self._queue and not self._closing:
            rows = sum(r.pixels.shape[0] for r in self._queue)
            remaining = max(self._queue[0].enqueued, self._idle_since) + self.max_wait - time.monotonic()
            if rows >= self.max_batch or remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[ImageRequest]:
        """Requests of this batch, oldest first, up to max_batch_size rows (a larger request alone); expired ones
        fail with Timeout, abandoned ones are dropped."""
        now = time.monotonic()
        out: list[ImageRequest] = []
        rest: deque[ImageRequest] = deque()
        rows = 0
        for req in self._queue:
            if req.cancelled or req.future.done():
                continue
            if now >= req.deadline:
                self._fail(req, Timeout(f"request timed out after {self.timeout_s:g} s in the queue"))
                continue
            n = req.pixels.shape[0]
            if not out or rows + n <= self.max_batch:
                out.append(req)
                rows += n
                continue
            rest.append(req)
        self._queue = rest
        if self.metrics:
            for req in out:
                self.metrics.observe("softprompt_queue_wait_seconds", now - req.enqueued, {"task": req.task.name})
        return out

    def _fail(self, req: ImageRequest, exc: BaseException) -> None:
        if req.future.done():
            return
        if not isinstance(exc, ServeError):
            _notes("failed", logging.ERROR, "request on image task %s failed: %s", req.task.name, exc, exc_info=exc)
            exc = ServeError(f"internal error while running the model ({type(exc).__name__}: {str(exc)[:200]})")
        req.future.set_exception(exc)
        req.future.exception()  # mark retrieved: a timed-out waiter may never read it

    # ---- model thread ----------------------------------------------------------------------------------
    def _run_batch(self, reqs: list[ImageRequest]) -> list[list[torch.Tensor] | BaseException]:
        """Probabilities per request; when the batch fails, each request is run alone, so only those that fail by
        themselves get the error."""
        try:
            rows = [(r.task, r.pixels[k]) for r in reqs for k in range(r.pixels.shape[0])]
            probs: list[torch.Tensor] = []
            for i in range(0, len(rows), self.max_batch):
                chunk = rows[i : i + self.max_batch]
                self.batches.append(len(chunk))
                probs += self.run_rows(self.reg.vm, chunk)
                if self.metrics:
                    self.metrics.observe("softprompt_batch_size", len(chunk), {"kind": "classify"})
                    self.metrics.observe("softprompt_batch_tasks", len({id(t) for t, _ in chunk}), {"kind": "classify"})
            if len(probs) != len(rows):
                raise RuntimeError(f"{len(probs)} results for {len(rows)} rows")
            out: list[list[torch.Tensor] | BaseException] = []
            at = 0
            for r in reqs:
                n = r.pixels.shape[0]
                out.append(probs[at : at + n])
                at += n
                if self.metrics:
                    self.metrics.inc("softprompt_rows_total", {"task": r.task.name}, n)
            return out
        except Exception as e:
            if len(reqs) == 1:
                return [e]
            _notes("retry", logging.WARNING, "image batch of %d requests failed (%s); retrying them one by one",
                   len(reqs), e)  # fmt: skip
            return [self._run_batch([r])[0] for r in reqs]


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
    router = APIRouter(tags=["images"], responses=INFERENCE_ERRORS)

    async def run(request: Request, task: ImageTask, decode: Callable[[], list[Any]]) -> dict[str, Any]:
        request.state.task = task.name  # the request's metrics label
        batcher.check_room()  # a full queue answers 429 before any image is decoded
        px = await batcher.run_cpu(lambda: preprocess(decode(), reg.vm.processor))  # (B, 3, H, W), off the loop
        return response(task, await until_disconnect(request, batcher.classify(task, px)))

    @router.post("/v1/images/classify")
    async def classify(body: ImageClassifyBody, request: Request) -> dict[str, Any]:
        """Label and class probabilities of each base64 image, batched with every other image task's rows."""
        task = reg.get(body.task)
        if len(body.images) > max_inputs:  # bounded before anything is decoded
            raise TooLarge(f"images: {len(body.images)} images, at most {max_inputs} per request", param="images")
        return await run(request, task, lambda: decode_base64(body.images, max_inputs))

    @router.post("/v1/images/classify/{task}")
    async def classify_upload(task: str, request: Request) -> dict[str, Any]:
        """The same for a multipart/form-data upload (one file part per image)."""
        t = reg.get(task, "task")
        ctype, body = request.headers.get("content-type", ""), await request.body()
        return await run(request, t, lambda: decode_multipart(ctype, body, max_inputs))

    return router


def image_ops_router(reg: ImageRegistry, batcher: ImageBatcher, metrics: Metrics) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz", tags=["ops"])
    async def healthz() -> JSONResponse:
        """200 while serving; 503 once shutdown has begun."""
        ok = batcher.running and not batcher.closing
        body = {"status": "ok" if ok else "unavailable", "model": reg.vm.model_id, "family": "vision",
                "tasks": len(reg), "queue_depth": batcher.queue_depth}  # fmt: skip
        return JSONResponse(body, 200 if ok else 503)

    @router.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def prometheus() -> Response:
        """Prometheus text format, the text server's names: requests, errors, latency, rows, batches, queue."""
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @router.get("/v1/tasks", tags=["tasks"])
    async def tasks() -> dict[str, Any]:
        return {"model": reg.vm.model_id, "tasks": [t.info() for t in reg.tasks.values()], "refused": reg.refused}

    @router.get("/v1/tasks/{name}", tags=["tasks"])
    async def task(name: str, request: Request) -> dict[str, Any]:
        t = reg.get(name, "name")
        request.state.task = t.name
        return t.info()

    return router


def create_image_app(
    reg: ImageRegistry,
    *,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    max_inputs: int = 256,
    max_body_bytes: int = 64 * 2**20,
    max_queue: int = 1024,
    timeout_s: float = 60.0,
    admin_token: str | None = None,
    max_upload_bytes: int = 16 * 2**20,
    metrics: Metrics | None = None,
    drain_timeout_s: float | None = None,
) -> FastAPI:
    """The image app: the text server's request middleware (softprompt.serve.http.Observe: every request counted,
    a body over max_body_bytes a 413 while it is read), error shape, limits (ImageBatcher) and admin endpoints
    (softprompt.serve.app.task_admin_router, behind `admin_token`). The batcher starts and stops with the app's
    lifespan; shutdown finishes every accepted request first."""
    metrics = metrics or server_metrics()
    batcher = ImageBatcher(reg, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
                           timeout_s=timeout_s, metrics=metrics)  # fmt: skip
    metrics.watch("softprompt_tasks", lambda: len(reg))
    metrics.watch("softprompt_queue_depth", lambda: batcher.queue_depth)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        log.info("serving %d image task(s) on %s", len(reg), reg.vm.model_id)
        try:
            yield
        finally:
            log.info("shutting down: finishing %d queued request(s)", batcher.queue_depth)
            await batcher.stop(drain=True, timeout=drain_timeout_s)

    app = serve_app(metrics, max_body_bytes=max_body_bytes, max_upload_bytes=max_upload_bytes,
                    title="softprompt (images)", version="1", lifespan=lifespan)  # fmt: skip
    app.state.registry, app.state.batcher, app.state.metrics = reg, batcher, metrics
    app.include_router(image_ops_router(reg, batcher, metrics))
    app.include_router(image_router(reg, batcher, max_inputs=max_inputs))
    app.include_router(task_admin_router(reg, metrics, admin_token, max_upload_bytes))
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
    """The image app for a ServeConfig whose prompt directory holds image prompts: the same flags as the text
    server where they apply (batching, --max-queue, --timeout-s, --max-inputs, --max-body-mb, --admin-token or
    $SOFTPROMPT_ADMIN_TOKEN, --max-upload-mb)."""
    from softprompt.serve.server import TOKEN_ENV
    from softprompt.vision.encoder import load_vision_model

    cfg.validate()
    model = cfg.model or image_prompts_in(cfg.prompts)
    vm = load_vision_model(str(model), device=cfg.device, dtype=cfg.dtype, check=not cfg.skip_equivalence_check)
    reg = ImageRegistry(vm, cfg.prompts, allow_other_model=cfg.allow_other_model)
    return create_image_app(
        reg,
        max_batch_size=cfg.max_batch_size,
        max_wait_ms=cfg.max_wait_ms,
        max_inputs=cfg.max_inputs,
        max_body_bytes=int(cfg.max_body_mb * 2**20),
        max_queue=cfg.max_queue,
        timeout_s=cfg.timeout_s,
        admin_token=cfg.admin_token or os.environ.get(TOKEN_ENV) or None,
        max_upload_bytes=int(cfg.max_upload_mb * 2**20),
        drain_timeout_s=cfg.timeout_s + 5,
    )
