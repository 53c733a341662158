"""Descriptors: builds per scope and connector; ours vs upstream when both ran."""

from __future__ import annotations

import streamlit as st

from hybrid_pd.dashboard import common, display, figures
from hybrid_pd.dashboard import connector_queries as cq
from hybrid_pd.dashboard.display import Col
from hybrid_pd.telemetry import attributes as A

OTHER_CONNECTOR = {cq.OURS: cq.UPSTREAM, cq.UPSTREAM: cq.OURS}
CONNECTORS_CAPTION = "Connectors in this range: "
# ``connector_queries.desc_build_stats`` for people.
BUILD_COLUMNS: dict[str, Col] = {
    A.KV_DESC_SCOPE: Col("scope"),
    A.CONNECTOR: Col("connector"),
    "builds": Col("builds", "count"),
    "descriptors": Col("descriptors", "count"),
    "bytes": Col("bytes", "bytes"),
    "p50_us": Col("p50 (ms)", "ms", 1e-3),
    "max_us": Col("max (ms)", "ms", 1e-3),
}
# ``connector_queries.comparison_medians``: medians can be halves, hence "num" for counts.
MEDIAN_COLUMNS: dict[str, Col] = {
    "connector": Col("connector"),
    "requests": Col("requests", "count"),
    **{h: Col(h, "bytes" if "bytes" in h else "num") for h in cq.MEDIAN_COLUMNS.values()},
}


def explain_no_comparison(present: list[str], compared: list[str]) -> None:
    """Why there is no comparison: no spans, only bench spans, or one connector only."""
    if not present:
        st.info("No READ or descriptor-build spans in this time range: nothing to compare.")
        return
    if not compared:
        st.info(
            f"Only `{cq.BENCH}` spans (from `hybrid-pd bench`) in this time range. They are "
            f"counted above under their own label, not compared: the comparison sets "
            f"`{cq.OURS}` beside `{cq.UPSTREAM}` as they serve requests in vLLM "
            "(`hybrid-pd serve --connector … --telemetry-db …`)."
        )
        return
    (only,) = compared
    other = OTHER_CONNECTOR.get(only, "the other connector")
    st.info(
        f"Only the `{only}` connector ran in this time range, so there is nothing to "
        f"compare it with. Run the same requests with `{other}` into this database "
        f"(`hybrid-pd serve --connector {other} --telemetry-db …`) to see both side by side."
    )


def comparison(db: str, start: int | None, end: int | None, filtered: bool) -> None:
    """Ours vs upstream per request and READ, when spans of both are in the range."""
    st.subheader("Ours vs upstream")
    if filtered:
        st.caption("Over every engine: the host / engine-instance filter applies to the "
                   "builds above, not to this comparison.")
    present = common.connectors(db, start, end)
    compared = [c for c in present if c in cq.COMPARED_CONNECTORS]
    if len(compared) < 2:
        explain_no_comparison(present, compared)
        return
    cmp = common.connector_reads(db, start, end)
    per_request = cq.comparison_per_request(cmp)
    if per_request["connector"].nunique() < 2:
        st.info("Both connectors built descriptors, but READ spans with a request id exist "
                f"for `{', '.join(per_request['connector'].unique()) or 'none'}` only.")
        return
    st.caption(
        f"Per connector, up to {cq.COMPARE_MAX_REQUESTS:,} requests: the newest of those "
        f"with one of its newest {cq.COMPARE_MAX_READS:,} READ spans in the range; each "
        "request counted whole (all its READs and its descriptor-id mapping). Bars: totals "
        "over those requests divided by their READs; table: medians over the requests."
        + (f" `{cq.BENCH}` spans (from `hybrid-pd bench`, no vLLM) are left out."
           if cq.BENCH in present else "")
    )
    st.plotly_chart(figures.connector_comparison(cq.comparison_per_kind(cmp)),
                    key="connector_comparison")
    st.dataframe(display.table(cq.comparison_medians(per_request), MEDIAN_COLUMNS),
                 hide_index=True, key="connector_medians")


def body() -> None:
    db = common.require_db()
    start, end = common.sidebar_window(db)
    engines = common.sidebar_instances(db)
    st.title("Descriptor builds")
    g = common.desc_build_stats(db, start, end, engines)
    if g.empty:
        st.info("No `desc_build` spans in this time range.")
        return
    names = sorted(g[A.CONNECTOR].dropna().unique())
    # The names go in a caption: three of them as a metric value were cut at 1280 px.
    common.metric_row([("builds", display.fmt_count(g["builds"].sum())),
                       ("descriptors", display.fmt_count(g["descriptors"].sum())),
                       ("connectors", display.fmt_count(len(names)))])
    st.caption(CONNECTORS_CAPTION + ", ".join(f"`{n}`" for n in names))
    st.plotly_chart(figures.descriptor_bars(g), key="desc_bars")
    st.dataframe(display.table(g, BUILD_COLUMNS), hide_index=True, key="desc_table")
    comparison(db, start, end, engines is not None)


common.run_page(body)
