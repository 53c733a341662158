"""Request timeline: the Gantt of one request's trace, one row per layer READ."""

from __future__ import annotations

import streamlit as st

from hybrid_pd.dashboard import common, display, figures
from hybrid_pd.dashboard import instance_queries as iq
from hybrid_pd.dashboard.display import Col
from hybrid_pd.dashboard.handover_queries import PHASE_SPANS
from hybrid_pd.telemetry import attributes as A

MODES = ("latest", "slowest", "by id")
SPAN_COLUMNS: dict[str, Col] = {
    "name": Col("span"),
    "engine": Col("engine"),
    "peer_rank": Col("P rank", "count"),
    "layer": Col("layer", "count"),
    "layer_kind": Col("layer kind"),
    "bytes": Col("bytes", "bytes"),
    "descriptors": Col("descriptors", "count"),
    "duration_us": Col("duration (ms)", "ms", 1e-3),
    "status": Col("status"),
    A.KV_NIXL_POST_US: Col("NIXL post (ms)", "ms", 1e-3),
    A.KV_NIXL_XFER_US: Col("NIXL transfer (ms)", "ms", 1e-3),
    "start": Col("start (UTC)", "time"),
}


def pick_request(db: str, engines: common.Engines) -> str | None:
    """The request to show: ``?request=`` (links from other pages), else the picker."""
    mode, rid = common.request_mode(MODES, "pick_mode", "request_id")
    if mode == MODES[-1]:
        return rid
    reqs = common.request_list(db, mode, engines)  # type: ignore[arg-type]
    if reqs.empty:
        return None
    labels = {
        r.request_id: f"{r.request_id}  ·  {display.fmt_duration_ms(r.duration_ms)}  ·  "
        f"{display.fmt_bin_bytes(r.bytes or 0)}"
        + ("  ·  FAILED" if r.errors else "")
        for r in reqs.itertuples()
    }
    return st.selectbox("request", list(labels), format_func=labels.__getitem__, key=f"req_{mode}")


def body() -> None:
    db = common.require_db()
    common.drops_banner(db, None)  # no time range on this page: any drop in the file
    engines = common.sidebar_instances(db)  # narrows the request list; a request shows whole
    st.title("Request timeline")
    rid = pick_request(db, engines)
    if rid is None:
        st.info("No request with a KV transfer in this database yet.")
        return
    df = iq.label_engines(common.request_timeline(db, rid), common.engine_directory(db))
    if df.empty:
        st.warning(f"No spans for request `{rid}`.")
        return
    st.query_params["request"] = rid  # shareable URL for this view
    if df["name"].isin(PHASE_SPANS).any():  # the proxy's TTFT phases: the Handover page
        st.page_link("views/handover.py", label="Time to first token, phase by phase (Handover)",
                     icon=":material/waterfall_chart:", query_params={"request": rid})
    rd = df[df["name"] == A.SPAN_KV_READ]
    tr = df[df["name"] == A.SPAN_KV_TRANSFER]
    common.metric_row([
        ("spans", display.fmt_count(len(df))),
        ("layer READs", display.fmt_count(len(rd))),
        ("bytes read", display.fmt_bin_bytes(float(rd["bytes"].fillna(0).sum()))),
        ("slowest transfer", display.fmt_duration_ms(tr["duration_ms"].max() if not tr.empty
                                                     else None)),
        ("errors", display.fmt_count((df["status"] == "ERROR").sum())),
    ])
    # Handshakes are per P-D pair and usually finished long before this request; drawn
    # by default they squeeze the request into a sliver, so they start hidden then.
    hs = df["name"] == A.SPAN_KV_HANDSHAKE
    before = bool(hs.any()) and bool((df.loc[hs, "end_ns"] < df.loc[~hs, "start_ns"].min()).all())
    show_hs = st.toggle("show P–D handshakes", value=not before, key="show_handshakes",
                        help="Once per P-D pair; drawn at negative times when they ran "
                        "before this request.")
    plot_df = df if show_hs else df[~hs]
    st.plotly_chart(figures.timeline_figure(plot_df, title=f"request {rid}"), key="timeline")
    with st.expander("Spans (table)"):
        spans = df.assign(name=df["name"].map(display.span_name))
        st.dataframe(display.table(spans, SPAN_COLUMNS), hide_index=True, key="spans_table")


common.run_page(body)
