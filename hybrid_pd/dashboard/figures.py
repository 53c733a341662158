"""Plotly figures from the query frames (pure: DataFrame in, Figure out; no Streamlit).

Colours are fixed per category (``COLOURS``) so attention is the same blue on every page
and in every request, whatever subset of kinds a frame happens to contain.
"""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from hybrid_pd.dashboard.connector_queries import BENCH, OURS, UPSTREAM
from hybrid_pd.dashboard.display import fmt_bin_bytes
from hybrid_pd.dashboard.instance_queries import engine_label
from hybrid_pd.dashboard.transfer_queries import fmt_width
from hybrid_pd.telemetry import attributes as A

# Category -> colour.  Layer kinds first (the READ rows), then the other span kinds.
COLOURS: dict[str, str] = {
    "attention": "#1f77b4",
    "mamba": "#ff7f0e",
    "mixed": "#9467bd",
    "proxy": "#7f7f7f",
    "engine": "#c7c7c7",
    "handshake": "#17becf",
    "descriptors": "#bcbd22",
    "transfer": "#2ca02c",
    "notify": "#8c564b",
    "failure": "#d62728",
}
LAYER_KINDS: tuple[str, ...] = ("attention", "mamba", "mixed")
# Connector -> colour: ours, upstream's and the bench's keep their colour on every chart.
CONNECTOR_COLOURS: dict[str, str] = {OURS: "#2ca02c", UPSTREAM: "#7f7f7f", BENCH: "#e377c2"}
# Row order on the Gantt, top to bottom: the request's life in causal order.
_CATEGORY_ORDER: tuple[str, ...] = (
    "proxy", "engine", "handshake", "descriptors", "transfer", *LAYER_KINDS, "notify", "failure",
)
_NAME_CATEGORY: dict[str, str] = {
    A.SPAN_PROXY_REQUEST: "proxy",
    A.SPAN_PROXY_PREFILL: "proxy",
    A.SPAN_PROXY_DECODE: "proxy",
    A.SPAN_KV_HANDSHAKE: "handshake",
    A.SPAN_KV_DESC_BUILD: "descriptors",
    A.SPAN_KV_TRANSFER: "transfer",
    A.SPAN_KV_NOTIFY: "notify",
    A.SPAN_KV_STALL: "failure",
    A.SPAN_KV_ABORT: "failure",
    # the handover phases are the proxy's spans (its clock, its request)
    **{name: "proxy" for name in A.SPANS if name.startswith("hybrid_pd.ttft.")},
}
MIB, GIB = 1 << 20, 1 << 30
TIME_AXIS_TITLE = "time since the request's first span (ms)"
READ_ROW_PREFIX = "READ "


def _int(v: object) -> int | None:
    return None if v is None or pd.isna(v) else int(v)  # type: ignore[arg-type]


def _pair(peer: int | None, rank: int | None) -> str:
    """P→D rank pair; '?' where the span did not record a rank."""
    return f"P{'?' if peer is None else peer}→D{'?' if rank is None else rank}"


def span_category(name: str, layer_kind: str | None) -> str:
    if name == A.SPAN_KV_READ:
        return layer_kind if layer_kind in LAYER_KINDS else "mixed"
    return _NAME_CATEGORY.get(name, "engine")


def span_row(row: pd.Series) -> str:
    """The Gantt row label of one span; each layer's READ per rank pair gets its own row."""
    name, rank, peer = row["name"], _int(row.get("rank")), _int(row.get("peer_rank"))
    short = name.rsplit(".", 1)[-1]
    if name == A.SPAN_KV_READ:
        layer = _int(row.get("layer"))
        where = "all layers" if layer is None else f"L{layer:02d}"
        return f"{READ_ROW_PREFIX}{row['category']} {where} {_pair(peer, rank)}"
    if name == A.SPAN_KV_DESC_BUILD:
        scope = row.get(A.KV_DESC_SCOPE) or "?"
        return f"desc_build {scope} {_pair(peer, rank)}"
    if name in (A.SPAN_KV_HANDSHAKE, A.SPAN_KV_NOTIFY, A.SPAN_KV_STALL, A.SPAN_KV_ABORT):
        return f"{short} {_pair(peer, rank)}"
    if name == A.SPAN_KV_TRANSFER:
        return f"transfer →D{'?' if rank is None else rank}"
    return name.removeprefix("hybrid_pd.")


