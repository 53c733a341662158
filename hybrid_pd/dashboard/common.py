"""Streamlit glue shared by the pages: cached engine and loads, database checks, sidebar.

Caching: the engine is one shared object per database (``st.cache_resource``;
SQLAlchemy engines are thread-safe), every load is ``st.cache_data`` with a short ``ttl``
so one refresh reads the database once per query however many widgets use the result,
and auto-refresh (``TTL_S``) sees new spans while the engines run.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pandas as pd
import streamlit as st
from sqlalchemy import Engine

from hybrid_pd.dashboard import (
    connector_queries,
    instance_queries,
    queries,
    timeline_queries,
    transfer_queries,
)
from hybrid_pd.dashboard.queries import Engines
from hybrid_pd.settings import ENV_TELEMETRY_DB

TTL_S = 10  # seconds a cached load stays valid; also the shortest auto-refresh period

# Label -> window length in ns, counted back from the newest span in the database (not
# from "now": a database from last week's bench must still show something).
RANGES: dict[str, int | None] = {
    "all": None,
    "last 1 min": 60 * 10**9,
    "last 5 min": 5 * 60 * 10**9,
    "last 15 min": 15 * 60 * 10**9,
    "last 1 h": 3600 * 10**9,
    "last 24 h": 24 * 3600 * 10**9,
}
# The "timeline" column of a table ("/timeline?request=ID") as a link to that request.
TIMELINE_LINK = {"timeline": st.column_config.LinkColumn("timeline", display_text="open")}


@st.cache_resource(show_spinner=False)
def get_engine(db: str) -> Engine:
    return queries.open_engine(db)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def db_status(db: str) -> queries.DbStatus:
    # A missing SQLite file is reported before an engine is made (and cached) for it.
    path = queries.sqlite_path(db)
    if path is not None and not path.exists():
        return queries.check_db(db)
    return queries.check_db(db, get_engine(db))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def time_bounds(db: str) -> tuple[int | None, int | None]:
    return queries.time_bounds(get_engine(db))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def span_drops(db: str, start_ns: int | None) -> pd.DataFrame:
    return queries.span_drops(get_engine(db), start_ns)


def drops_banner(db: str, start_ns: int | None) -> None:
    """Warn when writers dropped spans in the range: the pages' counts are then too low."""
    drops = span_drops(db, start_ns)
    if drops.empty:
        return
    parts = ", ".join(f"{int(r.spans):,} by {r.sink} ({r.reason})" for r in drops.itertuples())
    st.warning(
        f"Spans were dropped in this time range: {parts}. Figures on this page miss them. "
        "See `hybrid_pd_telemetry_spans_dropped_total{sink,reason}` on the processes' "
        "`/metrics` and table `telemetry_drops`."
    )


@st.cache_data(ttl=TTL_S, show_spinner="Loading transfers…")
def transfers(db: str, start_ns: int | None, end_ns: int | None,
              engines: Engines = None) -> pd.DataFrame:
    return transfer_queries.transfers(get_engine(db), start_ns, end_ns, engines=engines)


@st.cache_data(ttl=TTL_S, show_spinner="Loading reads…")
def reads(db: str, start_ns: int | None, end_ns: int | None,
          engines: Engines = None) -> pd.DataFrame:
    return transfer_queries.reads(get_engine(db), start_ns, end_ns, engines=engines)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def desc_builds(db: str, start_ns: int | None, end_ns: int | None,
                engines: Engines = None) -> pd.DataFrame:
    return connector_queries.desc_builds(get_engine(db), start_ns, end_ns, engines=engines)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def failures(db: str, start_ns: int | None, end_ns: int | None,
             engines: Engines = None) -> pd.DataFrame:
    return transfer_queries.failures(get_engine(db), start_ns, end_ns, engines=engines)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def failure_counts(db: str, start_ns: int | None, end_ns: int | None,
                   engines: Engines = None) -> dict[str, int]:
    return transfer_queries.failure_counts(get_engine(db), start_ns, end_ns, engines)


