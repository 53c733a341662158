"""The PostgreSQL trace store: SQLite's schema, many writer processes, the same dashboard.

Runs against a real PostgreSQL server: a throwaway cluster per session
(tests/pg_cluster.py, fixture ``pg_cluster`` / ``pg_url``), skipped with the fix named
where the server or psycopg is missing.  No GPU, NIXL or vLLM required.  SQLite is the
oracle: the same spans go into both stores and every public dashboard query must give
the same answer on each.  Query times of both are printed, never asserted.
"""

from __future__ import annotations

import inspect as pyinspect
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from pg_cluster import PgCluster, race_schema
from sqlalchemy import Engine, create_engine, insert, inspect, select, text
from sqlalchemy.exc import DBAPIError
from test_dashboard_instances import P0, P1, D, write_multi_host
from test_dashboard_queries import T0, SpanWriter, load_gen, write_connector_spans
from test_sqlite_exporter import (
    FAIL,
    IDENTITY,
    OK,
    assert_every_span_stored,
    make_spans,
    run_processes,
    run_same_identity,
    run_writer_processes,
    traced,
)

from hybrid_pd.dashboard import (
    connector_queries,
    instance_queries,
    queries,
    timeline_queries,
    transfer_queries,
)
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry.schema import (
    CONTRACT_COLUMNS,
    SCHEMA_VERSION,
    metadata_obj,
    processes_table,
    spans_table,
)
from hybrid_pd.telemetry.sqlite_exporter import SQLiteSpanExporter, drops_table
from hybrid_pd.telemetry.store import SCHEMA_LOCK_KEY


def pg_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    finally:
        engine.dispose()


def sqlite_rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


# ------------------------------------------------------------------- contract and schema


