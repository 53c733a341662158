"""Overview: transfers over time, latency percentiles, bandwidth, bytes, failures.

Every number here is aggregated in SQL (``transfer_queries.transfer_stats`` /
``transfer_buckets`` / ``read_stats`` / ``failure_counts``): the page fetches a few hundred
rows however many spans the range holds.  The sidebar's host / engine-instance filter
applies to every figure; engines are labelled by role, rank and host.
"""

from __future__ import annotations

import streamlit as st

from hybrid_pd.dashboard import common, figures, transfer_queries
from hybrid_pd.dashboard import instance_queries as iq


def pairs(db: str, start: int | None, end: int | None, engines: common.Engines) -> None:
    """Transfers, bytes and errors per (P instance, D instance)."""
    st.subheader("Per P–D instance pair")
    labelled = iq.label_pairs(common.transfer_pairs(db, start, end, engines),
                              common.engine_directory(db))
    st.caption("D instance: the engine of the transfer span; P instance: the engine it read "
               "from (`kv.peer_engine_id`). Errors: transfers that ended ERROR.")
    st.plotly_chart(figures.pair_bars(labelled), key="pair_bars")
    st.dataframe(iq.pair_table(labelled), hide_index=True, key="pairs")


def body() -> None:
    db = common.require_db()
    start, end = common.sidebar_window(db)
    engines = common.sidebar_instances(db)
    st.title("KV transfers")
    total = common.transfer_stats(db, start, end, (), engines)
    if total.empty or int(total["transfers"].iloc[0]) == 0:
        st.info("No `kv.transfer` spans in this time range.")
        return
    t = total.iloc[0]
    fails = common.failure_counts(db, start, end, engines)
    total_bytes = float(t["bytes"])
    busy_s = float(t["busy_ns"]) / 1e9
    c = st.columns(7)
    c[0].metric("transfers", f"{int(t['transfers']):,}")
    c[1].metric("latency p50", f"{t['p50_ms']:,.2f} ms",
                help="Nearest-rank percentiles over every transfer of the range.")
    c[2].metric("latency p90", f"{t['p90_ms']:,.2f} ms")
    c[3].metric("latency p99", f"{t['p99_ms']:,.2f} ms")
    c[4].metric("bytes moved", common.fmt_bytes(total_bytes))
    # Bytes over time spent in transfers: the per-transfer bandwidth seen by a request.
    c[5].metric("GB/s (per transfer)", f"{total_bytes / 1e9 / busy_s:,.3f}" if busy_s else "–")
    c[6].metric("failed / stalled / aborted",
                f"{int(t['failed'])} / {fails['stalls']} / {fails['aborts']}")
    st.caption(
        "Dropped spans are counted in `hybrid_pd_telemetry_spans_dropped_total{sink,reason}` "
        "(Prometheus) and table `telemetry_drops`; a banner above says when the range has any."
    )
    directory = common.engine_directory(db)
    buckets = iq.label_engines(common.transfer_buckets(db, start, end, engines), directory)
    left, right = st.columns(2)
    with left:
        st.subheader("Transfer latency over time")
        st.plotly_chart(figures.latency_over_time(buckets), key="latency_over_time")
    with right:
        st.subheader("Bytes on the wire")
        st.plotly_chart(figures.throughput_bars(buckets), key="throughput")
    st.subheader("Per engine and D rank")
    per = iq.label_engines(common.transfer_stats(db, start, end, engines=engines), directory)
    st.dataframe(
        per[["engine", "transfers", "p50_ms", "p99_ms", "bytes", "failed", "gbps", "engine_id",
             "rank"]].rename(columns={"gbps": "GB/s"}),
        hide_index=True, key="per_rank",
    )
    pairs(db, start, end, engines)
    rd = common.read_stats(db, start, end, engines)
    if not rd.empty:
        st.subheader("READ spans")
        if int(rd["reads"].sum()) >= transfer_queries.READS_MAX_ROWS:
            st.caption(f"Newest {transfer_queries.READS_MAX_ROWS:,} READ spans of the range "
                       "(narrow the time range to see others).")
        st.dataframe(rd, hide_index=True, key="reads_by_kind")


common.run_page(body)
