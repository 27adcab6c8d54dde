"""Connection-level limits of `softprompt serve`: uvicorn's h11 protocol with read timeouts and a connection cap,
and a rate-limited log so that no flood of events becomes a flood of log lines.

- **Header timeout**: a request's headers must arrive within `header_timeout_s` of the connection opening (or of
  the previous response, on a kept-alive connection); otherwise the server answers `408` and closes it.
- **Body timeout**: its body must then arrive within `body_timeout_s`; otherwise `408` (when nothing was answered
  yet) and the connection is closed, and the request's handler sees a disconnect.
- **Connection cap**: at `max_connections` open connections, a new connection first evicts the connection that has
  waited longest for a request (a half-sent request, an idle keep-alive; it gets `408`); when every connection is
  busy with a request, the new one is refused with `503` and `Retry-After: 1`. Either way the connection is
  half-closed, so the client reads the answer, then closed within a second.
- Each kind of event logs one line at most every `interval_s` seconds, with the count of the ones it stood for.
(Body size is enforced while reading, in the app's middleware: see softprompt.serve.app.)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("softprompt.serve")


class RateLimitedLog:
    """At most one log line per key every `interval_s` seconds; the next line says how many were left out."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger, self.interval = logger, interval_s
        self._state: dict[str, list[float]] = {}  # key -> [time of the last line, events left out since]
        self._lock = threading.Lock()

    def __call__(self, key: str, level: int, msg: str, *args: Any, exc_info: Any = None) -> bool:
        now = time.monotonic()
        with self._lock:
            st = self._state.get(key)
            if st is not None and now - st[0] < self.interval:
                st[1] += 1
                return False
            left_out = int(st[1]) if st is not None else 0
            self._state[key] = [now, 0]
        if left_out:
            msg += f" (and {left_out} more like it in the last {self.interval:g} s)"
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True


class FloodFilter(logging.Filter):
    """A logging filter passing at most one record per (logger, message template) every `interval_s` seconds: put
    on the loggers of libraries that log once per failed accept or bad connection (asyncio, uvicorn.error)."""

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval = interval_s
        self._last: dict[tuple[str, str], list[float]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg)[:200])
        now = time.monotonic()
        with self._lock:
            st = self._last.get(key)
            if st is not None and now - st[0] < self.interval:
                st[1] += 1
                return False
            left_out = int(st[1]) if st is not None else 0
            self._last[key] = [now, 0]
            if len(self._last) > 1000:
                self._last.clear()
        if left_out:
            record.msg = f"{record.msg} (and {left_out} more like it in the last {self.interval:g} s)"
        return True


def install_flood_filters(interval_s: float = 10.0) -> None:
    for name in ("asyncio", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, FloodFilter) for f in logger.filters):
            logger.addFilter(FloodFilter(interval_s))


@dataclass(frozen=True)
class ConnLimits:
    max_connections: int = 1000
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    linger_s: float = 1.0  # a refused connection is half-closed, then closed after this long at most


_REASONS = {400: "Bad Request", 408: "Request Timeout", 503: "Service Unavailable"}


def _raw_response(status: int, message: str, headers: dict[str, str] | None = None) -> bytes:
    kind = {400: "invalid_request_error", 408: "timeout_error", 503: "unavailable_error"}.get(status, "server_error")
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close"]  # fmt: skip
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


