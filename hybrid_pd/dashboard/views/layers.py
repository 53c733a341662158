"""Layers: per-layer READ latency and bandwidth across requests, heat map, outliers."""

from __future__ import annotations

import streamlit as st

from hybrid_pd.dashboard import common, figures, transfer_queries
from hybrid_pd.dashboard import instance_queries as iq


def body() -> None:
    db = common.require_db()
    start, end = common.sidebar_window(db)
    engines = common.sidebar_instances(db)
    st.title("Per-layer transfers")
    rd = common.reads(db, start, end, engines)
    rd = rd[rd["layer"].notna()] if not rd.empty else rd
    if rd.empty:
        st.info("No per-layer READ spans in this range. Run with `--granularity layer` "
                "(or `sampled:K`) to get one READ span per layer.")
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
    st.dataframe(
        top[["request_id", "timeline", "engine", "layer", "layer_kind", "rank", "peer_rank", "bytes",
             "duration_us", "gbps"]],
        hide_index=True, key="outliers",
        column_config={"timeline": st.column_config.LinkColumn("timeline", display_text="open")},
    )


common.run_page(body)
