"""The dashboard's read-only queries and the timeline figure, on real and synthetic spans.

No GPU required; the bench fixture moves bytes through NIXL/UCX on DRAM.  The aggregate
queries (SQL percentiles, time buckets, counts) are checked against brute-force pandas /
plain-SQL oracles over the same rows; the ours-vs-upstream comparison (and bench spans
kept out of it) against counts worked out by hand for a database written through the real
exporter.  Speed is not asserted here (``scripts/gen_spans_db.py --bench-queries``
measures it); index use is.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from sqlalchemy import Engine, create_engine, event, insert
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.exc import OperationalError

from hybrid_pd.dashboard import (
    connector_queries,
    figures,
    queries,
    timeline_queries,
    transfer_queries,
)
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry.schema import (
    DASHBOARD_INDEXES,
    SCHEMA_VERSION,
    metadata_obj,
    schema_version_table,
)
from hybrid_pd.telemetry.sqlite_exporter import SQLiteSpanExporter

ROOT = Path(__file__).resolve().parents[1]


def load_gen() -> ModuleType:
    """scripts/gen_spans_db.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gen_spans_db", ROOT / "scripts" / "gen_spans_db.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def synth_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~6k synthetic spans (52 layers x 2 D ranks per request), 10 % failed transfers."""
    db = tmp_path_factory.mktemp("synth") / "spans.db"
    load_gen().generate(db, 6_000, seed=1, fail_rate=0.1)
    return db


# ------------------------------------------------- a database of both connectors, by hand

T0 = 1_790_000_000_000_000_000  # ns; hybrid's requests from T0, upstream's from T0 + 2 min
UPSTREAM_T0 = T0 + 120 * 10**9
BENCH_T0 = T0 + 60 * 10**9  # bench's requests, when written, between the two
MS = 10**6
# Layer kinds of the hybrid READs of one request (layers 0..4).
HYBRID_LAYERS = ("attention", "mamba", "mamba", "attention", "mamba")


class SpanWriter:
    """Spans with chosen times and attributes, through the real ``SQLiteSpanExporter``."""

    def __init__(self, path: Path) -> None:
        resource = Resource.create({"service.name": "hybrid-pd-decode"})
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(SimpleSpanProcessor(SQLiteSpanExporter(path)))
        self.tracer = self.provider.get_tracer("test")

    def emit(self, name: str, t0: int, dur: int, attrs: dict[str, Any],
             parent: trace.Span | None = None, fail: str = "") -> trace.Span:
        ctx = trace.set_span_in_context(parent) if parent is not None else None
        span = self.tracer.start_span(name, context=ctx, start_time=t0)
        A.set_attrs(span, attrs)
        if fail:
            A.mark_failed(span, fail)
        span.end(end_time=t0 + dur)
        return span

    def build(self, t0: int, connector: str | None, scope: str, n: int, nbytes: int | None,
              engine: str, rid: str | None = None, parent: trace.Span | None = None) -> None:
        self.emit(A.SPAN_KV_DESC_BUILD, t0, 20_000, {
            A.CONNECTOR: connector, A.KV_DESC_SCOPE: scope, A.KV_VIEW: "all",
            A.KV_DESCRIPTORS: n, A.KV_BYTES: nbytes, A.ENGINE_ID: engine, A.REQUEST_ID: rid,
            A.KV_RANK: 0, A.KV_PEER_RANK: 0}, parent)

    def read(self, t0: int, dur: int, connector: str, engine: str, rid: str, kind: str,
             n: int, nbytes: int, parent: trace.Span, layer: int | None = None,
             fail: str = "") -> None:
        self.emit(A.SPAN_KV_READ, t0, dur, {
            A.CONNECTOR: connector, A.ENGINE_ID: engine, A.REQUEST_ID: rid, A.KV_LAYER: layer,
            A.KV_LAYER_KIND: kind, A.KV_DESCRIPTORS: n, A.KV_BYTES: nbytes, A.KV_RANK: 0,
            A.KV_PEER_RANK: 0, A.KV_NIXL_XFER_US: 30.0 if layer is not None else None},
            parent, fail)

    def transfer(self, t0: int, connector: str, engine: str, rid: str, nbytes: int,
                 fail: str = "") -> trace.Span:
        """An open transfer span: the caller ends it after its children."""
        span = self.tracer.start_span(A.SPAN_KV_TRANSFER, start_time=t0)
        A.set_attrs(span, {A.CONNECTOR: connector, A.ENGINE_ID: engine, A.REQUEST_ID: rid,
                           A.KV_RANK: 0, A.KV_BYTES: nbytes})
        if fail:
            A.mark_failed(span, fail)
        return span


def write_hybrid(w: SpanWriter) -> None:
    """Engine ``decode-h``: requests r0, r1, r2 at T0 + 0/100/200 ms, transfers of 1, 2,
    3 ms; per request one mapping build (10 descriptors, 900 B) and five per-layer READs:
    attention 3 descriptors / 300 B, mamba 1 / 100 B, so 2*3 + 3*1 = 9 descriptors and
    2*300 + 3*100 = 900 B per request.  Handshake builds: local 100 / 10 kB twice (one
    without the connector attribute: a span from before it existed, counted as hybrid),
    remote 100 / 10 kB once."""
    w.build(T0 - 50 * MS, "hybrid", "local", 100, 10_000, "decode-h")
    w.build(T0 - 49 * MS, None, "local", 100, 10_000, "decode-h")  # legacy span
    w.build(T0 - 48 * MS, "hybrid", "remote", 100, 10_000, "decode-h")
    for i in range(3):
        t = T0 + i * 100 * MS
        tr = w.transfer(t, "hybrid", "decode-h", f"r{i}", 900)
        w.build(t + 1_000, "hybrid", "request", 10, 900, "decode-h", f"r{i}", tr)
        for layer, kind in enumerate(HYBRID_LAYERS):
            attn = kind == "attention"
            w.read(t + 100_000 + layer * 50_000, 40_000, "hybrid", "decode-h", f"r{i}", kind,
                   3 if attn else 1, 300 if attn else 100, tr, layer)
        tr.end(end_time=t + (i + 1) * MS)


def write_upstream(w: SpanWriter) -> None:
    """Engine ``decode-u``: requests r0, r1 (the same ids, as when two bench runs share a
    database) at T0 + 2 min + 0/100 ms, transfers of 4, 5 ms; per request one mapping
    build (40 ids, no bytes) and one whole-request READ (layer kind ``mixed``, 40
    descriptors, 1000 B).  r1 fails: its READ and transfer end ERROR, with a stall and an
    ERROR abort.  Handshake builds: local 300 / 10 kB, remote 300 / 10 kB."""
    w.build(UPSTREAM_T0 - 50 * MS, "upstream", "local", 300, 10_000, "decode-u")
    w.build(UPSTREAM_T0 - 48 * MS, "upstream", "remote", 300, 10_000, "decode-u")
    for i in range(2):
        t = UPSTREAM_T0 + i * 100 * MS
        fail = "stalled" if i == 1 else ""
        tr = w.transfer(t, "upstream", "decode-u", f"r{i}", 1000, fail)
        w.build(t + 1_000, "upstream", "request", 40, None, "decode-u", f"r{i}", tr)
        w.read(t + 100_000, 2 * MS, "upstream", "decode-u", f"r{i}", "mixed", 40, 1000, tr,
               fail=fail)
        if fail:
            base = {A.CONNECTOR: "upstream", A.ENGINE_ID: "decode-u", A.REQUEST_ID: f"r{i}"}
            w.emit(A.SPAN_KV_STALL, t + 3 * MS, 1_000, {**base, A.KV_WAITED_MS: 2.0}, tr)
            w.emit(A.SPAN_KV_ABORT, t + 3 * MS + 1_000, 1_000, base, tr, fail)
        tr.end(end_time=t + (i + 4) * MS)


def write_bench(w: SpanWriter) -> None:
    """``hybrid-pd bench`` (connector ``bench``, engine ``bench-d``): requests r0, r1 (the
    ids hybrid's and upstream's use too) at T0 + 1 min + 0/100 ms, transfers of 6 ms; per
    request one mapping build (6 descriptors, 600 B) and two attention READs of 5
    descriptors / 2000 B, so 10 descriptors and 4000 B per request, 5 descriptors and
    2000 B per READ.  One handshake build: local 50 / 5 kB."""
    w.build(BENCH_T0 - 50 * MS, "bench", "local", 50, 5_000, "bench-d")
    for i in range(2):
        t = BENCH_T0 + i * 100 * MS
        tr = w.transfer(t, "bench", "bench-d", f"r{i}", 4000)
        w.build(t + 1_000, "bench", "request", 6, 600, "bench-d", f"r{i}", tr)
        for layer in range(2):
            w.read(t + 100_000 + layer * 50_000, 40_000, "bench", "bench-d", f"r{i}",
                   "attention", 5, 2000, tr, layer)
        tr.end(end_time=t + 6 * MS)


def write_connector_spans(w: SpanWriter, bench: bool = False) -> None:
    """Spans of both connectors (:func:`write_hybrid`, :func:`write_upstream`) and, with
    ``bench``, a bench run's (:func:`write_bench`), through ``w``'s exporters; then
    shuts ``w`` down (tests/test_postgres_store.py hangs a second store on it)."""
    write_hybrid(w)
    if bench:
        write_bench(w)
    write_upstream(w)
    w.provider.shutdown()


def write_connector_db(path: Path, bench: bool = False) -> Path:
    """:func:`write_connector_spans` into a SQLite file through the real exporter."""
    write_connector_spans(SpanWriter(path), bench)
    return path


@pytest.fixture(scope="module")
def connector_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_connector_db(tmp_path_factory.mktemp("connectors") / "spans.db")


def without_dashboard_indexes(src: Path, dst: Path) -> Path:
    """A copy of ``src`` as a database made before the dashboard's indexes existed."""
    shutil.copy(src, dst)
    con = sqlite3.connect(dst)
    for name in DASHBOARD_INDEXES:
        con.execute(f"DROP INDEX {name}")
    con.commit()
    con.close()
    return dst


