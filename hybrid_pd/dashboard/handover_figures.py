"""Plotly figures of the Handover page (pure: DataFrame in, Figure out; no Streamlit).

Every phase keeps one colour on every chart, in families by where it runs: greys for the
proxy and its hops, blues for P, greens for the KV transfer, oranges for D.
"""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from hybrid_pd.dashboard.display import fmt_duration_ms, sig3
from hybrid_pd.dashboard.handover_queries import MEANINGS, PHASE_WHERE, PHASES, SIZE_ORDER
from hybrid_pd.dashboard.transfer_queries import fmt_width

PHASE_COLOURS: dict[str, str] = {
    "router_receive": "#7f7f7f",
    "p_queue": "#9ecae1",
    "p_prefill": "#1f77b4",
    "p_answer": "#a5a5a5",
    "router_to_d": "#c7c7c7",
    "d_queue": "#fdae6b",
    "handshake": "#17becf",
    "read_post": "#98df8a",
    "read_in_flight": "#2ca02c",
    "completion_noticed": "#fd8d3c",
    "d_first_step": "#e6550d",
    "first_token_sent": "#525252",
}
PHASE_AXIS_TITLE = "phase duration (ms), stacked"
WATERFALL_AXIS_TITLE = "time since the proxy received the request (ms)"
SHARE_AXIS_TITLE = "transfer's share of TTFT (%)"
# Stacked bars list their legend top-down as the stack reads: the last phase on top.
_LEGEND = {"title_text": "phase", "traceorder": "reversed"}


def fmt_percent(share: float | None) -> str:
    """A share (0.123) as ``12.3%``; missing: ``–``."""
    if share is None or pd.isna(share):
        return "–"
    return f"{sig3(share * 100)}%"


def _hover(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(duration=[fmt_duration_ms(v) for v in df["ms"]],
                     where=df["phase"].map(PHASE_WHERE))


def phases_by_size(long: pd.DataFrame) -> go.Figure:
    """The phases stacked at p50 / p90 / p99 (one panel each) per prompt-length bucket
    (``handover_queries.long_percentiles`` of ``phase_percentiles``)."""
    df = _hover(long)
    sizes = [s for s in SIZE_ORDER if s in set(df["size"])]
    fig = px.bar(df, x="size", y="ms", color="phase", facet_col="percentile",
                 color_discrete_map=PHASE_COLOURS,
                 category_orders={"phase": list(PHASES), "size": sizes,
                                  "percentile": sorted(set(df["percentile"]), key=lambda p: int(p[1:]))},
                 custom_data=["phase", "duration", "requests", "where"],
                 labels={"size": "prompt tokens (k = 1,024)", "ms": PHASE_AXIS_TITLE})
    fig.update_traces(hovertemplate="<b>%{customdata[0]}</b> (%{customdata[3]})<br>"
                      "%{customdata[1]} over %{customdata[2]} requests<extra></extra>")
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    fig.update_yaxes(title_text=None)
    fig.update_yaxes(title_text=PHASE_AXIS_TITLE, row=1, col=1)
    fig.update_layout(barmode="stack", height=420, legend=_LEGEND,
                      margin={"l": 10, "r": 10, "t": 40, "b": 40})
    return fig


def phases_over_time(buckets: pd.DataFrame, percentile: int) -> go.Figure:
    """The phases stacked at ``percentile`` per time bucket of the requests' start
    (``handover_queries.phase_buckets``)."""
    width = fmt_width(int(buckets["width_ns"].iloc[0])) if not buckets.empty else "–"
    df = _hover(buckets.assign(ms=buckets[f"p{percentile}_ms"]))
    fig = px.bar(df, x="start", y="ms", color="phase", color_discrete_map=PHASE_COLOURS,
                 category_orders={"phase": list(PHASES)},
                 custom_data=["phase", "duration", "requests", "where"],
                 labels={"start": f"requests' start (UTC, {width} buckets)",
                         "ms": f"p{percentile} phase duration (ms), stacked"})
    fig.update_traces(hovertemplate="<b>%{customdata[0]}</b> (%{customdata[3]})<br>"
                      f"p{percentile} " "%{customdata[1]} over %{customdata[2]} requests"
                      "<extra></extra>")
    fig.update_layout(barmode="stack", height=400, legend=_LEGEND,
                      margin={"l": 10, "r": 10, "t": 30, "b": 40})
    return fig


def share_histogram(reqs: pd.DataFrame) -> go.Figure:
    """Requests per 5 % of transfer share (``handover_queries.requests``), cold (waited
    for a handshake) and warm apart."""
    df = reqs.assign(share_pct=reqs["transfer_share"].astype(float) * 100,
                     handshake=reqs["cold"].map({True: "cold (handshake)", False: "warm"}))
    fig = px.histogram(df, x="share_pct", color="handshake", nbins=20, range_x=[0, 100],
                       color_discrete_map={"cold (handshake)": PHASE_COLOURS["handshake"],
                                           "warm": PHASE_COLOURS["read_in_flight"]},
                       labels={"share_pct": SHARE_AXIS_TITLE, "handshake": ""})
    fig.update_traces(xbins={"start": 0, "end": 100, "size": 5})
    fig.update_yaxes(title_text="requests (count)")
    fig.update_layout(barmode="stack", height=320, margin={"l": 10, "r": 10, "t": 30, "b": 40},
                      legend={"title_text": "", "orientation": "h", "yanchor": "bottom",
                              "y": 1.02, "x": 0})
    return fig


def waterfall(phases: pd.DataFrame, title: str = "") -> go.Figure:
    """One request's phases as horizontal bars from their start offset, first phase on
    top (``handover_queries.request_phases`` rows)."""
    ttft = float(phases["ttft_ms"].max()) if phases["ttft_ms"].notna().any() else None
    total = ttft or float(phases["dur_ms"].sum()) or None
    df = phases.assign(
        duration=[fmt_duration_ms(v) for v in phases["dur_ms"]],
        at=[fmt_duration_ms(v) for v in phases["offset_ms"]],
        share=[fmt_percent(v / total if total else None) for v in phases["dur_ms"]],
        where=phases["phase"].map(PHASE_WHERE),
        meaning=phases["phase"].map(MEANINGS),
    )
    order = list(df.sort_values("index")["phase"])
    fig = px.bar(df, base="offset_ms", x="dur_ms", y="phase", color="phase", orientation="h",
                 color_discrete_map=PHASE_COLOURS, category_orders={"phase": order},
                 custom_data=["phase", "at", "duration", "share", "where", "meaning"],
                 title=title)
    fig.update_traces(hovertemplate=(
        "<b>%{customdata[0]}</b> (%{customdata[4]})<br>from %{customdata[1]}, "
        "%{customdata[2]} (%{customdata[3]} of TTFT)<br>%{customdata[5]}<extra></extra>"))
    fig.update_yaxes(title_text="phase")  # px lists the first category on top
    fig.update_xaxes(title_text=WATERFALL_AXIS_TITLE)
    fig.update_layout(height=max(360, 26 * len(order) + 140), showlegend=False, bargap=0.2,
                      margin={"l": 10, "r": 10, "t": 50 if title else 20, "b": 40})
    return fig
