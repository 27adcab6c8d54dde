"""The HTTP layer: a thin FastAPI adapter (decode request -> validate and tokenise -> scheduler -> encode response).

Endpoints: POST /v1/classify, POST /v1/generate (SSE with "stream": true), OpenAI-compatible POST /v1/completions
and GET /v1/models, GET /v1/tasks[/{name}], admin POST|PUT|DELETE /v1/admin/tasks/{name}, GET /healthz,
GET /metrics (Prometheus). FastAPI serves the OpenAPI schema at /openapi.json (and /docs).
Every error is JSON `{"error": {"message", "type", "param", "code"}}` (OpenAI's shape); 422 validation errors keep
FastAPI's `detail` list too and name the field in `param` and the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar

import torch
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from softprompt.evaluate import combine_probs
from softprompt.serve.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    ServeError,
    TooLarge,
    Unauthorized,
    Unprocessable,
)
from softprompt.serve.generation import GenParams
from softprompt.serve.limits import RateLimitedLog
from softprompt.serve.metrics import Metrics, server_metrics
from softprompt.serve.registry import Registry, TaskEntry, check_text, validate_name
from softprompt.serve.scheduler import Scheduler

log = logging.getLogger("softprompt.serve")
_notes = RateLimitedLog(log)
T = TypeVar("T")

InputValue = str | dict[str, str | int | float | bool]


# ---- request / response models ---------------------------------------------------------------------------
class ClassifyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str | list[str] = Field(
        min_length=1,
        description="Task name (a prompt file in the prompts directory), or a list of 2-16 tasks with the same "
        "labels: an ensemble, each input run under every prompt in the same mixed-task batch.",
    )
    inputs: list[InputValue] = Field(
        min_length=1,
        description="Inputs: a string fills the template's single field; an object gives the fields by name.",
    )
    combine: Literal["mean", "vote"] = Field(
        "mean", description="Ensembles: average the probabilities, or majority vote (ties: mean probability)."
    )


class ClassifyResult(BaseModel):
    label: str
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    task: str | list[str]
    results: list[ClassifyResult]


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = Field(min_length=1)
    input: InputValue
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=10.0, allow_inf_nan=False, description="0 = greedy (the default).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = Field(None, description="Stop strings (cut from the output).")
    seed: int | None = Field(
        None, ge=-(2**63), le=2**64 - 1, description="Seed of this request's sampler (sampling only)."
    )
    stream: bool = Field(False, description="Send server-sent events: deltas, then the final result, then [DONE].")


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int


class GenerateResponse(BaseModel):
    task: str
    output: str
    finish_reason: Literal["stop", "length"]
    usage: Usage


class CompletionBody(BaseModel):
    """OpenAI's legacy completions request; `model` is the task name. Fields this server does not use are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    temperature: float | None = Field(1.0, ge=0.0, le=10.0, allow_inf_nan=False)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int | None = Field(1, ge=1)
    stream: bool | None = False
    stop: str | list[str] | None = None
    seed: int | None = Field(
        None, ge=-(2**63), le=2**64 - 1, description="Seed of this request's sampler (sampling only)."
    )


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorBody(BaseModel):
    error: ErrorDetail


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    what = {400: "Wrong kind of task", 401: "Missing or invalid admin token", 403: "Admin endpoints disabled",
            404: "Unknown task", 409: "Task exists", 413: "Input or upload too large",
            422: "Malformed request (the field is named)", 429: "Queue full (see Retry-After)",
            503: "Shutting down", 504: "Request timed out"}  # fmt: skip
    return {c: {"model": ErrorBody, "description": what[c]} for c in codes}


INFERENCE_ERRORS = _errors(400, 404, 413, 422, 429, 503, 504)
ADMIN_ERRORS = _errors(400, 401, 403, 404, 409, 413, 422)


