"""The HTTP layer: FastAPI routers over the pipeline (softprompt.serve.pipeline) and the scheduler.

Each route decodes its request (pipeline: bodies, kind checks, tokenising off the event loop), hands the work to
the scheduler (queue -> collate -> predict -> unbatch, in the model thread) and encodes the response (pipeline).
Routers: inference (POST /v1/classify, POST /v1/generate, SSE with "stream": true), OpenAI-compatible
(POST /v1/completions, GET /v1/models), admin (POST|PUT|DELETE /v1/admin/tasks/{name}) and operations
(GET /healthz, GET /metrics in Prometheus format, GET /v1/tasks[/{name}]). FastAPI serves the OpenAPI schema at
/openapi.json (and /docs). Error bodies, the metrics-and-limits middleware, disconnects and server-sent events:
softprompt.serve.http.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from softprompt.serve import pipeline as pl
from softprompt.serve.errors import Forbidden, NotFound, TooLarge, Unauthorized, Unprocessable
from softprompt.serve.http import (
    ADMIN_ERRORS,
    INFERENCE_ERRORS,
    serve_app,
    sse,
    until_disconnect,
)
from softprompt.serve.metrics import Metrics, server_metrics
from softprompt.serve.pipeline import ClassifyBody, ClassifyResponse, CompletionBody, GenerateBody, GenerateResponse
from softprompt.serve.registry import Registry, TaskEntry, validate_name
from softprompt.serve.scheduler import Scheduler

log = logging.getLogger("softprompt.serve")

ENSEMBLE_LABEL = "+ensemble"  # the metrics' task label of every ensemble request (task names start alphanumeric)


@dataclass
class Served:
    """What the routes share: the registry, its scheduler, the metrics and the request limits."""

    registry: Registry
    scheduler: Scheduler
    metrics: Metrics
    admin_token: str | None
    max_upload_bytes: int
    max_inputs: int
    max_new_tokens: int

    def lookup(self, name: str, request: Request, param: str = "task") -> TaskEntry:
        """The task (404 naming the field), recorded as the request's metrics label."""
        try:
            entry = self.registry.get(name)
        except NotFound:
            raise NotFound(f"unknown task {name!r} (GET /v1/tasks lists them)", param=param) from None
        request.state.task = entry.name
        return entry

    def task_of(self, kind: str, name: str, request: Request, param: str) -> TaskEntry:
        entry = self.lookup(name, request, param)
        return pl.check_kind(entry, kind, param, family=self.registry.backbone.family)

    async def encode(self, entry: TaskEntry, values: list[Any], param: str, single: bool = False) -> list[list[int]]:
        """Token ids of the inputs, tokenised off the event loop (lengths are checked on characters first)."""
        reg = self.registry
        return await self.scheduler.run_cpu(lambda: pl.encode_inputs(reg, entry, values, param, single=single))

    def gen_params(self, entry: TaskEntry, n_input: int, max_new: int, temperature: float, top_p: float,
                   stop: str | list[str] | None, seed: int | None, param: str) -> pl.GenParams:  # fmt: skip
        limit = self.registry.position_limit
        return pl.gen_params(entry, n_input, max_new, temperature, top_p, stop, seed, param,
                             max_new_tokens=self.max_new_tokens, position_limit=limit)  # fmt: skip


