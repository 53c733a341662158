"""Read-only access to the telemetry ``spans`` table and the SQL every page query shares.

The page queries live beside this module, one per page family: ``transfer_queries``
(Overview, Layers, Failures), ``connector_queries`` (Descriptors: builds, ours vs
upstream) and ``timeline_queries`` (Request timeline).  All are SQLAlchemy Core, plain data
in, ``pandas.DataFrame`` out, so the tests call them directly and the
Streamlit layer (``common.py``) only adds caching (``st.cache_data``) on top.

Read-only on purpose: the engines write to the same file while the dashboard runs, so a
SQLite path is opened as ``file:PATH?mode=ro`` (URI form) *and* with ``PRAGMA
query_only``; a dashboard bug can therefore never take a write lock or alter a row.  A
PostgreSQL URL (the central store) gets sessions whose transactions are read-only.  Every
query gives the same answer on both backends (tests/test_postgres_store.py).

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
    BigInteger,
    ColumnElement,
    Engine,
    Subquery,
    case,
    cast,
    create_engine,
    event,
    func,
    inspect,
    literal,
    or_,
    select,
)
from sqlalchemy.dialects import postgresql as postgresql_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.schema import CreateIndex

from hybrid_pd.settings import ENV_TELEMETRY_DB
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry.schema import (
    DASHBOARD_INDEXES,
    SCHEMA_VERSION,
    schema_version_table,
    span_attr,
    spans_table,
)
from hybrid_pd.telemetry.store import session_sql

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
SPAN_COLS = (
    _S.trace_id, _S.span_id, _S.parent_span_id, _S.name, _S.start_ns, _S.end_ns,
    _S.duration_ns, _S.status, _S.status_message, _S.service, _S.role, _S.engine_id,
    _S.request_id, _S.layer, _S.layer_kind, _S.bytes, _S.descriptors, _S.rank,
    _S.peer_rank, _S.attributes,
)
# Window loads take the attributes they show out of the JSON in SQL (json_extract), not
# the whole JSON text into Python: at 2*10^4 rows json.loads was a third of a page load.
WINDOW_COLS = tuple(c for c in SPAN_COLS if c.name != "attributes")

# Engine instances a page is filtered to (:func:`for_engines`); None: every one.
Engines = tuple[str, ...] | None

# The biggest window a page loads at once; above it the page says the result was cut.
DEFAULT_MAX_ROWS = 200_000


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
    the backend has a switch for it (PostgreSQL).
    """
    path = sqlite_path(db)
    if path is not None:
        return f"sqlite:///file:{quote(str(path))}?mode=ro&uri=true"
    return make_url(db)


def open_engine(db: str) -> Engine:
    """A read-only engine for ``db`` (path or SQLAlchemy URL)."""
    # pre-ping on a server: a dashboard left open outlives a database restart.
    engine = create_engine(readonly_url(db), pool_pre_ping=not is_sqlite_target(db))
    if engine.dialect.name == "sqlite":
        # Belt and braces beside mode=ro; busy_timeout because writers hold the WAL lock
        # for a batch at a time and a reader must wait, not fail.
        statements: tuple[str, ...] = ("PRAGMA query_only = ON", "PRAGMA busy_timeout = 5000")
    elif engine.dialect.name == "postgresql":
        statements = ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",)
    else:
        return engine

    @event.listens_for(engine, "connect")
    def _read_only(dbapi_connection: Any, connection_record: Any) -> None:
        session_sql(dbapi_connection, *statements)

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


def index_names(engine: Engine) -> set[str]:
    """Names of the indexes on ``spans``.

    SQLite: from ``sqlite_master`` (SQLAlchemy's SQLite index reflection skips expression
    indexes); other backends: reflected (PostgreSQL's includes them).
    """
    if engine.dialect.name != "sqlite":
        return {str(ix["name"]) for ix in inspect(engine).get_indexes(spans_table.name)}
    with engine.connect() as conn:
        return set(conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'spans'"
        ).scalars())


def missing_indexes(engine: Engine) -> tuple[str, ...]:
    """The :data:`~hybrid_pd.telemetry.schema.DASHBOARD_INDEXES` the database lacks."""
    have = index_names(engine)
    return tuple(n for n in DASHBOARD_INDEXES if n not in have)


def create_index_sql(names: tuple[str, ...], dialect_name: str = "sqlite") -> str:
    """The DDL that adds the named ``spans`` indexes (for the operator to run), in the
    SQL of ``dialect_name`` (``sqlite`` or ``postgresql``)."""
    dialect = (sqlite_dialect if dialect_name == "sqlite" else postgresql_dialect).dialect()
    by_name = {ix.name: ix for ix in spans_table.indexes}
    return "\n".join(
        f"{CreateIndex(by_name[n], if_not_exists=True).compile(dialect=dialect)};"
        for n in names
    )


def db_target_from_env(default: str | None = None) -> str | None:
    """The database the app shows: ``$HYBRID_PD_TELEMETRY_DB``, else ``default``."""
    return os.environ.get(ENV_TELEMETRY_DB) or default


