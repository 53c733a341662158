"""Process-wide counters of exported and dropped spans, per sink.

Telemetry must never lose spans silently: every sink (SQLite, OTLP, ...) reports here
how many spans it delivered and how many it dropped and why.  The numbers are exposed
three ways, because a serving process may have any one of them wired up:

* a Prometheus counter in prometheus_client's default registry
  (``hybrid_pd_telemetry_spans_dropped_total{sink,reason}`` /
  ``hybrid_pd_telemetry_spans_exported_total{sink}``) -- vLLM's ``/metrics`` and our
  proxy serve that registry;
* an OpenTelemetry counter (``hybrid_pd.telemetry.spans.dropped`` / ``.exported``) on the
  global MeterProvider (a no-op until someone configures one);
* plain Python attributes on each exporter, and :func:`snapshot` for tests and reports.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as _Tally
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry import metrics
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import REGISTRY, Counter

DROPPED_METRIC = "hybrid_pd_telemetry_spans_dropped"  # exposed as ..._total
EXPORTED_METRIC = "hybrid_pd_telemetry_spans_exported"


def _prom_counter(name: str, doc: str, labels: list[str]) -> Counter:
    """The counter ``name`` in the default registry, created once per process.

    A second import of this module (``importlib.reload``, a test harness) must reuse the
    registered collector instead of failing with "Duplicated timeseries".  When
    ``PROMETHEUS_MULTIPROC_DIR`` is set before prometheus_client is imported (vLLM with
    several API servers), the value lives in that directory's mmap files, so the API
    server's multiprocess ``/metrics`` sums it over every engine process.
    """
    try:
        return Counter(name, doc, labels)
    except ValueError:  # already registered in this process
        existing = REGISTRY._names_to_collectors.get(name)  # no public lookup by name
        if isinstance(existing, Counter):
            return existing
        raise


_PROM_DROPPED = _prom_counter(
    DROPPED_METRIC,
    "Spans a telemetry sink dropped (export queue full, database locked/full/unwritable, "
    "OTLP endpoint down...), counted when the drop happens.",
    ["sink", "reason"],
)
_PROM_EXPORTED = _prom_counter(EXPORTED_METRIC, "Spans a telemetry sink delivered.", ["sink"])

_meter = metrics.get_meter("hybrid_pd.telemetry")
_OTEL_DROPPED = _meter.create_counter(
    "hybrid_pd.telemetry.spans.dropped", unit="{span}", description="Spans dropped by a sink."
)
_OTEL_EXPORTED = _meter.create_counter(
    "hybrid_pd.telemetry.spans.exported", unit="{span}", description="Spans delivered by a sink."
)

_lock = threading.Lock()
_dropped: _Tally[tuple[str, str]] = _Tally()
_exported: _Tally[str] = _Tally()


def record_dropped(sink: str, reason: str, n: int) -> None:
    """Count ``n`` spans dropped by ``sink`` for ``reason`` (a short, low-cardinality word)."""
    if n <= 0:
        return
    with _lock:
        _dropped[(sink, reason)] += n
    _PROM_DROPPED.labels(sink=sink, reason=reason).inc(n)
    _OTEL_DROPPED.add(n, {"sink": sink, "reason": reason})


def record_exported(sink: str, n: int) -> None:
    if n <= 0:
        return
    with _lock:
        _exported[sink] += n
    _PROM_EXPORTED.labels(sink=sink).inc(n)
    _OTEL_EXPORTED.add(n, {"sink": sink})


def snapshot() -> dict[str, dict[str, int]]:
    """This process's totals: ``{"exported": {sink: n}, "dropped": {"sink/reason": n}}``."""
    with _lock:
        return {
            "exported": dict(_exported),
            "dropped": {f"{s}/{r}": n for (s, r), n in _dropped.items()},
        }


DropHook = Callable[[str, str, int], None]  # (sink, reason, n): also persist a drop


class _HandOff(SpanExporter):
    """Passes batches to the sink and counts the spans the queue has handed over."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.handed = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.handed += len(spans)  # only the processor's worker thread writes this
        return self.inner.export(spans)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self.inner.shutdown()


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """A ``BatchSpanProcessor`` that counts every span it cannot queue, when it happens.

    The SDK's queue (a bounded deque) silently evicts its oldest span when full and only
    reports it through internal metrics that are off unless an SDK-wide environment
    variable is set.  So this processor keeps the bound itself, with public API only: it
    counts spans accepted and spans handed to the exporter (``export`` sees every batch),
    and refuses a span while ``accepted - handed`` has reached ``max_queue_size``.  That
    difference is never smaller than the SDK deque's length (the worker pops a batch just
    before it calls ``export``), so the deque never overflows and every loss is a refusal
    counted here: reason ``queue_full``, and ``shutdown`` for spans that end after
    shutdown or that a timed-out shutdown left queued.
    """

    def __init__(self, sink: str, exporter: SpanExporter, max_queue_size: int | None = None,
                 *args: Any, on_drop: DropHook | None = None, **kwargs: Any) -> None:
        self.sink = sink
        self.on_drop = on_drop
        self.max_queue_size = (BatchSpanProcessor._default_max_queue_size()
                               if max_queue_size is None else max_queue_size)
        self.shutdown_deadline: float | None = None  # time.monotonic() bound, set by owner
        self._handoff = _HandOff(exporter)
        self._count_lock = threading.Lock()
        self._closed = False
        self.accepted = 0
        self.dropped_by_reason: _Tally[str] = _Tally()
        super().__init__(self._handoff, self.max_queue_size, *args, **kwargs)

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by_reason.values())

    def _count_drop(self, reason: str, n: int) -> None:
        with self._count_lock:
            self.dropped_by_reason[reason] += n
        record_dropped(self.sink, reason, n)
        if self.on_drop is not None:
            self.on_drop(self.sink, reason, n)

    def on_end(self, span: ReadableSpan) -> None:
        if not (span.context and span.context.trace_flags.sampled):
            return  # the SDK's processor ignores these too
        with self._count_lock:
            reason = ("shutdown" if self._closed else
                      "queue_full" if self.accepted - self._handoff.handed >= self.max_queue_size
                      else None)
            if reason is None:
                self.accepted += 1
        if reason is not None:
            self._count_drop(reason, 1)
            return
        super().on_end(span)

    def shutdown(self) -> None:
        with self._count_lock:
            if self._closed:
                return
            self._closed = True
        timeout_ms = 30000.0
        if self.shutdown_deadline is not None:
            timeout_ms = max(0.0, (self.shutdown_deadline - time.monotonic()) * 1000)
        # The SDK's public shutdown() always waits up to 30 s; its worker's own shutdown
        # takes the bound we want (engines must exit promptly), so use it when present.
        inner = getattr(self, "_batch_processor", None)
        if inner is not None and hasattr(inner, "shutdown"):
            inner.shutdown(timeout_millis=timeout_ms)
        else:
            super().shutdown()
        left = self.accepted - self._handoff.handed  # queued, never exported: timed out
        if left > 0:
            self._count_drop("shutdown", left)
