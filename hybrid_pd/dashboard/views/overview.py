"""Overview: transfers over time, latency percentiles, bandwidth, bytes, failures."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from hybrid_pd.dashboard import common, figures, queries
from hybrid_pd.telemetry import attributes as A


def body() -> None:
    db = common.require_db()
    start, end = common.sidebar_window(db)
    tr = common.transfers(db, start, end)
    st.title("KV transfers")
    if tr.empty:
        st.info("No `kv.transfer` spans in this time range.")
        return
    fails = common.failures(db, start, end)
    lat = tr["duration_ms"]
    total_bytes = float(tr["bytes"].fillna(0).sum())
    busy_s = float(tr["duration_ns"].sum()) / 1e9
    n_err = int((tr["status"] == "ERROR").sum())
    aborts = int((fails["name"] == A.SPAN_KV_ABORT).sum()) if not fails.empty else 0
    stalls = int((fails["name"] == A.SPAN_KV_STALL).sum()) if not fails.empty else 0
    c = st.columns(7)
    c[0].metric("transfers", f"{len(tr):,}")
    c[1].metric("latency p50", f"{lat.quantile(0.5):,.2f} ms")
    c[2].metric("latency p90", f"{lat.quantile(0.9):,.2f} ms")
    c[3].metric("latency p99", f"{lat.quantile(0.99):,.2f} ms")
    c[4].metric("bytes moved", common.fmt_bytes(total_bytes))
    # Bytes over time spent in transfers: the per-transfer bandwidth seen by a request.
    c[5].metric("GB/s (per transfer)", f"{total_bytes / 1e9 / busy_s:,.3f}" if busy_s else "–")
    c[6].metric("failed / stalled / aborted", f"{n_err} / {stalls} / {aborts}")
    st.caption(
        "Dropped spans are never in the database: the writer counts them in "
        "`hybrid_pd_telemetry_spans_dropped_total{sink,reason}` (Prometheus) and the "
        "`hybrid-pd bench` report (`spans_dropped`)."
    )
    left, right = st.columns(2)
    with left:
        st.subheader("Transfer latency over time")
        st.plotly_chart(figures.latency_scatter(tr), key="latency_scatter")
    with right:
        st.subheader("Bytes on the wire")
        st.plotly_chart(figures.throughput_bars(tr), key="throughput")
    st.subheader("Per engine and D rank")
    per = (
        tr.assign(bytes=tr["bytes"].fillna(0), err=(tr["status"] == "ERROR").astype(int))
        .groupby(["engine_id", "rank"], dropna=False)
        .agg(transfers=("span_id", "count"), p50_ms=("duration_ms", "median"),
             p99_ms=("duration_ms", lambda s: s.quantile(0.99)), bytes=("bytes", "sum"),
             busy_ns=("duration_ns", "sum"), failed=("err", "sum"))
        .reset_index()
    )
    per["GB/s"] = per["bytes"] / per["busy_ns"].where(per["busy_ns"] > 0)
    st.dataframe(per.drop(columns=["busy_ns"]), hide_index=True, key="per_rank")
    rd = common.reads(db, start, end)
    if not rd.empty:
        st.subheader("READ spans")
        if len(rd) >= queries.READS_MAX_ROWS:
            st.caption(f"Newest {queries.READS_MAX_ROWS:,} READ spans of the range "
                       "(narrow the time range to see others).")
        k = rd.groupby("layer_kind", dropna=False).agg(
            reads=("span_id", "count"), bytes=("bytes", "sum"),
            p50_us=("duration_us", "median"), median_gbps=("gbps", "median"),
            nixl_xfer_p50_us=(A.KV_NIXL_XFER_US, lambda s: pd.to_numeric(s).median()),
        ).reset_index()
        st.dataframe(k, hide_index=True, key="reads_by_kind")


common.run_page(body)