# -------------------------------------------------------------------------- shared SQL


def fetch_frame(engine: Engine, stmt: Any) -> pd.DataFrame:
    with engine.connect() as conn:
        result = conn.execute(stmt)
        df = pd.DataFrame(result.fetchall(), columns=list(result.keys()))
    return df


def sql_literal(value: str) -> ColumnElement[Any]:
    """``value`` rendered into the SQL text, not bound: SQLite picks a partial index only
    when the query states its predicate (``name = 'hybrid_pd.kv.transfer'``)."""
    return literal(value, literal_execute=True)


def in_window(start_ns: int | None, end_ns: int | None) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = []
    if start_ns is not None:
        conds.append(_S.start_ns >= start_ns)
    if end_ns is not None:
        conds.append(_S.start_ns <= end_ns)
    return conds


def for_engines(engines: Engines) -> list[ColumnElement[bool]]:
    """Spans of the engine instances ``engines`` (None: no filter): the span's own engine
    or, for D's transfer and READ spans, the P engine it read from (``kv.peer_engine_id``),
    so picking a P shows the transfers out of it.  The peer id lives in the JSON, so a
    filtered query reads the span rows (covering indexes no longer cover it)."""
    if engines is None:
        return []
    return [or_(_S.engine_id.in_(engines), span_attr(A.KV_PEER_ENGINE_ID).in_(engines))]


def ranked(base: Subquery, keys: tuple[str, ...], values: tuple[str, ...]) -> Subquery:
    """``base`` plus, per column ``v`` of ``values``, ``_rn_v`` (v's rank in its group,
    smallest first, NULLs last) and ``_n_v`` (the group's non-NULL count of v)."""
    part = [base.c[k] for k in keys] or None
    cols: list[Any] = [base]
    for v in values:
        cols.append(func.row_number().over(partition_by=part,
                                           order_by=base.c[v].asc().nulls_last()).label(f"_rn_{v}"))
        cols.append(func.count(base.c[v]).over(partition_by=part).label(f"_n_{v}"))
    return select(*cols).subquery()


def sql_sum(expr: ColumnElement[Any]) -> ColumnElement[Any]:
    """``SUM(expr)`` of an integer column as an integer on both backends: PostgreSQL sums
    BIGINT into NUMERIC, which arrives as Decimal (an object column in pandas, and
    ``Decimal / float`` raises)."""
    return cast(func.sum(expr), BigInteger)


def sql_percentile(r: Subquery, value: str, p: int) -> ColumnElement[Any]:
    """Nearest-rank percentile ``p`` (integer percent) of ``value`` per group of ``r``:
    the ceil(p * n / 100)-th smallest, i.e. (p * n + 99) // 100 in integers."""
    rank = (r.c[f"_n_{value}"] * p + 99) // 100
    return func.max(case((r.c[f"_rn_{value}"] == rank, r.c[value])))


def attr_cols(keys: tuple[str, ...]) -> list[ColumnElement[Any]]:
    """Attribute ``keys`` as columns of the same name, each value in its JSON type."""
    return [span_attr(k, value=True).label(k) for k in keys]


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


# ---------------------------------------------------------------------- shared queries


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
    engines: Engines = None,
) -> pd.DataFrame:
    """Spans of the given names started in [start_ns, end_ns], newest first, at most ``limit``.

    ``attrs`` are attribute keys copied out of the JSON into columns of the same name (in
    SQL); the raw ``attributes`` text is not loaded.  ``engines``: :func:`for_engines`.
    """
    stmt = (
        select(*WINDOW_COLS, *attr_cols(attrs))
        .where(_S.name.in_(names), *in_window(start_ns, end_ns), *for_engines(engines))
        .order_by(_S.start_ns.desc())
        .limit(limit)
    )
    return add_derived(fetch_frame(engine, stmt))


def span_drops(engine: Engine, start_ns: int | None = None) -> pd.DataFrame:
    """Spans the writers dropped, per sink and reason, from ``telemetry_drops``.

    Only drops that ended at or after ``start_ns`` (None: all).  No end bound on purpose:
    the ranges end at the newest span, and drops recorded after it (at shutdown, or while
    the database refused spans) belong to that latest range.  Empty for a database made
    before the table existed.
    """
    from hybrid_pd.telemetry.sqlite_exporter import drops_table

    cols = ["sink", "reason", "spans", "first_ns", "last_ns"]
    if not inspect(engine).has_table(drops_table.name):
        return pd.DataFrame(columns=cols)
    d = drops_table.c
    stmt = select(d.sink, d.reason, func.sum(d.spans).label("spans"),
                  func.min(d.first_ns).label("first_ns"), func.max(d.last_ns).label("last_ns"))
    if start_ns is not None:
        stmt = stmt.where(d.last_ns >= start_ns)
    stmt = stmt.group_by(d.sink, d.reason).order_by(d.sink, d.reason)
    with engine.connect() as conn:
        result = conn.execute(stmt)
        return pd.DataFrame(result.fetchall(), columns=cols)
