"""Handover: a P/D request's time to first token, phase by phase (the proxy's TTFT spans).

Metrics, charts and tables cover the newest ``handover_queries.MAX_REQUESTS`` requests of
the range (one load, cached); one request's waterfall is looked up by id (``?request=ID``,
as other pages link to it), whatever the range.
"""

from __future__ import annotations

from urllib.parse import quote

import pandas as pd
import streamlit as st

from hybrid_pd.dashboard import common, display
from hybrid_pd.dashboard import handover_figures as hf
from hybrid_pd.dashboard import handover_queries as hq
from hybrid_pd.dashboard import instance_queries as iq
from hybrid_pd.dashboard.display import Col

NO_PHASES_HINT = (
    "No handover phase spans (`hybrid_pd.ttft.*`) in this time range. The proxy writes them, "
    "twelve per request it routes through P and D: send requests through the proxy of "
    "`hybrid-pd serve` (its span database is `--telemetry-db PATH`, by default "
    "`RUN_DIR/telemetry.db`), or of `hybrid-pd proxy --telemetry-db PATH`. `hybrid-pd bench` "
    "has no proxy and writes none. To try the page: `python scripts/gen_spans_db.py "
    "runs/synthetic.db --spans 20000`, then `hybrid-pd dashboard --db runs/synthetic.db`."
)
MODES = ("slowest", "latest", "by id")
TOP_REQUESTS = 20  # rows of the slowest-requests table
PICK_REQUESTS = 200  # choices of the request picker
REQUEST_COLUMNS: dict[str, Col] = {
    "request_id": Col("request"),
    "waterfall": Col("waterfall"),
    "timeline": Col("timeline"),
    "start": Col("start (UTC)", "time"),
    "ttft_ms": Col("TTFT (ms)", "ms"),
    "input_tokens": Col("prompt tokens", "count"),
    "transfer_share": Col("transfer share (%)", "num", 100),
    "handshake": Col("handshake"),
    "D instance": Col("D instance"),
    "P instance": Col("P instance"),
}
PHASE_TABLE_COLUMNS: dict[str, Col] = {
    "index": Col("#", "count"),
    "phase": Col("phase"),
    "where": Col("where"),
    "offset_ms": Col("from (ms)", "ms"),
    "dur_ms": Col("duration (ms)", "ms"),
    "share": Col("of TTFT (%)", "num", 100),
    "skew_ms": Col("clock skew (ms)", "ms"),
    "meaning": Col("what"),
}
STATS_COLUMNS: dict[str, Col] = {
    "index": Col("#", "count"),
    "phase": Col("phase"),
    "where": Col("where"),
    "requests": Col("requests", "count"),
    "p50_ms": Col("p50 (ms)", "ms"),
    "p90_ms": Col("p90 (ms)", "ms"),
    "p99_ms": Col("p99 (ms)", "ms"),
}
LINKS = {**common.TIMELINE_LINK,
         "waterfall": st.column_config.LinkColumn("waterfall", display_text="open")}


# ------------------------------------------------------------------- cached loads


@st.cache_data(ttl=common.TTL_S, show_spinner="Loading handover phases…")
def phases(db: str, start: int | None, end: int | None, engines: common.Engines) -> pd.DataFrame:
    return hq.phase_spans(common.get_engine(db), start, end, engines)


@st.cache_data(ttl=common.TTL_S, show_spinner="Loading the request's phases…")
def one_request(db: str, request_id: str) -> pd.DataFrame:
    return hq.request_phases(common.get_engine(db), request_id)


@st.cache_data(ttl=common.TTL_S, show_spinner=False)
def instances(db: str, request_ids: tuple[str, ...]) -> pd.DataFrame:
    """``request_instances`` with ``D instance`` / ``P instance`` labels (``–``: none)."""
    df = hq.request_instances(common.get_engine(db), request_ids)
    directory = common.engine_directory(db)
    df = iq.label_engines(df, directory, "d_engine_id", None, "D instance")
    df = iq.label_engines(df, directory, "p_engine_id", None, "P instance")
    for col, raw in (("D instance", "d_engine_id"), ("P instance", "p_engine_id")):
        df[col] = df[col].where(df[raw].notna(), display.MISSING)
    return df


# ------------------------------------------------------------------------- sections


def summary(reqs: pd.DataFrame) -> None:
    s = hq.summary(reqs)
    common.metric_row([
        ("requests", display.fmt_count(s["requests"]),
         "P/D requests with handover phases whose first phase started in the range."),
        ("TTFT p50", display.fmt_duration_ms(s["ttft_p50"]),
         "Time to first token as the proxy measured it; nearest-rank percentiles."),
        ("TTFT p99", display.fmt_duration_ms(s["ttft_p99"])),
    ])
    common.metric_row([
        ("transfer share p50", hf.fmt_percent(s["share_p50"]),
         "Per request: (handshake + read_post + read_in_flight) / TTFT."),
        ("transfer share p90", hf.fmt_percent(s["share_p90"])),
        ("cold requests", display.fmt_count(s["cold"]),
         "Requests that waited for a NIXL handshake (first of a P-D pair)."),
    ])
    if s["requests"] >= hq.MAX_REQUESTS:
        st.caption(f"The newest {hq.MAX_REQUESTS:,} requests of the range, here and below "
                   "(narrow the time range to see older ones).")


