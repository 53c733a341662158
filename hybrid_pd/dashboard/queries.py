"""Read-only queries over the telemetry ``spans`` table (SQLAlchemy Core, no Streamlit).

Everything here is plain data in, ``pandas.DataFrame`` out, so the tests call it directly
(house rule 3) and the Streamlit layer only adds caching (``st.cache_data``) on top.

Read-only on purpose: the engines write to the same file while the dashboard runs, so a
SQLite path is opened as ``file:PATH?mode=ro`` (URI form) *and* with ``PRAGMA
query_only``; a dashboard bug can therefore never take a write lock or alter a row.

Each query is shaped for one of the schema's named indexes (see ``telemetry/schema.py``):

* one request's timeline  -> ``ix_spans_request_id_start_ns`` + ``ix_spans_trace_id``
* a span kind in a window -> ``ix_spans_name_start_ns``
* bounds / recent window  -> ``ix_spans_start_ns``
* transfer aggregates     -> ``ix_spans_transfer_cover`` (partial, covering: no row read)
* failures                -> ``ix_spans_error_start_ns`` (partial: the ERROR spans only)
* ours vs upstream        -> ``ix_spans_name_connector_start_ns`` (connector from the JSON)

The whole-range pages (Overview, Failures, Descriptors) aggregate in SQL and fetch a few
rows, not one row per span: at 10^6 spans, pulling 2*10^4 rows through SQLAlchemy and
pandas cost more than the SQL itself.  Percentiles are computed in SQL too, with window
functions, as *nearest-rank* percentiles (the ceil(p/100 * n)-th smallest value; p50 of
[1, 2, 3, 4] is 2), so they are always a value that occurred.  A database made before the
newer indexes existed gives the same answers, slower (:attr:`DbStatus.missing_indexes`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import pandas as pd
from sqlalchemy import (
    ColumnElement,
    Engine,
    Select,
    Subquery,
    case,
    create_engine,
    event,
    func,
    inspect,
    literal,
    select,
    union_all,
)
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.schema import CreateIndex
from sqlalchemy.sql.selectable import CompoundSelect

from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry.schema import (
    CONNECTOR_EXPR,
    DASHBOARD_INDEXES,
    SCHEMA_VERSION,
    schema_version_table,
    span_attr,
    spans_table,
)

ENV_DB = "HYBRID_PD_TELEMETRY_DB"

# Shown wherever there is nothing to plot: the shortest path to a database with spans.
PRODUCE_SPANS_HINT = (
    "Produce spans with a traced benchmark, e.g.\n\n"
    "    hybrid-pd bench --config tests/data/tiny_nemotron_h_config.json "
    "--prefill-tp 1 --decode-tp 2 --num-tokens 300 --requests 4 --granularity layer "
    "--telemetry sqlite --telemetry-db runs/spans.db\n\n"
    "or serve with `--telemetry-db`, then start `hybrid-pd dashboard --db runs/spans.db`."
)

# Columns the pages need; ``attributes`` is parsed lazily (JSON) only where hover/detail
# fields come from it, because json.loads on 10^5 rows is the slow part of a load.
_S = spans_table.c
_SPAN_COLS = (
    _S.trace_id, _S.span_id, _S.parent_span_id, _S.name, _S.start_ns, _S.end_ns,
    _S.duration_ns, _S.status, _S.status_message, _S.service, _S.role, _S.engine_id,
    _S.request_id, _S.layer, _S.layer_kind, _S.bytes, _S.descriptors, _S.rank,
    _S.peer_rank, _S.attributes,
)
_COL_NAMES = [c.name for c in _SPAN_COLS]
# Window loads take the attributes they show out of the JSON in SQL (json_extract), not
# the whole JSON text into Python: at 2*10^4 rows json.loads was a third of a page load.
_WINDOW_COLS = tuple(c for c in _SPAN_COLS if c.name != "attributes")

# The biggest window a page loads at once; above it the page says the result was cut.
DEFAULT_MAX_ROWS = 200_000
# READ spans are ~90 % of a per-layer database; pages load the newest this many.
READS_MAX_ROWS = 20_000
# The Failures table shows the newest this many (its counts cover the whole range).
FAILURES_MAX_ROWS = 1_000
# Ours vs upstream: per connector, the requests of the newest this many READ spans (at
# most COMPARE_MAX_REQUESTS of them, newest first) are compared; every READ and mapping
# span of those requests is then counted.
COMPARE_MAX_READS = 5_000
COMPARE_MAX_REQUESTS = 200
# Time buckets on the Overview charts: at most this many per range.
MAX_BUCKETS = 120
# Spans from before the ``hybrid_pd.connector`` attribute existed were all ours.
LEGACY_CONNECTOR = "hybrid"


# ----------------------------------------------------------------------- engine + state


def is_sqlite_target(db: str) -> bool:
    return "://" not in db or db.startswith("sqlite")


def sqlite_path(db: str) -> Path | None:
    """The file behind a SQLite target (plain path or ``sqlite:///...``), else None."""
    if "://" not in db:
        return Path(db).expanduser().resolve()
    url = make_url(db)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    name = url.database
    if name.startswith("file:"):  # already a URI form: strip scheme and query
        name = name[len("file:"):].split("?", 1)[0]
    return Path(name).expanduser().resolve()


def readonly_url(db: str) -> str | URL:
    """A URL that opens ``db`` read-only.

    SQLite: the URI form ``file:PATH?mode=ro&uri=true`` (pysqlite passes ``uri=true`` on
    to ``sqlite3.connect``), so the OS-level open is read-only.  Other backends are
    returned as given; the connect hook below still marks the sessions read-only where
    the backend has a switch for it.
    """
    path = sqlite_path(db)
    if path is not None:
        return f"sqlite:///file:{quote(str(path))}?mode=ro&uri=true"
    return make_url(db)


def open_engine(db: str) -> Engine:
    """A read-only engine for ``db`` (path or SQLAlchemy URL)."""
    engine = create_engine(readonly_url(db))
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _read_only(dbapi_connection: Any, connection_record: Any) -> None:
            # Belt and braces beside mode=ro; busy_timeout because writers hold the
            # WAL lock for a batch at a time and a reader must wait, not fail.
            cur = dbapi_connection.cursor()
            cur.execute("PRAGMA query_only = ON")
            cur.execute("PRAGMA busy_timeout = 5000")
            cur.close()

    elif engine.dialect.name == "postgresql":

        @event.listens_for(engine, "connect")
        def _pg_read_only(dbapi_connection: Any, connection_record: Any) -> None:
            cur = dbapi_connection.cursor()
            cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            cur.close()

    return engine


@dataclass(frozen=True)
class DbStatus:
    """What the dashboard can show for a database, and the sentence to say when nothing."""

    state: Literal["ok", "missing", "empty", "newer_schema", "error"]
    message: str
    schema_version: int | None = None
    span_count: int = 0
    # Dashboard indexes the file lacks (made before they existed): same answers, slower.
    missing_indexes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.state == "ok"


def check_db(db: str, engine: Engine | None = None) -> DbStatus:
    """Classify ``db``: missing file, no spans, newer schema than this reader, or usable."""
    path = sqlite_path(db) if is_sqlite_target(db) else None
    if path is not None and not path.exists():
        return DbStatus("missing", f"The database `{path}` does not exist yet.\n\n{PRODUCE_SPANS_HINT}")
    engine = engine or open_engine(db)
    try:
        insp = inspect(engine)
        if not insp.has_table(spans_table.name):
            return DbStatus("empty", f"The database has no `spans` table yet.\n\n{PRODUCE_SPANS_HINT}")
        version = None
        if insp.has_table(schema_version_table.name):
            with engine.connect() as conn:
                version = conn.execute(select(func.max(schema_version_table.c.version))).scalar()
        if version is not None and version > SCHEMA_VERSION:
            return DbStatus(
                "newer_schema",
                f"This database uses telemetry schema version {version}, newer than the "
                f"version {SCHEMA_VERSION} this dashboard understands. Upgrade hybrid-pd to "
                "view it (the dashboard refuses rather than misreading columns).",
                schema_version=version,
            )
        with engine.connect() as conn:
            # max(id) is the rowid alias: O(1), unlike count(*) on a 10^6-row table.
            count = conn.execute(select(func.max(_S.id))).scalar() or 0
        missing = missing_indexes(engine)
    except SQLAlchemyError as exc:
        return DbStatus("error", f"Cannot read the database: {exc.__class__.__name__}: {exc}")
    if count == 0:
        return DbStatus("empty", f"The database has no spans yet.\n\n{PRODUCE_SPANS_HINT}", version)
    return DbStatus("ok", f"{count:,} spans", version, int(count), missing)


def missing_indexes(engine: Engine) -> tuple[str, ...]:
    """The :data:`~hybrid_pd.telemetry.schema.DASHBOARD_INDEXES` a SQLite file lacks.

    Read from ``sqlite_master`` (SQLAlchemy's index reflection skips expression indexes).
    Other backends report none: their schema is created whole by the exporter.
    """
    if engine.dialect.name != "sqlite":
        return ()
    with engine.connect() as conn:
        have = set(conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'spans'"
        ).scalars())
    return tuple(n for n in DASHBOARD_INDEXES if n not in have)


