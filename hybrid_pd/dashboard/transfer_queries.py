"""Transfer, READ and failure queries: the Overview, Layers and Failures pages.

Whole-range figures are aggregated in SQL over ``ix_spans_transfer_cover`` (transfers),
``ix_spans_error_start_ns`` (failures) and ``ix_spans_name_start_ns`` (READs, stalls,
aborts); the row loads are windows of one span kind (see ``queries``).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from sqlalchemy import (
    ColumnElement,
    Engine,
    Float,
    Select,
    Subquery,
    case,
    cast,
    func,
    select,
    union_all,
)

from hybrid_pd.dashboard.queries import (
    DEFAULT_MAX_ROWS,
    WINDOW_COLS,
    Engines,
    add_derived,
    attr_cols,
    fetch_frame,
    for_engines,
    in_window,
    ranked,
    spans_by_name,
    sql_literal,
    sql_percentile,
    sql_sum,
)
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry.schema import span_attr, spans_table

_S = spans_table.c

# READ spans are ~90 % of a per-layer database; pages load the newest this many.
READS_MAX_ROWS = 20_000
# The Failures table shows the newest this many (its counts cover the whole range).
FAILURES_MAX_ROWS = 1_000
# Time buckets on the Overview charts: at most this many per range.
MAX_BUCKETS = 120


# ------------------------------------------------------------------------ span windows


def transfers(engine: Engine, start_ns: int | None = None, end_ns: int | None = None,
              limit: int = DEFAULT_MAX_ROWS, engines: Engines = None) -> pd.DataFrame:
    """Decode-side transfer spans (one per request and D rank) with outcome and reads."""
    return spans_by_name(engine, (A.SPAN_KV_TRANSFER,), start_ns, end_ns, limit,
                         (A.KV_STATUS, A.KV_READS, A.KV_PEER_ENGINE_ID, A.CONNECTOR), engines)


def reads(engine: Engine, start_ns: int | None = None, end_ns: int | None = None,
          limit: int = READS_MAX_ROWS, engines: Engines = None) -> pd.DataFrame:
    """READ spans (per layer with serve's ``--kv-read-granularity layer`` or bench's
    ``--granularity layer``) with NIXL's own timings."""
    return spans_by_name(engine, (A.SPAN_KV_READ,), start_ns, end_ns, limit,
                         (A.KV_STATUS, A.KV_NIXL_POST_US, A.KV_NIXL_XFER_US), engines)


FAILURE_ATTRS: tuple[str, ...] = (A.KV_STATUS, A.KV_FAILURE_REASON, A.KV_WAITED_MS)


def failures(engine: Engine, start_ns: int | None = None, end_ns: int | None = None,
             limit: int = FAILURES_MAX_ROWS, engines: Engines = None) -> pd.DataFrame:
    """Failed (status ERROR), stalled and aborted spans, newest first, at most ``limit``.

    Two index lookups: every ERROR span through the partial ``ix_spans_error_start_ns``
    (it holds only failed spans, so a whole-database range reads a few hundred entries
    of 10^6), and the stall/abort spans through ``ix_spans_name_start_ns``.  Without the
    partial index (a database made before it) the first one scans the table, ~1 s per
    10^6 spans.  ``engines``: ``queries.for_engines``.
    """
    win = [*in_window(start_ns, end_ns), *for_engines(engines)]
    cols = (*WINDOW_COLS, *attr_cols(FAILURE_ATTRS))
    errors = select(*cols).where(_S.status == sql_literal("ERROR"), *win)
    others = select(*cols).where(_S.name.in_((A.SPAN_KV_STALL, A.SPAN_KV_ABORT)),
                                 _S.status != sql_literal("ERROR"), *win)
    both = union_all(errors, others).subquery()
    df = fetch_frame(engine, select(both).order_by(both.c.start_ns.desc()).limit(limit))
    df = df.drop_duplicates(subset=["trace_id", "span_id"]).reset_index(drop=True)
    return add_derived(df)


def failure_counts(engine: Engine, start_ns: int | None = None,
                   end_ns: int | None = None, engines: Engines = None) -> dict[str, int]:
    """How many spans failed (``errors``), stalled and aborted in the range: three counts
    answered from the indexes alone (``ix_spans_error_start_ns``, ``ix_spans_name_start_ns``;
    the rows too when filtered by ``engines``)."""
    win = [*in_window(start_ns, end_ns), *for_engines(engines)]
    with engine.connect() as conn:
        errors = conn.execute(
            select(func.count()).select_from(spans_table).where(_S.status == sql_literal("ERROR"), *win)
        ).scalar() or 0
        by_name = dict(conn.execute(
            select(_S.name, func.count())
            .where(_S.name.in_((A.SPAN_KV_STALL, A.SPAN_KV_ABORT)), *win)
            .group_by(_S.name)
        ).all())
    return {"errors": int(errors), "stalls": int(by_name.get(A.SPAN_KV_STALL, 0)),
            "aborts": int(by_name.get(A.SPAN_KV_ABORT, 0))}


# ----------------------------------------------------------------- transfer aggregates


def _transfer_rows(*where: ColumnElement[bool], bucket: ColumnElement[Any] | None = None) -> Select[Any]:
    """Transfer spans, only columns of ``ix_spans_transfer_cover`` (so no row is read)."""
    cols: list[Any] = [_S.start_ns, _S.duration_ns, _S.status, _S.bytes, _S.engine_id,
                       _S.rank, _S.request_id]
    if bucket is not None:
        cols.append(bucket.label("bucket"))
    return select(*cols).where(_S.name == sql_literal(A.SPAN_KV_TRANSFER), *where)


