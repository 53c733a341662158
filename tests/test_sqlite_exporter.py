"""The SQLite span exporter: contract columns, many writer processes, locked/full/unwritable.

No GPU, NIXL or vLLM required.  Results are checked with plain ``sqlite3``, since people
will query the database with plain SQL.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode
from sqlalchemy import event

from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry import counters
from hybrid_pd.telemetry import setup as S
from hybrid_pd.telemetry.schema import CONTRACT_COLUMNS, SCHEMA_VERSION
from hybrid_pd.telemetry.sqlite_exporter import (
    SchemaVersionError,
    SQLiteSpanExporter,
    attributes_json,
    to_url,
)

FAIL = SpanExportResult.FAILURE
OK = SpanExportResult.SUCCESS


@pytest.fixture(autouse=True)
def _no_leftover_config():
    yield
    S.shutdown()


def make_spans(n: int, *, request_id: str = "req-1", big: int = 0) -> list[ReadableSpan]:
    """n finished spans (one parent + n-1 per-layer reads) without touching any database."""
    mem = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "unit"}))
    provider.add_span_processor(SimpleSpanProcessor(mem))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span(A.SPAN_KV_TRANSFER) as parent:
        A.set_attrs(parent, {A.REQUEST_ID: request_id})
        for i in range(n - 1):
            with tracer.start_as_current_span(A.SPAN_KV_READ) as span:
                A.set_attrs(span, {A.REQUEST_ID: request_id, A.KV_LAYER: i, A.KV_BYTES: 1 << 20,
                                   "pad": "x" * big if big else None})
    return list(mem.get_finished_spans())


def rows(db: Path, sql: str = "SELECT COUNT(*) FROM spans") -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


# ------------------------------------------------------------------- contract and schema


def test_contract_columns_hold_the_span(tmp_path: Path) -> None:
    db = tmp_path / "spans.db"
    exporter = SQLiteSpanExporter(db)
    provider = TracerProvider(resource=Resource.create(
        {"service.name": "decode-0", A.RESOURCE_ROLE: "decode", A.RESOURCE_ENGINE_ID: "eng-d",
         A.RESOURCE_PID: 4242}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span(A.SPAN_KV_TRANSFER) as root:
        A.set_attrs(root, {A.REQUEST_ID: "cmpl-7"})
        with tracer.start_as_current_span(
            A.SPAN_KV_READ, set_status_on_exception=False, record_exception=False
        ) as read:
            A.set_attrs(read, {
                A.REQUEST_ID: "cmpl-7", A.KV_LAYER: 12, A.KV_LAYER_KIND: "mamba",
                A.KV_BYTES: 4_194_304, A.KV_DESCRIPTORS: 4, A.KV_RANK: 1, A.KV_PEER_RANK: 0,
                A.KV_NIXL_XFER_US: 812.5, A.KV_VIEW: "ssm",
            })
            A.mark_failed(read, "timeout")
    exporter.shutdown()

    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    cols = [r[1] for r in conn.execute("PRAGMA table_info(spans)")]
    assert set(CONTRACT_COLUMNS) <= set(cols), f"missing: {set(CONTRACT_COLUMNS) - set(cols)}"
    r = conn.execute("SELECT * FROM spans WHERE name = ?", (A.SPAN_KV_READ,)).fetchone()
    p = conn.execute("SELECT * FROM spans WHERE name = ?", (A.SPAN_KV_TRANSFER,)).fetchone()
    ctx = read.get_span_context()
    assert r["trace_id"] == format(ctx.trace_id, "032x") == p["trace_id"]
    assert len(r["trace_id"]) == 32 and len(r["span_id"]) == 16
    assert r["span_id"] == format(ctx.span_id, "016x")
    assert r["parent_span_id"] == p["span_id"] and p["parent_span_id"] is None
    assert r["start_ns"] == read.start_time and r["end_ns"] == read.end_time
    assert r["duration_ns"] == read.end_time - read.start_time
    assert (r["status"], r["status_message"]) == ("ERROR", "timeout")
    assert p["status"] == "UNSET"
    assert (r["service"], r["role"], r["engine_id"], r["pid"]) == ("decode-0", "decode", "eng-d", 4242)
    assert (r["request_id"], r["layer"], r["layer_kind"], r["bytes"], r["descriptors"]) == (
        "cmpl-7", 12, "mamba", 4_194_304, 4)
    assert (r["rank"], r["peer_rank"]) == (1, 0)
    attrs = json.loads(r["attributes"])
    assert attrs[A.KV_NIXL_XFER_US] == 812.5 and attrs[A.KV_STATUS] == "failed"
    # Plain SQL users can reach into the JSON.
    assert conn.execute(
        "SELECT json_extract(attributes, '$.\"kv.view\"') FROM spans WHERE layer = 12"
    ).fetchone()[0] == "ssm"


def test_schema_pragmas_indexes_and_version(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    SQLiteSpanExporter(str(db)).shutdown()  # plain path
    SQLiteSpanExporter(f"sqlite:///{db}").shutdown()  # URL, same file, second opener is fine
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent
        idx = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"ix_spans_request_id_start_ns", "ix_spans_start_ns", "ix_spans_name_start_ns",
                "ix_spans_trace_id"} <= idx
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        # The request timeline query uses its index (the dashboard's hot query).
        plan = " ".join(r[-1] for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM spans WHERE request_id = 'x' ORDER BY start_ns"))
        assert "ix_spans_request_id_start_ns" in plan, plan


def test_pragmas_are_set_on_our_connections_only(tmp_path: Path) -> None:
    exporter = SQLiteSpanExporter(tmp_path / "p.db", busy_timeout_ms=1234)
    with exporter.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 1234
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    # A foreign SQLAlchemy engine keeps its defaults (the hook is not global).
    from sqlalchemy import create_engine

    other = create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    with other.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "delete"
    exporter.shutdown()


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    SQLiteSpanExporter(db).shutdown()
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO schema_version VALUES (99, 0, 'hybrid-pd from the future')")
    with pytest.raises(SchemaVersionError, match=r"schema version 99, newer than .* version 1"):
        SQLiteSpanExporter(db)
    with pytest.raises(SchemaVersionError):
        S.configure_tracing("svc", "proxy", db_url=db, otlp=False, set_global=False)


def test_url_forms() -> None:
    assert to_url("/tmp/x.db").render_as_string() == "sqlite:////tmp/x.db"
    assert to_url("sqlite:///rel.db").database == "rel.db"
    pg = to_url("postgresql+psycopg://u:secret@db.example/hybrid")
    assert pg.get_backend_name() == "postgresql" and pg.password == "secret"


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(
    st.text(min_size=1, max_size=12),
    st.one_of(
        st.text(max_size=20), st.booleans(), st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=True, allow_infinity=True),
        st.lists(st.floats(allow_nan=True), max_size=3).map(tuple),
    ),
    max_size=6,
))
def test_attributes_json_is_strict_json(attrs: dict[str, Any]) -> None:
    def no_constants(c: str) -> Any:
        raise AssertionError(f"non-standard JSON constant {c}")

    text = attributes_json(attrs)
    back = json.loads(text, parse_constant=no_constants)
    assert set(back) == set(attrs)
    for k, v in attrs.items():
        if isinstance(v, float) and not math.isfinite(v):
            assert back[k] == str(v)
        elif isinstance(v, tuple):
            assert len(back[k]) == len(v)
        else:
            assert back[k] == v
    # And SQLite's own JSON functions accept it.
    assert sqlite3.connect(":memory:").execute("SELECT json_valid(?)", (text,)).fetchone()[0] == 1


# ----------------------------------------------------------------- several processes


def _writer(db: str, idx: int, requests: int, layers: int, barrier: Any, out: Any) -> None:
    """One writer process: `requests` x (1 transfer span + `layers` read spans)."""
    import os

    # Small, frequent batches (honoured through the standard OTEL_BSP_* variables) so the
    # four processes' transactions interleave and really contend for the write lock.
    os.environ["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"] = "128"
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "20"
    tel = S.configure_tracing(f"writer-{idx}", "bench", db_url=db, otlp=False,
                              engine_id=f"w{idx}", set_global=False)
    tracer = tel.tracer()
    barrier.wait(timeout=120)  # all processes write at the same time
    t0 = time.perf_counter()
    for r in range(requests):
        rid = f"w{idx}-r{r}"
        with tracer.start_as_current_span(A.SPAN_KV_TRANSFER) as root:
            A.set_attrs(root, {A.REQUEST_ID: rid})
            for layer in range(layers):
                with tracer.start_as_current_span(A.SPAN_KV_READ) as span:
                    A.set_attrs(span, {A.REQUEST_ID: rid, A.KV_LAYER: layer, A.KV_RANK: idx,
                                       A.KV_BYTES: 1000 * layer + idx, A.KV_DESCRIPTORS: 3,
                                       A.KV_LAYER_KIND: "mamba" if layer % 2 else "attention"})
    t_create = time.perf_counter() - t0
    stats = tel.shutdown()
    out.put({"idx": idx, "stats": stats, "t_create": t_create, "t_total": time.perf_counter() - t0})


def run_processes(target: Callable[..., None], args: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """One spawned process per ``args`` running ``target(*args, barrier, out)``; they start
    their work together at ``barrier``.  Returns what each put on ``out``."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(len(args)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, barrier, out)) for a in args]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return results