def create_index_sql(names: tuple[str, ...]) -> str:
    """The SQLite DDL that adds the named ``spans`` indexes (for the operator to run)."""
    by_name = {ix.name: ix for ix in spans_table.indexes}
    return "\n".join(
        f"{CreateIndex(by_name[n], if_not_exists=True).compile(dialect=sqlite_dialect.dialect())};"
        for n in names
    )


# ----------------------------------------------------------------------------- helpers


def _frame(engine: Engine, stmt: Any) -> pd.DataFrame:
    with engine.connect() as conn:
        result = conn.execute(stmt)
        df = pd.DataFrame(result.fetchall(), columns=list(result.keys()))
    return df


def _const(value: str) -> ColumnElement[Any]:
    """``value`` rendered into the SQL text, not bound: SQLite picks a partial index only
    when the query states its predicate (``name = 'hybrid_pd.kv.transfer'``)."""
    return literal(value, literal_execute=True)


def _window(start_ns: int | None, end_ns: int | None) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = []
    if start_ns is not None:
        conds.append(_S.start_ns >= start_ns)
    if end_ns is not None:
        conds.append(_S.start_ns <= end_ns)
    return conds


def _ranked(base: Subquery, keys: tuple[str, ...], values: tuple[str, ...]) -> Subquery:
    """``base`` plus, per column ``v`` of ``values``, ``_rn_v`` (v's rank in its group,
    smallest first, NULLs last) and ``_n_v`` (the group's non-NULL count of v)."""
    part = [base.c[k] for k in keys] or None
    cols: list[Any] = [base]
    for v in values:
        cols.append(func.row_number().over(partition_by=part,
                                           order_by=base.c[v].asc().nulls_last()).label(f"_rn_{v}"))
        cols.append(func.count(base.c[v]).over(partition_by=part).label(f"_n_{v}"))
    return select(*cols).subquery()


