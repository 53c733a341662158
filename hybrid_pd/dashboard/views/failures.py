"""Failures: failed, stalled and aborted transfers with reasons and their request."""

from __future__ import annotations

import streamlit as st

from hybrid_pd.dashboard import common, display, transfer_queries
from hybrid_pd.dashboard import instance_queries as iq
from hybrid_pd.dashboard.display import Col
from hybrid_pd.telemetry import attributes as A

FAILURE_COLUMNS: dict[str, Col] = {
    "start": Col("start (UTC)", "time"),
    "name": Col("span"),
    "request_id": Col("request"),
    "timeline": Col("timeline"),
    "engine": Col("engine"),
    "peer_rank": Col("P rank", "count"),
    "layer": Col("layer", "count"),
    "status": Col("status"),
    A.KV_STATUS: Col("transfer status"),
    "reason": Col("reason"),
    A.KV_WAITED_MS: Col("waited (ms)", "ms"),
}


def body() -> None:
    db = common.require_db()
    start, end = common.sidebar_window(db)
    engines = common.sidebar_instances(db)
    st.title("Failures")
    n = common.failure_counts(db, start, end, engines)
    if not any(n.values()):
        st.success("No failed, stalled or aborted transfers in this time range.")
        return
    common.metric_row([("failed spans", display.fmt_count(n["errors"])),
                       ("stalls", display.fmt_count(n["stalls"])),
                       ("aborts", display.fmt_count(n["aborts"]))])
    f = iq.label_engines(common.failures(db, start, end, engines), common.engine_directory(db))
    if len(f) >= transfer_queries.FAILURES_MAX_ROWS:
        st.caption(f"Newest {transfer_queries.FAILURES_MAX_ROWS:,} of them (the counts above "
                   "cover the whole range; narrow it to list older ones).")
    f["reason"] = f[A.KV_FAILURE_REASON].fillna(f["status_message"])
    f["timeline"] = "/timeline?request=" + f["request_id"].astype(str)
    f["name"] = f["name"].map(display.span_name)
    st.dataframe(display.table(f, FAILURE_COLUMNS), hide_index=True, key="failures_table",
                 column_config=common.TIMELINE_LINK)


common.run_page(body)