# ---- errors ----------------------------------------------------------------------------------------------
def error_body(status: int, message: str, kind: str, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _safe(obj: Any, depth: int = 0) -> Any:
    """JSON-safe copy of an error body: non-finite floats as strings, lone surrogates escaped, long strings (an
    echoed 10 MB input) cut."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, str):
        if len(obj) > 500:
            obj = obj[:500] + f"... ({len(obj)} characters)"
        return obj.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(obj, dict) and depth < 8:
        return {str(_safe(k, depth + 1)): _safe(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and depth < 8:
        return [_safe(v, depth + 1) for v in obj[:100]]
    if obj is None or isinstance(obj, (bool, int)):
        return obj
    return _safe(str(obj), depth + 1)


class ErrorResponse(JSONResponse):
    """An error body as ASCII JSON: whatever a client sent (NaN, lone surrogates) never breaks its rendering."""

    def render(self, content: Any) -> bytes:
        return json.dumps(_safe(content), ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, kind: str, param: str | None, **kw: Any) -> ErrorResponse:
    return ErrorResponse(error_body(status, message, kind, param), status, **kw)


def _serve_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServeError)
    return error_response(exc.status, exc.message, exc.kind, exc.param, headers=exc.headers)


def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    parts, param = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:] or loc
        name = ".".join(loc) or "body"
        if e.get("type") == "json_invalid":
            name = "body"
        param = param or name
        parts.append(f"{name}: {e.get('msg', 'invalid')}")
    body = error_body(422, "; ".join(parts) or "invalid request", "invalid_request_error", param)
    body["detail"] = jsonable_encoder(_safe(errors))
    return ErrorResponse(body, 422)


# ---- metrics and limits middleware (pure ASGI: streaming responses pass through untouched) ------------------
class _Observe:
    """Counts every request in the metrics; enforces the body size while reading (chunked bodies included: the
    bytes received are counted, 413 the moment they pass the limit, the connection closed); answers any error
    that escaped the handlers as a JSON 500 (one rate-limited log line with the traceback)."""

    def __init__(self, app: Any, metrics: Metrics, max_body_bytes: int, max_admin_bytes: int) -> None:
        self.app, self.metrics = app, metrics
        self.max_body, self.max_admin = max_body_bytes, max_admin_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500
        started = over = False
        limit = self.max_admin if str(scope.get("path", "")).startswith("/v1/admin/") else self.max_body
        close = {"connection": "close"}

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status, started
            if over:
                return  # the client has its 413; what the handler answers to the "disconnect" is dropped
            if message["type"] == "http.response.start":
                status, started = int(message["status"]), True
            await send(message)

        async def too_large() -> None:
            nonlocal over
            msg = f"request body larger than {limit} bytes"
            await send_status_413(error_response(413, msg, "request_too_large", "body", headers=close))
            over = True

        async def send_status_413(resp: Response) -> None:
            nonlocal status, started
            if not started:
                status, started = 413, True
                await resp(scope, _no_body, send)

        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await too_large()
            self._count(scope, 413, t0)
            return
        received = 0

        async def receive_limited() -> dict[str, Any]:
            nonlocal received
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    await too_large()
                    return {"type": "http.disconnect"}
            return dict(message)

        try:
            await self.app(scope, receive_limited, send_status)
        except Exception as e:
            if not over and not started:
                _notes("unhandled", logging.ERROR, "unhandled error on %s: %s", scope.get("path"), e, exc_info=e)
                resp = error_response(500, f"internal error ({type(e).__name__})", "server_error", None)
                status = 500
                await resp(scope, _no_body, send)
            elif not over:
                _notes("unhandled", logging.ERROR, "error after the response started on %s: %s", scope.get("path"),
                       e, exc_info=e)  # fmt: skip
        finally:
            self._count(scope, status, t0)

    def _count(self, scope: dict[str, Any], status: int, t0: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "other"
        task = (scope.get("state") or {}).get("task", "-")
        labels = {"endpoint": endpoint, "task": task}
        self.metrics.inc("softprompt_requests_total", {**labels, "code": str(status)})
        if status >= 400:
            self.metrics.inc("softprompt_request_errors_total", {**labels, "code": str(status)})
        self.metrics.observe("softprompt_request_duration_seconds", time.perf_counter() - t0, labels)


async def _no_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


class ClientGone(ServeError):
    status, kind = 499, "client_closed_request"


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the request body has been read: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # not expected once the body is read; never a busy loop


async def until_disconnect(request: Request, aw: Awaitable[T]) -> T:
    """Await `aw` unless the client disconnects first: then it is cancelled (the scheduler drops its queued request
    or frees its decoding rows) and ClientGone (499, never seen by the gone client) is raised."""
    task = asyncio.ensure_future(aw)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientGone("client closed the connection before the answer")


ENSEMBLE_LABEL = "+ensemble"  # the metrics' task label of every ensemble request (task names start alphanumeric)


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

    app = FastAPI(
        title="softprompt",
        version="1",
        summary="Many prompt-tuned tasks on one frozen model, batched across tasks.",
        lifespan=lifespan,
    )
    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(
        _Observe,  # type: ignore[arg-type]
        metrics=metrics,
        max_body_bytes=max_body_bytes,
        max_admin_bytes=max(max_upload_bytes, 64 * 1024) + 1024,
    )
    app.state.registry, app.state.scheduler, app.state.metrics = registry, scheduler, metrics

    def lookup(name: str, request: Request, param: str = "task") -> TaskEntry:
        try:
            entry = registry.get(name)
        except NotFound:
            raise NotFound(f"unknown task {name!r} (GET /v1/tasks lists them)", param=param) from None
        request.state.task = entry.name
        return entry

    def gen_params(
        entry: TaskEntry,
        n_input: int,
        max_new: int,
        temperature: float,
        top_p: float,
        stop: str | list[str] | None,
        seed: int | None,
        param: str,
    ) -> GenParams:
        if max_new > max_new_tokens:
            raise Unprocessable(f"{param}: at most {max_new_tokens} (the server's --max-new-tokens)", param=param)
        limit = registry.position_limit
        if limit is not None and entry.prefix_len + n_input + max_new > limit:
            raise TooLarge(
                f"prompt ({entry.prefix_len}) + input ({n_input}) + {param} ({max_new}) tokens exceed the model's "
                f"{limit} positions",
                param=param,
            )
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not s or len(s) > 1000 for s in stops) or len(stops) > 16:
            raise Unprocessable("stop: up to 16 non-empty strings of at most 1000 characters", param="stop")
        for s in stops:
            check_text(s, "stop")
        try:
            return GenParams(max_new, temperature, top_p, tuple(stops), seed)
        except ValueError as e:
            name = str(e).split(" ")[0]
            raise Unprocessable(str(e), param=param if name == "max_new_tokens" else name) from None

    def require_generate(entry: TaskEntry, param: str) -> None:
        if entry.kind != "generate":
            raise BadRequest(f"task {entry.name!r} is a {entry.kind} task: use /v1/classify", param=param)
        if bb.family == "encoder":
            raise BadRequest("this server's model is an encoder: it cannot generate", param=param)

    # ---- health, metrics, tasks --------------------------------------------------------------------------
    @app.get("/healthz", tags=["ops"])
    async def healthz() -> JSONResponse:
        """200 while serving; 503 once shutdown has begun."""
        ok = scheduler.running and not scheduler.closing
        body = {
            "status": "ok" if ok else "unavailable",
            "model": bb.model_id,
            "family": bb.family,
            "tasks": len(registry),
            "queue_depth": scheduler.queue_depth,
            "active_generations": scheduler.active_generations,
        }
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def prometheus() -> Response:
        """Prometheus text format: requests, errors, latency, batch sizes, queue depth, cache, per task."""
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/tasks", tags=["tasks"])
    async def list_tasks() -> dict[str, Any]:
        """Every served task with its metadata, and the prompt files refused at start (with the reason)."""
        return {
            "model": bb.model_id,
            "tasks": [e.info() for e in registry.entries()],
            "refused": registry.refused_list(),
        }

    @app.get("/v1/tasks/{name}", tags=["tasks"])
    async def get_task(name: str, request: Request) -> dict[str, Any]:
        return lookup(name, request, "name").info()

    # ---- inference -----------------------------------------------------------------------------------
    @app.post("/v1/classify", tags=["inference"], response_model=ClassifyResponse, responses=INFERENCE_ERRORS)
    async def classify(body: ClassifyBody, request: Request) -> dict[str, Any]:
        """Label and class probabilities per input, batched with the requests of every other task. A list of tasks
        is an ensemble: every input runs under each prompt and the probabilities are combined."""
        if len(body.inputs) > max_inputs:
            raise TooLarge(f"inputs: {len(body.inputs)} inputs, at most {max_inputs} per request", param="inputs")
        if isinstance(body.task, str):
            entry = classify_entry(body.task, request, "task")
            ids = await encode_all(entry, body.inputs, "inputs")
            return {"task": entry.name, "results": await until_disconnect(request, scheduler.classify(entry, ids))}
        if not 2 <= len(body.task) <= 16 or len(set(body.task)) < len(body.task):
            raise Unprocessable("task: an ensemble lists 2 to 16 distinct tasks", param="task")
        entries = [classify_entry(t, request, f"task.{k}") for k, t in enumerate(body.task)]
        labels = entries[0].labels
        for k, e in enumerate(entries[1:], start=1):
            if e.labels != labels:
                raise Unprocessable(f"task.{k}: {e.name!r} has labels {e.labels}, not {labels}", param=f"task.{k}")
        request.state.task = ENSEMBLE_LABEL  # one label for every ensemble: metrics stay bounded by the tasks
        member_ids = [await encode_all(e, body.inputs, "inputs") for e in entries]
        per_task = await until_disconnect(  # submitted together: the scheduler puts them in the same batches
            request, asyncio.gather(*(scheduler.classify(e, ids) for e, ids in zip(entries, member_ids, strict=True)))
        )
        assert labels is not None
        p = torch.tensor(
            [[[r[i]["probabilities"][lab] for lab in labels] for r in per_task] for i in range(len(body.inputs))]
        )  # (N, K, L)
        combined = combine_probs(p, body.combine)
        results = [
            {"label": labels[int(row.argmax())], "probabilities": dict(zip(labels, (row / row.sum()).tolist()))}
            for row in combined
        ]
        return {"task": [e.name for e in entries], "results": results}

    async def encode_all(entry: TaskEntry, values: list[Any], param: str, single: bool = False) -> list[list[int]]:
        """Token ids of the inputs, tokenised off the event loop (lengths are checked on characters first)."""

        def work() -> list[list[int]]:
            return [registry.encode(entry, x, param if single else f"{param}.{i}") for i, x in enumerate(values)]

        return await scheduler.run_cpu(work)

    def classify_entry(name: str, request: Request, param: str) -> TaskEntry:
        entry = lookup(name, request, param)
        if entry.kind != "classify":
            raise BadRequest(f"task {entry.name!r} is a {entry.kind} task: use /v1/generate", param=param)
        return entry

    @app.post(
        "/v1/generate",
        tags=["inference"],
        response_model=GenerateResponse,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when streaming"},
            **INFERENCE_ERRORS,
        },  # fmt: skip
    )
    async def generate(body: GenerateBody, request: Request) -> Any:
        """Text generation; joins the running decode batch between steps. `stream: true` sends server-sent
        events: `{"delta": ...}` per piece of text, a final event with the whole output, then `[DONE]`."""
        entry = lookup(body.task, request)
        require_generate(entry, "task")
        ids = (await encode_all(entry, [body.input], "input", single=True))[0]
        params = gen_params(
            entry, len(ids), body.max_new_tokens, body.temperature, body.top_p, body.stop, body.seed, "max_new_tokens"
        )
        if not body.stream:
            res = await until_disconnect(request, scheduler.generate(entry, ids, params))
            return {
                "task": entry.name,
                "output": res["text"],
                "finish_reason": res["finish_reason"],
                "usage": {"input_tokens": res["input_tokens"], "output_tokens": res["output_tokens"]},
            }

        def encode(ev: dict[str, Any]) -> dict[str, Any]:
            if not ev.get("done"):
                return {"task": entry.name, "delta": ev.get("delta", "")}
            return {
                "task": entry.name,
                "delta": "",
                "output": ev["text"],
                "finish_reason": ev["finish_reason"],
                "usage": {"input_tokens": ev["input_tokens"], "output_tokens": ev["output_tokens"]},
            }

        return await _sse(request, scheduler, scheduler.submit_stream(entry, ids, params), encode)

    @app.get("/v1/models", tags=["openai"])
    async def models() -> dict[str, Any]:
        """OpenAI-compatible model list: one model per task."""
        return {
            "object": "list",
            "data": [
                {"id": e.name, "object": "model", "created": int(e.created), "owned_by": "softprompt", "task": e.kind}
                for e in registry.entries()
            ],
        }

    @app.post("/v1/completions", tags=["openai"], responses=INFERENCE_ERRORS)
    async def completions(body: CompletionBody, request: Request) -> Any:
        """OpenAI-compatible completions; `model` is the task name. A classification task completes with its
        predicted label."""
        entry = lookup(body.model, request, "model")
        if body.n not in (None, 1):
            raise Unprocessable("n: only n=1 is supported", param="n")
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise Unprocessable("prompt: at least one prompt", param="prompt")
        if len(prompts) > max_inputs:
            raise TooLarge(f"prompt: at most {max_inputs} prompts per request", param="prompt")
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        ids = await encode_all(entry, list(prompts), "prompt", single=len(prompts) == 1)

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
            out = {"id": cid, "object": "text_completion", "created": created, "model": entry.name, "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        def usage(n_in: int, n_out: int) -> dict[str, int]:
            return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}

        if entry.kind == "classify":  # the completion is the predicted label
            if body.stream:
                raise Unprocessable("stream: not available for classification tasks", param="stream")
            results = await until_disconnect(request, scheduler.classify(entry, ids))
            choices = [
                {"text": r["label"], "index": i, "logprobs": None, "finish_reason": "stop"}
                for i, r in enumerate(results)
            ]
            return chunk(choices, usage(sum(map(len, ids)), len(ids)))
        require_generate(entry, "model")
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        max_new = 16 if body.max_tokens is None else body.max_tokens
        params = [
            gen_params(entry, len(x), max_new, temperature, top_p, body.stop, body.seed, "max_tokens") for x in ids
        ]
        if body.stream:
            if len(prompts) != 1:
                raise Unprocessable("prompt: streaming takes a single prompt", param="prompt")

            def encode(ev: dict[str, Any]) -> dict[str, Any]:
                if not ev.get("done"):
                    return chunk([{"text": ev.get("delta", ""), "index": 0, "logprobs": None, "finish_reason": None}])
                return chunk(
                    [{"text": "", "index": 0, "logprobs": None, "finish_reason": ev["finish_reason"]}],
                    usage(ev["input_tokens"], ev["output_tokens"]),
                )

            return await _sse(request, scheduler, scheduler.submit_stream(entry, ids[0], params[0]), encode)
        results = await until_disconnect(
            request, asyncio.gather(*(scheduler.generate(entry, x, p) for x, p in zip(ids, params, strict=True)))
        )
        choices = [
            {"text": r["text"], "index": i, "logprobs": None, "finish_reason": r["finish_reason"]}
            for i, r in enumerate(results)
        ]
        return chunk(choices, usage(sum(r["input_tokens"] for r in results), sum(r["output_tokens"] for r in results)))

    # ---- admin ---------------------------------------------------------------------------------------
    def check_admin(request: Request) -> None:
        if not admin_token:
            raise Forbidden(
                "admin endpoints are disabled (start the server with --admin-token or SOFTPROMPT_ADMIN_TOKEN)"
            )
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), admin_token.encode()):
            raise Unauthorized(
                "missing or invalid admin token (Authorization: Bearer TOKEN)", headers={"WWW-Authenticate": "Bearer"}
            )

    async def read_body(request: Request) -> tuple[bytes | None, str | None]:
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
                raise Unprocessable(
                    'path: required (a JSON body is {"path": "/server/file.safetensors"})', param="path"
                )
            return None, path
        if not data:
            raise Unprocessable('body: empty (send the prompt file\'s bytes, or JSON {"path": ...})', param="body")
        return bytes(data), None

    upload_doc: dict[str, Any] = {
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

    async def upsert(name: str, request: Request, replace: bool) -> JSONResponse:
        check_admin(request)
        validate_name(name)
        data, path = await read_body(request)
        if path is not None:
            entry, replaced = await asyncio.to_thread(
                registry.add_path, name, path, replace=replace, max_bytes=max_upload_bytes
            )
        else:
            assert data is not None
            entry, replaced = await asyncio.to_thread(registry.add, name, data, replace=replace)
        request.state.task = entry.name
        return JSONResponse({"task": entry.info(), "replaced": replaced}, 200 if replaced else 201)

    @app.post("/v1/admin/tasks/{name}", tags=["admin"], status_code=201, openapi_extra=upload_doc,
              responses=ADMIN_ERRORS)  # fmt: skip
    async def add_task(name: str, request: Request) -> JSONResponse:
        """Add a task (409 if it exists). Body: the prompt file (application/octet-stream) or
        JSON {"path": "..."} naming a file on the server. Bearer token required."""
        return await upsert(name, request, replace=False)

    @app.put("/v1/admin/tasks/{name}", tags=["admin"], openapi_extra=upload_doc, responses=ADMIN_ERRORS)
    async def put_task(name: str, request: Request) -> JSONResponse:
        """Add or replace a task (same bodies as POST). Bearer token required."""
        return await upsert(name, request, replace=True)

    @app.delete("/v1/admin/tasks/{name}", tags=["admin"], responses=ADMIN_ERRORS)
    async def delete_task(name: str, request: Request) -> dict[str, Any]:
        """Remove a task and its file. Bearer token required."""
        check_admin(request)
        entry = await asyncio.to_thread(registry.remove, name)
        metrics.forget("task", entry.name)  # its series go with it: labels stay bounded by the tasks there are
        return {"deleted": entry.name}

    return app


async def _sse(request: Request, scheduler: Scheduler, req: Any, encode: Any) -> StreamingResponse:
    """Server-sent events of a streaming request. Waits for the first event before answering, so queue time-outs
    and early failures still get their HTTP status; later failures arrive as a final `data: {"error": ...}`."""
    events: AsyncGenerator[dict[str, Any], None] = scheduler.stream(req)  # type: ignore[assignment]
    try:
        first = await until_disconnect(request, events.__anext__())  # a client gone while queued frees it
    except BaseException:
        await events.aclose()
        raise

    async def body() -> AsyncIterator[str]:
        try:
            yield f"data: {json.dumps(encode(first))}\n\n"
            if not first.get("done"):
                async for ev in events:
                    yield f"data: {json.dumps(encode(ev))}\n\n"
            yield "data: [DONE]\n\n"
        except ServeError as e:
            yield f"data: {json.dumps(error_body(e.status, e.message, e.kind, e.param))}\n\n"
        finally:
            await events.aclose()

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