@st.cache_data(ttl=TTL_S, show_spinner="Aggregating transfers…")
def transfer_stats(db: str, start_ns: int | None, end_ns: int | None,
                   by: tuple[str, ...] = ("engine_id", "rank"),
                   engines: Engines = None) -> pd.DataFrame:
    return transfer_queries.transfer_stats(get_engine(db), start_ns, end_ns, by, engines)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def transfer_buckets(db: str, start_ns: int | None, end_ns: int | None,
                     engines: Engines = None) -> pd.DataFrame:
    """Time buckets over the range; "all" is bucketed between the first and last span."""
    if start_ns is None or end_ns is None:
        lo, hi = time_bounds(db)
        start_ns = lo if start_ns is None else start_ns
        end_ns = hi if end_ns is None else end_ns
    if start_ns is None or end_ns is None:
        return transfer_queries.transfer_buckets(get_engine(db), 0, -1)  # no spans: no rows
    return transfer_queries.transfer_buckets(get_engine(db), start_ns, end_ns, engines=engines)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def read_stats(db: str, start_ns: int | None, end_ns: int | None,
               engines: Engines = None) -> pd.DataFrame:
    return transfer_queries.read_stats(get_engine(db), start_ns, end_ns, engines=engines)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def desc_build_stats(db: str, start_ns: int | None, end_ns: int | None,
                     engines: Engines = None) -> pd.DataFrame:
    return connector_queries.desc_build_stats(get_engine(db), start_ns, end_ns, engines=engines)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def connectors(db: str, start_ns: int | None, end_ns: int | None) -> list[str]:
    return connector_queries.connectors(get_engine(db), start_ns, end_ns)


@st.cache_data(ttl=TTL_S, show_spinner="Comparing connectors…")
def connector_reads(db: str, start_ns: int | None, end_ns: int | None) -> pd.DataFrame:
    return connector_queries.connector_reads(get_engine(db), start_ns, end_ns)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def request_list(db: str, order: timeline_queries.RequestOrder,
                 engines: Engines = None) -> pd.DataFrame:
    return timeline_queries.request_list(get_engine(db), order, engines=engines)


@st.cache_data(ttl=TTL_S, show_spinner="Loading the request's spans…")
def request_timeline(db: str, request_id: str) -> pd.DataFrame:
    return timeline_queries.request_timeline(get_engine(db), request_id)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def transfer_pairs(db: str, start_ns: int | None, end_ns: int | None,
                   engines: Engines = None) -> pd.DataFrame:
    return instance_queries.transfer_pairs(get_engine(db), start_ns, end_ns, engines)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def processes(db: str) -> pd.DataFrame:
    return instance_queries.processes(get_engine(db))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def engine_directory(db: str) -> pd.DataFrame:
    """Every engine instance: those in ``processes`` and those only named by transfer
    spans (as D, or as the P read from), whatever the time range."""
    pairs = transfer_pairs(db, None, None)
    seen = tuple(str(e) for e in pd.concat([pairs["d_engine_id"], pairs["p_engine_id"]]).dropna())
    return instance_queries.engine_directory(processes(db), seen,
                                             instance_queries.span_roles(pairs))


def sidebar_instances(db: str) -> Engines:
    """Host and engine-instance pickers; the engine ids to keep, None when unfiltered.

    Hosts come from table ``processes``; a database made before it has none, and then
    only the engine picker (raw ids) is offered.
    """
    directory = engine_directory(db)
    host_list = instance_queries.hosts(processes(db))
    picked_hosts: list[str] = []
    if host_list:
        picked_hosts = st.sidebar.multiselect(
            "Hosts", host_list, key="hosts",
            help="Engines running on these hosts (table `processes`); empty: all.")
    else:
        st.sidebar.caption("Hosts unknown: no writer of this database recorded its host "
                           "(table `processes` is missing, from an older hybrid-pd, or "
                           "names none).")
    if picked_hosts:
        on_host = directory["host"].fillna("").map(
            lambda h: bool(set(h.split(", ")) & set(picked_hosts)))
        directory = directory[on_host]
    labels = dict(zip(directory["engine_id"], directory["label"], strict=True))
    picked = st.sidebar.multiselect(
        "Engine instances", list(labels), format_func=labels.__getitem__, key="engines",
        help="A transfer counts for its D engine and for the P engine it read from; "
        "empty: all.")
    if picked:
        return tuple(sorted(picked))
    return tuple(sorted(labels)) if picked_hosts else None