def make_empty(path: Path, version: int | None = SCHEMA_VERSION) -> Path:
    engine = create_engine(f"sqlite:///{path}")
    metadata_obj.create_all(engine)
    if version is not None:
        with engine.begin() as conn:
            conn.execute(insert(schema_version_table), [{"version": version, "applied_ns": 0, "writer": "test"}])
    engine.dispose()
    return path


# ----------------------------------------------------------------------- engine + status


def test_engine_is_read_only(bench_spans_db: Path) -> None:
    before = bench_spans_db.read_bytes()
    engine = queries.open_engine(str(bench_spans_db))
    with pytest.raises(OperationalError, match="readonly|read-only|query_only"):
        with engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM spans")
    engine.dispose()
    assert bench_spans_db.read_bytes() == before


def test_readonly_url_forms(tmp_path: Path) -> None:
    p = tmp_path / "a b.db"
    url = str(queries.readonly_url(str(p)))
    assert url.startswith("sqlite:///file:") and url.endswith("?mode=ro&uri=true"), url
    assert "a%20b.db" in url
    assert queries.sqlite_path(f"sqlite:///{p}") == p.resolve()
    assert queries.sqlite_path("postgresql+psycopg://u@h/db") is None


def test_check_db_states(tmp_path: Path, bench_spans_db: Path) -> None:
    missing = queries.check_db(str(tmp_path / "nope.db"))
    assert missing.state == "missing" and "hybrid-pd bench" in missing.message
    assert not (tmp_path / "nope.db").exists(), "checking must not create the file"
    empty = queries.check_db(str(make_empty(tmp_path / "empty.db")))
    assert empty.state == "empty" and "--telemetry sqlite" in empty.message
    newer = queries.check_db(str(make_empty(tmp_path / "newer.db", SCHEMA_VERSION + 1)))
    assert newer.state == "newer_schema" and f"version {SCHEMA_VERSION + 1}" in newer.message
    no_table = tmp_path / "plain.db"
    sqlite3.connect(no_table).close()
    assert queries.check_db(str(no_table)).state == "empty"
    ok = queries.check_db(str(bench_spans_db))
    assert ok.ok and ok.span_count > 50 and ok.schema_version == SCHEMA_VERSION


