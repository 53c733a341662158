"""Overview: transfers over time, latency percentiles, bandwidth, bytes, failures.

Every number here is aggregated in SQL (``transfer_queries.transfer_stats`` /
``transfer_buckets`` / ``read_stats`` / ``failure_counts``): the page fetches a few hundred
rows however many spans the range holds.  The sidebar's host / engine-instance filter
applies to every figure; engines are labelled by role, rank and host.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from hybrid_pd.dashboard import common, display, figures, transfer_queries
from hybrid_pd.dashboard import instance_queries as iq
from hybrid_pd.dashboard.display import Col

GB = 1e9  # the queries' gbps is bytes per ns, i.e. decimal GB/s
# Per engine and D rank (``transfer_queries.transfer_stats``); the label names the rank.
PER_ENGINE_COLUMNS: dict[str, Col] = {
    "engine": Col("engine"),
    "transfers": Col("transfers", "count"),
    "failed": Col("failed", "count"),
    "bytes": Col("bytes", "bytes"),
    "p50_ms": Col("p50 (ms)", "ms"),
    "p99_ms": Col("p99 (ms)", "ms"),
    "gbps": Col("bandwidth", "rate", GB),
}
PAIR_COLUMNS: dict[str, Col] = {
    "P instance": Col("P instance"),
    "D instance": Col("D instance"),
    "transfers": Col("transfers", "count"),
    "errors": Col("errors", "count"),
    "bytes": Col("bytes"),  # already "3.00 MiB" (``iq.label_pairs``)
    "p50 (ms)": Col("p50 (ms)", "ms"),
    "p99 (ms)": Col("p99 (ms)", "ms"),
    "max (ms)": Col("max (ms)", "ms"),
    "GiB/s": Col("bandwidth", "rate", float(1 << 30)),
}
# READ spans per layer kind (``transfer_queries.read_stats``).
READ_COLUMNS: dict[str, Col] = {
    "layer_kind": Col("layer kind"),
    "reads": Col("READs", "count"),
    "bytes": Col("bytes", "bytes"),
    "p50_us": Col("p50 (ms)", "ms", 1e-3),
    "median_gbps": Col("median bandwidth", "rate", GB),
    "nixl_xfer_p50_us": Col("NIXL transfer p50 (ms)", "ms", 1e-3),
}


def summary(t: pd.Series, fails: dict[str, int]) -> None:
    """The range in three rows of three metrics: volume, latency, failures."""
    total_bytes = float(t["bytes"])
    busy_s = float(t["busy_ns"]) / 1e9
    common.metric_row([
        ("transfers", display.fmt_count(t["transfers"])),
        ("bytes moved", display.fmt_bin_bytes(total_bytes)),
        ("bandwidth", display.fmt_rate(total_bytes / busy_s if busy_s else None),
         "Bytes moved over the time spent in transfers: the bandwidth one transfer saw."),
    ])
    common.metric_row([
        ("latency p50", display.fmt_duration_ms(t["p50_ms"]),
         "Nearest-rank percentiles over every transfer of the range."),
        ("latency p90", display.fmt_duration_ms(t["p90_ms"])),
        ("latency p99", display.fmt_duration_ms(t["p99_ms"])),
    ])
    common.metric_row([
        ("failed", display.fmt_count(t["failed"]), "Transfers that ended ERROR."),
        ("stalled", display.fmt_count(fails["stalls"])),
        ("aborted", display.fmt_count(fails["aborts"])),
    ])


def pairs(db: str, start: int | None, end: int | None, engines: common.Engines) -> None:
    """Transfers, bytes and errors per (P instance, D instance)."""
    st.subheader("Per P–D instance pair")
    labelled = iq.label_pairs(common.transfer_pairs(db, start, end, engines),
                              common.engine_directory(db))
    st.caption("D instance: the engine of the transfer span; P instance: the engine it read "
               "from (`kv.peer_engine_id`). Errors: transfers that ended ERROR.")
    st.plotly_chart(figures.pair_bars(labelled), key="pair_bars")
    st.dataframe(display.table(iq.pair_table(labelled), PAIR_COLUMNS), hide_index=True,
                 key="pairs")


def body() -> None:
    db = common.require_db()
    start, end = common.sidebar_window(db)
    engines = common.sidebar_instances(db)
    st.title("KV transfers")
    total = common.transfer_stats(db, start, end, (), engines)
    if total.empty or int(total["transfers"].iloc[0]) == 0:
        st.info("No `kv.transfer` spans in this time range.")
        return
    summary(total.iloc[0], common.failure_counts(db, start, end, engines))
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
    st.dataframe(display.table(per, PER_ENGINE_COLUMNS), hide_index=True, key="per_rank")
    pairs(db, start, end, engines)
    rd = common.read_stats(db, start, end, engines)
    if not rd.empty:
        st.subheader("READ spans")
        if int(rd["reads"].sum()) >= transfer_queries.READS_MAX_ROWS:
            st.caption(f"Newest {transfer_queries.READS_MAX_ROWS:,} READ spans of the range "
                       "(narrow the time range to see others).")
        st.dataframe(display.table(rd, READ_COLUMNS), hide_index=True, key="reads_by_kind")


common.run_page(body)
