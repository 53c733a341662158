"""The dashboard in a real browser: `hybrid-pd dashboard` on loopback + headless Chromium.

Chromium and chromedriver are Debian packages (scripts/setup.sh installs them as root);
the test skips with that hint when they are missing.  The screenshot goes to
``artifacts/dashboard_timeline.png`` (CI keeps artifacts/).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_port

from hybrid_pd.dashboard import figures
from hybrid_pd.telemetry import attributes as A

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
REQUEST = "r0"


@contextlib.contextmanager
def dashboard_at(db: Path) -> Iterator[str]:
    """`hybrid-pd dashboard --db DB --port N` running; yields its base URL."""
    port = free_port()
    log_path = db.parent / f"dashboard-{port}.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "hybrid_pd.cli", "dashboard", "--db", str(db), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # own group: kill only it
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "dashboard did not come up in 90 s"
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def dashboard(bench_spans_db: Path) -> Iterator[str]:
    with dashboard_at(bench_spans_db) as base:
        yield base


def expected_read_rows(db: Path, request_id: str) -> int:
    """Distinct (layer, P rank, D rank) READs of the request, straight from the file."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    (n,) = con.execute(
        "SELECT count(*) FROM (SELECT DISTINCT layer, peer_rank, rank FROM spans "
        "WHERE request_id = ? AND name = ?)", (request_id, A.SPAN_KV_READ)).fetchone()
    con.close()
    return int(n)


def test_timeline_in_browser(dashboard: str, browser, bench_spans_db: Path) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    want = expected_read_rows(bench_spans_db, REQUEST)
    assert want == 10  # tiny Nemotron-H: 5 layers x 2 D ranks
    # The viewport itself at 1280x800 (--window-size counts the window, not the page).
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    browser.get(f"{dashboard}/timeline?request={REQUEST}")
    wait = WebDriverWait(browser, 90)
    chart = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".js-plotly-plot")))
    tick_js = ("return Array.from(document.querySelectorAll("
               "'.js-plotly-plot .yaxislayer-above .ytick text')).map(e => e.textContent)")
    wait.until(lambda d: any(t.startswith(figures.READ_ROW_PREFIX) for t in d.execute_script(tick_js)))
    ticks = browser.execute_script(tick_js)
    reads = [t for t in ticks if t.startswith(figures.READ_ROW_PREFIX)]
    assert len(reads) == len(set(reads)) == want, ticks
    assert {"P0→D0", "P0→D1"} == {t.split()[-1] for t in reads}
    xtitle = browser.execute_script(
        "return document.querySelector('.js-plotly-plot .g-xtitle text').textContent")
    assert xtitle == figures.TIME_AXIS_TITLE
    assert f"request {REQUEST}" in browser.page_source
    ARTIFACTS.mkdir(exist_ok=True)
    time.sleep(1.0)  # let Plotly finish its transition before the picture
    browser.save_screenshot(str(ARTIFACTS / "dashboard_timeline.png"))
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", chart)
    time.sleep(0.5)
    chart.screenshot(str(ARTIFACTS / "dashboard_timeline_chart.png"))
    assert (ARTIFACTS / "dashboard_timeline.png").stat().st_size > 10_000