# ---------------------------------------------------------------- queries on a real bench


def test_request_timeline_real_bench(bench_spans_db: Path) -> None:
    engine = queries.open_engine(str(bench_spans_db))
    reqs = timeline_queries.request_list(engine, "latest")
    assert "r0" in set(reqs["request_id"]), reqs
    df = timeline_queries.request_timeline(engine, "r0")
    names = df["name"].value_counts().to_dict()
    # TP 1 -> 2: both D ranks pull the whole request from P0; tiny model: 5 layers.
    assert names[A.SPAN_KV_TRANSFER] == 2, names
    assert names[A.SPAN_KV_READ] == 10, names
    assert names[A.SPAN_KV_HANDSHAKE] == 2, names  # the latest handshake per D rank
    assert set(df.loc[df["name"] == A.SPAN_KV_READ, "layer_kind"]) == {"attention", "mamba"}
    assert df["start_ns"].is_monotonic_increasing
    assert df[A.KV_NIXL_XFER_US].notna().sum() == 10  # NIXL timings parsed for every READ
    rows = figures.timeline_rows(df)
    read_rows = rows.loc[rows["name"] == A.SPAN_KV_READ, "row"]
    assert read_rows.is_unique and len(read_rows) == 10, list(read_rows)
    assert {r.split()[-1] for r in read_rows} == {"P0→D0", "P0→D1"}
    assert not rows["row"].str.contains("D\\?").any(), list(rows["row"])  # ranks filled in


def test_window_queries_real_bench(bench_spans_db: Path) -> None:
    engine = queries.open_engine(str(bench_spans_db))
    lo, hi = queries.time_bounds(engine)
    assert lo is not None and hi is not None and lo <= hi
    tr = transfer_queries.transfers(engine)
    assert len(tr) == 10 and (tr["bytes"] > 0).all() and (tr["gbps"] > 0).all()
    rd = transfer_queries.reads(engine, lo, hi)
    assert len(rd) == 50
    assert transfer_queries.reads(engine, hi + 1, None).empty
    d = connector_queries.desc_builds(engine)
    assert {"local", "remote", "request"} <= set(d[A.KV_DESC_SCOPE])
    assert transfer_queries.failures(engine).empty


def test_unknown_request_is_empty(bench_spans_db: Path) -> None:
    engine = queries.open_engine(str(bench_spans_db))
    df = timeline_queries.request_timeline(engine, "no-such-request")
    assert df.empty and "duration_ms" in df


# ------------------------------------------------------------------- synthetic + speed


def test_failures_and_slowest(synth_db: Path) -> None:
    engine = queries.open_engine(str(synth_db))
    f = transfer_queries.failures(engine)
    assert {A.SPAN_KV_ABORT, A.SPAN_KV_STALL, A.SPAN_KV_TRANSFER} <= set(f["name"])
    assert (f.loc[f["name"] == A.SPAN_KV_ABORT, A.KV_FAILURE_REASON] == "stall timeout").all()
    slow = timeline_queries.request_list(engine, "slowest")
    assert slow["duration_ns"].is_monotonic_decreasing
    assert (slow["errors"] > 0).any()


def test_timeline_query_uses_indexes(synth_db: Path) -> None:
    """The request lookups must be index searches: that is what keeps 10^6 spans fast."""
    sql = str(timeline_queries.timeline_statement("cmpl-00000003").compile(
        dialect=sqlite_dialect(), compile_kwargs={"literal_binds": True}))
    con = sqlite3.connect(synth_db)
    plan = " ".join(str(r) for r in con.execute("EXPLAIN QUERY PLAN " + sql))
    con.close()
    assert "ix_spans_request_id_start_ns" in plan and "ix_spans_trace_id" in plan, plan
    assert "SCAN" not in plan, plan
    engine = queries.open_engine(str(synth_db))
    timeline_queries.request_timeline(engine, "cmpl-00000003")  # warm the connection pool
    t0 = time.perf_counter()
    df = timeline_queries.request_timeline(engine, "cmpl-00000003")
    assert time.perf_counter() - t0 < 1.0
    assert (df["name"] == A.SPAN_KV_READ).sum() == 2 * 52


