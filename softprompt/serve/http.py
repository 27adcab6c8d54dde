"""HTTP plumbing of the server: error bodies, the metrics-and-limits middleware, disconnects, server-sent events.

Every error is JSON `{"error": {"message", "type", "param", "code"}}` (OpenAI's shape); 422 validation errors keep
FastAPI's `detail` list too and name the field in `param` and the message. `Observe` (pure ASGI: streaming
responses pass through untouched) counts every request in the metrics and enforces the body size while reading;
`until_disconnect` cancels the work of a client that has gone; `sse` streams a generation's events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from softprompt.serve.errors import ServeError
from softprompt.serve.limits import RateLimitedLog
from softprompt.serve.metrics import Metrics
from softprompt.serve.scheduler import Scheduler

log = logging.getLogger("softprompt.serve")
_notes = RateLimitedLog(log)
T = TypeVar("T")


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


def serve_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServeError)
    return error_response(exc.status, exc.message, exc.kind, exc.param, headers=exc.headers)


def validation_error(_: Request, exc: Exception) -> JSONResponse:
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
class Observe:
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


async def sse(
    request: Request, scheduler: Scheduler, req: Any, encode: Callable[[dict[str, Any]], dict[str, Any]]
) -> StreamingResponse:
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


def serve_app(metrics: Metrics, *, max_body_bytes: int, max_upload_bytes: int, **fastapi: Any) -> FastAPI:
    """A FastAPI app with the server's error shape (ServeError, request validation) and its request middleware
    (Observe: body limits while reading, metrics): what the text and the image apps share before their routers."""
    app = FastAPI(**fastapi)
    app.add_exception_handler(ServeError, serve_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_middleware(
        Observe,  # type: ignore[arg-type]
        metrics=metrics,
        max_body_bytes=max_body_bytes,
        max_admin_bytes=max(max_upload_bytes, 64 * 1024) + 1024,
    )
    return app
