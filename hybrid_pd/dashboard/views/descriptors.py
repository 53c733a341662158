"""Descriptors: counts and bytes per build scope; ours vs upstream when both ran."""

from __future__ import annotations

import streamlit as st

from hybrid_pd.dashboard import common, figures, queries
from hybrid_pd.telemetry import attributes as A

OTHER_CONNECTOR = {"hybrid": "upstream", "upstream": "hybrid"}


def comparison(db: str, start: int | None, end: int | None) -> None:
    """Ours vs upstream per request and READ, when spans of both are in the range."""
    st.subheader("Ours vs upstream")
    present = common.connectors(db, start, end)
    if len(present) < 2:
        if not present:
            st.info("No READ or descriptor-build spans in this time range: nothing to compare.")
            return
        (only,) = present
        other = OTHER_CONNECTOR.get(only, "the other connector")
        st.info(
            f"Only the `{only}` connector ran in this time range, so there is nothing to "
            f"compare it with. Run the same requests with `{other}` into this database "
            f"(`hybrid-pd serve --connector {other} --telemetry-db …`) to see both side by side."
        )
        return
    cmp = common.connector_reads(db, start, end)
    per_request = queries.comparison_per_request(cmp)
    if per_request["connector"].nunique() < 2:
        st.info("Both connectors built descriptors, but READ spans with a request id exist "
                f"for `{', '.join(per_request['connector'].unique()) or 'none'}` only.")
        return
    st.caption(
        f"Per connector, up to {queries.COMPARE_MAX_REQUESTS:,} requests: the newest of those "
        f"with one of its newest {queries.COMPARE_MAX_READS:,} READ spans in the range; each "
        "request counted whole (all its READs and its descriptor-id mapping). Bars: totals "
        "over those requests divided by their READs; table: medians over the requests."
    )
    st.plotly_chart(figures.connector_comparison(queries.comparison_per_kind(cmp)),
                    key="connector_comparison")
    st.dataframe(queries.comparison_medians(per_request), hide_index=True,
                 key="connector_medians")


def body() -> None:
    db = common.require_db()
    start, end = common.sidebar_window(db)
    st.title("Descriptor builds")
    g = common.desc_build_stats(db, start, end)
    if g.empty:
        st.info("No `desc_build` spans in this time range.")
        return
    c = st.columns(3)
    c[0].metric("builds", f"{int(g['builds'].sum()):,}")
    c[1].metric("descriptors", f"{int(g['descriptors'].sum()):,}")
    c[2].metric("connectors", ", ".join(sorted(g[A.CONNECTOR].dropna().unique())))
    st.plotly_chart(figures.descriptor_bars(g), key="desc_bars")
    st.dataframe(g, hide_index=True, key="desc_table")
    comparison(db, start, end)


common.run_page(body)