def _pct(r: Subquery, value: str, p: int) -> ColumnElement[Any]:
    """Nearest-rank percentile ``p`` (integer percent) of ``value`` per group of ``r``:
    the ceil(p * n / 100)-th smallest, i.e. (p * n + 99) // 100 in integers."""
    rank = (r.c[f"_n_{value}"] * p + 99) // 100
    return func.max(case((r.c[f"_rn_{value}"] == rank, r.c[value])))


def _attr_cols(keys: tuple[str, ...]) -> list[ColumnElement[Any]]:
    return [span_attr(k).label(k) for k in keys]


def parse_attributes(df: pd.DataFrame, keys: tuple[str, ...]) -> pd.DataFrame:
    """Copy attribute ``keys`` out of the JSON ``attributes`` column into columns."""
    if df.empty or "attributes" not in df:
        for k in keys:
            df[k] = pd.Series(dtype=object)
        return df
    parsed = df["attributes"].map(lambda s: json.loads(s) if s else {})
    for k in keys:
        df[k] = parsed.map(lambda d, k=k: d.get(k))
    return df


def add_derived(df: pd.DataFrame) -> pd.DataFrame:
    """Times as UTC datetimes, durations in µs/ms, and GB/s where bytes are known."""
    if df.empty:
        for c in ("start", "end", "duration_us", "duration_ms", "gbps"):
            df[c] = pd.Series(dtype=float)
        return df
    df["start"] = pd.to_datetime(df["start_ns"], unit="ns", utc=True)
    df["end"] = pd.to_datetime(df["end_ns"], unit="ns", utc=True)
    df["duration_us"] = df["duration_ns"] / 1e3
    df["duration_ms"] = df["duration_ns"] / 1e6
    dur_s = df["duration_ns"].where(df["duration_ns"] > 0) / 1e9
    # bytes / ns == GB/s (decimal GB, as link speeds are quoted).
    df["gbps"] = pd.to_numeric(df["bytes"], errors="coerce") / 1e9 / dur_s
    return df


# ----------------------------------------------------------------------------- queries


def time_bounds(engine: Engine) -> tuple[int | None, int | None]:
    """First and last span start (ns); both come straight off ``ix_spans_start_ns``."""
    # Two statements on purpose: SQLite answers a lone min() or max() from the index in
    # O(log n) but scans the whole table when both share one SELECT.
    with engine.connect() as conn:
        lo = conn.execute(select(func.min(_S.start_ns))).scalar()
        hi = conn.execute(select(func.max(_S.start_ns))).scalar()
    return lo, hi


def spans_by_name(
    engine: Engine,
    names: tuple[str, ...],
    start_ns: int | None = None,
    end_ns: int | None = None,
    limit: int = DEFAULT_MAX_ROWS,
    attrs: tuple[str, ...] = (),
) -> pd.DataFrame:
    """Spans of the given names started in [start_ns, end_ns], newest first, at most ``limit``.

    ``attrs`` are attribute keys copied out of the JSON into columns of the same name (in
    SQL); the raw ``attributes`` text is not loaded.
    """
    stmt = (
        select(*_WINDOW_COLS, *_attr_cols(attrs))
        .where(_S.name.in_(names), *_window(start_ns, end_ns))
        .order_by(_S.start_ns.desc())
        .limit(limit)
    )
    return add_derived(_frame(engine, stmt))


def transfers(engine: Engine, start_ns: int | None = None, end_ns: int | None = None,
              limit: int = DEFAULT_MAX_ROWS) -> pd.DataFrame:
    """Decode-side transfer spans (one per request and D rank) with outcome and reads."""
    return spans_by_name(engine, (A.SPAN_KV_TRANSFER,), start_ns, end_ns, limit,
                         (A.KV_STATUS, A.KV_READS, A.KV_PEER_ENGINE_ID, A.CONNECTOR))