# ---- inference -------------------------------------------------------------------------------------------
def inference_router(s: Served) -> APIRouter:
    router = APIRouter(tags=["inference"], responses=INFERENCE_ERRORS)

    @router.post("/v1/classify", response_model=ClassifyResponse)
    async def classify(body: ClassifyBody, request: Request) -> dict[str, Any]:
        """Label and class probabilities per input, batched with the requests of every other task. A list of tasks
        is an ensemble: every input runs under each prompt and the probabilities are combined."""
        if len(body.inputs) > s.max_inputs:
            raise TooLarge(f"inputs: {len(body.inputs)} inputs, at most {s.max_inputs} per request", param="inputs")
        if isinstance(body.task, str):
            entry = s.task_of("classify", body.task, request, "task")
            ids = await s.encode(entry, body.inputs, "inputs")
            results = await until_disconnect(request, s.scheduler.classify(entry, ids))
            return pl.classify_response(entry.name, results)
        if not 2 <= len(body.task) <= 16 or len(set(body.task)) < len(body.task):
            raise Unprocessable("task: an ensemble lists 2 to 16 distinct tasks", param="task")
        entries = [s.task_of("classify", t, request, f"task.{k}") for k, t in enumerate(body.task)]
        labels = entries[0].labels
        for k, e in enumerate(entries[1:], start=1):
            if e.labels != labels:
                raise Unprocessable(f"task.{k}: {e.name!r} has labels {e.labels}, not {labels}", param=f"task.{k}")
        request.state.task = ENSEMBLE_LABEL  # one label for every ensemble: metrics stay bounded by the tasks
        member_ids = [await s.encode(e, body.inputs, "inputs") for e in entries]
        per_task = await until_disconnect(  # submitted together: the scheduler puts them in the same batches
            request,
            asyncio.gather(*(s.scheduler.classify(e, ids) for e, ids in zip(entries, member_ids, strict=True))),
        )
        assert labels is not None
        return pl.classify_response([e.name for e in entries], pl.ensemble_results(labels, per_task, body.combine))

    @router.post(
        "/v1/generate",
        response_model=GenerateResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when streaming"}},
    )
    async def generate(body: GenerateBody, request: Request) -> Any:
        """Text generation; joins the running decode batch between steps. `stream: true` sends server-sent
        events: `{"delta": ...}` per piece of text, a final event with the whole output, then `[DONE]`."""
        entry = s.task_of("generate", body.task, request, "task")
        ids = (await s.encode(entry, [body.input], "input", single=True))[0]
        params = s.gen_params(
            entry, len(ids), body.max_new_tokens, body.temperature, body.top_p, body.stop, body.seed, "max_new_tokens"
        )
        if not body.stream:
            res = await until_disconnect(request, s.scheduler.generate(entry, ids, params))
            return pl.generate_response(entry.name, res)
        req = s.scheduler.submit_stream(entry, ids, params)
        return await sse(request, s.scheduler, req, lambda ev: pl.generate_event(entry.name, ev))

    return router


# ---- OpenAI-compatible -----------------------------------------------------------------------------------
def openai_router(s: Served) -> APIRouter:
    router = APIRouter(tags=["openai"])

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        """OpenAI-compatible model list: one model per task."""
        return {
            "object": "list",
            "data": [
                {"id": e.name, "object": "model", "created": int(e.created), "owned_by": "softprompt", "task": e.kind}
                for e in s.registry.entries()
            ],
        }

    @router.post("/v1/completions", responses=INFERENCE_ERRORS)
    async def completions(body: CompletionBody, request: Request) -> Any:
        """OpenAI-compatible completions; `model` is the task name. A classification task completes with its
        predicted label."""
        entry = s.lookup(body.model, request, "model")
        if body.n not in (None, 1):
            raise Unprocessable("n: only n=1 is supported", param="n")
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise Unprocessable("prompt: at least one prompt", param="prompt")
        if len(prompts) > s.max_inputs:
            raise TooLarge(f"prompt: at most {s.max_inputs} prompts per request", param="prompt")
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        ids = await s.encode(entry, list(prompts), "prompt", single=len(prompts) == 1)
        if entry.kind == "classify":  # the completion is the predicted label
            if body.stream:
                raise Unprocessable("stream: not available for classification tasks", param="stream")
            results = await until_disconnect(request, s.scheduler.classify(entry, ids))
            return pl.classify_completion(cid, created, entry.name, ids, results)
        pl.check_kind(entry, "generate", "model", family=s.registry.backbone.family)
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        max_new = 16 if body.max_tokens is None else body.max_tokens
        params = [s.gen_params(entry, len(x), max_new, temperature, top_p, body.stop, body.seed, "max_tokens")
                  for x in ids]  # fmt: skip
        if body.stream:
            if len(prompts) != 1:
                raise Unprocessable("prompt: streaming takes a single prompt", param="prompt")
            req = s.scheduler.submit_stream(entry, ids[0], params[0])
            return await sse(request, s.scheduler, req, lambda ev: pl.completion_chunk(cid, created, entry.name, ev))
        results = await until_disconnect(
            request, asyncio.gather(*(s.scheduler.generate(entry, x, p) for x, p in zip(ids, params, strict=True)))
        )
        return pl.generate_completion(cid, created, entry.name, results)

    return router


