"""Failures: failed, stalled and aborted transfers with reasons and their request."""

from __future__ import annotations

import streamlit as st

from hybrid_pd.dashboard import common, transfer_queries
from hybrid_pd.dashboard import instance_queries as iq
from hybrid_pd.telemetry import attributes as A


def body() -> None:
    db = common.require_db()
    start, end = common.sidebar_window(db)
    engines = common.sidebar_instances(db)
    st.title("Failures")
    n = common.failure_counts(db, start, end, engines)
    if not any(n.values()):
        st.success("No failed, stalled or aborted transfers in this time range.")
        return
    c = st.columns(3)
    c[0].metric("failed spans", n["errors"])
    c[1].metric("stalls", n["stalls"])
    c[2].metric("aborts", n["aborts"])
    f = iq.label_engines(common.failures(db, start, end, engines), common.engine_directory(db))
    if len(f) >= transfer_queries.FAILURES_MAX_ROWS:
        st.caption(f"Newest {transfer_queries.FAILURES_MAX_ROWS:,} of them (the counts above "
                   "cover the whole range; narrow it to list older ones).")
    f["reason"] = f[A.KV_FAILURE_REASON].fillna(f["status_message"])
    f["timeline"] = "/timeline?request=" + f["request_id"].astype(str)
    st.dataframe(
        f[["start", "name", "request_id", "timeline", "engine", "peer_rank",
           "layer", "status", A.KV_STATUS, "reason", A.KV_WAITED_MS]],
        hide_index=True, key="failures_table",
        column_config={"timeline": st.column_config.LinkColumn("timeline", display_text="open")},
    )


common.run_page(body)
