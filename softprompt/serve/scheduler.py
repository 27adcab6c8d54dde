"""The scheduler: one bounded queue, its batching policy and its lifecycle; the model work is the pipeline's.

Requests are validated and tokenised before they are queued (softprompt.serve.pipeline), so a batch only holds
well-formed rows. The worker (an asyncio task) takes up to `max_batch_size` rows (waiting at most `max_wait_ms`
for a batch to fill when the model is idle) and runs them in a single model thread, so the event loop stays
responsive:

- classification: every queued classify request of every task goes into one batch (modes: "mixed", the default,
  or "per-task": one task per batch), run by pipeline.classify_rows (collate -> predict -> unbatch);
- generation (decoder-only): iteration-level batching, one softprompt.serve.decoder.Decoder iteration per turn:
  between two decoding steps new requests are prefilled and join, finished ones leave.

`kv_cache=False` rebuilds each task's prefix with every batch and runs the prompt through the model with the
input (the PEFT way), for comparison. A failure while running a batch is retried request by request, so one bad
request never fails the others. Full queue: QueueFull (429, Retry-After); a request still waiting or running at
its deadline: Timeout (504); after `stop()`: Unavailable (503). `stop()` finishes everything accepted first.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from softprompt.serve.decoder import Decoder
from softprompt.serve.errors import QueueFull, ServeError, Timeout, Unavailable
from softprompt.serve.generation import GenParams
from softprompt.serve.limits import RateLimitedLog
from softprompt.serve.metrics import Metrics
from softprompt.serve.pipeline import classify_rows, unbatch
from softprompt.serve.registry import Registry, TaskEntry

log = logging.getLogger("softprompt.serve")
_notes = RateLimitedLog(log)
T = TypeVar("T")
MODES = ("mixed", "per-task")


@dataclass(eq=False)
class Request:
    kind: str  # classify | generate
    entry: TaskEntry
    inputs: list[list[int]]  # classify: one per input; generate: exactly one
    deadline: float  # time.monotonic()
    future: asyncio.Future
    params: GenParams | None = None
    events: asyncio.Queue | None = None  # generate, streaming: {"delta": str} ... then the final result
    enqueued: float = field(default_factory=time.monotonic)
    started: bool = False
    cancelled: bool = False


async def finish_worker(task: asyncio.Task, *, drain: bool, timeout: float | None) -> None:
    """A scheduler's worker task at shutdown: with drain, wait (at most `timeout`) for it to finish the requests it
    accepted, else cancel it at once; past the timeout it is cancelled (the text and image schedulers)."""
    if not drain:
        task.cancel()
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        task.cancel()


def check_room(depth: int, max_queue: int, max_batch_size: int, batch_s: float) -> None:
    """QueueFull (429) when `depth` requests already wait in a queue of `max_queue`; Retry-After: the time the
    queue takes to drain at `batch_s` seconds a batch (at least 1 s). Shared by the text and image schedulers."""
    if depth >= max_queue:
        wait = math.ceil(max(1.0, depth / max_batch_size * batch_s))
        raise QueueFull(f"queue full ({max_queue} requests waiting); retry later", headers={"Retry-After": str(wait)})


async def wait_for_result(req: Any, timeout_s: float) -> Any:
    """The result of a queued request (`.future`, `.deadline` in time.monotonic(), `.cancelled`): Timeout (504)
    at its deadline, queued or running; either way, or when the waiter is cancelled, the request is marked
    cancelled so the worker skips it. Shared by the text and image schedulers."""
    try:
        return await asyncio.wait_for(asyncio.shield(req.future), max(req.deadline - time.monotonic(), 0.001))
    except asyncio.TimeoutError:
        req.cancelled = True
        raise Timeout(f"request timed out after {timeout_s:g} s") from None
    except asyncio.CancelledError:
        req.cancelled = True
        raise


@dataclass
class BatchRecord:
    """What one model pass held (kept for tests, the benchmark and metrics)."""

    kind: str  # classify | prefill | decode
    rows: int
    tasks: int
    seconds: float


class Scheduler:
    def __init__(
        self,
        registry: Registry,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        timeout_s: float = 60.0,
        mode: str = "mixed",
        kv_cache: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"--scheduler must be one of {', '.join(MODES)}, got {mode!r}")
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0 or timeout_s <= 0:
            raise ValueError("--max-batch-size and --max-queue must be >= 1, --max-wait-ms >= 0, --timeout-s > 0")
        self.registry = registry
        self.pm = registry.pm
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.mode = mode
        self.metrics = metrics
        self.history: deque[BatchRecord] = deque(maxlen=10_000)
        self._queue: deque[Request] = deque()
        self.decoder = Decoder(registry, kv_cache=kv_cache, timeout_s=timeout_s, record=self._record)
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._cpu: ThreadPoolExecutor | None = None  # tokenisation and other CPU work of the handlers
        self._closing = False
        self._batch_s = 0.5  # running mean of a model pass, for Retry-After
        self._idle_since = 0.0  # time.monotonic() when the model thread last became free
        self.eos = self.decoder.eos

    @property
    def kv_cache(self) -> bool:
        """Per-task prompt K/V cached (False: the prompt runs with every batch); settable, for classification and
        generation alike."""
        return self.decoder.kv_cache

    @kv_cache.setter
    def kv_cache(self, on: bool) -> None:
        self.decoder.kv_cache = on

    # ---- lifecycle -------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def closing(self) -> bool:
        return self._closing

    async def start(self) -> None:
        if self.running:
            return
        self._closing = False
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="softprompt-model")
        self._cpu = ThreadPoolExecutor(1, thread_name_prefix="softprompt-tokenize")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="softprompt-scheduler")

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
        for owner in self.decoder.owners():
            self._fail(owner, Unavailable("server shut down during generation"))
        self.decoder.reset()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        if self._cpu is not None:
            self._cpu.shutdown(wait=False)
            self._cpu = None

    async def run_cpu(self, fn: Callable[[], T]) -> T:
        """Run `fn` (tokenisation, validation) in the scheduler's CPU worker thread, off the event loop."""
        if self._cpu is None:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn)

    # ---- submission ------------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active_generations(self) -> int:
        return self.decoder.n

    def _submit(self, req: Request) -> None:
        if self._closing:
            raise Unavailable("server is shutting down")
        check_room(len(self._queue), self.max_queue, self.max_batch_size, self._batch_s)
        if not self.running:
            raise Unavailable("scheduler is not running")
        self._queue.append(req)
        self._gauges()
        assert self._wakeup is not None
        self._wakeup.set()

    def _new(
        self,
        kind: str,
        entry: TaskEntry,
        inputs: list[list[int]],
        timeout: float | None,
        params: GenParams | None = None,
        stream: bool = False,
    ) -> Request:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout_s)
        return Request(kind, entry, inputs, deadline, loop.create_future(), params, asyncio.Queue() if stream else None)

    async def classify(
        self, entry: TaskEntry, inputs: list[list[int]], *, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """Per input: {"label", "probabilities"} (the task's labels in order)."""
        req = self._new("classify", entry, inputs, timeout)
        self._submit(req)
        return await self._wait(req)

    async def generate(
        self, entry: TaskEntry, input_ids: list[int], params: GenParams, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """{"text", "finish_reason", "input_tokens", "output_tokens"} once the generation is complete."""
        req = self._new("generate", entry, [input_ids], timeout, params)
        self._submit(req)
        return await self._wait(req)

    def submit_stream(
        self, entry: TaskEntry, input_ids: list[int], params: GenParams, *, timeout: float | None = None
    ) -> Request:
        req = self._new("generate", entry, [input_ids], timeout, params, stream=True)
        self._submit(req)
        return req

    async def stream(self, req: Request) -> AsyncIterator[dict[str, Any]]:
        """Events of a streaming request: {"delta": text} ..., then {"done": True, **result}. Raises ServeError
        (e.g. Timeout) instead of an event; leaving the iteration early cancels the request."""
        assert req.events is not None
        try:
            while True:
                remaining = req.deadline - time.monotonic()
                try:
                    ev = await asyncio.wait_for(req.events.get(), max(remaining, 0.001))
                except asyncio.TimeoutError:
                    raise Timeout(f"request timed out after {self.timeout_s:g} s") from None
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
                if ev.get("done"):
                    return
        finally:
            req.cancelled = True  # no-op when done; stops the decoding of an abandoned stream

    async def _wait(self, req: Request) -> Any:
        return await wait_for_result(req, self.timeout_s)

    # ---- worker ----------------------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            cls: list[Request] = []
            gens: list[Request] = []
            try:
                if not self._queue and self.decoder.active is None:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                if self.decoder.active is None and self.max_wait > 0:
                    await self._gather()
                cls, gens = self._take()
                self._gauges()
                if cls:
                    t0 = time.perf_counter()
                    results = await loop.run_in_executor(self._executor, self._classify_batch, cls)
                    self._record("classify", sum(len(r.inputs) for r in cls), len({r.entry.uid for r in cls}), t0)
                    for req, res in zip(cls, results, strict=True):
                        self._finish(req, res)
                if gens or self.decoder.active is not None:
                    events = await loop.run_in_executor(self._executor, self.decoder.step, gens)
                    for req, ev in events:
                        self._emit(req, ev)
                    self._gauges()
                self._idle_since = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # never let the worker die, nor leave a request waiting: fail those involved
                _notes("iteration", logging.ERROR, "scheduler iteration failed: %s", e, exc_info=e)
                involved = [*cls, *gens]
                involved += self.decoder.owners()
                self.decoder.reset()
                for req in involved:
                    self._fail(req, e)
                self._gauges()
                await asyncio.sleep(0.01)

    async def _gather(self) -> None:
        """Wait (model idle) until max_batch_size rows are queued or max_wait has passed since the oldest request
        arrived or, when it arrived while the model was busy, since the model became free: clients answered by the
        previous batch get max_wait to send their next request, so closed-loop load does not split into two
        half-size cohorts that alternate."""
        assert self._wakeup is not None
        while self._queue and not self._closing:
            rows = sum(len(r.inputs) for r in self._queue)
            start = max(self._queue[0].enqueued, self._idle_since)
            remaining = start + self.max_wait - time.monotonic()
            if rows >= self.max_batch_size or remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take(self) -> tuple[list[Request], list[Request]]:
        """Requests for this iteration: classify rows up to max_batch_size, generations up to the free decode slots.
        per-task mode keeps one task per batch (generations join only a decode batch of their own task)."""
        now = time.monotonic()
        per_task = self.mode == "per-task"
        cls: list[Request] = []
        gens: list[Request] = []
        rest: deque[Request] = deque()
        n_cls = 0
        slots = self.max_batch_size - self.active_generations
        cls_task: int | None = None
        gen_task = self.decoder.active_task if self.decoder.active is not None else None
        if per_task and gen_task is not None:
            oldest = next((r for r in self._queue if r.kind == "generate" and not r.cancelled), None)
            if oldest is not None and oldest.entry.uid != gen_task:
                slots = 0  # another task is waiting: let this task's batch drain instead of growing it
        for req in self._queue:
            if req.cancelled or req.future.done():
                continue
            if now >= req.deadline:
                self._fail(req, Timeout(f"request timed out after {self.timeout_s:g} s in the queue"))
                continue
            uid = req.entry.uid
            if req.kind == "classify":
                fits = n_cls == 0 or n_cls + len(req.inputs) <= self.max_batch_size
                if fits and (not per_task or cls_task in (None, uid)):
                    cls.append(req)
                    n_cls += len(req.inputs)
                    cls_task = uid
                    continue
            elif slots > 0 and (not per_task or gen_task in (None, uid)):
                gens.append(req)
                slots -= 1
                gen_task = uid
                continue
            rest.append(req)
        self._queue = rest
        for req in cls + gens:
            req.started = True
            if self.metrics:
                self.metrics.observe("softprompt_queue_wait_seconds", now - req.enqueued, {"task": req.entry.name})
        if gens and per_task:
            self.decoder.active_task = gens[0].entry.uid
        return cls, gens

    # ---- results ---------------------------------------------------------------------------------------
    def _finish(self, req: Request, res: Any) -> None:
        if isinstance(res, BaseException):
            self._fail(req, res)
        elif not req.future.done():
            req.future.set_result(res)

    def _fail(self, req: Request, exc: BaseException) -> None:
        if req.future.done() and req.events is None:
            return
        if not isinstance(exc, ServeError):
            _notes("failed", logging.ERROR, "request on task %s failed: %s", req.entry.name, exc, exc_info=exc)
            exc = ServeError(f"internal error while running the model ({type(exc).__name__}: {str(exc)[:200]})")
        if req.events is not None and not req.future.done():
            req.events.put_nowait(exc)
        if not req.future.done():
            req.future.set_exception(exc)
            req.future.exception()  # mark retrieved: a timed-out waiter may never read it

    def _emit(self, req: Request, ev: dict[str, Any] | BaseException) -> None:
        if isinstance(ev, BaseException):
            self._fail(req, ev)
            return
        if ev.get("done"):
            if self.metrics:
                self.metrics.inc("softprompt_generated_tokens_total", {"task": req.entry.name}, ev["output_tokens"])
            if req.events is not None:
                req.events.put_nowait(ev)
            if not req.future.done():
                req.future.set_result({k: v for k, v in ev.items() if k != "done"})
        elif req.events is not None:
            req.events.put_nowait(ev)

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.set("softprompt_queue_depth", len(self._queue))
            self.metrics.set("softprompt_active_generations", self.active_generations)

    def _record(self, kind: str, rows: int, tasks: int, t0: float) -> None:
        dt = time.perf_counter() - t0
        self._batch_s = 0.8 * self._batch_s + 0.2 * dt
        self.history.append(BatchRecord(kind, rows, tasks, dt))
        if self.metrics:
            self.metrics.observe("softprompt_batch_size", rows, {"kind": kind})
            self.metrics.observe("softprompt_batch_tasks", tasks, {"kind": kind})

    def _count_routes(self, entry: TaskEntry, routes: Any) -> None:
        """A routed task's rows per route (softprompt_routes_total); `routes` (n,) a tensor of route indices."""
        assert self.metrics is not None
        for k, n in sorted(Counter(routes.tolist()).items()):
            self.metrics.inc("softprompt_routes_total", {"task": entry.name, "route": str(k)}, n)

    # ---- model thread ----------------------------------------------------------------------------------
    def _classify_batch(self, reqs: list[Request]) -> list[list[dict[str, Any]] | BaseException]:
        try:
            rows = [(r.entry, ids) for r in reqs for ids in r.inputs]
            flat = classify_rows(self.registry, rows, max_batch_size=self.max_batch_size, kv=self.kv_cache,
                                 routes=self._count_routes if self.metrics else None)  # fmt: skip
            if self.metrics:
                for e, _ in rows:
                    self.metrics.inc("softprompt_rows_total", {"task": e.name})
            return list(unbatch(flat, [len(r.inputs) for r in reqs]))
        except Exception as e:
            if len(reqs) == 1:
                return [e]
            _notes("retry", logging.WARNING, "batch of %d requests failed (%s); retrying them one by one", len(reqs), e)
            return [self._classify_batch([r])[0] for r in reqs]