def reads(engine: Engine, start_ns: int | None = None, end_ns: int | None = None,
          limit: int = READS_MAX_ROWS) -> pd.DataFrame:
    """READ spans (per layer with ``--granularity layer``) with NIXL's own timings."""
    return spans_by_name(engine, (A.SPAN_KV_READ,), start_ns, end_ns, limit,
                         (A.KV_STATUS, A.KV_NIXL_POST_US, A.KV_NIXL_XFER_US))


def desc_builds(engine: Engine, start_ns: int | None = None, end_ns: int | None = None,
                limit: int = DEFAULT_MAX_ROWS) -> pd.DataFrame:
    df = spans_by_name(engine, (A.SPAN_KV_DESC_BUILD,), start_ns, end_ns, limit,
                       (A.KV_DESC_SCOPE, A.KV_VIEW, A.CONNECTOR))
    if not df.empty:
        df[A.CONNECTOR] = df[A.CONNECTOR].fillna(LEGACY_CONNECTOR)
    return df


FAILURE_ATTRS: tuple[str, ...] = (A.KV_STATUS, A.KV_FAILURE_REASON, A.KV_WAITED_MS)


def failures(engine: Engine, start_ns: int | None = None, end_ns: int | None = None,
             limit: int = FAILURES_MAX_ROWS) -> pd.DataFrame:
    """Failed (status ERROR), stalled and aborted spans, newest first, at most ``limit``.

    Two index lookups: every ERROR span through the partial ``ix_spans_error_start_ns``
    (it holds only failed spans, so a whole-database range reads a few hundred entries
    of 10^6), and the stall/abort spans through ``ix_spans_name_start_ns``.  Without the
    partial index (a database made before it) the first one scans the table, ~1 s per
    10^6 spans.
    """
    win = _window(start_ns, end_ns)
    cols = (*_WINDOW_COLS, *_attr_cols(FAILURE_ATTRS))
    errors = select(*cols).where(_S.status == _const("ERROR"), *win)
    others = select(*cols).where(_S.name.in_((A.SPAN_KV_STALL, A.SPAN_KV_ABORT)),
                                 _S.status != _const("ERROR"), *win)
    both = union_all(errors, others).subquery()
    df = _frame(engine, select(both).order_by(both.c.start_ns.desc()).limit(limit))
    df = df.drop_duplicates(subset=["trace_id", "span_id"]).reset_index(drop=True)
    return add_derived(df)


def failure_counts(engine: Engine, start_ns: int | None = None,
                   end_ns: int | None = None) -> dict[str, int]:
    """How many spans failed (``errors``), stalled and aborted in the range: three counts
    answered from the indexes alone (``ix_spans_error_start_ns``, ``ix_spans_name_start_ns``)."""
    win = _window(start_ns, end_ns)
    with engine.connect() as conn:
        errors = conn.execute(
            select(func.count()).select_from(spans_table).where(_S.status == _const("ERROR"), *win)
        ).scalar() or 0
        by_name = dict(conn.execute(
            select(_S.name, func.count())
            .where(_S.name.in_((A.SPAN_KV_STALL, A.SPAN_KV_ABORT)), *win)
            .group_by(_S.name)
        ).all())
    return {"errors": int(errors), "stalls": int(by_name.get(A.SPAN_KV_STALL, 0)),
            "aborts": int(by_name.get(A.SPAN_KV_ABORT, 0))}


# ------------------------------------------------------------------ transfer aggregates


def _transfer_rows(*where: ColumnElement[bool], bucket: ColumnElement[Any] | None = None) -> Select[Any]:
    """Transfer spans, only columns of ``ix_spans_transfer_cover`` (so no row is read)."""
    cols: list[Any] = [_S.start_ns, _S.duration_ns, _S.status, _S.bytes, _S.engine_id,
                       _S.rank, _S.request_id]
    if bucket is not None:
        cols.append(bucket.label("bucket"))
    return select(*cols).where(_S.name == _const(A.SPAN_KV_TRANSFER), *where)


def _transfer_derived(df: pd.DataFrame) -> pd.DataFrame:
    for p in ("p50", "p90", "p99", "max"):
        if f"{p}_ns" in df:
            df[f"{p}_ms"] = pd.to_numeric(df[f"{p}_ns"]) / 1e6
    if "busy_ns" in df:
        busy = pd.to_numeric(df["busy_ns"])
        df["gbps"] = pd.to_numeric(df["bytes"]) / busy.where(busy > 0)  # bytes/ns == GB/s
    return df


