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
from collections import Counter as _Tally

from opentelemetry import metrics
from prometheus_client import Counter

_PROM_DROPPED = Counter(
    "hybrid_pd_telemetry_spans_dropped",
    "Spans a telemetry sink dropped (database locked/full/unwritable, OTLP endpoint down...).",
    ["sink", "reason"],
)
_PROM_EXPORTED = Counter(
    "hybrid_pd_telemetry_spans_exported",
    "Spans a telemetry sink delivered.",
    ["sink"],
)

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
