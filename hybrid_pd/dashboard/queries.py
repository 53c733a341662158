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
    Engine,
    and_,
    case,
    create_engine,
    event,
    func,
    inspect,
    or_,
    select,
    union_all,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.selectable import CompoundSelect

from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry.schema import SCHEMA_VERSION, schema_version_table, spans_table

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

# The biggest window a page loads at once; above it the page says the result was cut.
DEFAULT_MAX_ROWS = 200_000
# READ spans are ~90 % of a per-layer database; pages load the newest this many.
READS_MAX_ROWS = 20_000


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
    except SQLAlchemyError as exc:
        return DbStatus("error", f"Cannot read the database: {exc.__class__.__name__}: {exc}")
    if count == 0:
        return DbStatus("empty", f"The database has no spans yet.\n\n{PRODUCE_SPANS_HINT}", version)
    return DbStatus("ok", f"{count:,} spans", version, int(count))


# ----------------------------------------------------------------------------- helpers


def _frame(engine: Engine, stmt: Any) -> pd.DataFrame:
    with engine.connect() as conn:
        result = conn.execute(stmt)
        df = pd.DataFrame(result.fetchall(), columns=list(result.keys()))
    return df


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
) -> pd.DataFrame:
    """Spans of the given names started in [start_ns, end_ns], newest first, at most ``limit``."""
    conds = [_S.name.in_(names)]
    if start_ns is not None:
        conds.append(_S.start_ns >= start_ns)
    if end_ns is not None:
        conds.append(_S.start_ns <= end_ns)
    stmt = select(*_SPAN_COLS).where(and_(*conds)).order_by(_S.start_ns.desc()).limit(limit)
    return add_derived(_frame(engine, stmt))


def transfers(engine: Engine, start_ns: int | None = None, end_ns: int | None = None,
              limit: int = DEFAULT_MAX_ROWS) -> pd.DataFrame:
    """Decode-side transfer spans (one per request and D rank) with outcome and reads."""
    df = spans_by_name(engine, (A.SPAN_KV_TRANSFER,), start_ns, end_ns, limit)
    return parse_attributes(df, (A.KV_STATUS, A.KV_READS, A.KV_PEER_ENGINE_ID, A.CONNECTOR))


def reads(engine: Engine, start_ns: int | None = None, end_ns: int | None = None,
          limit: int = READS_MAX_ROWS) -> pd.DataFrame:
    """READ spans (per layer with ``--granularity layer``) with NIXL's own timings."""
    df = spans_by_name(engine, (A.SPAN_KV_READ,), start_ns, end_ns, limit)
    return parse_attributes(df, (A.KV_STATUS, A.KV_NIXL_POST_US, A.KV_NIXL_XFER_US))


def desc_builds(engine: Engine, start_ns: int | None = None, end_ns: int | None = None,
                limit: int = DEFAULT_MAX_ROWS) -> pd.DataFrame:
    df = spans_by_name(engine, (A.SPAN_KV_DESC_BUILD,), start_ns, end_ns, limit)
    df = parse_attributes(df, (A.KV_DESC_SCOPE, A.KV_VIEW, A.CONNECTOR))
    if not df.empty:
        # Spans from before the connector attribute existed were all ours.
        df[A.CONNECTOR] = df[A.CONNECTOR].fillna("hybrid")
    return df


# Span kinds whose failures are looked up by name (few rows per request); failed READs
# are then found through their failed transfer's trace rather than by scanning all READs.
_FAILURE_PARENTS: tuple[str, ...] = (
    A.SPAN_KV_TRANSFER, A.SPAN_KV_HANDSHAKE, A.SPAN_KV_NOTIFY, A.SPAN_KV_DESC_BUILD,
    A.SPAN_PROXY_REQUEST, A.SPAN_PROXY_PREFILL, A.SPAN_PROXY_DECODE,
    A.SPAN_ENGINE_PREFILL, A.SPAN_ENGINE_DECODE,
)


def failures(engine: Engine, start_ns: int | None = None, end_ns: int | None = None,
             limit: int = 10_000) -> pd.DataFrame:
    """Failed (status ERROR), stalled and aborted spans, newest first.

    ``status`` has no index (and should not: one in 200 spans fails), so the lookup goes
    by name: stalls/aborts and failed per-request spans via ``ix_spans_name_start_ns``,
    then the ERROR spans of those failed spans' traces (failed READs) via
    ``ix_spans_trace_id``.  A bare ``WHERE status = 'ERROR'`` scanned 10^6 rows (12 s).
    """
    window = []
    if start_ns is not None:
        window.append(_S.start_ns >= start_ns)
    if end_ns is not None:
        window.append(_S.start_ns <= end_ns)
    direct = select(*_SPAN_COLS).where(
        or_(_S.name.in_((A.SPAN_KV_STALL, A.SPAN_KV_ABORT)),
            and_(_S.name.in_(_FAILURE_PARENTS), _S.status == "ERROR")),
        *window,
    )
    failed_traces = (
        select(_S.trace_id)
        .where(_S.name.in_(_FAILURE_PARENTS), _S.status == "ERROR", *window)
        .scalar_subquery()
    )
    children = select(*_SPAN_COLS).where(
        _S.trace_id.in_(failed_traces), _S.status == "ERROR",
        _S.name.not_in(_FAILURE_PARENTS),
    )
    df = _frame(engine, union_all(direct, children))
    df = df.drop_duplicates(subset=["trace_id", "span_id"])
    df = df.sort_values("start_ns", ascending=False).head(limit).reset_index(drop=True)
    df = add_derived(df)
    return parse_attributes(df, (A.KV_STATUS, A.KV_FAILURE_REASON, A.KV_WAITED_MS))


RequestOrder = Literal["latest", "slowest"]


def request_list(engine: Engine, order: RequestOrder = "latest", limit: int = 200) -> pd.DataFrame:
    """Requests that had a KV transfer: id, first start, slowest transfer, bytes, errors.

    Grouped over transfer spans only (``ix_spans_name_start_ns`` narrows the scan to
    one span in ~60), so it stays cheap on large databases.
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
        .where(_S.name == A.SPAN_KV_TRANSFER, _S.request_id.is_not(None))
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
