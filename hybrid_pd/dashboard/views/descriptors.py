"""Descriptors: counts and bytes per build scope; ours vs upstream when both ran."""

from __future__ import annotations

import streamlit as st

from hybrid_pd.dashboard import common, figures
from hybrid_pd.telemetry import attributes as A


def body() -> None:
    db = common.require_db()
    start, end = common.sidebar_window(db)
    st.title("Descriptor builds")
    d = common.desc_builds(db, start, end)
    if d.empty:
        st.info("No `desc_build` spans in this time range.")
        return
    g = (
        d.groupby([A.KV_DESC_SCOPE, A.CONNECTOR], dropna=False)
        .agg(builds=("span_id", "count"), descriptors=("descriptors", "sum"),
             bytes=("bytes", "sum"), p50_us=("duration_us", "median"),
             max_us=("duration_us", "max"))
        .reset_index()
    )
    c = st.columns(3)
    c[0].metric("builds", f"{len(d):,}")
    c[1].metric("descriptors", f"{int(d['descriptors'].fillna(0).sum()):,}")
    c[2].metric("connectors", ", ".join(sorted(d[A.CONNECTOR].dropna().unique())))
    st.plotly_chart(figures.descriptor_bars(d), key="desc_bars")
    st.dataframe(g, hide_index=True, key="desc_table")


common.run_page(body)