def run_writer_processes(db: str, procs_n: int, requests: int, layers: int) -> list[dict[str, Any]]:
    """``procs_n`` :func:`_writer` processes writing ``db`` at once; their reports."""
    return run_processes(_writer, [(db, i, requests, layers) for i in range(procs_n)])


def assert_every_span_stored(results: list[dict[str, Any]],
                             query: Callable[[str], list[tuple[Any, ...]]],
                             procs_n: int, requests: int, layers: int) -> int:
    """Spans created == spans stored, intact and interleaved (``query(sql)`` runs plain
    SQL on the database).  Returns the number of interleaved runs."""
    per_proc = requests * (1 + layers)
    created = sum(r["stats"]["created"] for r in results)
    stored = sum(r["stats"]["sinks"]["sqlite"]["exported"] for r in results)
    dropped = sum(r["stats"]["sinks"]["sqlite"]["dropped"] for r in results)
    assert created == procs_n * per_proc
    assert (stored, dropped) == (created, 0), [r["stats"] for r in results]
    assert query("SELECT COUNT(*) FROM spans") == [(created,)]  # created == stored, exactly
    assert query("SELECT COUNT(DISTINCT span_id) FROM spans") == [(created,)]
    assert query("SELECT service, COUNT(*) FROM spans GROUP BY service ORDER BY service") == [
        (f"writer-{i}", per_proc) for i in range(procs_n)]
    # Every read's parent is the transfer span of the same request, in the same trace.
    assert query("""
        SELECT COUNT(*) FROM spans c JOIN spans p
          ON c.parent_span_id = p.span_id AND c.trace_id = p.trace_id
         WHERE c.name = 'hybrid_pd.kv.read' AND p.name = 'hybrid_pd.kv.transfer'
           AND c.request_id = p.request_id""") == [(procs_n * requests * layers,)]
    assert query("SELECT COUNT(DISTINCT trace_id) FROM spans") == [(procs_n * requests,)]
    # Promoted values arrive intact from every process.
    assert query("""SELECT rank, layer, bytes, descriptors, layer_kind, role, engine_id
                   FROM spans WHERE request_id = 'w3-r17' AND layer = 5""") == [
        (3, 5, 5003, 3, "mamba", "bench", "w3")]
    # One processes row per writer: its resource's engine id is its spans' (w<i>).
    assert query("""SELECT service, role, engine_id, host, COUNT(DISTINCT pid) FROM processes
                    GROUP BY service, role, engine_id, host ORDER BY service""") == [
        (f"writer-{i}", "bench", f"w{i}", socket.gethostname(), 1) for i in range(procs_n)]
    assert query("SELECT COUNT(*) FROM processes") == [(procs_n,)]
    # The writers really overlapped: in insertion order, batches of different processes
    # alternate (a run = consecutive rows of one service).
    services = [r[0] for r in query("SELECT service FROM spans ORDER BY id")]
    runs = 1 + sum(a != b for a, b in zip(services, services[1:], strict=False))
    assert runs > procs_n, f"writers did not interleave ({runs} runs)"
    return runs