# ---- admin -----------------------------------------------------------------------------------------------
UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {
                "schema": {"type": "object", "required": ["path"], "properties": {"path": {"type": "string"}}}
            },
        },
    }
}


def check_admin(request: Request, admin_token: str | None) -> None:
    """403 when the admin endpoints are disabled, 401 unless the request carries the bearer token."""
    if not admin_token:
        raise Forbidden("admin endpoints are disabled (start the server with --admin-token or SOFTPROMPT_ADMIN_TOKEN)")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), admin_token.encode()):
        raise Unauthorized(
            "missing or invalid admin token (Authorization: Bearer TOKEN)", headers={"WWW-Authenticate": "Bearer"}
        )


async def read_upload(request: Request, max_upload_bytes: int) -> tuple[bytes | None, str | None]:
    """(file bytes, None) for a raw upload, or (None, server path) for a JSON {"path": ...} body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = 64 * 1024 if ctype == "application/json" else max_upload_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise TooLarge(f"body: {length} bytes, the limit is {limit}", param="body")
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise TooLarge(f"body: larger than the {limit} byte limit", param="body")
    if ctype == "application/json":
        try:
            obj = json.loads(bytes(data) or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise Unprocessable("body: malformed JSON", param="body") from None
        path = obj.get("path") if isinstance(obj, dict) else None
        if not isinstance(path, str) or not path:
            raise Unprocessable('path: required (a JSON body is {"path": "/server/file.safetensors"})', param="path")
        return None, path
    if not data:
        raise Unprocessable('body: empty (send the prompt file\'s bytes, or JSON {"path": ...})', param="body")
    return bytes(data), None


class TaskStore(Protocol):
    """What the admin endpoints change: the text Registry, or the image app's ImageRegistry. Each returns the task
    (with `.name` and `.info()`); a bad file raises BadRequest and changes nothing."""

    def add(self, name: str, data: bytes, *, replace: bool, from_path: str | None = None) -> tuple[Any, bool]: ...

    def add_path(self, name: str, source: str, *, replace: bool, max_bytes: int) -> tuple[Any, bool]: ...

    def remove(self, name: str) -> Any: ...


def admin_router(s: Served) -> APIRouter:
    return task_admin_router(s.registry, s.metrics, s.admin_token, s.max_upload_bytes)


def task_admin_router(store: TaskStore, metrics: Metrics, admin_token: str | None, max_upload_bytes: int) -> APIRouter:
    """POST|PUT|DELETE /v1/admin/tasks/{name} over `store`, behind the bearer token (check_admin)."""
    router = APIRouter(tags=["admin"], responses=ADMIN_ERRORS)

    async def upsert(name: str, request: Request, replace: bool) -> JSONResponse:
        check_admin(request, admin_token)
        validate_name(name)
        data, path = await read_upload(request, max_upload_bytes)
        if path is not None:
            entry, replaced = await asyncio.to_thread(
                store.add_path, name, path, replace=replace, max_bytes=max_upload_bytes
            )
        else:
            assert data is not None
            entry, replaced = await asyncio.to_thread(store.add, name, data, replace=replace)
        request.state.task = entry.name
        return JSONResponse({"task": entry.info(), "replaced": replaced}, 200 if replaced else 201)

    @router.post("/v1/admin/tasks/{name}", status_code=201, openapi_extra=UPLOAD_DOC)
    async def add_task(name: str, request: Request) -> JSONResponse:
        """Add a task (409 if it exists). Body: the prompt file (application/octet-stream) or
        JSON {"path": "..."} naming a file on the server. Bearer token required."""
        return await upsert(name, request, replace=False)

    @router.put("/v1/admin/tasks/{name}", openapi_extra=UPLOAD_DOC)
    async def put_task(name: str, request: Request) -> JSONResponse:
        """Add or replace a task (same bodies as POST). Bearer token required."""
        return await upsert(name, request, replace=True)

    @router.delete("/v1/admin/tasks/{name}")
    async def delete_task(name: str, request: Request) -> dict[str, Any]:
        """Remove a task and its file. Bearer token required."""
        check_admin(request, admin_token)
        entry = await asyncio.to_thread(store.remove, name)
        metrics.forget("task", entry.name)  # its series go with it: labels stay bounded by the tasks there are
        return {"deleted": entry.name}

    return router


# ---- operations ------------------------------------------------------------------------------------------
def ops_router(s: Served) -> APIRouter:
    router = APIRouter()
    bb = s.registry.backbone

    @router.get("/healthz", tags=["ops"])
    async def healthz() -> JSONResponse:
        """200 while serving; 503 once shutdown has begun."""
        ok = s.scheduler.running and not s.scheduler.closing
        body = {
            "status": "ok" if ok else "unavailable",
            "model": bb.model_id,
            "family": bb.family,
            "tasks": len(s.registry),
            "queue_depth": s.scheduler.queue_depth,
            "active_generations": s.scheduler.active_generations,
        }
        return JSONResponse(body, 200 if ok else 503)

    @router.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def prometheus() -> Response:
        """Prometheus text format: requests, errors, latency, batch sizes, queue depth, cache, per task."""
        return Response(s.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @router.get("/v1/tasks", tags=["tasks"])
    async def list_tasks() -> dict[str, Any]:
        """Every served task with its metadata, and the prompt files refused at start (with the reason)."""
        return {
            "model": bb.model_id,
            "tasks": [e.info() for e in s.registry.entries()],
            "refused": s.registry.refused_list(),
        }

    @router.get("/v1/tasks/{name}", tags=["tasks"])
    async def get_task(name: str, request: Request) -> dict[str, Any]:
        return s.lookup(name, request, "name").info()

    return router


# ---- the app ---------------------------------------------------------------------------------------------
def create_app(
    registry: Registry,
    scheduler: Scheduler,
    *,
    admin_token: str | None = None,
    max_upload_bytes: int = 16 * 2**20,
    max_body_bytes: int = 8 * 2**20,
    max_inputs: int = 256,
    max_new_tokens: int = 512,
    metrics: Metrics | None = None,
    drain_timeout_s: float | None = None,
) -> FastAPI:
    """The FastAPI app over a registry and its scheduler. The scheduler starts and stops with the app's lifespan
    (shutdown finishes every accepted request first)."""
    metrics = metrics or scheduler.metrics or server_metrics()
    scheduler.metrics = metrics
    watch_metrics(metrics, registry, scheduler)
    bb = registry.backbone

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await scheduler.start()
        log.info("serving %d task(s) on %s (%s)", len(registry), bb.model_id, bb.family)
        try:
            yield
        finally:
            log.info(
                "shutting down: finishing %d queued and %d running request(s)",
                scheduler.queue_depth,
                scheduler.active_generations,
            )
            await scheduler.stop(drain=True, timeout=drain_timeout_s)

    app = serve_app(
        metrics,
        max_body_bytes=max_body_bytes,
        max_upload_bytes=max_upload_bytes,
        title="softprompt",
        version="1",
        summary="Many prompt-tuned tasks on one frozen model, batched across tasks.",
        lifespan=lifespan,
    )
    app.state.registry, app.state.scheduler, app.state.metrics = registry, scheduler, metrics
    served = Served(registry, scheduler, metrics, admin_token, max_upload_bytes, max_inputs, max_new_tokens)
    for router in (ops_router(served), inference_router(served), openai_router(served), admin_router(served)):
        app.include_router(router)
    return app


def watch_metrics(metrics: Metrics, registry: Registry, scheduler: Scheduler) -> None:
    """The gauges read at every scrape: tasks, queue depth, active generations, the prefix cache."""
    metrics.watch("softprompt_tasks", lambda: len(registry))
    metrics.watch("softprompt_queue_depth", lambda: scheduler.queue_depth)
    metrics.watch("softprompt_active_generations", lambda: scheduler.active_generations)
    for key, name in (
        ("bytes", "kv_cache_bytes"),
        ("entries", "kv_cache_entries"),
        ("hits", "kv_cache_hits_total"),
        ("misses", "kv_cache_misses_total"),
        ("evictions", "kv_cache_evictions_total"),
    ):
        metrics.watch(f"softprompt_{name}", lambda key=key: registry.cache_info()[key])  # type: ignore[misc]