def _transfer_derived(df: pd.DataFrame) -> pd.DataFrame:
    for p in ("p50", "p90", "p99", "max"):
        if f"{p}_ns" in df:
            df[f"{p}_ms"] = pd.to_numeric(df[f"{p}_ns"]) / 1e6
    if "busy_ns" in df:
        busy = pd.to_numeric(df["busy_ns"])
        df["gbps"] = pd.to_numeric(df["bytes"]) / busy.where(busy > 0)  # bytes/ns == GB/s
    return df


def transfer_aggregates(r: Subquery, failed: str = "failed",
                        percentiles: tuple[int, ...] = (50, 90, 99)) -> list[ColumnElement[Any]]:
    """Per group of ``r`` (a ``queries.ranked`` transfer subquery): transfers, ``failed``
    (status ERROR), bytes, busy_ns (sum of durations), the nearest-rank ``percentiles``
    and the max of the duration (``p<N>_ns``, ``max_ns``)."""
    return [
        func.count().label("transfers"),
        func.coalesce(func.sum(case((r.c.status == "ERROR", 1), else_=0)), 0).label(failed),
        func.coalesce(sql_sum(r.c.bytes), 0).label("bytes"),
        func.coalesce(sql_sum(r.c.duration_ns), 0).label("busy_ns"),
        *[sql_percentile(r, "duration_ns", p).label(f"p{p}_ns") for p in percentiles],
        func.max(r.c.duration_ns).label("max_ns"),
    ]


def transfer_stats(engine: Engine, start_ns: int | None = None, end_ns: int | None = None,
                   by: tuple[str, ...] = ("engine_id", "rank"),
                   engines: Engines = None) -> pd.DataFrame:
    """Transfer spans aggregated per ``by`` (``()``: one row for the whole range).

    Columns: ``by``, transfers, failed (status ERROR), bytes, busy_ns (sum of durations),
    p50/p90/p99/max of the duration in ns and ms, gbps (bytes over busy time).  One SQL
    statement over ``ix_spans_transfer_cover``; an empty range gives one row of 0 when
    ``by`` is ``()`` and no row otherwise.
    """
    base = _transfer_rows(*in_window(start_ns, end_ns), *for_engines(engines)).subquery()
    r = ranked(base, by, ("duration_ns",))
    keys = [r.c[k] for k in by]
    stmt = select(*keys, *transfer_aggregates(r))
    if keys:
        stmt = stmt.group_by(*keys).order_by(*keys)
    return _transfer_derived(fetch_frame(engine, stmt))


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
                     max_buckets: int = MAX_BUCKETS, engines: Engines = None) -> pd.DataFrame:
    """Transfers in [lo_ns, hi_ns] bucketed by start time (in SQL) per engine and D rank.

    Columns: start (bucket start, UTC), width_ns, engine_id, rank, transfers, failed,
    bytes, p50/max of the duration (ns, ms) and ``slowest_request`` (the request id of
    the bucket's slowest transfer, so an outlier leads to its timeline).
    """
    width = bucket_width_ns(hi_ns - lo_ns, max_buckets)
    bucket = (_S.start_ns - lo_ns) // width
    base = _transfer_rows(_S.start_ns >= lo_ns, _S.start_ns <= hi_ns, *for_engines(engines),
                          bucket=bucket).subquery()
    keys = ("bucket", "engine_id", "rank")
    r = ranked(base, keys, ("duration_ns",))
    stmt = (
        select(
            *[r.c[k] for k in keys],
            func.count().label("transfers"),
            func.coalesce(func.sum(case((r.c.status == "ERROR", 1), else_=0)), 0).label("failed"),
            func.coalesce(sql_sum(r.c.bytes), 0).label("bytes"),
            sql_percentile(r, "duration_ns", 50).label("p50_ns"),
            func.max(r.c.duration_ns).label("max_ns"),
            func.max(case((r.c._rn_duration_ns == r.c._n_duration_ns, r.c.request_id)))
            .label("slowest_request"),
        )
        .group_by(*[r.c[k] for k in keys])
        .order_by(*[r.c[k] for k in keys])
    )
    df = _transfer_derived(fetch_frame(engine, stmt))
    df["width_ns"] = width
    df["start"] = pd.to_datetime(lo_ns + df["bucket"].astype("int64") * width, unit="ns", utc=True)
    return df


def read_stats(engine: Engine, start_ns: int | None = None, end_ns: int | None = None,
               limit: int = READS_MAX_ROWS, engines: Engines = None) -> pd.DataFrame:
    """The newest ``limit`` READ spans of the range, per layer kind: reads, bytes, p50
    latency (µs), median GB/s and NIXL's median transfer time (µs); aggregated in SQL."""
    base = (
        select(
            _S.layer_kind, _S.duration_ns, _S.bytes,
            (cast(_S.bytes, Float) / func.nullif(_S.duration_ns, 0)).label("gbps"),
            span_attr(A.KV_NIXL_XFER_US, numeric=True).label("xfer_us"),
        )
        .where(_S.name == A.SPAN_KV_READ, *in_window(start_ns, end_ns), *for_engines(engines))
        .order_by(_S.start_ns.desc())
        .limit(limit)
        .subquery()
    )
    r = ranked(base, ("layer_kind",), ("duration_ns", "gbps", "xfer_us"))
    stmt = (
        select(
            r.c.layer_kind,
            func.count().label("reads"),
            func.coalesce(sql_sum(r.c.bytes), 0).label("bytes"),
            (sql_percentile(r, "duration_ns", 50) / 1e3).label("p50_us"),
            sql_percentile(r, "gbps", 50).label("median_gbps"),
            sql_percentile(r, "xfer_us", 50).label("nixl_xfer_p50_us"),
        )
        .group_by(r.c.layer_kind)
        .order_by(r.c.layer_kind)
    )
    return fetch_frame(engine, stmt)
