"""Layers: per-layer READ latency and bandwidth across requests, heat map, outliers."""

from __future__ import annotations

import streamlit as st

from hybrid_pd.dashboard import common, display, figures, transfer_queries
from hybrid_pd.dashboard import instance_queries as iq
from hybrid_pd.dashboard.display import Col

# Both ways to get per-layer READ spans: most people look at a served model, not the bench.
NO_LAYERS_HINT = (
    "No per-layer READ spans in this range: by default each request's KV is read in one "
    "READ per P rank, without layers. For one READ span per layer, serve with "
    "`hybrid-pd serve ... --kv-read-granularity layer|sampled:K` (`sampled:K`: per layer "
    "for one request in K) or bench with `hybrid-pd bench ... --granularity layer`."
)
OUTLIER_COLUMNS: dict[str, Col] = {
    "request_id": Col("request"),
    "timeline": Col("timeline"),
    "engine": Col("engine"),
    "layer": Col("layer", "count"),
    "layer_kind": Col("layer kind"),
    "peer_rank": Col("P rank", "count"),
    "bytes": Col("bytes", "bytes"),
    "duration_us": Col("latency (ms)", "ms", 1e-3),
    "gbps": Col("bandwidth", "rate", 1e9),
}


def body() -> None:
    db = common.require_db()
    start, end = common.sidebar_window(db)
    engines = common.sidebar_instances(db)
    st.title("Per-layer transfers")
    rd = common.reads(db, start, end, engines)
    rd = rd[rd["layer"].notna()] if not rd.empty else rd
    if rd.empty:
        st.info(NO_LAYERS_HINT)
        return
    st.subheader("READ latency per layer (attention vs Mamba)")
    if len(rd) >= transfer_queries.READS_MAX_ROWS:
        st.caption(f"Newest {transfer_queries.READS_MAX_ROWS:,} READ spans of the range "
                   "(narrow the time range to see others).")
    st.plotly_chart(figures.layer_box(rd), key="layer_box")
    st.subheader("Bandwidth per layer")
    st.plotly_chart(figures.layer_bandwidth(rd), key="layer_bw")
    st.subheader("Layer × time")
    st.plotly_chart(figures.layer_heatmap(rd), key="layer_heat")
    st.subheader("Slowest READs")
    top = iq.label_engines(rd.nlargest(20, "duration_ns"), common.engine_directory(db))
    top["timeline"] = "/timeline?request=" + top["request_id"].astype(str)
    st.dataframe(display.table(top, OUTLIER_COLUMNS), hide_index=True, key="outliers",
                 column_config=common.TIMELINE_LINK)


common.run_page(body)
