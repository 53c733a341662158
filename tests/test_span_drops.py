"""Span drops are counted when they happen, exposed to Prometheus, flushed at exit, stored.

A processor with a tiny queue and a blocked exporter refuses spans: the counter rises at
once (before any shutdown) and ``generate_latest()`` shows it.  An engine process that
exits without shutting telemetry down still has every span in the database, and drops are
written to ``telemetry_drops`` for the dashboard.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from hybrid_pd.settings import ENV_ROLE, ENV_TELEMETRY_DB
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry import counters
from hybrid_pd.telemetry import setup as S
from hybrid_pd.telemetry.counters import CountingBatchSpanProcessor

ROOT = Path(__file__).resolve().parents[1]


class BlockedExporter(SpanExporter):
    """Blocks in export until released: a sink far slower than span creation."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait(30)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


def prom_value(text: str, sink: str, reason: str) -> float | None:
    prefix = f'{counters.DROPPED_METRIC}_total{{reason="{reason}",sink="{sink}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return None


def test_full_queue_counted_at_once_and_exposed() -> None:
    sink = "test-blocked"
    exporter = BlockedExporter()
    seen: list[tuple[str, str, int]] = []
    proc = CountingBatchSpanProcessor(sink, exporter, max_queue_size=4, schedule_delay_millis=10,
                                      max_export_batch_size=2,
                                      on_drop=lambda s, r, n: seen.append((s, r, n)))
    provider = TracerProvider()
    provider.add_span_processor(proc)
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span(A.SPAN_KV_READ):
        pass
    assert exporter.entered.wait(10)  # the worker now sits in export with that span
    for _ in range(20):
        with tracer.start_as_current_span(A.SPAN_KV_READ):
            pass
    # Before any shutdown: 1 span handed over, 4 queued, the other 16 refused and counted.
    assert proc.accepted == 5 and proc.dropped_by_reason == {"queue_full": 16}
    assert seen == [(sink, "queue_full", 1)] * 16
    assert counters.snapshot()["dropped"][f"{sink}/queue_full"] == 16
    assert prom_value(generate_latest().decode(), sink, "queue_full") == 16.0
    exporter.release.set()
    provider.shutdown()
    assert exporter.exported == 5  # nothing else lost: 5 delivered + 16 counted == 21


def test_registration_is_idempotent() -> None:
    again = counters._prom_counter(counters.DROPPED_METRIC, "doc", ["sink", "reason"])
    assert again is counters._PROM_DROPPED
    for _ in range(3):  # several providers in one process share the counters
        tel = S.configure_tracing("svc", "proxy", otlp=False, set_global=False)
        tel.shutdown()
    assert generate_latest().decode().count(f"# TYPE {counters.DROPPED_METRIC}_total counter") <= 1


def drops_rows(db: Path) -> list[tuple[str, str, int]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT sink, reason, SUM(spans) FROM telemetry_drops "
                            "GROUP BY sink, reason ORDER BY sink, reason").fetchall()


def test_queue_full_with_sqlite_is_counted_live_and_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "16")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "8")
    db = tmp_path / "q.db"
    tel = S.configure_tracing("svc", "decode", db_url=db, otlp=False, set_global=False,
                              sqlite_options={"busy_timeout_ms": 300, "max_retries": 0})
    before = counters.snapshot()["dropped"].get("sqlite/queue_full", 0)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # the worker's export now waits for the lock
    try:
        for _ in range(200):
            with tel.tracer().start_as_current_span(A.SPAN_KV_READ):
                pass
        live = counters.snapshot()["dropped"].get("sqlite/queue_full", 0) - before
        assert live >= 200 - 16 - 8 * 2  # counted while still blocked, not at shutdown
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    stats = tel.shutdown()
    sq = stats["sinks"]["sqlite"]
    assert sq["dropped_queue"] >= live > 0
    assert stats["ended"] == 200 == sq["exported"] + sq["dropped"] + sq["dropped_queue"]
    stored = dict(((s, r), n) for s, r, n in drops_rows(db))
    assert stored.get(("sqlite", "queue_full")) == sq["dropped_queue"]
    assert sum(n for (s, _), n in stored.items() if s == "sqlite") == sq["dropped"] + sq["dropped_queue"]
    with sqlite3.connect(db) as conn:
        (service, role, pid) = conn.execute(
            "SELECT service, role, pid FROM telemetry_drops LIMIT 1").fetchone()
    assert (service, role, pid) == ("svc", "decode", os.getpid())


def test_no_drops_no_rows(tmp_path: Path) -> None:
    db = tmp_path / "ok.db"
    tel = S.configure_tracing("svc", "decode", db_url=db, otlp=False, set_global=False)
    for _ in range(10):
        with tel.tracer().start_as_current_span(A.SPAN_KV_READ):
            pass
    assert tel.shutdown()["sinks"]["sqlite"]["exported"] == 10
    assert drops_rows(db) == []


ENGINE_SCRIPT = textwrap.dedent("""
    from hybrid_pd.telemetry import attributes as A
    from hybrid_pd.telemetry.engine import engine_tracer
    tracer = engine_tracer("engine-under-test")
    for i in range(50):
        with tracer.start_as_current_span(A.SPAN_KV_READ, attributes={A.KV_LAYER: i}):
            pass
    # exit without shutting telemetry down: atexit must flush the queued spans
""")


def test_engine_flushes_at_exit(tmp_path: Path) -> None:
    db = tmp_path / "engine.db"
    env = {**os.environ, ENV_TELEMETRY_DB: str(db), ENV_ROLE: "decode",
           # Nothing would be exported before exit without the atexit flush.
           "OTEL_BSP_SCHEDULE_DELAY": "600000", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "512",
           "OTEL_TRACES_EXPORTER": "none"}
    proc = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with sqlite3.connect(db) as conn:
        n, layers, role = conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT layer), MIN(role) FROM spans").fetchone()
    assert (n, layers, role) == (50, 50, "decode")
    assert drops_rows(db) == []


MULTIPROC_SCRIPT = textwrap.dedent("""
    from hybrid_pd.telemetry import counters
    counters.record_dropped("sqlite", "queue_full", 7)
    counters.record_exported("sqlite", 5)
""")


def test_multiprocess_mode_reaches_the_serving_process(tmp_path: Path) -> None:
    # vLLM with several API servers sets PROMETHEUS_MULTIPROC_DIR for its children and
    # serves /metrics through a MultiProcessCollector: the engine's counters appear there.
    mp = tmp_path / "prom"
    mp.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp)}
    proc = subprocess.run([sys.executable, "-c", MULTIPROC_SCRIPT], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(mp))
    text = generate_latest(registry).decode()
    assert prom_value(text, "sqlite", "queue_full") == 7.0
    assert f'{counters.EXPORTED_METRIC}_total{{sink="sqlite"}} 5.0' in text
