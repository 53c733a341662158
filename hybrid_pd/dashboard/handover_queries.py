"""Handover queries: a P/D request's time to first token (TTFT), phase by phase.

For every request it routes through P and D, the proxy writes twelve
``hybrid_pd.ttft.<phase>`` spans (children of its ``hybrid_pd.proxy.request`` span, same
trace) that tile [request received, first token sent] without gaps, in the order of
``attributes.TTFT_PHASES``; each carries the phase, its index, the request's TTFT, its
prompt tokens (when known) and whether it waited for a NIXL handshake.

A request is its (trace_id, request_id) pair, placed in time by its first phase
(``router_receive``): a time range holds the requests whose first phase started in it,
each whole, even when its last phases end after the range.  The host / engine filter
keeps the requests whose KV transfer (``kv.transfer`` spans of the same request id) ran on,
or read from, a picked engine (``queries.for_engines``).

Everything is derived from one load (:func:`phase_spans`): a row per request and phase
for the newest ``MAX_REQUESTS`` requests of the range (like the Layers page's newest READs:
the nearest-rank percentiles of the other pages cost a window-function sort per query, and
three of them over 10^5 phase spans took seconds), then per-request tables, the transfer's
share, and the nearest-rank p50/p90/p99 of every phase per prompt-length bucket and per
time bucket, in pandas.  One request's phases are looked up by its id (any range).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from sqlalchemy import ColumnElement, Engine, Select, and_, case, func, select

from hybrid_pd.dashboard.queries import (
    Engines,
    attr_cols,
    fetch_frame,
    for_engines,
    in_window,
    sql_literal,
)
from hybrid_pd.dashboard.transfer_queries import bucket_width_ns
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry.schema import span_attr, spans_table

_S = spans_table.c

PREFIX = A.SPAN_TTFT_ROUTER_RECEIVE.rsplit(".", 1)[0] + "."  # "hybrid_pd.ttft."
PHASES: tuple[str, ...] = A.TTFT_PHASES
PHASE_SPANS: tuple[str, ...] = tuple(PREFIX + p for p in PHASES)
PHASE_INDEX: dict[str, int] = {p: i for i, p in enumerate(PHASES)}
# What each phase is (attributes' registry, for hovers and the phase table).
MEANINGS: dict[str, str] = {p: A._TTFT_MEANINGS[PREFIX + p] for p in PHASES}
# The KV transfer's part of the TTFT: handshake wait, descriptors + posts, READs in flight.
TRANSFER_PHASES: tuple[str, ...] = ("handshake", "read_post", "read_in_flight")
# Where each phase runs: the proxy (and its HTTP hops), P, the KV transfer, D.
PHASE_WHERE: dict[str, str] = {
    "router_receive": "proxy", "p_queue": "P", "p_prefill": "P", "p_answer": "proxy",
    "router_to_d": "proxy", "d_queue": "D", "handshake": "transfer", "read_post": "transfer",
    "read_in_flight": "transfer", "completion_noticed": "D", "d_first_step": "D",
    "first_token_sent": "proxy",
}
PERCENTILES: tuple[int, ...] = (50, 90, 99)
# The per-request rows cover the newest this many requests of the range (12 rows each:
# 24,000 rows, about the Layers page's READ window).
MAX_REQUESTS = 2_000
# Time buckets of the "over time" chart: at most this many per range.
MAX_BUCKETS = 60

# Prompt-length buckets: label, upper bound (exclusive) in tokens; k = 1,024 tokens.
K_TOKENS = 1024
SIZE_BUCKETS: tuple[tuple[str, int | None], ...] = (
    ("<1k", K_TOKENS), ("1k-4k", 4 * K_TOKENS), ("4k-16k", 16 * K_TOKENS),
    ("16k-64k", 64 * K_TOKENS), (">=64k", None),
)
UNKNOWN_SIZE = "unknown"  # the phase spans did not say how long the prompt was
SIZE_ORDER: tuple[str, ...] = (*(label for label, _ in SIZE_BUCKETS), UNKNOWN_SIZE)

# Attributes read from the JSON (in SQL): the request's, once per request (every phase
# carries the same), and the phase's own.  Phase name and index come from the span name
# (the contract makes ``hybrid_pd.ttft.phase`` / ``.index`` equal to it): one JSON read per
# row and attribute is most of a load, on PostgreSQL even more.
REQUEST_ATTRS: tuple[str, ...] = (A.TTFT_MS, A.GEN_AI_USAGE_INPUT_TOKENS, A.TTFT_COLD)
PHASE_ATTRS: tuple[str, ...] = (A.TTFT_SKEW_NS,)
PHASE_COLUMNS: tuple[str, ...] = (
    "trace_id", "request_id", "phase", "index", "start_ns", "end_ns", "dur_ms", "offset_ms",
    "ttft_ms", "input_tokens", "cold", "skew_ns", "req_start_ns", "size",
)


def size_bucket(tokens: Any) -> str:
    """The prompt-length bucket of ``tokens`` (``unknown`` when missing)."""
    if tokens is None or pd.isna(tokens):
        return UNKNOWN_SIZE
    for label, hi in SIZE_BUCKETS:
        if hi is None or float(tokens) < hi:
            return label
    raise AssertionError("unreachable: the last bucket has no bound")


def _size_sql(tokens: ColumnElement[Any]) -> ColumnElement[Any]:
    """:func:`size_bucket` in SQL."""
    whens: list[tuple[ColumnElement[bool], str]] = [(tokens.is_(None), UNKNOWN_SIZE)]
    whens += [(tokens < hi, label) for label, hi in SIZE_BUCKETS if hi is not None]
    return case(*whens, else_=SIZE_BUCKETS[-1][0])


def _for_engines(engines: Engines) -> list[ColumnElement[bool]]:
    """Requests whose transfer involved one of ``engines`` (None: no filter)."""
    if engines is None:
        return []
    moved = (select(_S.request_id)
             .where(_S.name == sql_literal(A.SPAN_KV_TRANSFER), _S.request_id.is_not(None),
                    *for_engines(engines))
             .correlate(None))
    return [_S.request_id.in_(moved)]


def _request_keys(start_ns: int | None, end_ns: int | None, engines: Engines,
                  attrs: tuple[str, ...] = ()) -> Select[Any]:
    """One row per request: its first phase's span (``ix_spans_name_start_ns``) with the
    request's start, prompt-length bucket and the attributes ``attrs``."""
    tokens = span_attr(A.GEN_AI_USAGE_INPUT_TOKENS, numeric=True)
    return (
        select(_S.trace_id, _S.request_id, _S.start_ns.label("req_start_ns"),
               _size_sql(tokens).label("size"), *attr_cols(attrs))
        .where(_S.name == A.SPAN_TTFT_ROUTER_RECEIVE, *in_window(start_ns, end_ns),
               *_for_engines(engines))
    )


