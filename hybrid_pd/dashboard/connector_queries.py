"""Descriptor builds and the ours-vs-upstream comparison: the Descriptors page.

Every query here groups by the ``hybrid_pd.connector`` attribute (read from the JSON by
``CONNECTOR_EXPR``, indexed by ``ix_spans_name_connector_start_ns``).  Its values are
``hybrid`` (ours, inside vLLM), ``upstream`` (vLLM's NIXL connector) and ``bench``
(``hybrid-pd bench``); spans without it were written before it existed, all by ours.
Tables and legends show every connector under its own label; the comparison puts only
``hybrid`` beside ``upstream`` (:data:`COMPARED_CONNECTORS`).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from sqlalchemy import ColumnElement, Engine, Select, func, select, true

from hybrid_pd.dashboard.queries import (
    DEFAULT_MAX_ROWS,
    Engines,
    fetch_frame,
    for_engines,
    in_window,
    ranked,
    spans_by_name,
    sql_percentile,
    sql_sum,
)
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry.schema import CONNECTOR_EXPR, span_attr, spans_table

_S = spans_table.c

OURS = "hybrid"
UPSTREAM = "upstream"
# ``hybrid-pd bench`` drives our transfer code without vLLM (no scheduler, no serving
# loop), so its per-request numbers are not the connector's: a group of its own, never
# counted as ours.
BENCH = "bench"
# Spans from before the ``hybrid_pd.connector`` attribute existed were all ours.
LEGACY_CONNECTOR = OURS
# The connectors the ours-vs-upstream comparison sets side by side.
COMPARED_CONNECTORS: tuple[str, ...] = (OURS, UPSTREAM)

# Ours vs upstream: per connector, the requests of the newest this many READ spans (at
# most COMPARE_MAX_REQUESTS of them, newest first) are compared; every READ and mapping
# span of those requests is then counted.
COMPARE_MAX_READS = 5_000
COMPARE_MAX_REQUESTS = 200


# ------------------------------------------------------------------------- descriptors


def desc_builds(engine: Engine, start_ns: int | None = None, end_ns: int | None = None,
                limit: int = DEFAULT_MAX_ROWS, engines: Engines = None) -> pd.DataFrame:
    df = spans_by_name(engine, (A.SPAN_KV_DESC_BUILD,), start_ns, end_ns, limit,
                       (A.KV_DESC_SCOPE, A.KV_VIEW, A.CONNECTOR), engines)
    if not df.empty:
        df[A.CONNECTOR] = df[A.CONNECTOR].fillna(LEGACY_CONNECTOR)
    return df


def desc_build_stats(engine: Engine, start_ns: int | None = None,
                     end_ns: int | None = None, engines: Engines = None) -> pd.DataFrame:
    """Descriptor builds per scope and connector: builds, descriptors, bytes, p50/max µs
    (of the builds of ``engines``, ``queries.for_engines``)."""
    base = select(
        span_attr(A.KV_DESC_SCOPE).label("scope"),
        func.coalesce(CONNECTOR_EXPR, LEGACY_CONNECTOR).label("connector"),
        _S.descriptors, _S.bytes, _S.duration_ns,
    ).where(_S.name == A.SPAN_KV_DESC_BUILD, *in_window(start_ns, end_ns),
            *for_engines(engines)).subquery()
    r = ranked(base, ("scope", "connector"), ("duration_ns",))
    stmt = (
        select(
            r.c.scope.label(A.KV_DESC_SCOPE),
            r.c.connector.label(A.CONNECTOR),
            func.count().label("builds"),
            func.coalesce(sql_sum(r.c.descriptors), 0).label("descriptors"),
            func.coalesce(sql_sum(r.c.bytes), 0).label("bytes"),
            (sql_percentile(r, "duration_ns", 50) / 1e3).label("p50_us"),
            (func.max(r.c.duration_ns) / 1e3).label("max_us"),
        )
        .group_by(r.c.scope, r.c.connector)
        .order_by(r.c.scope, r.c.connector)
    )
    return fetch_frame(engine, stmt)


# -------------------------------------------------------------------------- connectors


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
    win = in_window(start_ns, end_ns)
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
    without the attribute count as ``hybrid`` (:data:`LEGACY_CONNECTOR`).  ``bench`` is
    listed too: filter with :data:`COMPARED_CONNECTORS` for the comparison."""
    return sorted({v or LEGACY_CONNECTOR for v in connector_values(engine, start_ns, end_ns)})