def test_timeline_figure(bench_spans_db: Path) -> None:
    engine = queries.open_engine(str(bench_spans_db))
    fig = figures.timeline_figure(timeline_queries.request_timeline(engine, "r0"), title="r0")
    spec = json.loads(fig.to_json())
    ys = {y for tr in spec["data"] for y in tr["y"]}
    assert len([y for y in ys if y.startswith(figures.READ_ROW_PREFIX)]) == 10
    colours = {tr["name"]: tr["marker"]["color"] for tr in spec["data"]}
    assert colours["attention"] == figures.COLOURS["attention"]
    assert colours["mamba"] == figures.COLOURS["mamba"]
    assert spec["layout"]["xaxis"]["title"]["text"] == figures.TIME_AXIS_TITLE
    assert "(ms)" in figures.TIME_AXIS_TITLE


# ------------------------------------------------------------- whole-range aggregates


def nearest_rank(values: Any, p: int) -> float:
    """Oracle: the ceil(p/100 * n)-th smallest value (what the SQL computes)."""
    v = np.sort(np.asarray(values, dtype=float))
    return float(v[math.ceil(p / 100 * len(v)) - 1])


def test_nearest_rank_percentiles_by_hand(connector_db: Path) -> None:
    engine = queries.open_engine(str(connector_db))
    (t,) = transfer_queries.transfer_stats(engine, by=()).to_dict("records")
    # durations 1, 2, 3 (hybrid) and 4, 5 ms (upstream); n = 5:
    # p50 -> ceil(2.5) = 3rd = 3 ms; p90 -> ceil(4.5) = 5th = 5 ms; p99 -> 5th = 5 ms
    assert (t["transfers"], t["failed"], t["bytes"]) == (5, 1, 3 * 900 + 2 * 1000), t
    assert (t["p50_ms"], t["p90_ms"], t["p99_ms"], t["max_ms"]) == (3, 5, 5, 5), t
    assert t["busy_ns"] == (1 + 2 + 3 + 4 + 5) * MS
    per = transfer_queries.transfer_stats(engine).set_index("engine_id")
    # decode-h: [1, 2, 3] -> p50 = ceil(1.5) = 2nd = 2 ms, p99 = ceil(2.97) = 3rd = 3 ms
    # decode-u: [4, 5]    -> p50 = ceil(1.0) = 1st = 4 ms, p99 = ceil(1.98) = 2nd = 5 ms
    assert per.loc["decode-h", ["transfers", "p50_ms", "p99_ms", "failed"]].tolist() == [3, 2, 3, 0]
    assert per.loc["decode-u", ["transfers", "p50_ms", "p99_ms", "failed"]].tolist() == [2, 4, 5, 1]
    assert per.loc["decode-h", "gbps"] == 2700 / (6 * MS)  # bytes / busy ns == GB/s
    empty = transfer_queries.transfer_stats(engine, T0 + 5 * 10**9, T0 + 6 * 10**9, by=())
    assert empty["transfers"].tolist() == [0]
    assert transfer_queries.transfer_stats(engine, T0 + 5 * 10**9, T0 + 6 * 10**9).empty