def test_concurrent_writer_processes_store_every_span(tmp_path: Path) -> None:
    procs_n, requests, layers = 4, 200, 9  # 4 x 200 x (1 + 9) = 4 x 2,000 spans
    db = tmp_path / "shared.db"
    results = run_writer_processes(str(db), procs_n, requests, layers)
    runs = assert_every_span_stored(results, lambda sql: rows(db, sql), procs_n, requests, layers)
    created = sum(r["stats"]["created"] for r in results)
    t_total = max(r["t_total"] for r in results)
    print(f"\n{created} spans from {procs_n} processes stored in {t_total:.2f} s "
          f"(create+flush, {created / t_total:,.0f} spans/s overall, {runs} interleaved runs)")


# ------------------------------------------------------------------- table processes

PROCESS_COLUMNS = ["id", "service", "role", "engine_id", "pid", "host", "first_seen_ns"]
IDENTITY = {"service.name": "hybrid-pd-decode", A.RESOURCE_ROLE: "decode",
            A.RESOURCE_ENGINE_ID: "eng-d-rank0", A.RESOURCE_PID: 4242,
            A.RESOURCE_HOST_NAME: "host-b"}


def traced(exporter: SQLiteSpanExporter, attrs: dict[str, Any], n: int = 3,
           span_attrs: dict[str, Any] | None = None) -> None:
    """``n`` spans, one batch each, from a provider whose resource is ``attrs``."""
    resource = Resource.create(attrs)
    exporter.set_origin(resource)
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    for _ in range(n):
        with provider.get_tracer("t").start_as_current_span(A.SPAN_KV_READ) as span:
            A.set_attrs(span, span_attrs or {})
    provider.shutdown()