def transfer_stats(engine: Engine, start_ns: int | None = None, end_ns: int | None = None,
                   by: tuple[str, ...] = ("engine_id", "rank")) -> pd.DataFrame:
    """Transfer spans aggregated per ``by`` (``()``: one row for the whole range).

    Columns: ``by``, transfers, failed (status ERROR), bytes, busy_ns (sum of durations),
    p50/p90/p99/max of the duration in ns and ms, gbps (bytes over busy time).  One SQL
    statement over ``ix_spans_transfer_cover``; an empty range gives one row of 0 when
    ``by`` is ``()`` and no row otherwise.
    """
    base = _transfer_rows(*_window(start_ns, end_ns)).subquery()
    r = _ranked(base, by, ("duration_ns",))
    keys = [r.c[k] for k in by]
    stmt = select(
        *keys,
        func.count().label("transfers"),
        func.coalesce(func.sum(case((r.c.status == "ERROR", 1), else_=0)), 0).label("failed"),
        func.coalesce(func.sum(r.c.bytes), 0).label("bytes"),
        func.coalesce(func.sum(r.c.duration_ns), 0).label("busy_ns"),
        _pct(r, "duration_ns", 50).label("p50_ns"),
        _pct(r, "duration_ns", 90).label("p90_ns"),
        _pct(r, "duration_ns", 99).label("p99_ns"),
        func.max(r.c.duration_ns).label("max_ns"),
    )
    if keys:
        stmt = stmt.group_by(*keys).order_by(*keys)
    return _transfer_derived(_frame(engine, stmt))


# Bucket widths a person reads at a glance, in ns.
_NICE_WIDTHS_NS: tuple[int, ...] = tuple(
    int(v * 10**6) for v in (1, 2, 5, 10, 20, 50, 100, 200, 500)  # ms
) + tuple(
    int(v * 10**9) for v in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800,
                             3600, 7200, 10800, 21600, 43200, 86400, 7 * 86400)
)