def _phases_of(keys: Any, *cols: Any) -> Select[Any]:
    """The phase spans of the requests in subquery ``keys`` (ix_spans_trace_id)."""
    on = and_(_S.trace_id == keys.c.trace_id, _S.request_id == keys.c.request_id)
    return select(*cols).select_from(spans_table.join(keys, on)).where(_S.name.in_(PHASE_SPANS))


# ------------------------------------------------------------------------- row loads


def _finish(df: pd.DataFrame) -> pd.DataFrame:
    """Typed columns, phase and index from the name, per-request offsets."""
    if df.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in PHASE_COLUMNS})
    df = df.rename(columns={A.TTFT_MS: "ttft_ms", A.GEN_AI_USAGE_INPUT_TOKENS: "input_tokens",
                            A.TTFT_COLD: "cold", A.TTFT_SKEW_NS: "skew_ns"})
    df["phase"] = df["name"].str.removeprefix(PREFIX)
    df["index"] = df["phase"].map(PHASE_INDEX).astype("int64")
    df["dur_ms"] = pd.to_numeric(df["duration_ns"]) / 1e6
    for c in ("ttft_ms", "input_tokens", "skew_ns"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    # JSON true: True on PostgreSQL, 1 on SQLite; absent: not cold.
    df["cold"] = df["cold"].map(lambda v: bool(v) if v is not None and not pd.isna(v) else False)
    key = ["trace_id", "request_id"]
    if "req_start_ns" not in df:
        df["req_start_ns"] = df.groupby(key)["start_ns"].transform("min")
    if "size" not in df:
        df["size"] = [size_bucket(t) for t in df.groupby(key)["input_tokens"].transform("max")]
    df["offset_ms"] = (df["start_ns"] - df["req_start_ns"]) / 1e6
    df = df.sort_values(["req_start_ns", "trace_id", "request_id", "index"],
                        ascending=[False, True, True, True], kind="stable")
    return df[list(PHASE_COLUMNS)].reset_index(drop=True)


def phase_spans(engine: Engine, start_ns: int | None = None, end_ns: int | None = None,
                engines: Engines = None, limit: int = MAX_REQUESTS) -> pd.DataFrame:
    """One row per request and phase for the newest ``limit`` requests of the range.

    Columns: ``PHASE_COLUMNS`` -- ids, phase name and index (0..11), the span's times,
    its duration (``dur_ms``) and start offset from the request's first phase
    (``offset_ms``), the request's TTFT, prompt tokens (NaN when unknown), ``cold``,
    ``skew_ns``, the request's start and prompt-length bucket (``size``).  Newest request
    first, its phases in order.
    """
    keys = (_request_keys(start_ns, end_ns, engines, REQUEST_ATTRS)
            .order_by(_S.start_ns.desc(), _S.trace_id, _S.request_id).limit(limit).subquery())
    stmt = _phases_of(keys, _S.trace_id, _S.request_id, _S.name, _S.start_ns, _S.end_ns,
                      _S.duration_ns, keys.c.req_start_ns, keys.c.size,
                      *[keys.c[k] for k in REQUEST_ATTRS], *attr_cols(PHASE_ATTRS))
    return _finish(fetch_frame(engine, stmt))


def request_phases(engine: Engine, request_id: str) -> pd.DataFrame:
    """The phase rows (``PHASE_COLUMNS``) of request ``request_id``, whatever the range
    (``ix_spans_request_id_start_ns``); of its newest trace when the id was used twice."""
    stmt = (select(_S.trace_id, _S.request_id, _S.name, _S.start_ns, _S.end_ns, _S.duration_ns,
                   *attr_cols(REQUEST_ATTRS + PHASE_ATTRS))
            .where(_S.request_id == request_id, _S.name.in_(PHASE_SPANS)))
    df = _finish(fetch_frame(engine, stmt))
    if df.empty:
        return df
    newest = df.iloc[0]["trace_id"]  # _finish sorts the newest request first
    return df[df["trace_id"] == newest].reset_index(drop=True)


def request_instances(engine: Engine, request_ids: tuple[str, ...]) -> pd.DataFrame:
    """Per request id, the D engine of its transfer and the P engine it read from
    (``d_engine_id``, ``p_engine_id``; the smallest id when there were several)."""
    stmt = (
        select(_S.request_id, func.min(_S.engine_id).label("d_engine_id"),
               func.min(span_attr(A.KV_PEER_ENGINE_ID)).label("p_engine_id"))
        .where(_S.name == sql_literal(A.SPAN_KV_TRANSFER), _S.request_id.in_(request_ids))
        .group_by(_S.request_id)
        .order_by(_S.request_id)
    )
    return fetch_frame(engine, stmt)


# ------------------------------------------------------------------ per-request tables


def nearest_rank(values: pd.Series, p: int) -> float | None:
    """The ceil(p/100 * n)-th smallest non-missing value (as the SQL percentiles)."""
    v = pd.to_numeric(values, errors="coerce").dropna().sort_values().to_numpy()
    return float(v[(p * len(v) + 99) // 100 - 1]) if len(v) else None


def requests(phases: pd.DataFrame) -> pd.DataFrame:
    """One row per request of :func:`phase_spans` rows, newest first.

    Columns: trace_id, request_id, req_start_ns, start (UTC), ttft_ms (the attribute, else
    the sum of the phases), phases_ms (the sum), phases (count), input_tokens, size, cold,
    transfer_ms (``TRANSFER_PHASES``), transfer_share (transfer_ms / ttft_ms), and one
    column per phase with its duration in ms.
    """
    cols = ["trace_id", "request_id", "req_start_ns", "start", "ttft_ms", "phases_ms", "phases",
            "input_tokens", "size", "cold", "transfer_ms", "transfer_share", *PHASES]
    if phases.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in cols})
    key = ["trace_id", "request_id"]
    g = phases.groupby(key, sort=False)
    out = g.agg(req_start_ns=("req_start_ns", "min"), ttft_attr=("ttft_ms", "max"),
                phases_ms=("dur_ms", "sum"), phases=("phase", "size"),
                input_tokens=("input_tokens", "max"), size=("size", "first"),
                cold=("cold", "any"))
    per = phases.pivot_table(index=key, columns="phase", values="dur_ms", aggfunc="sum")
    out = out.join(per.reindex(columns=list(PHASES)))
    out["ttft_ms"] = out["ttft_attr"].fillna(out["phases_ms"])
    out["transfer_ms"] = out[list(TRANSFER_PHASES)].fillna(0).sum(axis=1)
    ttft = out["ttft_ms"].where(out["ttft_ms"] > 0)
    out["transfer_share"] = out["transfer_ms"] / ttft
    out["start"] = pd.to_datetime(out["req_start_ns"], unit="ns", utc=True)
    out = out.reset_index().sort_values(["req_start_ns", "trace_id", "request_id"],
                                        ascending=[False, True, True], kind="stable")
    return out[cols].reset_index(drop=True)


def summary(reqs: pd.DataFrame) -> dict[str, float | int | None]:
    """Requests, cold ones, TTFT and transfer-share percentiles (``ttft_p50``,
    ``share_p90``...) over :func:`requests` rows."""
    out: dict[str, float | int | None] = {"requests": len(reqs),
                                          "cold": int(reqs["cold"].sum()) if len(reqs) else 0}
    for p in PERCENTILES:
        out[f"ttft_p{p}"] = nearest_rank(reqs["ttft_ms"], p)
        out[f"share_p{p}"] = nearest_rank(reqs["transfer_share"], p)
    return out


# ----------------------------------------------------------------------- percentiles


def _percentiles(phases: pd.DataFrame, by: tuple[str, ...]) -> pd.DataFrame:
    """Nearest-rank p50/p90/p99 of ``dur_ms`` per ``by`` and phase (vectorised: each
    group sorted once, the value at rank ceil(p/100 * n) picked, as the SQL of the other
    pages does with window functions)."""
    keys = [*by, "phase"]
    cols = [*keys, "index", "where", "requests", *(f"p{p}_ms" for p in PERCENTILES)]
    if phases.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in cols})
    d = phases[[*keys, "dur_ms"]].sort_values([*keys, "dur_ms"], kind="stable")
    g = d.groupby(keys, sort=False)
    rank = g.cumcount() + 1
    n = g["dur_ms"].transform("size")
    out = g.size().rename("requests").to_frame()
    for p in PERCENTILES:
        picked = d[rank == (p * n + 99) // 100]
        out[f"p{p}_ms"] = picked.set_index(keys)["dur_ms"]
    out = out.reset_index()
    out["index"] = out["phase"].map(PHASE_INDEX)
    out["where"] = out["phase"].map(PHASE_WHERE)
    return out[cols]


def phase_percentiles(phases: pd.DataFrame, by_size: bool = True) -> pd.DataFrame:
    """p50/p90/p99 of each phase's duration over the requests of :func:`phase_spans`
    rows, per prompt-length bucket (``by_size``; only buckets with requests, in
    ``SIZE_ORDER``) or overall.

    Columns: [size,] phase, index, where, requests, p50_ms, p90_ms, p99_ms.
    """
    df = _percentiles(phases, ("size",) if by_size else ())
    order = ["index"]
    if by_size:
        df["size_rank"] = df["size"].map({s: i for i, s in enumerate(SIZE_ORDER)})
        order = ["size_rank", "index"]
    df = df.sort_values(order, kind="stable").drop(columns=["size_rank"], errors="ignore")
    return df.reset_index(drop=True)


def phase_buckets(phases: pd.DataFrame, max_buckets: int = MAX_BUCKETS) -> pd.DataFrame:
    """p50/p90/p99 of each phase's duration per time bucket of the requests' start, over
    the requests of :func:`phase_spans` rows (round widths, at most ``max_buckets``
    between the first and the last request: ``transfer_queries.bucket_width_ns``).

    Columns: bucket, phase, index, where, requests, p50/p90/p99_ms, width_ns, start (the
    bucket's start, UTC); in time then phase order.
    """
    if phases.empty:
        df = _percentiles(phases.assign(bucket=pd.Series(dtype="int64")), ("bucket",))
        return df.assign(width_ns=pd.Series(dtype="int64"), start=pd.Series(dtype=object))
    lo, hi = int(phases["req_start_ns"].min()), int(phases["req_start_ns"].max())
    width = bucket_width_ns(hi - lo, max_buckets)
    df = _percentiles(phases.assign(bucket=(phases["req_start_ns"] - lo) // width), ("bucket",))
    df["width_ns"] = width
    df["start"] = pd.to_datetime(lo + df["bucket"].astype("int64") * width, unit="ns", utc=True)
    return df.sort_values(["bucket", "index"], kind="stable").reset_index(drop=True)


def long_percentiles(stats: pd.DataFrame) -> pd.DataFrame:
    """:func:`phase_percentiles` / :func:`phase_buckets` rows melted to one row per
    percentile (column ``percentile``: ``p50``...; the duration in ``ms``)."""
    stat_cols = {f"p{p}_{unit}" for p in PERCENTILES for unit in ("ns", "ms")}
    ids = [c for c in stats.columns if c not in stat_cols]
    long = stats.melt(id_vars=ids, value_vars=[f"p{p}_ms" for p in PERCENTILES],
                      var_name="percentile", value_name="ms")
    long["percentile"] = long["percentile"].str.removesuffix("_ms")
    return long