def test_same_spans_same_rows_columns_and_indexes(pg_url: str, tmp_path: Path) -> None:
    """One provider, two exporters: every column of every row is the same in both stores,
    and so are the tables, the columns and the named indexes."""
    lite = tmp_path / "spans.db"
    provider = TracerProvider(resource=Resource.create(
        {"service.name": "decode-0", A.RESOURCE_ROLE: "decode", A.RESOURCE_ENGINE_ID: "eng-d",
         A.RESOURCE_PID: 4242}))
    exporters = [SQLiteSpanExporter(lite), SQLiteSpanExporter(pg_url)]
    for exporter in exporters:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span(A.SPAN_KV_TRANSFER) as root:
        A.set_attrs(root, {A.REQUEST_ID: "cmpl-7", A.CONNECTOR: "hybrid"})
        with tracer.start_as_current_span(A.SPAN_KV_READ, record_exception=False,
                                          set_status_on_exception=False) as read:
            A.set_attrs(read, {A.REQUEST_ID: "cmpl-7", A.KV_LAYER: 12, A.KV_LAYER_KIND: "mamba",
                               A.KV_BYTES: 4_194_304, A.KV_DESCRIPTORS: 4, A.KV_RANK: 1,
                               A.KV_PEER_RANK: 0, A.KV_NIXL_XFER_US: 812.5, A.KV_VIEW: "ssm",
                               "nan": float("nan")})
            read.add_event("metadata_received", {"kv.bytes": 10})
            A.mark_failed(read, "timeout")
    provider.shutdown()
    assert [e.exported for e in exporters] == [2, 2] and [e.dropped for e in exporters] == [0, 0]

    every = "SELECT * FROM spans ORDER BY id"
    pg = pg_rows(pg_url, every)
    assert pg == sqlite_rows(lite, every) and len(pg) == 2, pg
    # Plain SQL reaches into the JSON on PostgreSQL too (NaN stored as a string).
    assert pg_rows(pg_url, """SELECT attributes::jsonb ->> 'kv.view', attributes::jsonb ->> 'nan'
                              FROM spans WHERE layer = 12""") == [("ssm", "nan")]

    lite_e, pg_e = create_engine(f"sqlite:///{lite}"), create_engine(pg_url)
    lite_i, pg_i = inspect(lite_e), inspect(pg_e)
    assert sorted(pg_i.get_table_names()) == sorted(lite_i.get_table_names()) == sorted(
        metadata_obj.tables)
    for table in metadata_obj.tables:
        shape = [(c["name"], c["nullable"], c["type"].python_type) for c in pg_i.get_columns(table)]
        assert shape == [(c["name"], c["nullable"], c["type"].python_type)
                         for c in lite_i.get_columns(table)], table
    columns = [c["name"] for c in pg_i.get_columns("spans")]
    assert set(CONTRACT_COLUMNS) <= set(columns), set(CONTRACT_COLUMNS) - set(columns)
    names = {str(ix.name) for ix in spans_table.indexes}
    assert queries.index_names(pg_e) == queries.index_names(lite_e) == names
    assert queries.missing_indexes(pg_e) == ()
    defs = dict(pg_rows(pg_url, "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'spans'"))
    assert "WHERE (name = 'hybrid_pd.kv.transfer'::text)" in defs["ix_spans_transfer_cover"]
    assert "WHERE ((status)::text = 'ERROR'::text)" in defs["ix_spans_error_start_ns"]
    assert "->> 'hybrid_pd.connector'" in defs["ix_spans_name_connector_start_ns"]
    assert pg_rows(pg_url, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    assert pg_i.get_columns("spans")[0]["type"].python_type is int  # BIGSERIAL id
    # processes: the same identity rows (first_seen_ns is each writer's own clock)
    ident = "SELECT service, role, engine_id, pid, host FROM processes ORDER BY id"
    assert pg_rows(pg_url, ident) == sqlite_rows(lite, ident) == [
        ("decode-0", "decode", "eng-d", 4242, None)]
    defs = dict(pg_rows(pg_url, "SELECT indexname, indexdef FROM pg_indexes "
                                "WHERE tablename = 'processes'"))
    assert "CREATE UNIQUE INDEX ux_processes_identity" in defs["ux_processes_identity"]
    assert "COALESCE(host, ''::text)" in defs["ux_processes_identity"], defs
    lite_e.dispose()
    pg_e.dispose()


def test_dashboard_engine_is_read_only(pg_url: str) -> None:
    SQLiteSpanExporter(pg_url).shutdown()
    engine = queries.open_engine(pg_url)
    for _ in range(2):  # the first connection and one back from the pool
        with pytest.raises(DBAPIError, match="read-only transaction"):
            with engine.begin() as conn:
                conn.execute(spans_table.delete())
    engine.dispose()


# ------------------------------------------------------------------ several processes


def test_concurrent_writer_processes_store_every_span(pg_cluster: PgCluster) -> None:
    """4 processes through configure_tracing, as the engines and the proxy do: every span
    created is stored, none dropped (tests/test_sqlite_exporter.py's checks, on PostgreSQL)."""
    url = pg_cluster.create_database("writers")
    procs_n, requests, layers = 4, 200, 9  # 4 x 200 x (1 + 9) = 4 x 2,000 spans
    t0 = time.perf_counter()
    results = run_writer_processes(url, procs_n, requests, layers)
    wall = time.perf_counter() - t0
    runs = assert_every_span_stored(results, lambda sql: pg_rows(url, sql), procs_n, requests,
                                    layers)
    sinks = [r["stats"]["sinks"]["sqlite"] for r in results]
    assert sum(s["dropped_queue"] for s in sinks) == 0 and all(
        s["dropped_by_reason"] == {} for s in sinks), sinks
    created = sum(r["stats"]["created"] for r in results)
    t_total = max(r["t_total"] for r in results)
    print(f"\nPostgreSQL: {created} spans created by {procs_n} processes, "
          f"{sum(s['exported'] for s in sinks)} stored, {sum(s['dropped'] for s in sinks)} "
          f"dropped; create+flush {t_total:.2f} s ({created / t_total:,.0f} spans/s), "
          f"{runs} interleaved runs, {wall:.1f} s with process start-up")


def test_schema_creation_races_from_several_processes(pg_cluster: PgCluster) -> None:
    """CREATE ... IF NOT EXISTS from 6 processes at once on a fresh database: without the
    schema lock all but one failed with a UniqueViolation on pg_type (3 of 3 rounds);
    with it none sees any database error, even without retries."""
    procs_n, rounds = 6, 2
    for r in range(rounds):
        url = pg_cluster.create_database(f"race{r}")
        results = run_processes(race_schema, [(url,)] * procs_n)
        assert all(x["ready"] and x["exported"] == 5 and not x["errors"] for x in results), results
        assert pg_rows(url, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
        assert pg_rows(url, "SELECT COUNT(*) FROM spans") == [(procs_n * 5,)]


def test_schema_creation_waits_for_the_schema_lock(pg_cluster: PgCluster) -> None:
    """While another session holds the schema lock, a new writer waits for it."""
    url = pg_cluster.create_database("schema_lock")
    holder = create_engine(url)
    done: list[SQLiteSpanExporter] = []
    with holder.begin() as conn:
        conn.execute(select(text(f"pg_advisory_xact_lock({SCHEMA_LOCK_KEY})")))
        thread = threading.Thread(target=lambda: done.append(SQLiteSpanExporter(url)))
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive() and not done, "the writer did not wait for the schema lock"
    thread.join(timeout=30)
    assert done and done[0]._schema_ready
    done[0].shutdown()
    holder.dispose()


def test_processes_one_row_per_identity(pg_cluster: PgCluster) -> None:
    """Restarts and NULL identities on PostgreSQL (whose UNIQUE lets NULLs repeat):
    still one row each; the first sighting is kept."""
    url = pg_cluster.create_database("processes")
    # A writer inserts in this order, the order in which the schema transaction locks
    # the tables (test_schema_creation_races_from_several_processes deadlocked otherwise).
    order = [t.name for t in metadata_obj.sorted_tables]
    assert order.index("processes") < order.index("spans") < order.index("telemetry_drops")
    sql = "SELECT service, role, engine_id, pid, host, first_seen_ns FROM processes ORDER BY id"
    traced(SQLiteSpanExporter(url), IDENTITY, span_attrs={A.ENGINE_ID: "eng-d"})
    first = pg_rows(url, sql)
    assert sorted(r[2] for r in first) == ["eng-d", "eng-d-rank0"]
    traced(SQLiteSpanExporter(url), IDENTITY, span_attrs={A.ENGINE_ID: "eng-d"})
    traced(SQLiteSpanExporter(url), {"service.name": "unit"}, n=2)
    traced(SQLiteSpanExporter(url), {"service.name": "unit"}, n=2)
    assert pg_rows(url, sql)[:2] == first
    assert [r[:5] for r in pg_rows(url, sql)[2:]] == [("unit", None, None, None, None)]


def test_processes_same_identity_from_several_processes(pg_cluster: PgCluster) -> None:
    url = pg_cluster.create_database("same_identity")
    run_same_identity(url, lambda sql: pg_rows(url, sql))


def test_dashboard_without_processes_table(pg_cluster: PgCluster) -> None:
    """A central store made before table processes: hosts unknown, pairs still there."""
    url = pg_cluster.create_database("no_processes")
    write_multi_host([url])
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE processes"))
    engine.dispose()
    ro = queries.open_engine(url)
    assert instance_queries.processes(ro).empty
    assert instance_queries.transfer_pairs(ro)["p_engine_id"].tolist() == [P0, P1]
    ro.dispose()


# ------------------------------------------------------------ never block, never lose


def test_locked_table_drops_counts_and_recovers(pg_cluster: PgCluster) -> None:
    """A table lock held elsewhere: lock_timeout bounds the wait like SQLite's busy
    timeout, the batch is dropped and counted as "locked", the next one goes through."""
    url = pg_cluster.create_database("locked")
    exporter = SQLiteSpanExporter(url, busy_timeout_ms=100, max_retries=1, retry_backoff_s=0.01)
    holder = create_engine(url)
    with holder.begin() as conn:
        conn.execute(text("LOCK TABLE spans IN EXCLUSIVE MODE"))  # blocks INSERT, not SELECT
        t0 = time.monotonic()
        assert exporter.export(make_spans(50)) is FAIL
        dt = time.monotonic() - t0
    assert 0.15 <= dt < 3.0, dt  # 2 attempts x 100 ms, then it gave up
    assert exporter.dropped_by_reason == {"locked": 50}, exporter.last_error
    assert "lock timeout" in (exporter.last_error or "")
    assert exporter.export(make_spans(50)) is OK
    assert pg_rows(url, "SELECT COUNT(*) FROM spans") == [(50,)]
    exporter.shutdown()
    holder.dispose()


def test_unreachable_server_drops_and_counts(pg_cluster: PgCluster) -> None:
    from helpers import free_port

    url = f"postgresql+psycopg://hybrid_pd@127.0.0.1:{free_port()}/nowhere"  # nobody listens
    t0 = time.monotonic()
    exporter = SQLiteSpanExporter(url)  # logs, does not raise
    assert exporter.export(make_spans(7)) is FAIL
    assert time.monotonic() - t0 < 5.0
    assert exporter.dropped_by_reason == {"unwritable": 7}, exporter.last_error


# ----------------------------------------------------------- the dashboard on both stores


def copy_spans(src: Path, url: str) -> None:
    """Every row of a SQLite span file into an empty PostgreSQL database (ids kept)."""
    SQLiteSpanExporter(url).shutdown()  # the schema, as a writer makes it
    lite, pg = create_engine(f"sqlite:///{src}"), create_engine(url)
    with lite.connect() as src_conn, pg.begin() as dst:
        for table in (spans_table, drops_table, processes_table):
            rows = [dict(r._mapping) for r in src_conn.execute(select(table))]
            for i in range(0, len(rows), 5_000):
                dst.execute(insert(table), rows[i:i + 5_000])
        # Statistics, as autovacuum's analyze keeps them on a live store.
        dst.execute(text("ANALYZE spans"))
    lite.dispose()
    pg.dispose()


def add_drops(engines: list[Engine]) -> None:
    rows = [{"recorded_ns": T0 + 5, "first_ns": T0, "last_ns": T0 + 4, "service": "svc",
             "role": "decode", "engine_id": "decode-h", "pid": 1, "sink": "sqlite",
             "reason": reason, "spans": n} for reason, n in (("locked", 3), ("queue_full", 9))]
    for engine in engines:
        with engine.begin() as conn:
            conn.execute(insert(drops_table), rows)


@pytest.fixture(scope="module")
def connector_pair(pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory
                   ) -> tuple[str, str]:
    """test_dashboard_queries' hand-made spans of hybrid, upstream and bench, written by
    one provider through two exporters: the same spans (ids included) in both stores."""
    lite = tmp_path_factory.mktemp("pair") / "spans.db"
    url = pg_cluster.create_database("connectors")
    w = SpanWriter(lite)
    w.provider.add_span_processor(SimpleSpanProcessor(SQLiteSpanExporter(url)))
    write_connector_spans(w, bench=True)
    add_drops([create_engine(f"sqlite:///{lite}"), create_engine(url)])
    return str(lite), url


@pytest.fixture(scope="module")
def synthetic_pair(pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory
                   ) -> tuple[str, str]:
    """~20k synthetic bench-shaped spans (scripts/gen_spans_db.py: 10 % failed transfers,
    every third request through upstream), the same rows in both stores."""
    lite = tmp_path_factory.mktemp("synthetic") / "spans.db"
    load_gen().generate(lite, 20_000, seed=3, fail_rate=0.1, upstream_every=3)
    url = pg_cluster.create_database("synthetic")
    copy_spans(lite, url)
    return str(lite), url


@pytest.fixture(scope="module")
def hosts_pair(pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[str, str]:
    """test_dashboard_instances' spans of two hosts (P0, P1, D) in both stores."""
    lite = tmp_path_factory.mktemp("hosts_pair") / "spans.db"
    url = pg_cluster.create_database("hosts")
    write_multi_host([str(lite), url])
    return str(lite), url


# Public functions taking an engine that are not page queries: they run what they are given.
NOT_QUERIES = {"queries.fetch_frame"}


def public_query_functions() -> set[str]:
    """``module.function`` of every public function of the dashboard's query modules whose
    first parameter is the engine."""
    out = set()
    for mod in (queries, transfer_queries, connector_queries, timeline_queries, instance_queries):
        for name, fn in vars(mod).items():
            if (pyinspect.isfunction(fn) and fn.__module__ == mod.__name__
                    and not name.startswith("_")
                    and next(iter(pyinspect.signature(fn).parameters), None) == "engine"):
                out.add(f"{mod.__name__.rsplit('.', 1)[1]}.{name}")
    return out - NOT_QUERIES


def query_calls(lo: int, hi: int, rid: str) -> dict[str, Callable[[Engine], Any]]:
    """Every page query with the arguments the pages pass: for the range "all", the
    second half of it, and (ids, bounds) where the query takes them."""
    x, c = transfer_queries, connector_queries
    every = (*c.COMPARED_CONNECTORS, c.BENCH)
    calls: dict[str, Callable[[Engine], Any]] = {
        "queries.time_bounds": queries.time_bounds,
        "queries.index_names": queries.index_names,
        "queries.missing_indexes": queries.missing_indexes,
        "queries.span_drops": queries.span_drops,
        "queries.span_drops(start)": lambda e: queries.span_drops(e, T0 + 4),
        "queries.spans_by_name": lambda e: queries.spans_by_name(
            e, (A.SPAN_KV_READ, A.SPAN_KV_DESC_BUILD),
            attrs=(A.KV_NIXL_XFER_US, A.CONNECTOR, A.KV_DESC_SCOPE, A.KV_LAYER)),
        "timeline_queries.request_list(latest)": lambda e: timeline_queries.request_list(e),
        "timeline_queries.request_list(slowest)":
            lambda e: timeline_queries.request_list(e, "slowest"),
        "timeline_queries.request_timeline": lambda e: timeline_queries.request_timeline(e, rid),
        "transfer_queries.transfer_buckets": lambda e: x.transfer_buckets(e, lo, hi),
        # first_seen_ns is each writer's clock: two exporters of one span stream differ
        "instance_queries.processes":
            lambda e: instance_queries.processes(e).drop(columns="first_seen_ns"),
    }
    # The host / engine-instance filter: a P (its transfers), D, and no engine at all.
    for engines in ((P0,), (D, P1), ()):
        calls.update({f"{k} engines={engines}": v for k, v in {
            "transfer_queries.transfer_stats": lambda e, g=engines: x.transfer_stats(
                e, engines=g),
            "transfer_queries.transfer_buckets": lambda e, g=engines: x.transfer_buckets(
                e, lo, hi, engines=g),
            "transfer_queries.failures": lambda e, g=engines: x.failures(e, engines=g),
            "transfer_queries.failure_counts":
                lambda e, g=engines: x.failure_counts(e, engines=g),
            "transfer_queries.read_stats": lambda e, g=engines: x.read_stats(e, engines=g),
            "connector_queries.desc_build_stats":
                lambda e, g=engines: c.desc_build_stats(e, engines=g),
            "timeline_queries.request_list":
                lambda e, g=engines: timeline_queries.request_list(e, engines=g),
            "instance_queries.transfer_pairs":
                lambda e, g=engines: instance_queries.transfer_pairs(e, engines=g),
        }.items()})
    for label, (s, t) in {"all": (None, None), "half": ((lo + hi) // 2, hi)}.items():
        calls.update({f"{k}({label})": v for k, v in {
            "transfer_queries.transfers": lambda e, s=s, t=t: x.transfers(e, s, t),
            "transfer_queries.reads": lambda e, s=s, t=t: x.reads(e, s, t),
            "transfer_queries.failures": lambda e, s=s, t=t: x.failures(e, s, t),
            "transfer_queries.failure_counts": lambda e, s=s, t=t: x.failure_counts(e, s, t),
            "transfer_queries.transfer_stats": lambda e, s=s, t=t: x.transfer_stats(e, s, t),
            "transfer_queries.transfer_stats total":
                lambda e, s=s, t=t: x.transfer_stats(e, s, t, ()),
            "transfer_queries.read_stats": lambda e, s=s, t=t: x.read_stats(e, s, t),
            "connector_queries.desc_builds": lambda e, s=s, t=t: c.desc_builds(e, s, t),
            "connector_queries.desc_build_stats":
                lambda e, s=s, t=t: c.desc_build_stats(e, s, t),
            "connector_queries.connector_values":
                lambda e, s=s, t=t: c.connector_values(e, s, t),
            "connector_queries.connectors": lambda e, s=s, t=t: c.connectors(e, s, t),
            "connector_queries.connector_reads": lambda e, s=s, t=t: c.connector_reads(e, s, t),
            "connector_queries.connector_reads with bench":
                lambda e, s=s, t=t: c.connector_reads(e, s, t, compared=every),
            "instance_queries.transfer_pairs":
                lambda e, s=s, t=t: instance_queries.transfer_pairs(e, s, t),
        }.items()})
    return calls


def difference(a: Any, b: Any) -> str | None:
    """None when ``a`` (SQLite's answer) equals ``b`` (PostgreSQL's), values and types;
    else what differs."""
    if isinstance(a, pd.DataFrame) and isinstance(b, pd.DataFrame):
        try:
            pd.testing.assert_frame_equal(a, b)
        except AssertionError as exc:
            return str(exc)
        return None
    if a != b or types(a) != types(b):
        return f"SQLite {a!r}\nPostgreSQL {b!r}"
    return None


def types(x: Any) -> Any:
    """The type names inside ``x`` (1 == 1.0 == True, but a page would show them apart)."""
    if isinstance(x, dict):
        return {k: types(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [types(v) for v in x]
    if isinstance(x, set | frozenset):
        return sorted(type(v).__name__ for v in x)
    return type(x).__name__


# Per database: answers that must have rows, so that no comparison is of empty frames.
NON_EMPTY: dict[str, tuple[str, ...]] = {
    "connector_pair": ("transfer_queries.failures(all)", "connector_queries.connector_reads(all)",
                       "timeline_queries.request_timeline", "transfer_queries.transfer_buckets",
                       "transfer_queries.read_stats(all)", "transfer_queries.reads(half)",
                       "instance_queries.processes"),
    "hosts_pair": ("instance_queries.processes", "instance_queries.transfer_pairs(all)",
                   "instance_queries.transfer_pairs(half)",
                   f"transfer_queries.failures engines={(P0,)}",
                   f"instance_queries.transfer_pairs engines={(D, P1)}",
                   "timeline_queries.request_timeline"),
}
NON_EMPTY["synthetic_pair"] = NON_EMPTY["connector_pair"][:-1]


@pytest.mark.parametrize("pair", ["connector_pair", "synthetic_pair", "hosts_pair"])
def test_dashboard_queries_same_on_both_stores(pair: str, request: pytest.FixtureRequest) -> None:
    """Every public dashboard query gives the same answer (values, dtypes, order) on
    PostgreSQL as on SQLite over the same spans."""
    lite, url = request.getfixturevalue(pair)
    lite_e, pg_e = queries.open_engine(lite), queries.open_engine(url)
    lo, hi = queries.time_bounds(lite_e)
    assert lo is not None and hi is not None
    rid = str(timeline_queries.request_list(lite_e, "slowest", limit=1)["request_id"].iloc[0])
    calls = query_calls(lo, hi, rid)
    assert public_query_functions() <= {n.split("(")[0].split(" ")[0] for n in calls}, (
        "a dashboard query is not compared here")
    diffs, answers = [], {}
    for name, call in calls.items():
        answers[name] = call(lite_e)
        if (d := difference(answers[name], call(pg_e))) is not None:
            diffs.append(f"--- {name}:\n{d}")
    sqlite_status, pg_status = queries.check_db(lite, lite_e), queries.check_db(url, pg_e)
    assert sqlite_status.ok and sqlite_status == pg_status, (sqlite_status, pg_status)
    assert not diffs, "\n".join(diffs)
    # Not a comparison of empty frames: the pages' main loads all have rows.
    for name in NON_EMPTY[pair]:
        assert len(answers[name]) > 0, name
    lite_e.dispose()
    pg_e.dispose()


def test_dashboard_page_query_times(synthetic_pair: tuple[str, str]) -> None:
    """Each page's queries (scripts/gen_spans_db.py's list) timed on both stores: printed,
    not asserted (a loaded 2-core box times nothing reliably)."""
    gen = load_gen()
    lite, url = synthetic_pair
    medians = {}
    for store, target in (("SQLite", lite), ("PostgreSQL", url)):
        results = gen.bench_queries(target, repeats=3)
        medians[store] = {(label, name): med for label, name, _, med, _ in results}
    n = queries.check_db(lite).span_count
    lines = [f"\ndashboard page queries, sum of medians of 3 runs, {n:,} spans",
             f"{'page':<17} {'range':<11} {'SQLite ms':>10} {'PostgreSQL ms':>14}"]
    for label in ("all", "last 1 min"):
        for page, names in gen.PAGE_QUERIES.items():
            lite_ms, pg_ms = (sum(medians[s][(label, q)] for q in names) for s in medians)
            lines.append(f"{page:<17} {label:<11} {lite_ms:>10.1f} {pg_ms:>14.1f}")
    print("\n".join(lines))
    assert set(medians["SQLite"]) == set(medians["PostgreSQL"])


@pytest.mark.parametrize("page", ["overview", "timeline", "layers", "descriptors", "failures"])
def test_dashboard_pages_on_postgres(page: str, monkeypatch: pytest.MonkeyPatch,
                                     connector_pair: tuple[str, str]) -> None:
    """The Streamlit pages on a PostgreSQL URL: no exception, and the same figures,
    tables and charts as on the SQLite file."""
    from test_dashboard_app import charts, metrics, open_page

    lite, url = connector_pair
    at_pg = open_page(monkeypatch, url, page)
    at_lite = open_page(monkeypatch, lite, page)
    assert metrics(at_pg) == metrics(at_lite), page
    assert charts(at_pg) == charts(at_lite), page
    tables = [[d.value for d in at.dataframe] for at in (at_pg, at_lite)]
    assert len(tables[0]) == len(tables[1])
    for pg_df, lite_df in zip(*tables, strict=True):
        pd.testing.assert_frame_equal(pg_df, lite_df)
    assert not at_pg.sidebar.warning  # every index there


@pytest.mark.parametrize("page", ["overview", "timeline", "layers", "descriptors", "failures"])
def test_dashboard_pages_filtered_on_postgres(page: str, monkeypatch: pytest.MonkeyPatch,
                                              hosts_pair: tuple[str, str]) -> None:
    """The pages with the host filter on: the same figures and tables on both stores."""
    from test_dashboard_app import charts, metrics, open_page

    lite, url = hosts_pair
    ats = [open_page(monkeypatch, db, page) for db in (url, lite)]
    for at in ats:
        assert at.multiselect(key="hosts").options == ["host-a", "host-b"]
        at.multiselect(key="hosts").set_value(["host-a"]).run()
        assert not at.exception, [e.value for e in at.exception]
    at_pg, at_lite = ats
    assert metrics(at_pg) == metrics(at_lite), page
    assert charts(at_pg) == charts(at_lite), page
    for pg_df, lite_df in zip(*[[d.value for d in at.dataframe] for at in ats], strict=True):
        pd.testing.assert_frame_equal(pg_df, lite_df)
