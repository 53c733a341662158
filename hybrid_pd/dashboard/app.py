"""Streamlit entry point: the router over the dashboard pages.

    HYBRID_PD_TELEMETRY_DB=runs/spans.db streamlit run hybrid_pd/dashboard/app.py
    hybrid-pd dashboard --db runs/spans.db        # the same, headless on 127.0.0.1

``st.navigation`` is called once, here only; each page is its own module under ``views/``
so an AppTest can open one page at a time.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from hybrid_pd.dashboard.cli import TOOLBAR_MODE

# `hybrid-pd dashboard` passes --client.toolbarMode; a bare `streamlit run app.py` gets it
# here, from the process's second script run on (the toolbar is sent as a run starts).
# Only over the default "auto": a mode chosen on the command line is kept.
if st.get_option("client.toolbarMode") == "auto":
    st.set_option("client.toolbarMode", TOOLBAR_MODE)

# Not "pages/": Streamlit would also treat that directory as legacy (v1) multipage
# navigation and list the raw file names in the sidebar.
PAGES_DIR = Path(__file__).resolve().parent / "views"  # absolute: st.Page joins relative ones

pg = st.navigation(
    {
        "Transfers": [
            st.Page(PAGES_DIR / "overview.py", title="Overview", icon=":material/monitoring:",
                    default=True),
            st.Page(PAGES_DIR / "timeline.py", title="Request timeline",
                    icon=":material/view_timeline:", url_path="timeline"),
            st.Page(PAGES_DIR / "handover.py", title="Handover",
                    icon=":material/waterfall_chart:", url_path="handover"),
        ],
        "Details": [
            st.Page(PAGES_DIR / "layers.py", title="Layers", icon=":material/layers:"),
            st.Page(PAGES_DIR / "descriptors.py", title="Descriptors", icon=":material/list:"),
            st.Page(PAGES_DIR / "failures.py", title="Failures", icon=":material/error:"),
        ],
    }
)
st.set_page_config(page_title="hybrid-pd telemetry", layout="wide")
pg.run()
