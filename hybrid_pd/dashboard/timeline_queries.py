"""The Request timeline page: requests to pick from, and every span of one request."""

from __future__ import annotations

from typing import Literal

import pandas as pd
from sqlalchemy import Engine, case, func, select, union_all
from sqlalchemy.sql.selectable import CompoundSelect

from hybrid_pd.dashboard.queries import (
    SPAN_COLS,
    Engines,
    add_derived,
    fetch_frame,
    for_engines,
    parse_attributes,
    sql_literal,
    sql_sum,
)
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry.schema import spans_table

_S = spans_table.c

RequestOrder = Literal["latest", "slowest"]


def request_list(engine: Engine, order: RequestOrder = "latest", limit: int = 200,
                 engines: Engines = None) -> pd.DataFrame:
    """Requests that had a KV transfer: id, first start, slowest transfer, bytes, errors.

    Grouped over transfer spans only, from ``ix_spans_transfer_cover`` (a partial index
    holding just those spans and the columns read here), so no table row is visited
    unless filtered by ``engines`` (``queries.for_engines``: those transfers only).
    """
    dur = func.max(_S.duration_ns).label("duration_ns")
    stmt = (
        select(
            _S.request_id,
            func.min(_S.start_ns).label("start_ns"),
            dur,
            sql_sum(_S.bytes).label("bytes"),
            func.count().label("transfers"),
            func.sum(case((_S.status == "ERROR", 1), else_=0)).label("errors"),
        )
        .where(_S.name == sql_literal(A.SPAN_KV_TRANSFER), _S.request_id.is_not(None),
               *for_engines(engines))
        .group_by(_S.request_id)
        # request_id breaks ties, so both backends list equal requests in one order.
        .order_by(dur.desc() if order == "slowest" else func.min(_S.start_ns).desc(),
                  _S.request_id)
        .limit(limit)
    )
    df = fetch_frame(engine, stmt)
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
    own = select(*SPAN_COLS).where(_S.request_id == request_id)
    traces = select(_S.trace_id).where(_S.request_id == request_id).scalar_subquery()
    same_trace = select(*SPAN_COLS).where(_S.trace_id.in_(traces))
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
    df = fetch_frame(engine, timeline_statement(request_id))
    if df.empty:
        return add_derived(parse_attributes(df, TIMELINE_ATTRS))
    hs = (
        select(*SPAN_COLS)
        .where(_S.name == A.SPAN_KV_HANDSHAKE, _S.start_ns <= int(df["end_ns"].max()))
        .order_by(_S.start_ns.desc())
        .limit(handshakes)
    )
    hs_df = fetch_frame(engine, hs)
    if not hs_df.empty:
        engines = set(df["engine_id"].dropna())
        hs_df = hs_df[hs_df["engine_id"].isin(engines)]
        hs_df = hs_df.drop_duplicates(subset=["engine_id", "peer_rank"], keep="first")
        df = pd.concat([hs_df, df], ignore_index=True) if not hs_df.empty else df
    # Ids break start-time ties (the handshakes of all D ranks start together), so the
    # rows come in one order whatever order the backend returned them in.
    df = df.drop_duplicates(subset=["trace_id", "span_id"])
    df = df.sort_values(["start_ns", "trace_id", "span_id"])
    df = df.reset_index(drop=True)
    return add_derived(parse_attributes(df, TIMELINE_ATTRS))
