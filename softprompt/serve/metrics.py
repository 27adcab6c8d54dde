"""A small, dependency-free Prometheus registry: counters, gauges and histograms with labels, rendered in the text
exposition format (version 0.0.4) that `GET /metrics` serves."""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: tuple[str, str] | None = None) -> str:
    items = list(labels) + ([extra] if extra else [])
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(float(v))


class _Metric:
    def __init__(self, name: str, help_: str, kind: str) -> None:
        self.name, self.help, self.kind = name, help_, kind


class Metrics:
    """Thread-safe metric store. Declare each metric once (`counter`, `gauge`, `histogram`), then update it by name
    with a dict of labels. Gauges may also be callbacks evaluated at render time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._meta: dict[str, _Metric] = {}
        self._values: dict[str, dict[Labels, float]] = {}
        self._hist: dict[str, dict[Labels, list[float]]] = {}  # per label set: bucket counts, overflow, sum, count
        self._buckets: dict[str, tuple[float, ...]] = {}
        self._callbacks: dict[str, Callable[[], float]] = {}

    # ---- declaration -----------------------------------------------------------------------------------
    def counter(self, name: str, help_: str, fn: Callable[[], float] | None = None) -> None:
        """A monotonic counter; `fn` reads its value at render time from a source that counts elsewhere."""
        self._meta[name] = _Metric(name, help_, "counter")
        self._values.setdefault(name, {})
        if fn is not None:
            self._callbacks[name] = fn

    def gauge(self, name: str, help_: str, fn: Callable[[], float] | None = None) -> None:
        self._meta[name] = _Metric(name, help_, "gauge")
        self._values.setdefault(name, {})
        if fn is not None:
            self._callbacks[name] = fn

    def histogram(self, name: str, help_: str, buckets: Sequence[float]) -> None:
        self._meta[name] = _Metric(name, help_, "histogram")
        self._hist.setdefault(name, {})
        self._buckets[name] = tuple(sorted(buckets))

    def watch(self, name: str, fn: Callable[[], float]) -> None:
        """Read a declared counter or gauge from `fn` at render time."""
        self._callbacks[name] = fn

    # ---- updates ---------------------------------------------------------------------------------------
    @staticmethod
    def _key(labels: dict[str, str] | None) -> Labels:
        return tuple(sorted((k, str(v)) for k, v in (labels or {}).items()))

    def inc(self, name: str, labels: dict[str, str] | None = None, value: float = 1.0) -> None:
        key = self._key(labels)
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0.0) + value

    def set(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        with self._lock:
            self._values[name][self._key(labels)] = float(value)

    def observe(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        key = self._key(labels)
        bounds = self._buckets[name]
        with self._lock:
            h = self._hist[name].get(key)
            if h is None:
                h = self._hist[name][key] = [0.0] * (len(bounds) + 3)  # buckets, overflow, sum, count
            h[bisect_left(bounds, value)] += 1  # the first bucket whose upper bound is >= value ("le")
            h[-2] += value
            h[-1] += 1

    def forget(self, label: str, value: str) -> None:
        """Drop every series whose `label` is `value` (a removed task's), so series stay bounded by what exists."""
        item = (label, value)
        with self._lock:
            tables: list[dict[Labels, Any]] = [*self._values.values(), *self._hist.values()]
            for table in tables:
                for key in [k for k in table if item in k]:
                    del table[key]

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a counter/gauge series, or a histogram's count (for tests)."""
        key = self._key(labels)
        with self._lock:
            if name in self._hist:
                h = self._hist[name].get(key)
                return h[-1] if h else 0.0
            return self._values[name].get(key, 0.0)

    # ---- exposition ------------------------------------------------------------------------------------
    def render(self) -> str:
        lines: list[str] = []
        for name, fn in self._callbacks.items():
            try:
                self.set(name, fn())
            except Exception:  # a gauge callback must never break /metrics
                pass
        with self._lock:
            for name, m in self._meta.items():
                lines.append(f"# HELP {name} {m.help}")
                lines.append(f"# TYPE {name} {m.kind}")
                if m.kind == "histogram":
                    bounds = self._buckets[name]
                    for key, h in sorted(self._hist[name].items()):
                        cum = 0.0
                        for b, c in zip(bounds, h[: len(bounds)], strict=True):
                            cum += c
                            lines.append(f"{name}_bucket{_labels(key, ('le', _num(b)))} {_num(cum)}")
                        cum += h[len(bounds)]
                        lines.append(f"{name}_bucket{_labels(key, ('le', '+Inf'))} {_num(cum)}")
                        lines.append(f"{name}_sum{_labels(key)} {_num(h[-2])}")
                        lines.append(f"{name}_count{_labels(key)} {_num(h[-1])}")
                else:
                    for key, v in sorted(self._values[name].items()):
                        lines.append(f"{name}{_labels(key)} {_num(v)}")
        return "\n".join(lines) + "\n"


def server_metrics() -> Metrics:
    """The metrics the server exports (names documented in docs/serving.md)."""
    m = Metrics()
    m.counter("softprompt_requests_total", "HTTP requests by endpoint, task and status code.")
    m.counter("softprompt_request_errors_total", "HTTP requests answered with an error status (>= 400).")
    m.histogram(
        "softprompt_request_duration_seconds", "Request latency (streams: until the last event).", LATENCY_BUCKETS
    )
    m.histogram(
        "softprompt_queue_wait_seconds", "Time a request waited in the queue before its first batch.", LATENCY_BUCKETS
    )
    m.histogram("softprompt_batch_size", "Rows per model forward pass (kind: classify, prefill, decode).", SIZE_BUCKETS)
    m.histogram("softprompt_batch_tasks", "Distinct tasks per model forward pass.", SIZE_BUCKETS)
    m.gauge("softprompt_queue_depth", "Requests waiting in the queue.")
    m.gauge("softprompt_active_generations", "Generations being decoded.")
    m.counter("softprompt_generated_tokens_total", "Tokens generated, per task.")
    m.counter("softprompt_rows_total", "Inputs processed, per task.")
    m.counter("softprompt_routes_total", "Inputs of a routed task (--method routed) per route taken.")
    m.gauge("softprompt_tasks", "Registered tasks.")
    m.gauge("softprompt_kv_cache_bytes", "Bytes held by cached per-task prompt prefixes (keys/values).")
    m.gauge("softprompt_kv_cache_entries", "Per-task prefixes in the cache.")
    m.counter("softprompt_kv_cache_hits_total", "Prefix cache hits.")
    m.counter("softprompt_kv_cache_misses_total", "Prefix cache misses.")
    m.counter("softprompt_kv_cache_evictions_total", "Prefix cache evictions.")
    return m