def protocol_class(limits: ConnLimits) -> type:
    """uvicorn's H11Protocol with `limits` (one class per server: it holds the server's waiting connections)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    waiting: OrderedDict[Any, None] = OrderedDict()  # connections waiting for a request's headers, oldest first
    note = RateLimitedLog(log)
    lingering = [0]

    class LimitedH11Protocol(H11Protocol):
        _phase: str | None = None
        _timer: Any = None
        _done = False  # answered and half-closed by us: the rest of its input is discarded

        # ---- protocol events ---------------------------------------------------------------------------
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                victim = next(iter(waiting), None)
                if victim is not None and victim is not self:
                    note("evict", logging.WARNING, "connection limit (%d) reached: closing the connection that "
                         "waited longest for a request", limits.max_connections)  # fmt: skip
                    victim._answer(408, "idle connection closed: the server is at its connection limit")
                else:
                    note("refuse", logging.WARNING, "connection limit (%d) reached: refusing a connection (503)",
                         limits.max_connections)  # fmt: skip
                    self._answer(503, "too many connections; retry later", {"retry-after": "1"})
                    return
            self._update()

        def data_received(self, data: bytes) -> None:
            if self._done:
                return
            super().data_received(data)
            self._update()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not None and self.cycle is not cycle:  # a new request: its response closes lingering
                self.cycle.transport = _LingeringClose(self.transport, self)  # type: ignore[assignment]

        def _linger_close(self) -> None:
            """Close, or, while the client is still sending a body (a 413 answered early), half-close and discard
            its bytes for linger_s first: closing with unread input resets the connection, and the client would
            never read the answer."""
            t = self.transport
            if self._done or self.conn.their_state is not h11.SEND_BODY or not t.can_write_eof():
                t.close()
                return
            self._set_phase(None)
            self._done = True
            lingering[0] += 1
            self.connections.discard(self)
            t.write_eof()
            self.loop.call_later(limits.linger_s, t.close)

        def eof_received(self) -> bool | None:  # type: ignore[override]
            if self._done:
                self.transport.close()
            return super().eof_received()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._update()

        def send_400_response(self, msg: str) -> None:  # malformed HTTP, headers over 16 KiB: JSON like the rest
            note("bad-http", logging.INFO, "closed a connection: %s", msg)
            self._set_phase(None)
            self._done = True
            lingering[0] += 1
            self.connections.discard(self)
            self.transport.write(_raw_response(400, f"malformed HTTP request ({msg.rstrip('.')})"))
            self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._set_phase(None)
            if self._done:
                lingering[0] -= 1
            super().connection_lost(exc)

        # ---- timers --------------------------------------------------------------------------------------
        def _update(self) -> None:
            if self._done or self.transport is None or self.transport.is_closing():
                self._set_phase(None)
                return
            state = self.conn.their_state
            if state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
                self._set_phase("headers")
            elif state is h11.SEND_BODY:
                self._set_phase("body")
            else:
                self._set_phase(None)

        def _set_phase(self, phase: str | None) -> None:
            if phase == self._phase:
                return
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            waiting.pop(self, None)
            self._phase = phase
            if phase == "headers":
                waiting[self] = None
                self._timer = self.loop.call_later(limits.header_timeout_s, self._expired, "headers")
            elif phase == "body":
                self._timer = self.loop.call_later(limits.body_timeout_s, self._expired, "body")

        def _expired(self, phase: str) -> None:
            self._timer = None
            if self._phase != phase:
                return
            secs = limits.header_timeout_s if phase == "headers" else limits.body_timeout_s
            note(f"timeout-{phase}", logging.INFO, "closed a connection whose request %s did not arrive within %g s",
                 phase, secs)  # fmt: skip
            self._answer(408, f"request {phase} not received within {secs:g} s")

        # ---- answering and closing -------------------------------------------------------------------------
        def _answer(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
            """Answer `status` (unless a response has started, or the connection is idle: a kept-alive connection
            that has sent nothing of a next request is closed without a word, as uvicorn's keep-alive timeout does,
            so a client never reads an unsolicited 408 as the answer to a request it sends), half-close, and close
            within linger_s."""
            idle = self._phase == "headers" and not self.conn.trailing_data[0] and status != 503
            self._set_phase(None)
            if self._done or self.transport.is_closing():
                return
            self._done = True
            lingering[0] += 1
            self.connections.discard(self)  # no longer counts against the limit
            cycle = self.cycle
            started = cycle is not None and (cycle.response_started or cycle.response_complete)
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # the request's handler sees a disconnect and stops
                cycle.message_event.set()
            if not started and not idle:
                self.transport.write(_raw_response(status, message, headers))
            if lingering[0] > limits.max_connections or not self.transport.can_write_eof():
                self.transport.close()
                return
            self.transport.write_eof()  # the client reads the answer, then closes; we close in linger_s at most
            self.loop.call_later(limits.linger_s, self.transport.close)

    class _LingeringClose:
        """The transport as a request/response cycle sees it: close() lingers (LimitedH11Protocol._linger_close)."""

        def __init__(self, transport: Any, proto: LimitedH11Protocol) -> None:
            self._transport, self._proto = transport, proto

        def __getattr__(self, name: str) -> Any:
            return getattr(self._transport, name)

        def close(self) -> None:
            self._proto._linger_close()

    return LimitedH11Protocol