@pytest.mark.parametrize("by", [(), ("engine_id", "rank")])
def test_transfer_stats_match_brute_force(synth_db: Path, by: tuple[str, ...]) -> None:
    engine = queries.open_engine(str(synth_db))
    rows = transfer_queries.transfers(engine)
    lo, hi = queries.time_bounds(engine)
    assert lo is not None and hi is not None
    for start, end in ((None, None), (lo + (hi - lo) // 3, lo + 2 * (hi - lo) // 3)):
        stats = transfer_queries.transfer_stats(engine, start, end, by)
        sel = rows[(rows["start_ns"] >= (start or lo)) & (rows["start_ns"] <= (end or hi))]
        groups = sel.groupby(list(by)) if by else [((), sel)]
        expected = {}
        for key, g in groups:
            expected[key if isinstance(key, tuple) else (key,)] = {
                "transfers": len(g), "failed": int((g["status"] == "ERROR").sum()),
                "bytes": int(g["bytes"].sum()), "busy_ns": int(g["duration_ns"].sum()),
                **{f"p{p}_ns": nearest_rank(g["duration_ns"], p) for p in (50, 90, 99)},
                "max_ns": int(g["duration_ns"].max()),
            }
        got = {tuple(r[k] for k in by): {k: r[k] for k in expected[next(iter(expected))]}
               for r in stats.to_dict("records")}
        assert got == expected, f"window {start}..{end}: expected {expected}, got {got}"


@pytest.mark.parametrize(("span_ns", "width"), [
    (0, 10**6), (1, 10**6), (120 * 10**6, 10**6),  # <= 120 buckets of 1 ms
    (121 * 10**6, 2 * 10**6),  # 121 ms / 120 -> 1.008 ms -> the next round width, 2 ms
    (194 * 10**9, 2 * 10**9),  # the 1M database: 194 s / 120 = 1.6 s -> 2 s
    (3600 * 10**9, 30 * 10**9),  # 1 h / 120 = 30 s exactly
    (2 * 7 * 86400 * 10**9 * 120, 2 * 7 * 86400 * 10**9),  # beyond the list: whole weeks
])
def test_bucket_width(span_ns: int, width: int) -> None:
    got = transfer_queries.bucket_width_ns(span_ns)
    assert got == width, f"Expected {width}, got {got}"
    assert -(-max(span_ns, 1) // got) <= transfer_queries.MAX_BUCKETS


def test_fmt_width() -> None:
    assert [transfer_queries.fmt_width(w) for w in (10**6, 500 * 10**6, 2 * 10**9, 300 * 10**9,
                                           3 * 3600 * 10**9, 86400 * 10**9)] == [
        "1 ms", "500 ms", "2 s", "5 min", "3 h", "1 d"]


def test_transfer_buckets_match_brute_force(synth_db: Path) -> None:
    engine = queries.open_engine(str(synth_db))
    lo, hi = queries.time_bounds(engine)
    assert lo is not None and hi is not None
    b = transfer_queries.transfer_buckets(engine, lo, hi)
    width = transfer_queries.bucket_width_ns(hi - lo)
    assert (b["width_ns"] == width).all() and b["bucket"].max() < transfer_queries.MAX_BUCKETS
    rows = transfer_queries.transfers(engine)
    rows["bucket"] = (rows["start_ns"] - lo) // width
    assert b["transfers"].sum() == len(rows) and b["bytes"].sum() == rows["bytes"].sum()
    for r in b.to_dict("records"):
        g = rows[(rows["bucket"] == r["bucket"]) & (rows["engine_id"] == r["engine_id"])
                 & (rows["rank"] == r["rank"])]
        assert r["transfers"] == len(g) and r["failed"] == (g["status"] == "ERROR").sum(), r
        assert r["p50_ns"] == nearest_rank(g["duration_ns"], 50), r
        assert r["max_ns"] == g["duration_ns"].max(), r
        # the outlier dot leads to its request
        assert r["slowest_request"] in set(g.loc[g["duration_ns"] == r["max_ns"], "request_id"]), r
        assert r["start"] == pd.Timestamp(lo + r["bucket"] * width, unit="ns", tz="UTC")


def test_failures_and_counts_match_plain_sql(synth_db: Path) -> None:
    engine = queries.open_engine(str(synth_db))
    con = sqlite3.connect(synth_db)
    oracle = {r[0] for r in con.execute(
        "SELECT span_id FROM spans WHERE status = 'ERROR' OR name IN (?, ?)",
        (A.SPAN_KV_STALL, A.SPAN_KV_ABORT))}
    n_err = con.execute("SELECT count(*) FROM spans WHERE status = 'ERROR'").fetchone()[0]
    n_stall, n_abort = (con.execute("SELECT count(*) FROM spans WHERE name = ?", (n,)).fetchone()[0]
                        for n in (A.SPAN_KV_STALL, A.SPAN_KV_ABORT))
    con.close()
    f = transfer_queries.failures(engine, limit=100_000)
    assert set(f["span_id"]) == oracle and len(f) == len(oracle)
    assert f["start_ns"].is_monotonic_decreasing
    assert transfer_queries.failure_counts(engine) == {
        "errors": n_err, "stalls": n_stall, "aborts": n_abort}
    assert n_stall > 0 and n_err > n_abort > 0
    newest = transfer_queries.failures(engine, limit=5)
    assert newest["span_id"].tolist() == f["span_id"].head(5).tolist()


def test_failures_by_hand(connector_db: Path) -> None:
    engine = queries.open_engine(str(connector_db))
    # upstream r1: READ, transfer and abort are ERROR; the stall is not
    assert transfer_queries.failure_counts(engine) == {"errors": 3, "stalls": 1, "aborts": 1}
    f = transfer_queries.failures(engine)
    assert sorted(f["name"]) == sorted([A.SPAN_KV_READ, A.SPAN_KV_TRANSFER, A.SPAN_KV_ABORT,
                                        A.SPAN_KV_STALL])
    assert set(f["request_id"]) == {"r1"} and (f[A.KV_FAILURE_REASON].dropna() == "stalled").all()
    assert transfer_queries.failure_counts(engine, T0, T0 + 10**9) == {
        "errors": 0, "stalls": 0, "aborts": 0}


def test_read_stats_match_brute_force(synth_db: Path) -> None:
    engine = queries.open_engine(str(synth_db))
    rows = transfer_queries.reads(engine)
    stats = transfer_queries.read_stats(engine).set_index("layer_kind")
    assert stats["reads"].sum() == len(rows)
    for kind, g in rows.groupby("layer_kind"):
        r = stats.loc[kind]
        assert (r["reads"], r["bytes"]) == (len(g), g["bytes"].sum()), kind
        assert r["p50_us"] == nearest_rank(g["duration_ns"], 50) / 1e3, kind
        assert r["median_gbps"] == pytest.approx(nearest_rank(g["bytes"] / g["duration_ns"], 50))
        assert r["nixl_xfer_p50_us"] == nearest_rank(g[A.KV_NIXL_XFER_US], 50), kind
    few = transfer_queries.read_stats(engine, limit=10)
    assert few["reads"].sum() == 10


def test_desc_build_stats_by_hand(connector_db: Path) -> None:
    engine = queries.open_engine(str(connector_db))
    g = connector_queries.desc_build_stats(engine)
    got = {(r[A.KV_DESC_SCOPE], r[A.CONNECTOR]): (r["builds"], r["descriptors"], r["bytes"])
           for r in g.to_dict("records")}
    assert got == {
        ("local", "hybrid"): (2, 200, 20_000),  # one of them without the attribute
        ("remote", "hybrid"): (1, 100, 10_000),
        ("request", "hybrid"): (3, 30, 2_700),
        ("local", "upstream"): (1, 300, 10_000),
        ("remote", "upstream"): (1, 300, 10_000),
        ("request", "upstream"): (2, 80, 0),
    }, got
    assert (g["p50_us"] == 20.0).all()  # every build lasts 20 µs
    # the same numbers as the row-level load, grouped in pandas
    rows = connector_queries.desc_builds(engine)
    rows = rows.groupby([A.KV_DESC_SCOPE, A.CONNECTOR])["descriptors"].sum()
    assert rows.to_dict() == {k: v[1] for k, v in got.items()}


# ------------------------------------------------------------------- ours vs upstream


def test_connectors(connector_db: Path, bench_spans_db: Path) -> None:
    engine = queries.open_engine(str(connector_db))
    assert connector_queries.connectors(engine) == ["hybrid", "upstream"]
    # the last value: the legacy build without the attribute
    assert connector_queries.connector_values(engine) == ["hybrid", "upstream", None]
    assert connector_queries.connectors(engine, T0, T0 + 10**9) == ["hybrid"]
    assert connector_queries.connectors(engine, UPSTREAM_T0, None) == ["upstream"]
    assert connector_queries.connectors(engine, T0 + 5 * 10**9, T0 + 6 * 10**9) == []
    # a real bench run: "bench" where bench writes the attribute, else (a bench from
    # before it) every span counted as ours
    expected = ["bench"] if raw_connectors(bench_spans_db) == {"bench"} else ["hybrid"]
    assert connector_queries.connectors(queries.open_engine(str(bench_spans_db))) == expected


def raw_connectors(db: Path) -> set[str | None]:
    """Oracle: the ``hybrid_pd.connector`` values of the descriptor builds, in plain SQL."""
    con = sqlite3.connect(db)
    rows = con.execute("SELECT DISTINCT json_extract(attributes, '$.\"hybrid_pd.connector\"') "
                       "FROM spans WHERE name = ?", (A.SPAN_KV_DESC_BUILD,)).fetchall()
    con.close()
    return {r[0] for r in rows}


def test_connector_comparison_by_hand(connector_db: Path) -> None:
    engine = queries.open_engine(str(connector_db))
    cmp = connector_queries.connector_reads(engine)
    per = connector_queries.comparison_per_request(cmp).set_index(["connector", "request_id"])
    cols = ["reads", "descriptors", "bytes", "mapping_descriptors", "descriptors_per_read",
            "bytes_per_read"]
    for rid in ("r0", "r1", "r2"):
        # 5 READs, 2*3 + 3*1 = 9 descriptors, 2*300 + 3*100 = 900 B; 9/5 = 1.8, 900/5 = 180
        assert per.loc[("hybrid", rid), cols].tolist() == [5, 9, 900, 10, 1.8, 180], rid
    for rid in ("r0", "r1"):  # same ids as hybrid's, kept apart by the connector
        assert per.loc[("upstream", rid), cols].tolist() == [1, 40, 1000, 40, 40, 1000], rid
    assert len(per) == 5
    med = connector_queries.comparison_medians(connector_queries.comparison_per_request(cmp))
    med = med.set_index("connector")
    assert med.loc["hybrid"].tolist() == [3, 5, 1.8, 180, 9, 900, 10]
    assert med.loc["upstream"].tolist() == [2, 1, 40, 1000, 40, 1000, 40]
    assert list(med.columns) == ["requests", *connector_queries.MEDIAN_COLUMNS.values()]
    kinds = connector_queries.comparison_per_kind(cmp).set_index(["connector", "layer_kind"])
    cols = ["reads", "descriptors_per_read", "bytes_per_read"]
    assert kinds.loc[("hybrid", "attention"), cols].tolist() == [6, 3, 300]  # 3 requests x 2
    assert kinds.loc[("hybrid", "mamba"), cols].tolist() == [9, 1, 100]
    assert kinds.loc[("hybrid", "all"), cols].tolist() == [15, 1.8, 180]  # 27/15, 2700/15
    assert kinds.loc[("upstream", "mixed"), cols].tolist() == [2, 40, 1000]
    assert kinds.loc[("upstream", "all"), cols].tolist() == [2, 40, 1000]
    # the newest READ picks the newest request; caps apply per connector
    few = connector_queries.comparison_per_request(
        connector_queries.connector_reads(engine, max_requests=1))
    assert sorted(map(tuple, few[["connector", "request_id"]].values)) == [
        ("hybrid", "r2"), ("upstream", "r1")]
    one_side = connector_queries.connector_reads(engine, T0, T0 + 10**9)
    assert set(one_side["connector"]) == {"hybrid"}


def test_connector_comparison_figure(connector_db: Path) -> None:
    engine = queries.open_engine(str(connector_db))
    cmp = connector_queries.connector_reads(engine)
    fig = figures.connector_comparison(connector_queries.comparison_per_kind(cmp))
    lay = fig.layout
    titles = [lay.yaxis.title.text, lay.yaxis2.title.text]
    assert titles == list(figures.COMPARISON_METRICS.values()), titles
    assert all("(" in t and ")" in t for t in titles)  # units on every axis
    assert lay.xaxis.title.text == "READ layer kind" and lay.barmode == "group"
    assert lay.yaxis2.matches is None  # bytes and counts each on their own scale
    bars = {(tr.name, tr.xaxis): dict(zip(tr.x, tr.y, strict=True)) for tr in fig.data}
    assert bars[("hybrid", "x")] == {"attention": 3, "mamba": 1, "all": 1.8}
    assert bars[("upstream", "x")] == {"mixed": 40, "all": 40}
    assert bars[("hybrid", "x2")] == {"attention": 300, "mamba": 100, "all": 180}
    assert bars[("upstream", "x2")] == {"mixed": 1000, "all": 1000}
    assert {tr.name: tr.marker.color for tr in fig.data} == {
        c: figures.CONNECTOR_COLOURS[c] for c in ("hybrid", "upstream")}
    json.loads(fig.to_json())  # serialisable as Streamlit sends it


# ------------------------------------------------------------------------ bench spans


@pytest.fixture(scope="module")
def bench_connector_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_connector_db(tmp_path_factory.mktemp("bench") / "spans.db", bench=True)


def test_bench_spans_labelled(bench_connector_db: Path) -> None:
    """Bench spans are their own group wherever spans are grouped by connector."""
    engine = queries.open_engine(str(bench_connector_db))
    assert connector_queries.connectors(engine) == ["bench", "hybrid", "upstream"]
    assert connector_queries.connector_values(engine) == ["bench", "hybrid", "upstream", None]
    # the bench's minute alone (its handshake build is 50 ms before its first request)
    assert connector_queries.connectors(engine, BENCH_T0 - 10**9, BENCH_T0 + 10**9) == ["bench"]
    g = connector_queries.desc_build_stats(engine)
    got = {(r[A.KV_DESC_SCOPE], r[A.CONNECTOR]): (r["builds"], r["descriptors"], r["bytes"])
           for r in g.to_dict("records")}
    # bench: one local build (50 / 5 kB), two mapping builds of 6 / 600 B; hybrid's rows
    # are those of the database without bench spans (test_desc_build_stats_by_hand)
    assert got[("local", "bench")] == (1, 50, 5_000)
    assert got[("request", "bench")] == (2, 12, 1_200)
    assert got[("local", "hybrid")] == (2, 200, 20_000)
    assert got[("request", "hybrid")] == (3, 30, 2_700)
    assert len(got) == 8, got
    rows = connector_queries.desc_builds(engine)
    assert rows[A.CONNECTOR].value_counts().to_dict() == {"hybrid": 6, "upstream": 4, "bench": 3}


def test_bench_spans_not_compared(bench_connector_db: Path, connector_db: Path) -> None:
    """Bench spans share request ids r0, r1 with both connectors, yet change no figure of
    the ours-vs-upstream comparison; asked for, they come out as a third group."""
    engine = queries.open_engine(str(bench_connector_db))
    cmp = connector_queries.connector_reads(engine)
    assert set(cmp["connector"]) == {"hybrid", "upstream"}
    without = connector_queries.connector_reads(queries.open_engine(str(connector_db)))
    pd.testing.assert_frame_equal(cmp, without)
    med = connector_queries.comparison_medians(connector_queries.comparison_per_request(cmp))
    med = med.set_index("connector")
    # as in test_connector_comparison_by_hand: hybrid 3 requests of 5 READs, 9 descriptors
    # and 900 B (1.8 descriptors, 180 B per READ); r0/r1 not merged with bench's
    assert med.loc["hybrid"].tolist() == [3, 5, 1.8, 180, 9, 900, 10]
    assert med.loc["upstream"].tolist() == [2, 1, 40, 1000, 40, 1000, 40]
    kinds = connector_queries.comparison_per_kind(cmp)
    assert set(kinds["connector"]) == {"hybrid", "upstream"}
    fig = figures.connector_comparison(kinds)
    assert {tr.name for tr in fig.data} == {"hybrid", "upstream"}

    every = connector_queries.connector_reads(
        engine, compared=(*connector_queries.COMPARED_CONNECTORS, connector_queries.BENCH))
    per = connector_queries.comparison_per_request(every).set_index(["connector", "request_id"])
    cols = ["reads", "descriptors", "bytes", "mapping_descriptors", "descriptors_per_read",
            "bytes_per_read"]
    for rid in ("r0", "r1"):
        # 2 READs of 5 descriptors / 2000 B: 10, 4000; mapping 6; 10/2 = 5, 4000/2 = 2000
        assert per.loc[("bench", rid), cols].tolist() == [2, 10, 4000, 6, 5, 2000], rid
        assert per.loc[("hybrid", rid), cols].tolist() == [5, 9, 900, 10, 1.8, 180], rid
    assert len(per) == 7  # 3 hybrid + 2 upstream + 2 bench requests
    med = connector_queries.comparison_medians(connector_queries.comparison_per_request(every))
    assert med.set_index("connector").loc["bench"].tolist() == [2, 2, 5, 2000, 10, 4000, 6]
    kinds = connector_queries.comparison_per_kind(every).set_index(["connector", "layer_kind"])
    assert kinds.loc[("bench", "attention"), ["reads", "descriptors_per_read",
                                              "bytes_per_read"]].tolist() == [4, 5, 2000]


def test_bench_colour_in_descriptor_bars(bench_connector_db: Path) -> None:
    g = connector_queries.desc_build_stats(queries.open_engine(str(bench_connector_db)))
    fig = figures.descriptor_bars(g)
    colours = {tr.name: tr.marker.color for tr in fig.data}
    assert colours == figures.CONNECTOR_COLOURS and len(set(colours.values())) == 3
    bench = next(tr for tr in fig.data if tr.name == "bench")
    assert dict(zip(bench.x, bench.y, strict=True)) == {"local": 50, "request": 12}


# -------------------------------------------------------------- indexes and older files


def captured_plans(engine: Engine, db: Path, calls: list[Callable[[], Any]]) -> list[tuple[str, str]]:
    """(SQL, EXPLAIN QUERY PLAN) of every statement ``calls`` run on ``engine``."""
    stmts: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                executemany: bool) -> None:
        stmts.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        for call in calls:
            call()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    con = sqlite3.connect(db)
    out = [(sql, " | ".join(r[3] for r in con.execute("EXPLAIN QUERY PLAN " + sql, params)))
           for sql, params in stmts if "sqlite_master" not in sql]
    con.close()
    return out


def test_whole_range_queries_use_indexes(connector_db: Path) -> None:
    """Each whole-range query is answered from its index, never by a full table scan."""
    engine = queries.open_engine(str(connector_db))
    expect = {
        "transfer_stats": ([lambda: transfer_queries.transfer_stats(engine, by=()),
                            lambda: transfer_queries.transfer_stats(engine)],
                           "COVERING INDEX ix_spans_transfer_cover"),
        "transfer_buckets": ([lambda: transfer_queries.transfer_buckets(engine, T0,
                                                                         UPSTREAM_T0 + 10**9)],
                             "COVERING INDEX ix_spans_transfer_cover"),
        "request_list": ([lambda: timeline_queries.request_list(engine, "slowest")],
                         "COVERING INDEX ix_spans_transfer_cover"),
        "failures": ([lambda: transfer_queries.failures(engine),
                      lambda: transfer_queries.failure_counts(engine)], "ix_spans_error_start_ns"),
        "connectors": ([lambda: connector_queries.connectors(engine)],
                       "ix_spans_name_connector_start_ns"),
    }
    for what, (calls, index) in expect.items():
        plans = captured_plans(engine, connector_db, calls)
        assert plans, what
        for sql, plan in plans:
            steps = plan.split(" | ")
            assert "SCAN spans" not in steps, f"{what}: full scan\n{sql}\n{plan}"
        assert any(index in plan for _, plan in plans), f"{what}: {index} unused: {plans}"
    # ours vs upstream: the newest READs of a connector by the connector index, then their
    # requests by request id (not every READ of the connector through the connector index)
    plans = captured_plans(engine, connector_db,
                           [lambda: connector_queries.connector_reads(engine)])
    (outer,) = [p for sql, p in plans if sql.lstrip().startswith("SELECT spans.request_id, spans.name")][:1]
    assert outer.split(" | ")[0] == "SEARCH spans USING INDEX ix_spans_request_id_start_ns (request_id=?)", outer
    assert "ix_spans_name_connector_start_ns (name=? AND <expr>=?)" in outer, outer


def test_older_database_same_answers(connector_db: Path, tmp_path: Path) -> None:
    """A file made before the dashboard's indexes: same answers (slower), indexes named."""
    old = without_dashboard_indexes(connector_db, tmp_path / "old.db")
    status = queries.check_db(str(old))
    assert status.ok and status.schema_version == SCHEMA_VERSION == 1  # indexes: no bump
    assert status.missing_indexes == DASHBOARD_INDEXES
    assert queries.check_db(str(connector_db)).missing_indexes == ()
    new_e, old_e = queries.open_engine(str(connector_db)), queries.open_engine(str(old))
    for fn in (lambda e: transfer_queries.transfer_stats(e),
               lambda e: transfer_queries.transfer_stats(e, by=()),
               lambda e: transfer_queries.transfer_buckets(e, T0, UPSTREAM_T0 + 10**9),
               lambda e: transfer_queries.failures(e), lambda e: transfer_queries.read_stats(e),
               lambda e: connector_queries.desc_build_stats(e),
               lambda e: connector_queries.connector_reads(e),
               lambda e: timeline_queries.request_list(e, "slowest")):
        pd.testing.assert_frame_equal(fn(new_e), fn(old_e))
    assert transfer_queries.failure_counts(old_e) == transfer_queries.failure_counts(new_e)
    assert connector_queries.connectors(old_e) == connector_queries.connectors(new_e)
    # the SQL the dashboard offers adds exactly what was missing
    con = sqlite3.connect(old)
    con.executescript(queries.create_index_sql(status.missing_indexes))
    con.close()
    assert queries.check_db(str(old)).missing_indexes == ()


def test_writer_adds_missing_indexes(connector_db: Path, tmp_path: Path) -> None:
    """A writer opening an older file creates the new indexes (the exporter's ensure_schema)."""
    old = without_dashboard_indexes(connector_db, tmp_path / "old.db")
    SQLiteSpanExporter(old).shutdown()
    assert queries.check_db(str(old)).missing_indexes == ()


def test_span_drops_range_and_missing_table(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    exporter = SQLiteSpanExporter(db)
    exporter.note_drop("sqlite", "locked", 4)
    assert exporter.write_drops()
    exporter.note_drop("sqlite", "locked", 6)
    exporter.shutdown()  # writes the second row
    engine = queries.open_engine(str(db))
    df = queries.span_drops(engine)
    assert df[["sink", "reason", "spans"]].values.tolist() == [["sqlite", "locked", 10]]
    assert queries.span_drops(engine, int(df["last_ns"].iloc[0]) + 1).empty  # ended before the range
    engine.dispose()
    old = tmp_path / "old.db"
    sqlite3.connect(old).close()
    assert queries.span_drops(queries.open_engine(str(old))).empty  # made before the table existed