def require_db() -> str:
    """The database target, checked; renders the hint and stops the page when unusable."""
    db = queries.db_target_from_env()
    if not db:
        st.warning(
            f"No database selected. Start the dashboard with `hybrid-pd dashboard --db PATH` "
            f"or set `{ENV_TELEMETRY_DB}`.\n\n{queries.PRODUCE_SPANS_HINT}"
        )
        st.stop()
    status = db_status(db)
    st.sidebar.caption(f"Database: `{db}`  \n{status.message if status.ok else status.state}")
    if status.state == "newer_schema":
        st.error(status.message)
        st.stop()
    if not status.ok:
        (st.info if status.state in ("missing", "empty") else st.error)(status.message)
        st.stop()
    if status.missing_indexes:
        missing_indexes_note(status.missing_indexes, get_engine(db).dialect.name)
    return db


def missing_indexes_note(names: tuple[str, ...], dialect_name: str = "sqlite") -> None:
    """Sidebar note for a database made before the dashboard's newer indexes existed."""
    st.sidebar.warning(
        f"This database lacks {len(names)} index(es) made for the dashboard "
        f"({', '.join(f'`{n}`' for n in names)}): every page works, whole-range pages are "
        "slower on large databases. Any hybrid-pd writer adds them when it opens the file "
        "(a `bench` or `serve` run with `--telemetry-db` on it), or run the SQL below once "
        "(the dashboard itself never writes)."
    )
    with st.sidebar.expander("SQL to add the indexes"):
        st.code(queries.create_index_sql(names, dialect_name), language="sql")


def sidebar_window(db: str) -> tuple[int | None, int | None]:
    """Time-range picker (relative to the newest span); returns [start_ns, end_ns]."""
    label = st.sidebar.selectbox("Time range", list(RANGES), index=0, key="time_range",
                                 help="Counted back from the newest span in the database.")
    lo, hi = time_bounds(db)
    span = RANGES[label]
    window = (None, None) if span is None or hi is None else (max(hi - span, lo or 0), hi)
    drops_banner(db, window[0])  # here, so that every page with a range shows it
    return window


def run_page(body: Callable[[], None]) -> None:
    """Run ``body``; with auto-refresh on, as a fragment re-run every N seconds."""
    auto = st.sidebar.toggle("Auto-refresh", value=False, key="auto_refresh",
                             help="Re-query while the engines are running.")
    if not auto:
        body()
        return
    every = st.sidebar.number_input("every (s)", min_value=TTL_S, max_value=600, value=10,
                                    key="refresh_s")
    st.fragment(run_every=timedelta(seconds=int(every)))(body)()


Metric = tuple[str, str] | tuple[str, str, str]  # label, value[, help]


def metric_row(items: list[Metric]) -> None:
    """One ``st.metric`` per column.  Keep rows short: a value wider than its column is
    cut with "…" (seven in a row cut "25.15 ms" at 1280 px)."""
    for col, (label, value, *help_) in zip(st.columns(len(items)), items, strict=True):
        col.metric(label, value, help=help_[0] if help_ else None)


def request_mode(modes: tuple[str, ...], mode_key: str, id_key: str) -> tuple[str, str | None]:
    """How the page picks its request: ``(mode, request id typed or linked)``.  A link
    (``?request=``) opens "by id" (the last mode) with that id filled in."""
    wanted = st.query_params.get("request")
    mode = st.radio("Pick a request", modes, horizontal=True, key=mode_key,
                    index=len(modes) - 1 if wanted else 0)
    if mode != modes[-1]:
        return mode, None
    rid = st.text_input("request id", value=wanted or "", key=id_key).strip()
    return mode, rid or None