def bucket_width_ns(span_ns: int, max_buckets: int = MAX_BUCKETS) -> int:
    """The smallest round width (1 ms ... 1 week) that cuts ``span_ns`` into at most
    ``max_buckets`` buckets; whole weeks beyond that."""
    need = max(1, -(-max(span_ns, 1) // max_buckets))
    for w in _NICE_WIDTHS_NS:
        if w >= need:
            return w
    week = _NICE_WIDTHS_NS[-1]
    return -(-need // week) * week


def fmt_width(width_ns: int) -> str:
    """``2 s``, ``500 ms``, ``5 min``, ``6 h``, ``1 d``."""
    for unit, ns in (("d", 86400 * 10**9), ("h", 3600 * 10**9), ("min", 60 * 10**9),
                     ("s", 10**9), ("ms", 10**6)):
        if width_ns >= ns and width_ns % ns == 0:
            return f"{width_ns // ns} {unit}"
    return f"{width_ns / 1e6:g} ms"


def transfer_buckets(engine: Engine, lo_ns: int, hi_ns: int,
                     max_buckets: int = MAX_BUCKETS) -> pd.DataFrame:
    """Transfers in [lo_ns, hi_ns] bucketed by start time (in SQL) per engine and D rank.

    Columns: start (bucket start, UTC), width_ns, engine_id, rank, transfers, failed,
    bytes, p50/max of the duration (ns, ms) and ``slowest_request`` (the request id of
    the bucket's slowest transfer, so an outlier leads to its timeline).
    """
    width = bucket_width_ns(hi_ns - lo_ns, max_buckets)
    bucket = (_S.start_ns - lo_ns) // width
    base = _transfer_rows(_S.start_ns >= lo_ns, _S.start_ns <= hi_ns, bucket=bucket).subquery()
    keys = ("bucket", "engine_id", "rank")
    r = _ranked(base, keys, ("duration_ns",))
    stmt = (
        select(
            *[r.c[k] for k in keys],
            func.count().label("transfers"),
            func.coalesce(func.sum(case((r.c.status == "ERROR", 1), else_=0)), 0).label("failed"),
            func.coalesce(func.sum(r.c.bytes), 0).label("bytes"),
            _pct(r, "duration_ns", 50).label("p50_ns"),
            func.max(r.c.duration_ns).label("max_ns"),
            func.max(case((r.c._rn_duration_ns == r.c._n_duration_ns, r.c.request_id)))
            .label("slowest_request"),
        )
        .group_by(*[r.c[k] for k in keys])
        .order_by(*[r.c[k] for k in keys])
    )
    df = _transfer_derived(_frame(engine, stmt))
    df["width_ns"] = width
    df["start"] = pd.to_datetime(lo_ns + df["bucket"].astype("int64") * width, unit="ns", utc=True)
    return df


def read_stats(engine: Engine, start_ns: int | None = None, end_ns: int | None = None,
               limit: int = READS_MAX_ROWS) -> pd.DataFrame:
    """The newest ``limit`` READ spans of the range, per layer kind: reads, bytes, p50
    latency (µs), median GB/s and NIXL's median transfer time (µs); aggregated in SQL."""
    base = (
        select(
            _S.layer_kind, _S.duration_ns, _S.bytes,
            (_S.bytes * 1.0 / func.nullif(_S.duration_ns, 0)).label("gbps"),
            span_attr(A.KV_NIXL_XFER_US, numeric=True).label("xfer_us"),
        )
        .where(_S.name == A.SPAN_KV_READ, *_window(start_ns, end_ns))
        .order_by(_S.start_ns.desc())
        .limit(limit)
        .subquery()
    )
    r = _ranked(base, ("layer_kind",), ("duration_ns", "gbps", "xfer_us"))
    stmt = (
        select(
            r.c.layer_kind,
            func.count().label("reads"),
            func.coalesce(func.sum(r.c.bytes), 0).label("bytes"),
            (_pct(r, "duration_ns", 50) / 1e3).label("p50_us"),
            _pct(r, "gbps", 50).label("median_gbps"),
            _pct(r, "xfer_us", 50).label("nixl_xfer_p50_us"),
        )
        .group_by(r.c.layer_kind)
        .order_by(r.c.layer_kind)
    )
    return _frame(engine, stmt)


# ------------------------------------------------------------------ descriptors


def desc_build_stats(engine: Engine, start_ns: int | None = None,
                     end_ns: int | None = None) -> pd.DataFrame:
    """Descriptor builds per scope and connector: builds, descriptors, bytes, p50/max µs."""
    base = select(
        span_attr(A.KV_DESC_SCOPE).label("scope"),
        func.coalesce(CONNECTOR_EXPR, LEGACY_CONNECTOR).label("connector"),
        _S.descriptors, _S.bytes, _S.duration_ns,
    ).where(_S.name == A.SPAN_KV_DESC_BUILD, *_window(start_ns, end_ns)).subquery()
    r = _ranked(base, ("scope", "connector"), ("duration_ns",))
    stmt = (
        select(
            r.c.scope.label(A.KV_DESC_SCOPE),
            r.c.connector.label(A.CONNECTOR),
            func.count().label("builds"),
            func.coalesce(func.sum(r.c.descriptors), 0).label("descriptors"),
            func.coalesce(func.sum(r.c.bytes), 0).label("bytes"),
            (_pct(r, "duration_ns", 50) / 1e3).label("p50_us"),
            (func.max(r.c.duration_ns) / 1e3).label("max_us"),
        )
        .group_by(r.c.scope, r.c.connector)
        .order_by(r.c.scope, r.c.connector)
    )
    return _frame(engine, stmt)


# Descriptor builds first: every connector builds descriptors before it reads, and they
# are ~2 % of the spans, so the look-ups below stay cheap even without the connector index.
_CONNECTOR_SPANS: tuple[str, ...] = (A.SPAN_KV_DESC_BUILD, A.SPAN_KV_READ)


def _is_connector(value: str | None, indexed: bool = True) -> ColumnElement[bool]:
    """``connector = value`` (NULL: spans without the attribute).  ``indexed=False``
    writes it as ``connector || ''`` so that SQLite cannot answer it from an index (the
    value is unchanged; NULL stays NULL): see :func:`connector_reads`."""
    expr: ColumnElement[Any] = CONNECTOR_EXPR if indexed else CONNECTOR_EXPR.op("||")("")
    return expr.is_(None) if value is None else expr == value


def connector_values(engine: Engine, start_ns: int | None = None,
                     end_ns: int | None = None) -> list[str | None]:
    """The raw ``hybrid_pd.connector`` values (None: spans without it) of descriptor-build
    and READ spans in the range, sorted, None last.

    The values come from the descriptor builds (every connector builds before it reads)
    by a loose index scan on ``ix_spans_name_connector_start_ns``: "the next value above
    the last one" is one index seek.  Then one seek per value (builds first, READs only
    if no build matched) checks it has a span in the range.  So this costs a few
    look-ups however many spans there are; without that index (an older database) it
    reads the descriptor builds once, ~2 % of the table.
    """
    win = _window(start_ns, end_ns)
    seen: set[str] = set()
    with engine.connect() as conn:
        prev = ""  # "> ''" is a range the index can seek to; IS NOT NULL walked every
        while True:  # attribute-less entry first
            v = conn.execute(select(CONNECTOR_EXPR)
                             .where(_S.name == A.SPAN_KV_DESC_BUILD, CONNECTOR_EXPR > prev)
                             .order_by(CONNECTOR_EXPR).limit(1)).scalar()
            if v is None:
                break
            seen.add(v)
            prev = v
        out: list[str | None] = []
        for value in [*sorted(seen), None]:
            if any(conn.execute(select(_S.id).where(_S.name == name, _is_connector(value), *win)
                                .limit(1)).first() for name in _CONNECTOR_SPANS):
                out.append(value)
    return out


def connectors(engine: Engine, start_ns: int | None = None, end_ns: int | None = None) -> list[str]:
    """Connectors whose descriptor-build (or READ) spans are in the range, sorted; spans
    without the attribute count as ``hybrid`` (:data:`LEGACY_CONNECTOR`)."""
    return sorted({v or LEGACY_CONNECTOR for v in connector_values(engine, start_ns, end_ns)})


def connector_reads(engine: Engine, start_ns: int | None = None, end_ns: int | None = None,
                    max_reads: int = COMPARE_MAX_READS,
                    max_requests: int = COMPARE_MAX_REQUESTS) -> pd.DataFrame:
    """Per connector, request, span name (READ or desc_build) and layer kind: spans,
    descriptors, bytes -- the input of the ours-vs-upstream comparison.

    Per connector, the newest ``max_reads`` READ spans of the range pick the requests
    (``ix_spans_name_connector_start_ns``), the ``max_requests`` newest of them (a
    per-layer connector has ~100 READs per request, a per-request one 1-2, so the READ
    cap alone would compare 50 requests of one and 2,500 of the other); all READ and
    mapping (``desc_build``
    scope=request, the only builds with a request id) spans of those requests with that
    connector are then summed in SQL (``ix_spans_request_id_start_ns``), so a request at
    the window's edge is counted whole.  The name and connector tests of that second
    step are kept off the indexes on purpose (``name || ''``): SQLite, which has no
    statistics here, otherwise preferred the connector index and walked every READ of
    the connector (1 s at 10^6 spans) instead of a few request ids.
    """
    win = _window(start_ns, end_ns)
    frames = []
    for value in connector_values(engine, start_ns, end_ns):
        is_c = _is_connector(value)
        newest = (
            select(_S.request_id, _S.start_ns)
            .where(_S.name == A.SPAN_KV_READ, is_c, _S.request_id.is_not(None), *win)
            .order_by(_S.start_ns.desc())
            .limit(max_reads)
            .subquery()
        )
        recent = (
            select(newest.c.request_id)
            .group_by(newest.c.request_id)
            .order_by(func.max(newest.c.start_ns).desc())
            .limit(max_requests)
        )
        stmt = (
            select(
                _S.request_id, _S.name, _S.layer_kind,
                func.count().label("spans"),
                func.coalesce(func.sum(_S.descriptors), 0).label("descriptors"),
                func.coalesce(func.sum(_S.bytes), 0).label("bytes"),
            )
            .where(_S.request_id.in_(recent), _S.name.op("||")("").in_(_CONNECTOR_SPANS),
                   _is_connector(value, indexed=False))
            .group_by(_S.request_id, _S.name, _S.layer_kind)
        )
        df = _frame(engine, stmt)
        df.insert(0, "connector", value or LEGACY_CONNECTOR)
        frames.append(df)
    cols = ["connector", "request_id", "name", "layer_kind", "spans", "descriptors", "bytes"]
    if not frames:
        return pd.DataFrame(columns=cols)
    df = pd.concat(frames, ignore_index=True)
    # Legacy spans (no attribute) and explicit "hybrid" ones are the same connector.
    df["layer_kind"] = df["layer_kind"].fillna("mixed")
    return df.groupby(cols[:4], as_index=False)[cols[4:]].sum()


def comparison_per_request(cmp: pd.DataFrame) -> pd.DataFrame:
    """One row per connector and request: reads, descriptors and bytes read, mapping
    descriptors, and per-READ ratios.  Requests without a READ are left out."""
    rd = cmp[cmp["name"] == A.SPAN_KV_READ]
    out = rd.groupby(["connector", "request_id"]).agg(
        reads=("spans", "sum"), descriptors=("descriptors", "sum"), bytes=("bytes", "sum"))
    maps = cmp[cmp["name"] == A.SPAN_KV_DESC_BUILD].groupby(["connector", "request_id"]).agg(
        mapping_descriptors=("descriptors", "sum"))
    out = out.join(maps, how="left").reset_index()
    out["descriptors_per_read"] = out["descriptors"] / out["reads"]
    out["bytes_per_read"] = out["bytes"] / out["reads"]
    return out


# Table columns of :func:`comparison_medians` (the units are part of the header).
MEDIAN_COLUMNS: dict[str, str] = {
    "reads": "READs / request",
    "descriptors_per_read": "descriptors / READ",
    "bytes_per_read": "bytes / READ (B)",
    "descriptors": "descriptors / request",
    "bytes": "bytes / request (B)",
    "mapping_descriptors": "mapped descriptor ids / request",
}


def comparison_medians(per_request: pd.DataFrame) -> pd.DataFrame:
    """Per connector: how many requests were compared and the median of each per-request
    figure (:data:`MEDIAN_COLUMNS`)."""
    g = per_request.groupby("connector")
    out = g[list(MEDIAN_COLUMNS)].median().rename(columns=MEDIAN_COLUMNS)
    out.insert(0, "requests", g.size())
    return out.reset_index()


def comparison_per_kind(cmp: pd.DataFrame) -> pd.DataFrame:
    """Per connector and layer kind: READs, descriptors and bytes per READ (totals over
    the compared requests divided by their READ count); an ``all`` kind is added when
    the READs come in more than one kind."""
    rd = cmp[cmp["name"] == A.SPAN_KV_READ]
    g = rd.groupby(["connector", "layer_kind"], as_index=False)[["spans", "descriptors", "bytes"]].sum()
    if rd["layer_kind"].nunique() > 1:
        total = rd.groupby("connector", as_index=False)[["spans", "descriptors", "bytes"]].sum()
        g = pd.concat([g, total.assign(layer_kind="all")], ignore_index=True)
    g = g.rename(columns={"spans": "reads"})
    g["descriptors_per_read"] = g["descriptors"] / g["reads"]
    g["bytes_per_read"] = g["bytes"] / g["reads"]
    return g


RequestOrder = Literal["latest", "slowest"]


def request_list(engine: Engine, order: RequestOrder = "latest", limit: int = 200) -> pd.DataFrame:
    """Requests that had a KV transfer: id, first start, slowest transfer, bytes, errors.

    Grouped over transfer spans only, from ``ix_spans_transfer_cover`` (a partial index
    holding just those spans and the columns read here), so no table row is visited.
    """
    dur = func.max(_S.duration_ns).label("duration_ns")
    stmt = (
        select(
            _S.request_id,
            func.min(_S.start_ns).label("start_ns"),
            dur,
            func.sum(_S.bytes).label("bytes"),
            func.count().label("transfers"),
            func.sum(case((_S.status == "ERROR", 1), else_=0)).label("errors"),
        )
        .where(_S.name == _const(A.SPAN_KV_TRANSFER), _S.request_id.is_not(None))
        .group_by(_S.request_id)
        .order_by(dur.desc() if order == "slowest" else func.min(_S.start_ns).desc())
        .limit(limit)
    )
    df = _frame(engine, stmt)
    if not df.empty:
        df["duration_ms"] = df["duration_ns"] / 1e6
        df["start"] = pd.to_datetime(df["start_ns"], unit="ns", utc=True)
    return df


# Attribute keys shown on the timeline's hover.
TIMELINE_ATTRS: tuple[str, ...] = (
    A.KV_DESC_SCOPE, A.KV_STATUS, A.KV_FAILURE_REASON, A.KV_NIXL_POST_US,
    A.KV_NIXL_XFER_US, A.KV_NIXL_DESC_COUNT, A.KV_PEER_ENGINE_ID,
)


def timeline_statement(request_id: str) -> CompoundSelect:
    """Lookups 1 and 2 of :func:`request_timeline` as one UNION ALL.

    The second branch deliberately has no ``request_id IS NULL`` filter: SQLite would
    then pick the request_id index for the NULL test and walk every id-less span (all
    proxy and handshake spans) instead of using ``ix_spans_trace_id``.  The few
    duplicates it returns are dropped in pandas.
    """
    own = select(*_SPAN_COLS).where(_S.request_id == request_id)
    traces = select(_S.trace_id).where(_S.request_id == request_id).scalar_subquery()
    same_trace = select(*_SPAN_COLS).where(_S.trace_id.in_(traces))
    return union_all(own, same_trace)


def request_timeline(engine: Engine, request_id: str, handshakes: int = 16) -> pd.DataFrame:
    """Every span of one request: its own spans, the rest of its traces, and handshakes.

    Three index-backed lookups in one round trip:

    1. ``request_id = ?``                      (ix_spans_request_id_start_ns)
    2. ``trace_id IN (traces of 1.)``          (ix_spans_trace_id) -- proxy/engine spans
       that carry no request id attribute but share the trace;
    3. the last ``handshakes`` handshake spans started before the request's last span
       (ix_spans_name_start_ns) -- a handshake is per P-D pair, not per request, so it
       has no request id; only the latest one per (engine, peer rank) is kept.
    """
    df = _frame(engine, timeline_statement(request_id))
    if df.empty:
        return add_derived(parse_attributes(df, TIMELINE_ATTRS))
    hs = (
        select(*_SPAN_COLS)
        .where(_S.name == A.SPAN_KV_HANDSHAKE, _S.start_ns <= int(df["end_ns"].max()))
        .order_by(_S.start_ns.desc())
        .limit(handshakes)
    )
    hs_df = _frame(engine, hs)
    if not hs_df.empty:
        engines = set(df["engine_id"].dropna())
        hs_df = hs_df[hs_df["engine_id"].isin(engines)]
        hs_df = hs_df.drop_duplicates(subset=["engine_id", "peer_rank"], keep="first")
        df = pd.concat([hs_df, df], ignore_index=True) if not hs_df.empty else df
    df = df.drop_duplicates(subset=["trace_id", "span_id"]).sort_values("start_ns")
    df = df.reset_index(drop=True)
    return add_derived(parse_attributes(df, TIMELINE_ATTRS))


def db_target_from_env(default: str | None = None) -> str | None:
    """The database the app shows: ``$HYBRID_PD_TELEMETRY_DB``, else ``default``."""
    return os.environ.get(ENV_DB) or default