def test_processes_one_row_per_identity(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    # a vLLM worker: the resource names "<engine>-rank0", its spans the engine
    traced(SQLiteSpanExporter(db), IDENTITY, span_attrs={A.ENGINE_ID: "eng-d"})
    assert [r[1] for r in rows(db, "PRAGMA table_info(processes)")] == PROCESS_COLUMNS
    sql = "SELECT service, role, engine_id, pid, host, first_seen_ns FROM processes ORDER BY engine_id"
    first = rows(db, sql)
    assert [r[:5] for r in first] == [("hybrid-pd-decode", "decode", "eng-d", 4242, "host-b"),
                                      ("hybrid-pd-decode", "decode", "eng-d-rank0", 4242, "host-b")]
    # a restart with the same identity: nothing new, the first sighting kept
    traced(SQLiteSpanExporter(db), IDENTITY, span_attrs={A.ENGINE_ID: "eng-d"})
    assert rows(db, sql) == first
    # unknown host, pid, role, engine (NULLs): still one row, however many batches
    traced(SQLiteSpanExporter(db), {"service.name": "unit"}, n=4)
    traced(SQLiteSpanExporter(db), {"service.name": "unit"}, n=2)
    assert rows(db, "SELECT role, engine_id, pid, host FROM processes WHERE service = 'unit'") == [
        (None, None, None, None)]
    assert rows(db) == [(12,)]


def test_processes_row_waits_for_a_writable_database(tmp_path: Path) -> None:
    """A batch that could not be written keeps its identity for the next one."""
    db = tmp_path / "w.db"
    exporter = SQLiteSpanExporter(db, busy_timeout_ms=50, max_retries=0)
    exporter.set_origin(Resource.create(IDENTITY))
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        assert exporter.export(make_spans(2)) is FAIL
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert rows(db, "SELECT COUNT(*) FROM processes") == [(0,)]
    assert exporter.export(make_spans(2)) is OK
    # the origin, and the identity of make_spans' own resource
    assert rows(db, "SELECT engine_id, host FROM processes ORDER BY engine_id") == [
        (None, None), ("eng-d-rank0", "host-b")]
    # shutdown alone writes the origin of an exporter that never exported
    other = SQLiteSpanExporter(db)
    other.set_origin(Resource.create({**IDENTITY, A.RESOURCE_PID: 1}))
    other.shutdown()
    assert rows(db, "SELECT COUNT(*) FROM processes WHERE pid = 1") == [(1,)]


def _same_identity_writer(db: str, barrier: Any, out: Any) -> None:
    """One of several processes whose resources name the same identity (as restarts
    that reuse a pid would): 10 batches of one span, started together."""
    exporter = SQLiteSpanExporter(db)
    barrier.wait(timeout=120)
    traced(exporter, IDENTITY, n=10)
    out.put({"exported": exporter.exported, "dropped": exporter.dropped,
             "last_error": exporter.last_error})


def run_same_identity(db: str, query: Callable[[str], list[tuple[Any, ...]]]) -> None:
    """4 processes insert the same processes row at once: one row, no batch lost."""
    results = run_processes(_same_identity_writer, [(db,)] * 4)
    assert [(r["exported"], r["dropped"]) for r in results] == [(10, 0)] * 4, results
    assert query("SELECT COUNT(*) FROM spans") == [(40,)]
    assert query("SELECT service, engine_id, pid, host FROM processes") == [
        ("hybrid-pd-decode", "eng-d-rank0", 4242, "host-b")]


def test_processes_same_identity_from_several_processes(tmp_path: Path) -> None:
    db = tmp_path / "same.db"
    run_same_identity(str(db), lambda sql: rows(db, sql))


# ------------------------------------------------------------ never block, never lose


def test_locked_database_drops_counts_and_recovers(tmp_path: Path) -> None:
    db = tmp_path / "locked.db"
    exporter = SQLiteSpanExporter(db, busy_timeout_ms=100, max_retries=1, retry_backoff_s=0.01)
    spans = make_spans(50)
    before = counters.snapshot()["dropped"].get("sqlite/locked", 0)

    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # held far longer than busy_timeout x attempts
    try:
        t0 = time.monotonic()
        assert exporter.export(spans) is FAIL
        dt = time.monotonic() - t0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # It really waited for the lock (2 attempts x 100 ms) and then gave up, boundedly.
    assert 0.15 <= dt < 3.0, dt
    assert exporter.dropped == 50 and exporter.dropped_by_reason == {"locked": 50}
    assert "locked" in exporter.last_error
    assert counters.snapshot()["dropped"]["sqlite/locked"] - before == 50
    # The lock is gone: the next batch goes through.
    assert exporter.export(spans) is OK
    assert rows(db) == [(50,)] and exporter.exported == 50


def test_locked_before_schema_exists_then_recovers(tmp_path: Path) -> None:
    db = tmp_path / "fresh.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE unrelated(x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        t0 = time.monotonic()
        exporter = SQLiteSpanExporter(db, busy_timeout_ms=100, max_retries=0)  # must not raise
        assert exporter.export(make_spans(5)) is FAIL
        assert time.monotonic() - t0 < 3.0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert exporter.dropped_by_reason == {"locked": 5}
    assert exporter.export(make_spans(5)) is OK  # schema created lazily now
    assert rows(db) == [(5,)]


def test_ledger_through_batch_processor_while_locked(tmp_path: Path) -> None:
    # Serving goes on while the database is locked; afterwards
    # created == stored + counted drops, exactly.
    db = tmp_path / "ledger.db"
    tel = S.configure_tracing("svc", "decode", db_url=db, otlp=False, set_global=False,
                              sqlite_options={"busy_timeout_ms": 50, "max_retries": 1})
    tracer = tel.tracer()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        t0 = time.perf_counter()
        for _ in range(300):
            with tracer.start_as_current_span(A.SPAN_KV_READ):
                pass
        hot = time.perf_counter() - t0
        assert tel.force_flush()  # the export fails inside; nothing raises here
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    for _ in range(200):
        with tracer.start_as_current_span(A.SPAN_KV_READ):
            pass
    stats = tel.shutdown()
    sq = stats["sinks"]["sqlite"]
    assert stats["created"] == 500
    assert sq["dropped"] == 300 and sq["dropped_by_reason"] == {"locked": 300}
    assert sq["exported"] == 200 and rows(db) == [(200,)]
    assert sq["pending"] == sq["dropped_queue"] == 0
    assert hot < 1.0, f"span creation waited for the database ({hot:.2f} s for 300 spans)"


def test_unwritable_path_drops_and_counts(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    db = blocker / "spans.db"  # parent is a regular file: cannot be created, even as root
    t0 = time.monotonic()
    exporter = SQLiteSpanExporter(db)  # logs, does not raise
    assert exporter.export(make_spans(7)) is FAIL
    assert exporter.export(make_spans(3)) is FAIL
    assert time.monotonic() - t0 < 5.0
    assert exporter.dropped == 10 and exporter.dropped_by_reason == {"unwritable": 10}
    assert "unable to open database file" in exporter.last_error
    # Through configure_tracing as a serving process would: nothing raises, drops counted.
    tel = S.configure_tracing("svc", "proxy", db_url=db, otlp=False, set_global=False)
    with tel.tracer().start_as_current_span(A.SPAN_PROXY_REQUEST):
        pass
    stats = tel.shutdown()
    assert stats["sinks"]["sqlite"]["dropped"] == 1 and stats["sinks"]["sqlite"]["exported"] == 0


def test_full_database_drops_and_counts(tmp_path: Path) -> None:
    db = tmp_path / "full.db"
    exporter = SQLiteSpanExporter(db)
    assert exporter.export(make_spans(2)) is OK
    with sqlite3.connect(db) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]

    # A real SQLITE_FULL: cap the file at (almost) its current size on our connections.
    @event.listens_for(exporter.engine, "connect")
    def _cap(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute(f"PRAGMA max_page_count={pages + 1}")

    exporter.engine.dispose()
    assert exporter.export(make_spans(200, big=2000)) is FAIL
    assert exporter.dropped_by_reason == {"full": 200}
    assert "full" in exporter.last_error
    assert rows(db) == [(2,)]  # the failed batch left nothing half-written


def test_export_after_shutdown_is_counted(tmp_path: Path) -> None:
    exporter = SQLiteSpanExporter(tmp_path / "s.db")
    exporter.shutdown()
    assert exporter.export(make_spans(4)) is FAIL
    assert exporter.dropped_by_reason == {"shutdown": 4}


def test_status_ok_and_events_roundtrip(tmp_path: Path) -> None:
    db = tmp_path / "ev.db"
    exporter = SQLiteSpanExporter(db)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("t").start_as_current_span(A.SPAN_KV_HANDSHAKE) as span:
        span.add_event("metadata_received", {"kv.bytes": 10})
        span.set_status(Status(StatusCode.OK))
    (status, events) = rows(db, "SELECT status, events FROM spans")[0]
    assert status == "OK"
    (ev,) = json.loads(events)
    assert ev["name"] == "metadata_received" and ev["attributes"] == {"kv.bytes": 10}


def test_full_queue_is_counted_not_lost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A sink slower than span creation: the SDK queue overflows.  The ledger still closes.
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "16")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "8")
    db = tmp_path / "q.db"
    tel = S.configure_tracing("svc", "decode", db_url=db, otlp=False, set_global=False,
                              sqlite_options={"busy_timeout_ms": 100, "max_retries": 0})
    before = counters.snapshot()["dropped"].get("sqlite/queue_full", 0)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # the worker's first export now waits 100 ms
    try:
        for _ in range(200):
            with tel.tracer().start_as_current_span(A.SPAN_KV_READ):
                pass
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    stats = tel.shutdown()
    sq = stats["sinks"]["sqlite"]
    assert sq["dropped_queue"] > 0, sq
    assert stats["ended"] == 200 == sq["exported"] + sq["dropped"] + sq["dropped_queue"]
    assert rows(db) == [(sq["exported"],)]
    assert counters.snapshot()["dropped"]["sqlite/queue_full"] - before == sq["dropped_queue"]
