"""The dashboard's read-only queries and the timeline figure, on real and synthetic spans.

No GPU required; the bench fixture moves bytes through NIXL/UCX on DRAM.
"""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import time
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy import create_engine, insert
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.exc import OperationalError

from hybrid_pd.dashboard import figures, queries
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry.schema import SCHEMA_VERSION, metadata_obj, schema_version_table

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
    reqs = queries.request_list(engine, "latest")
    assert "r0" in set(reqs["request_id"]), reqs
    df = queries.request_timeline(engine, "r0")
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
    tr = queries.transfers(engine)
    assert len(tr) == 10 and (tr["bytes"] > 0).all() and (tr["gbps"] > 0).all()
    rd = queries.reads(engine, lo, hi)
    assert len(rd) == 50
    assert queries.reads(engine, hi + 1, None).empty
    d = queries.desc_builds(engine)
    assert {"local", "remote", "request"} <= set(d[A.KV_DESC_SCOPE])
    assert queries.failures(engine).empty


def test_unknown_request_is_empty(bench_spans_db: Path) -> None:
    engine = queries.open_engine(str(bench_spans_db))
    df = queries.request_timeline(engine, "no-such-request")
    assert df.empty and "duration_ms" in df


# ------------------------------------------------------------------- synthetic + speed


def test_failures_and_slowest(synth_db: Path) -> None:
    engine = queries.open_engine(str(synth_db))
    f = queries.failures(engine)
    assert {A.SPAN_KV_ABORT, A.SPAN_KV_STALL, A.SPAN_KV_TRANSFER} <= set(f["name"])
    assert (f.loc[f["name"] == A.SPAN_KV_ABORT, A.KV_FAILURE_REASON] == "stall timeout").all()
    slow = queries.request_list(engine, "slowest")
    assert slow["duration_ns"].is_monotonic_decreasing
    assert (slow["errors"] > 0).any()


def test_timeline_query_uses_indexes(synth_db: Path) -> None:
    """The request lookups must be index searches: that is what keeps 10^6 spans fast."""
    sql = str(queries.timeline_statement("cmpl-00000003").compile(
        dialect=sqlite_dialect(), compile_kwargs={"literal_binds": True}))
    con = sqlite3.connect(synth_db)
    plan = " ".join(str(r) for r in con.execute("EXPLAIN QUERY PLAN " + sql))
    con.close()
    assert "ix_spans_request_id_start_ns" in plan and "ix_spans_trace_id" in plan, plan
    assert "SCAN" not in plan, plan
    engine = queries.open_engine(str(synth_db))
    queries.request_timeline(engine, "cmpl-00000003")  # warm the connection pool
    t0 = time.perf_counter()
    df = queries.request_timeline(engine, "cmpl-00000003")
    assert time.perf_counter() - t0 < 1.0
    assert (df["name"] == A.SPAN_KV_READ).sum() == 2 * 52


def test_timeline_figure(bench_spans_db: Path) -> None:
    engine = queries.open_engine(str(bench_spans_db))
    fig = figures.timeline_figure(queries.request_timeline(engine, "r0"), title="r0")
    spec = json.loads(fig.to_json())
    ys = {y for tr in spec["data"] for y in tr["y"]}
    assert len([y for y in ys if y.startswith(figures.READ_ROW_PREFIX)]) == 10
    colours = {tr["name"]: tr["marker"]["color"] for tr in spec["data"]}
    assert colours["attention"] == figures.COLOURS["attention"]
    assert colours["mamba"] == figures.COLOURS["mamba"]
    assert spec["layout"]["xaxis"]["title"]["text"] == figures.TIME_AXIS_TITLE
    assert "(ms)" in figures.TIME_AXIS_TITLE