def charts(ph: pd.DataFrame, reqs: pd.DataFrame) -> None:
    st.subheader("Phases per prompt length")
    st.caption("Each phase's own p50 / p90 / p99 over the requests of a bucket, stacked: a "
               "stack shows where the time goes, it is not itself a TTFT percentile.")
    by_size = hq.phase_percentiles(ph)
    st.plotly_chart(hf.phases_by_size(hq.long_percentiles(by_size)), key="phases_by_size")
    st.subheader("Phases over time")
    p = st.radio("percentile", hq.PERCENTILES, horizontal=True, key="handover_over_time_p",
                 format_func=lambda v: f"p{v}")
    st.plotly_chart(hf.phases_over_time(hq.phase_buckets(ph), int(p)), key="phases_over_time")
    st.subheader("The transfer's share of TTFT")
    st.caption("Per request: handshake + read_post + read_in_flight over its TTFT.")
    st.plotly_chart(hf.share_histogram(reqs), key="share_histogram")


def slowest(db: str, reqs: pd.DataFrame) -> None:
    st.subheader("Slowest requests")
    top = reqs.nlargest(TOP_REQUESTS, "ttft_ms")
    labels = instances(db, tuple(sorted(set(top["request_id"].astype(str)))))
    top = top.merge(labels[["request_id", "D instance", "P instance"]], on="request_id", how="left")
    top[["D instance", "P instance"]] = top[["D instance", "P instance"]].fillna(display.MISSING)
    ids = top["request_id"].astype(str).map(lambda r: quote(r, safe=""))
    top["waterfall"] = "/handover?request=" + ids
    top["timeline"] = "/timeline?request=" + ids
    top["handshake"] = top["cold"].map({True: "cold", False: "warm"})
    st.dataframe(display.table(top, REQUEST_COLUMNS), hide_index=True, key="slowest_requests",
                 column_config=LINKS)


def stats_table(ph: pd.DataFrame) -> None:
    with st.expander("Phase percentiles over the range (table)"):
        stats = hq.phase_percentiles(ph, by_size=False)
        st.dataframe(display.table(stats, STATS_COLUMNS), hide_index=True, key="phase_stats")


def pick_request(reqs: pd.DataFrame) -> str | None:
    """The request to draw: ``?request=`` (links from other pages), else the picker."""
    mode, rid = common.request_mode(MODES, "handover_pick", "handover_request_id")
    if mode == MODES[-1]:
        return rid
    if reqs.empty:
        return None
    by = "ttft_ms" if mode == "slowest" else "req_start_ns"
    pick = reqs.sort_values(by, ascending=False, kind="stable").head(PICK_REQUESTS)
    labels = {r.request_id: f"{r.request_id}  ·  TTFT {display.fmt_duration_ms(r.ttft_ms)}  ·  "
              f"{hf.fmt_percent(r.transfer_share)} transfer" for r in pick.itertuples()}
    return st.selectbox("request", list(labels), format_func=labels.__getitem__,
                        key=f"handover_req_{mode}")


def request_waterfall(db: str, reqs: pd.DataFrame) -> None:
    st.subheader("One request, phase by phase")
    rid = pick_request(reqs)
    if rid is None:
        return
    ph = one_request(db, rid)
    if ph.empty:
        st.warning(f"No handover phase spans for request `{rid}`.")
        return
    st.query_params["request"] = rid  # shareable URL for this view
    req = hq.requests(ph).iloc[0]
    where = instances(db, (rid,))
    pair = (f"P {where['P instance'].iloc[0]} → D {where['D instance'].iloc[0]}"
            if not where.empty else "no transfer span")
    tokens = "unknown" if pd.isna(req["input_tokens"]) else display.fmt_count(req["input_tokens"])
    st.caption(f"TTFT {display.fmt_duration_ms(req['ttft_ms'])}, prompt tokens {tokens}, "
               f"{'cold (waited for a handshake)' if req['cold'] else 'warm'}, {pair}.")
    st.plotly_chart(hf.waterfall(ph, title=f"request {rid}"), key="waterfall")
    total = req["ttft_ms"] if req["ttft_ms"] > 0 else None
    table = ph.assign(where=ph["phase"].map(hq.PHASE_WHERE), meaning=ph["phase"].map(hq.MEANINGS),
                      share=ph["dur_ms"] / total if total else None,
                      skew_ms=ph["skew_ns"] / 1e6)
    st.dataframe(display.table(table, PHASE_TABLE_COLUMNS), hide_index=True, key="phase_table")
    st.page_link("views/timeline.py", label="Every span of this request (Request timeline)",
                 icon=":material/view_timeline:", query_params={"request": rid})


def body() -> None:
    db = common.require_db()
    start, end = common.sidebar_window(db)
    engines = common.sidebar_instances(db)
    st.title("Handover: time to first token")
    ph = phases(db, start, end, engines)
    reqs = hq.requests(ph)
    if reqs.empty:
        st.info(NO_PHASES_HINT)
    else:
        summary(reqs)
        charts(ph, reqs)
        slowest(db, reqs)
        stats_table(ph)
    if not reqs.empty or st.query_params.get("request"):
        request_waterfall(db, reqs)


common.run_page(body)