def _connector_requests(value: str | None, win: list[ColumnElement[bool]], max_reads: int,
                        max_requests: int, lateral: bool = False) -> Select[Any]:
    """Per request, span name and layer kind: spans, descriptors and bytes of connector
    ``value`` over its newest requests (the statement of :func:`connector_reads`).

    ``lateral`` (PostgreSQL): each request summed in a LATERAL subquery, so that its spans
    are looked up by request id and only theirs have their JSON read.  With
    ``request_id IN (...)`` PostgreSQL, which costs the JSON cast as nearly free, chose
    to scan the whole table and parse every row's attributes (200k spans: 813 ms; 48 ms
    this way).  The GROUP BY inside keeps PostgreSQL from flattening it into that join.
    """
    newest = (
        select(_S.request_id, _S.start_ns)
        .where(_S.name == A.SPAN_KV_READ, _is_connector(value), _S.request_id.is_not(None), *win)
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
    sums = (func.count().label("spans"),
            func.coalesce(sql_sum(_S.descriptors), 0).label("descriptors"),
            func.coalesce(sql_sum(_S.bytes), 0).label("bytes"))
    if lateral:
        ids = recent.subquery("recent")
        per = (select(_S.name, _S.layer_kind, *sums)
               .where(_S.request_id == ids.c.request_id, _S.name.in_(_CONNECTOR_SPANS),
                      _is_connector(value))
               .group_by(_S.name, _S.layer_kind)
               .lateral("per_request"))
        return select(ids.c.request_id, *per.c).select_from(ids.join(per, true()))
    return (
        select(_S.request_id, _S.name, _S.layer_kind, *sums)
        .where(_S.request_id.in_(recent), _S.name.op("||")("").in_(_CONNECTOR_SPANS),
               _is_connector(value, indexed=False))
        .group_by(_S.request_id, _S.name, _S.layer_kind)
    )


def connector_reads(engine: Engine, start_ns: int | None = None, end_ns: int | None = None,
                    max_reads: int = COMPARE_MAX_READS,
                    max_requests: int = COMPARE_MAX_REQUESTS,
                    compared: tuple[str, ...] = COMPARED_CONNECTORS) -> pd.DataFrame:
    """Per connector, request, span name (READ or desc_build) and layer kind: spans,
    descriptors, bytes -- the input of the ours-vs-upstream comparison.

    Only the connectors in ``compared`` are read (by default ``hybrid`` and ``upstream``:
    ``bench`` spans stay out of the comparison); each keeps its own label.

    Per connector, the newest ``max_reads`` READ spans of the range pick the requests
    (``ix_spans_name_connector_start_ns``), the ``max_requests`` newest of them (a
    per-layer connector has ~100 READs per request, a per-request one 1-2, so the READ
    cap alone would compare 50 requests of one and 2,500 of the other); all READ and
    mapping (``desc_build`` scope=request, the only builds with a request id) spans of
    those requests with that connector are then summed in SQL
    (``ix_spans_request_id_start_ns``), so a request at the window's edge is counted
    whole.  The name and connector tests of that second
    step are kept off the indexes on purpose (``name || ''``): SQLite, which has no
    statistics here, otherwise preferred the connector index and walked every READ of
    the connector (1 s at 10^6 spans) instead of a few request ids.  PostgreSQL gets
    the same request-id look-ups from a LATERAL join (:func:`_connector_requests`).
    """
    win = in_window(start_ns, end_ns)
    frames = []
    for value in connector_values(engine, start_ns, end_ns):
        label = value or LEGACY_CONNECTOR
        if label not in compared:
            continue
        stmt = _connector_requests(value, win, max_reads, max_requests,
                                   lateral=engine.dialect.name == "postgresql")
        df = fetch_frame(engine, stmt)
        df.insert(0, "connector", label)
        frames.append(df)
    cols = ["connector", "request_id", "name", "layer_kind", "spans", "descriptors", "bytes"]
    if not frames:
        return pd.DataFrame(columns=cols)
    df = pd.concat(frames, ignore_index=True)
    # Legacy spans (no attribute) and explicit "hybrid" ones are the same connector.
    df["layer_kind"] = df["layer_kind"].fillna("mixed")
    return df.groupby(cols[:4], as_index=False)[cols[4:]].sum()


# -------------------------------------------------------------------------- comparison


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
    "bytes_per_read": "bytes / READ",
    "descriptors": "descriptors / request",
    "bytes": "bytes / request",
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