def timeline_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``category``, ``row`` and request-relative ``start_ms``; sorted in row order."""
    df = df.copy()
    df["category"] = [span_category(n, k) for n, k in zip(df["name"], df["layer_kind"], strict=True)]
    # Notify/desc spans may lack the local rank; their transfer span (same trace) has it.
    trace_rank = df.dropna(subset=["rank"]).drop_duplicates("trace_id").set_index("trace_id")["rank"]
    df["rank"] = df["rank"].fillna(df["trace_id"].map(trace_rank))
    df["row"] = df.apply(span_row, axis=1)
    # Time zero is the request's own first span: handshakes (shared by all requests of a
    # P-D pair, often long before) then sit at negative times instead of squashing the rest.
    own = df[df["category"] != "handshake"]
    t0 = (own if not own.empty else df)["start_ns"].min()
    df["start_ms"] = (df["start_ns"] - t0) / 1e6
    df["cat_rank"] = df["category"].map({c: i for i, c in enumerate(_CATEGORY_ORDER)})
    # Reads grouped by kind, then by rank pair, then by layer; everything else by time.
    df["layer_sort"] = df["layer"].fillna(-1)
    df["pair_sort"] = df["peer_rank"].fillna(-1) * 1000 + df["rank"].fillna(-1)
    is_read = df["name"] == A.SPAN_KV_READ
    df.loc[~is_read, ["layer_sort", "pair_sort"]] = 0
    df = df.sort_values(["cat_rank", "pair_sort", "layer_sort", "start_ns"], kind="stable")
    return df.reset_index(drop=True)


def _fmt(v: object, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:,.1f}{unit}"
    if isinstance(v, int):
        return f"{v:,}{unit}"
    return f"{v}{unit}"


def timeline_figure(df: pd.DataFrame, title: str = "") -> go.Figure:
    """The Gantt of one request's spans: a horizontal bar per span, one row per label.

    ``px.bar(base=...)`` on a numeric axis rather than ``px.timeline``: px.timeline puts
    spans on a *date* axis, which cannot resolve the µs-scale reads we need to compare,
    and gives no "ms since start" axis.  Same picture, exact units.
    """
    rows = timeline_rows(df)
    rows["hover_bytes"] = [fmt_bin_bytes(b) if _int(b) is not None else "–" for b in rows["bytes"]]
    rows["hover_desc"] = [_fmt(_int(d)) for d in rows["descriptors"]]
    rows["hover_post"] = [_fmt(v, " µs") for v in rows.get(A.KV_NIXL_POST_US, [None] * len(rows))]
    rows["hover_xfer"] = [_fmt(v, " µs") for v in rows.get(A.KV_NIXL_XFER_US, [None] * len(rows))]
    rows["hover_status"] = [
        f"{s}" + (f" / {k}" if k else "") + (f": {r}" if r else "")
        for s, k, r in zip(rows["status"], rows.get(A.KV_STATUS, [None] * len(rows)),
                           rows.get(A.KV_FAILURE_REASON, [None] * len(rows)), strict=True)
    ]
    order = list(dict.fromkeys(rows["row"]))
    fig = px.bar(
        rows,
        base="start_ms",
        x="duration_ms",
        y="row",
        color="category",
        orientation="h",
        color_discrete_map=COLOURS,
        category_orders={"row": order, "category": [c for c in _CATEGORY_ORDER if c in set(rows["category"])]},
        custom_data=["name", "duration_us", "hover_bytes", "hover_desc", "hover_post",
                     "hover_xfer", "hover_status", "engine" if "engine" in rows else "engine_id"],
        title=title,
    )
    fig.update_traces(
        hovertemplate=(
            "<b>%{customdata[0]}</b><br>start %{base:.3f} ms, %{customdata[1]:,.1f} µs<br>"
            "bytes %{customdata[2]}, descriptors %{customdata[3]}<br>"
            "NIXL post %{customdata[4]}, xfer %{customdata[5]}<br>"
            "status %{customdata[6]}<br>engine %{customdata[7]}<extra></extra>"
        )
    )
    fig.update_yaxes(title_text="span (READ rows: layer kind, layer, P→D rank pair)",
                     tickfont={"size": 11})
    fig.update_xaxes(title_text=TIME_AXIS_TITLE)
    fig.update_layout(
        height=max(360, 22 * len(order) + 160),
        legend_title_text="kind",
        margin={"l": 10, "r": 10, "t": 50 if title else 20, "b": 40},
        bargap=0.25,
    )
    return fig


def _width_text(buckets: pd.DataFrame) -> str:
    """The bucket width of a ``transfer_buckets`` frame as text (``2 s``)."""
    return fmt_width(int(buckets["width_ns"].iloc[0])) if not buckets.empty else "–"


def _where(df: pd.DataFrame) -> list[str]:
    """Legend entries: the ``engine`` label (``instance_queries.label_engines``) if the
    page added one, else the engine id (a UUID cut short) and rank."""
    if "engine" in df:
        return list(df["engine"])
    return [engine_label(e, rank=_int(r)) for e, r in zip(df["engine_id"], df["rank"], strict=True)]


LATENCY_AXIS_TITLE = "transfer latency (ms)"


def latency_over_time(buckets: pd.DataFrame) -> go.Figure:
    """Transfer latency per time bucket and engine / D rank: the median as a line, the
    slowest transfer as a dot whose hover names its request (buckets from
    ``transfer_queries.transfer_buckets``, aggregated in SQL)."""
    width = _width_text(buckets)
    df = buckets.assign(where=_where(buckets))
    fig = px.line(df, x="start", y="p50_ms", color="where", markers=True,
                  hover_data={"transfers": True, "failed": True},
                  labels={"start": f"bucket start (UTC, {width} buckets)",
                          "p50_ms": LATENCY_AXIS_TITLE, "where": "engine / D rank"})
    fig.for_each_trace(lambda t: t.update(name=f"{t.name} p50"))
    slow = px.scatter(df, x="start", y="max_ms", color="where", symbol_sequence=["x"],
                      custom_data=["slowest_request", "transfers"])
    for tr in slow.data:
        tr.update(name=f"{tr.name} slowest", legendgroup=tr.name, showlegend=True,
                  hovertemplate="slowest transfer %{y:,.2f} ms<br>request %{customdata[0]}"
                  "<br>of %{customdata[1]} transfers<extra></extra>")
        fig.add_trace(tr)
    fig.update_yaxes(title_text=LATENCY_AXIS_TITLE)
    # Legend above the plot: in a half-width column a side legend squeezes the time axis.
    fig.update_layout(height=420, margin={"l": 10, "r": 10, "t": 30, "b": 40},
                      legend={"title_text": "", "orientation": "h", "yanchor": "bottom",
                              "y": 1.02, "x": 0})
    return fig


def throughput_bars(buckets: pd.DataFrame) -> go.Figure:
    """Bytes moved per time bucket (by transfer start), stacked per engine / D rank."""
    width = _width_text(buckets)
    df = buckets.assign(where=_where(buckets), mib=buckets["bytes"].astype(float) / MIB)
    fig = px.bar(df, x="start", y="mib", color="where",
                 labels={"start": "time (UTC)", "mib": f"MiB transferred per {width}",
                         "where": "engine / D rank"})
    fig.update_layout(height=420, margin={"l": 10, "r": 10, "t": 30, "b": 40},
                      legend={"title_text": "", "orientation": "h", "yanchor": "bottom",
                              "y": 1.02, "x": 0})
    return fig


def layer_box(rd: pd.DataFrame) -> go.Figure:
    fig = px.box(rd.sort_values("layer"), x="layer", y="duration_us", color="layer_kind",
                 color_discrete_map=COLOURS, points="outliers",
                 hover_data=["request_id", "rank", "peer_rank"],
                 labels={"layer": "layer index", "duration_us": "READ latency (µs)",
                         "layer_kind": "layer kind", "request_id": "request",
                         "rank": "D rank", "peer_rank": "P rank"})
    fig.update_layout(height=380, margin={"l": 10, "r": 10, "t": 30, "b": 40})
    return fig


def layer_bandwidth(rd: pd.DataFrame) -> go.Figure:
    g = rd.groupby(["layer", "layer_kind"], as_index=False)["gbps"].median()
    g["gibps"] = g["gbps"] * 1e9 / GIB  # gbps is bytes/ns (decimal GB/s)
    fig = px.bar(g, x="layer", y="gibps", color="layer_kind", color_discrete_map=COLOURS,
                 labels={"layer": "layer index", "gibps": "median READ bandwidth (GiB/s)",
                         "layer_kind": "layer kind"})
    fig.update_layout(height=320, margin={"l": 10, "r": 10, "t": 30, "b": 40})
    return fig


def layer_heatmap(rd: pd.DataFrame) -> go.Figure:
    fig = px.density_heatmap(rd, x="start", y="layer", z="duration_us", histfunc="avg",
                             labels={"start": "time (UTC)", "layer": "layer index",
                                     "duration_us": "READ latency (µs)"})
    fig.update_layout(height=360, margin={"l": 10, "r": 10, "t": 30, "b": 40},
                      coloraxis_colorbar_title_text="mean µs")
    return fig


def descriptor_bars(db: pd.DataFrame) -> go.Figure:
    """Descriptors built per scope and connector (spans, or ``desc_build_stats`` rows)."""
    g = db.groupby([A.KV_DESC_SCOPE, A.CONNECTOR], as_index=False)["descriptors"].sum()
    fig = px.bar(g, x=A.KV_DESC_SCOPE, y="descriptors", color=A.CONNECTOR, barmode="group",
                 color_discrete_map=CONNECTOR_COLOURS,
                 labels={A.KV_DESC_SCOPE: "build scope", "descriptors": "descriptors built (count)",
                         A.CONNECTOR: "connector"})
    fig.update_layout(height=320, margin={"l": 10, "r": 10, "t": 30, "b": 40})
    return fig


# Per-READ metrics of the ours-vs-upstream chart -> axis title with its unit.
COMPARISON_METRICS: dict[str, str] = {
    "descriptors_per_read": "descriptors per READ (count)",
    "bytes_per_read": "bytes per READ (B)",
}


def connector_comparison(per_kind: pd.DataFrame) -> go.Figure:
    """Ours vs upstream: descriptors and bytes per READ, grouped bars per layer kind and
    connector, one panel per metric with its own y axis
    (``connector_queries.comparison_per_kind``)."""
    long = per_kind.melt(id_vars=["connector", "layer_kind", "reads"],
                         value_vars=list(COMPARISON_METRICS), var_name="metric")
    long["metric"] = long["metric"].map(COMPARISON_METRICS)
    kinds = [k for k in (*LAYER_KINDS, "all") if k in set(long["layer_kind"])]
    kinds += sorted(set(long["layer_kind"]) - set(kinds))
    # Values printed on the bars: one connector's can be 100x the other's, and a bar
    # of 1 % of the axis still has to be read.
    fig = px.bar(long, x="layer_kind", y="value", color="connector", barmode="group",
                 facet_col="metric", facet_col_spacing=0.12, text_auto=".3~s",
                 color_discrete_map=CONNECTOR_COLOURS,
                 category_orders={"metric": list(COMPARISON_METRICS.values()), "layer_kind": kinds},
                 hover_data={"reads": True},
                 labels={"layer_kind": "READ layer kind", "connector": "connector",
                         "reads": "READs"})
    fig.update_yaxes(matches=None, showticklabels=True)
    for col, title in enumerate(COMPARISON_METRICS.values(), start=1):
        fig.update_yaxes(title_text=title, row=1, col=col)
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    fig.update_traces(textposition="outside", cliponaxis=False)
    fig.update_layout(height=380, margin={"l": 10, "r": 10, "t": 50, "b": 40})
    return fig


PAIR_AXIS_TITLE = "transfers (count)"


def pair_bars(pairs: pd.DataFrame) -> go.Figure:
    """Transfers per (P instance, D instance): a bar per D, one colour per P; errors and
    bytes in the hover (``instance_queries.label_pairs`` rows)."""
    fig = px.bar(pairs, x="D instance", y="transfers", color="P instance", barmode="group",
                 hover_data={"errors": True, "bytes moved": True},
                 labels={"transfers": PAIR_AXIS_TITLE})
    fig.update_layout(height=360, margin={"l": 10, "r": 10, "t": 30, "b": 40},
                      legend={"title_text": "P instance"})
    return fig
