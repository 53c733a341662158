"""End to end, one real `hybrid-pd serve` for the telemetry an operator reads:

* each request's spans over OTLP: a real OTLP receiver (the ``rotel`` collector,
  tests/helpers.py) gets the same tree as SQLite;
* the handover breakdown: 12 ``hybrid_pd.ttft.*`` phases per request tiling its TTFT,
  checked against the client's clock and D's own transfer span;
* the connector's ``hybrid_pd_*`` metrics on each engine's ``/metrics``, checked against
  the spans of the same requests.

One `hybrid-pd serve` (tiny Nemotron-H, hybrid connector, one P + one D) runs with
``--telemetry-db`` and only the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` (gRPC, the
default protocol) in its environment, so P, D and the proxy each write to both sinks.
For a request sent through the proxy (once answered as JSON, once streamed) the spans of
its trace are compared generically: whatever SQLite holds for the trace (span ids,
names, parent span names, services, counts per name) must have arrived over OTLP, and
nothing more.  Spans that end after the answer (P's ``hybrid_pd.kv.notify`` ends when D
notifies P) and the 0.5 s batches of both sinks are waited for with a bound.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import Rotel, serve_command, serving

from e2e.test_pd_e2e import body, pd_ports, streamed_tokens, token_prompt
from hybrid_pd.telemetry import attributes as A

pytestmark = pytest.mark.e2e

# The spans every P/D request has, whatever else the proxy or engines add to its trace.
CORE = (A.SPAN_PROXY_REQUEST, A.SPAN_PROXY_PREFILL, A.SPAN_PROXY_DECODE,
        A.SPAN_KV_TRANSFER, A.SPAN_KV_READ, A.SPAN_KV_NOTIFY)
# (span, parent) pairs of the core tree: P's hold under the proxy's prefill call, D's
# transfer under its decode call.
CORE_EDGES = ((A.SPAN_PROXY_PREFILL, A.SPAN_PROXY_REQUEST),
              (A.SPAN_PROXY_DECODE, A.SPAN_PROXY_REQUEST),
              (A.SPAN_KV_NOTIFY, A.SPAN_PROXY_PREFILL),
              (A.SPAN_KV_TRANSFER, A.SPAN_PROXY_DECODE))
# attributes.py calls kv.transfer the parent of its reads, but inside vLLM (serve) the
# connector emits kv.transfer last, beside its reads, all under the decode call: accept both.
READ_PARENTS = (A.SPAN_KV_TRANSFER, A.SPAN_PROXY_DECODE)
SPANS_BOUND_S = 30.0  # for a trace's spans to reach both sinks (batches leave every 0.5 s)
SETTLE_S = 1.5        # both sinks unchanged this long: no late span of the trace is on its way
ROOT = "<root>"


@dataclass(frozen=True)
class Served:
    proxy: str
    model: Path
    db: Path
    rotel: Rotel
    prefill: str
    decode: str


@pytest.fixture(scope="module")
def served(rotel: Rotel, tiny_models: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One `hybrid-pd serve` whose spans go to a SQLite file and, over OTLP/gRPC, to rotel."""
    model = tiny_models["tiny-nemotron-h"]
    tmp = tmp_path_factory.mktemp("otlp_tree")
    db = tmp / "telemetry.db"
    ports = pd_ports()
    # only the standard variable: the OTLP sink of every process follows it
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{rotel.grpc_port}"
    cmd = serve_command(model, ports, tmp / "serve", "--telemetry-db", str(db),
                        "--health-timeout", "500")
    with serving(cmd, env):
        yield Served(f"http://127.0.0.1:{ports.proxy}", model, db, rotel,
                     f"http://127.0.0.1:{ports.prefill}", f"http://127.0.0.1:{ports.decode}")


# ------------------------------------------------------------------------------ the sinks


def _query(db: Path, sql: str, *args: object) -> list[tuple[Any, ...]] | None:
    """Rows, or None while the file is missing or busy (the writers' batches)."""
    if not db.exists():
        return None
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()
    except sqlite3.OperationalError:
        return None


def sqlite_spans(db: Path, trace_id: str | None = None) -> dict[str, dict[str, Any]] | None:
    """span id -> {trace_id, parent, name, service} as stored (one trace, or all)."""
    sql = "SELECT span_id, trace_id, parent_span_id, name, service FROM spans"
    rows = _query(db, sql + " WHERE trace_id = ?", trace_id) if trace_id else _query(db, sql)
    if rows is None:
        return None
    return {r[0]: {"trace_id": r[1], "parent": r[2], "name": r[3], "service": r[4]} for r in rows}


def otlp_spans(rotel: Rotel, trace_id: str | None = None) -> dict[str, dict[str, Any]]:
    """span id -> {trace_id, parent, name, service, attributes} as received (one trace, or all)."""
    return {k: v for k, v in rotel.spans().items() if trace_id is None or v["trace_id"] == trace_id}


def request_trace_id(db: Path, request_id: str) -> str:
    """The trace of the proxy's span for ``request_id``, once SQLite has it."""
    t0 = time.monotonic()
    while True:
        rows = _query(db, "SELECT DISTINCT trace_id FROM spans WHERE name = ? AND request_id = ?",
                      A.SPAN_PROXY_REQUEST, request_id)
        if rows:
            assert len(rows) == 1, f"request {request_id}: several proxy traces {rows}"
            return rows[0][0]
        assert time.monotonic() - t0 < SPANS_BOUND_S, (
            f"no {A.SPAN_PROXY_REQUEST} span for request {request_id} in {db} after "
            f"{SPANS_BOUND_S:.0f} s")
        time.sleep(0.25)


def settled(fetch_sqlite, fetch_otlp, complete) -> tuple[dict, dict, float]:
    """Poll both sinks until ``complete(sqlite, otlp)``, the same span ids in both, and no
    change for SETTLE_S; after SPANS_BOUND_S return what is there (the caller's asserts
    then say what is missing).  Also returns the seconds waited."""
    t0 = time.monotonic()
    last: tuple[frozenset, frozenset] | None = None
    since = t0
    sq: dict = {}
    while True:
        got = fetch_sqlite()
        sq = sq if got is None else got
        ot = fetch_otlp()
        now = time.monotonic()
        key = (frozenset(sq), frozenset(ot))
        if key != last:
            last, since = key, now
        if complete(sq, ot) and set(sq) == set(ot) and now - since >= SETTLE_S:
            return sq, ot, now - t0
        if now - t0 > SPANS_BOUND_S:
            return sq, ot, now - t0
        time.sleep(0.25)


# --------------------------------------------------------------------------- comparison


def edges(spans: dict[str, dict[str, Any]]) -> Counter[tuple[str, str]]:
    """Multiset of (span name, parent span name); a parent outside ``spans`` is named by id."""
    return Counter((s["name"], ROOT if s["parent"] is None else
                    spans[s["parent"]]["name"] if s["parent"] in spans else
                    f"<absent {s['parent']}>") for s in spans.values())


def _diff(a: Counter, b: Counter) -> str:
    return f"only in SQLite: {dict(a - b)}; only over OTLP: {dict(b - a)}"


def assert_same_spans(sq: dict[str, dict[str, Any]], ot: dict[str, dict[str, Any]],
                      what: str) -> None:
    """The same spans in both sinks: ids, and per id name, parent, trace and service; so
    also the same (name, parent name) multiset and the same count per name."""
    names_sq = Counter(s["name"] for s in sq.values())
    names_ot = Counter(s["name"] for s in ot.values())
    assert names_sq == names_ot, f"{what}: span counts per name differ: {_diff(names_sq, names_ot)}"
    tree_sq, tree_ot = edges(sq), edges(ot)
    assert tree_sq == tree_ot, f"{what}: (span, parent) multisets differ: {_diff(tree_sq, tree_ot)}"
    missing = {k: sq[k]["name"] for k in set(sq) - set(ot)}
    extra = {k: ot[k]["name"] for k in set(ot) - set(sq)}
    assert not missing and not extra, (
        f"{what}: span ids differ: only in SQLite {missing}; only over OTLP {extra}")
    for span_id, s in sq.items():
        o = ot[span_id]
        assert (o["name"], o["parent"], o["trace_id"], o["service"]) == (
            s["name"], s["parent"], s["trace_id"], s["service"]), (what, span_id, s, o)


# -------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_request_trace_over_otlp_matches_sqlite(served: Served, stream: bool) -> None:
    request_id = f"otlp-tree-{'stream' if stream else 'json'}"
    payload = body(served.model, token_prompt(300), max_tokens=4)
    with httpx.Client(timeout=120, headers={"X-Request-Id": request_id}) as c:
        if stream:
            assert len(streamed_tokens(c, served.proxy, payload)) == 4
        else:
            r = c.post(served.proxy + "/v1/completions", json=payload)
            assert r.status_code == 200, r.text
            assert len(r.json()["choices"][0]["token_ids"]) == 4

    trace_id = request_trace_id(served.db, request_id)

    def complete(sq: dict, ot: dict) -> bool:
        return all(n in {s["name"] for s in spans.values()} for spans in (sq, ot) for n in CORE)

    sq, ot, waited = settled(lambda: sqlite_spans(served.db, trace_id),
                             lambda: otlp_spans(served.rotel, trace_id), complete)
    print(f"\n{request_id}: trace {trace_id}, {len(sq)} spans in SQLite, {len(ot)} over OTLP "
          f"(waited {waited:.1f} s): {dict(sorted(Counter(s['name'] for s in sq.values()).items()))}")

    for sink, spans in (("SQLite", sq), ("OTLP", ot)):
        names = Counter(s["name"] for s in spans.values())
        lacking = [n for n in CORE if not names[n]]
        assert not lacking, (f"{request_id}: after {waited:.0f} s the {sink} sink still lacks "
                             f"{lacking} in trace {trace_id}; it has {dict(names)}")
        for n in (A.SPAN_PROXY_REQUEST, A.SPAN_PROXY_PREFILL, A.SPAN_PROXY_DECODE):
            assert names[n] == 1, (sink, n, dict(names))
        tree = edges(spans)
        # one tree: a single root (the proxy's request span), every parent in the trace
        roots = [name for (name, parent) in tree.elements() if parent == ROOT]
        assert roots == [A.SPAN_PROXY_REQUEST], (sink, roots)
        absent = {k: v for k, v in tree.items() if k[1].startswith("<absent")}
        assert not absent, f"{sink}: spans whose parent is not in trace {trace_id}: {absent}"
        for edge in CORE_EDGES:
            assert tree[edge] >= 1, (sink, edge, dict(tree))
        read_parents = {parent for (name, parent) in tree if name == A.SPAN_KV_READ}
        assert read_parents <= set(READ_PARENTS), (sink, read_parents)

    assert_same_spans(sq, ot, f"request {request_id}, trace {trace_id}")

    # trace ids are consistent: every span naming this request lies in this trace
    in_db = _query(served.db, "SELECT DISTINCT trace_id FROM spans WHERE request_id = ?", request_id)
    assert in_db == [(trace_id,)], in_db
    named = {s["trace_id"] for s in otlp_spans(served.rotel).values()
             if s["attributes"].get(A.REQUEST_ID) == request_id}
    assert named == {trace_id}, named


def test_every_stored_span_arrived_over_otlp(served: Served) -> None:
    """The whole run (start-up descriptor builds, the warm-up's handshake, the requests
    above): SQLite and OTLP hold the same spans, and no sink recorded a drop."""
    sq, ot, waited = settled(lambda: sqlite_spans(served.db), lambda: otlp_spans(served.rotel),
                             lambda sq, ot: bool(sq))
    drops = _query(served.db, "SELECT service, sink, reason, spans FROM telemetry_drops") or []
    print(f"\nwhole run: {len(sq)} spans in SQLite, {len(ot)} over OTLP (waited {waited:.1f} s)")
    assert_same_spans(sq, ot, f"whole run (drops recorded: {drops})")
    assert not drops, drops


# --------------------------------------------------------------- handover breakdown

BREAKDOWN_LENGTHS = (9, 300, 700, 1100)


def phase_rows(db: Path, request_id: str) -> list[tuple[Any, ...]]:
    """(name, start_ns, end_ns, attributes JSON) of the request's phase spans, by start."""
    return _query(db, "SELECT name, start_ns, end_ns, attributes FROM spans WHERE request_id = ? "
                  "AND name LIKE 'hybrid_pd.ttft.%' ORDER BY start_ns, end_ns", request_id) or []


def wait_rows(db: Path, sql: str, *args: object, n: int) -> list[tuple[Any, ...]]:
    t0 = time.monotonic()
    while True:
        rows = _query(db, sql, *args) or []
        if len(rows) >= n or time.monotonic() - t0 > SPANS_BOUND_S:
            return rows
        time.sleep(0.25)


def client_ttft_ms(c: httpx.Client, url: str, payload: dict) -> float:
    """Send to first streamed byte, on the client's clock."""
    t0 = time.perf_counter()
    with c.stream("POST", url, json=payload) as r:
        assert r.status_code == 200, r.read()
        it = r.iter_bytes()
        next(it)
        ttft = (time.perf_counter() - t0) * 1e3
        for _ in it:
            pass
    return ttft


def test_handover_phases_tile_ttft(served: Served) -> None:
    """Each P/D request: 12 phase spans in order, contiguous, >= 0, no clock correction on
    one box, summing to the proxy's TTFT within 1 ms; a streamed request's TTFT is within
    the client's; D's read phases start where D's own transfer span starts."""
    import json as _json

    client_ms: dict[str, float] = {}
    with httpx.Client(timeout=120) as c:
        for n in BREAKDOWN_LENGTHS:
            for stream in (False, True):
                rid = f"handover-{n}-{'stream' if stream else 'json'}"
                # distinct prompts: a prefix cached on D would leave nothing to read
                prompt = [t + int(stream) for t in token_prompt(n)]
                payload = body(served.model, prompt, max_tokens=4, stream=stream)
                c.headers["X-Request-Id"] = rid
                if stream:
                    client_ms[rid] = client_ttft_ms(c, served.proxy + "/v1/completions", payload)
                else:
                    r = c.post(served.proxy + "/v1/completions", json=payload)
                    assert r.status_code == 200, r.text
                    client_ms[rid] = r.elapsed.total_seconds() * 1e3
    table = []
    for rid, client in client_ms.items():
        rows = wait_rows(served.db, "SELECT name FROM spans WHERE request_id = ? AND name LIKE "
                         "'hybrid_pd.ttft.%'", rid, n=len(A.TTFT_PHASES))
        assert len(rows) == len(A.TTFT_PHASES), (rid, rows)
        phases = phase_rows(served.db, rid)
        names = [r[0] for r in phases]
        attrs = [_json.loads(r[3]) for r in phases]
        assert [a[A.TTFT_INDEX] for a in attrs] == list(range(len(A.TTFT_PHASES))), (rid, names)
        assert names == [f"hybrid_pd.ttft.{p}" for p in A.TTFT_PHASES], (rid, names)
        for (_, _s0, e0, _), (name, s1, _e1, _) in zip(phases, phases[1:], strict=False):
            assert s1 == e0, f"{rid}: gap or overlap before {name}: {s1 - e0} ns"
        durs = {r[0].rsplit(".", 1)[1]: (r[2] - r[1]) / 1e6 for r in phases}
        assert min(durs.values()) >= 0, (rid, durs)
        assert all(a[A.TTFT_SKEW_NS] == 0 for a in attrs), (
            f"{rid}: an engine instant out of order on one box: "
            f"{[(n, a[A.TTFT_SKEW_NS]) for n, a in zip(names, attrs, strict=True)]}")
        ttft = attrs[0][A.TTFT_MS]
        assert abs(sum(durs.values()) - ttft) <= 1.0, (rid, sum(durs.values()), ttft)
        root = _query(served.db, "SELECT attributes FROM spans WHERE request_id = ? AND name = ?",
                      rid, A.SPAN_PROXY_REQUEST)
        assert root and abs(_json.loads(root[0][0])[A.TTFT_MS] - ttft) <= 1.0, root
        assert ttft <= client + 1.0, f"{rid}: proxy TTFT {ttft:.2f} ms > client's {client:.2f} ms"
        assert not attrs[0][A.TTFT_COLD] and durs["handshake"] < 5.0, (rid, durs)
        transfer = wait_rows(served.db, "SELECT start_ns, end_ns FROM spans WHERE request_id = ? "
                             "AND name = ?", rid, A.SPAN_KV_TRANSFER, n=1)
        assert transfer, rid
        read_post = phases[A.TTFT_PHASES.index("read_post")]
        assert abs(read_post[1] - transfer[0][0]) < 1_000_000, (rid, read_post, transfer)
        table.append((rid, ttft, client, durs))
    print("\nrequest | proxy TTFT | client | " + " | ".join(A.TTFT_PHASES))
    for rid, ttft, client, durs in table:
        print(f"{rid} | {ttft:.1f} | {client:.1f} | "
              + " | ".join(f"{durs[p]:.2f}" for p in A.TTFT_PHASES))


# ------------------------------------------------------- the connector's /metrics

def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value of an engine's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items()
                                  if k not in ("model_name", "engine")))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def total(metrics: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in metrics.items() if n == name and want <= set(lab))


def span_totals(db: Path) -> dict[str, Any]:
    reads = _query(db, "SELECT layer_kind, COUNT(*), SUM(bytes) FROM spans WHERE name = ? AND "
                   "role = 'decode' AND status != 'ERROR' GROUP BY layer_kind", A.SPAN_KV_READ) or []
    one = lambda sql, *a: (_query(db, sql, *a) or [(0,)])[0][0]  # noqa: E731
    return {
        "reads": {k: (n, b) for k, n, b in reads},
        "transfers": one("SELECT COUNT(DISTINCT request_id) FROM spans WHERE name = ? AND "
                         "status != 'ERROR'", A.SPAN_KV_TRANSFER),
        "notified": one("SELECT COUNT(*) FROM spans WHERE name = ? AND role = 'prefill' AND "
                        "status != 'ERROR'", A.SPAN_KV_NOTIFY),
        "failed": one("SELECT COUNT(*) FROM spans WHERE name IN (?, ?)", A.SPAN_KV_STALL,
                      A.SPAN_KV_ABORT),
    }


def from_metrics(d: dict, p: dict) -> dict[str, Any]:
    kinds = {dict(lab)["layer_kind"] for (n, lab) in d if n == "hybrid_pd_kv_read_seconds_count"}
    return {
        "reads": {k: (int(total(d, "hybrid_pd_kv_read_seconds_count", layer_kind=k)),
                      int(total(d, "hybrid_pd_kv_read_bytes_sum", layer_kind=k))) for k in kinds},
        "transfers": int(total(d, "hybrid_pd_handover_phase_seconds_count", phase="d_first_step")),
        "notified": int(total(p, "hybrid_pd_handover_phase_seconds_count", phase="p_prefill")),
        "failed": int(total(d, "hybrid_pd_kv_stalls_total") + total(d, "hybrid_pd_kv_aborts_total")),
    }


def test_engine_metrics_match_the_spans(served: Served) -> None:
    """D's and P's hybrid_pd_* metrics count the same READs, bytes, handovers and
    failures as the spans of the same requests (all requests of this module so far)."""
    with httpx.Client(timeout=120, headers={"X-Request-Id": "metrics-1"}) as c:
        r = c.post(served.proxy + "/v1/completions",
                   json=body(served.model, token_prompt(520), max_tokens=2))
        assert r.status_code == 200, r.text
    t0 = time.monotonic()
    while True:  # spans leave in 0.5 s batches; metrics with the next engine step
        d, p = scrape(served.decode), scrape(served.prefill)
        want, got = span_totals(served.db), from_metrics(d, p)
        if want == got or time.monotonic() - t0 > SPANS_BOUND_S:
            break
        time.sleep(0.5)
    print("\n/metrics excerpt (decode):\n" + "\n".join(
        line for line in httpx.get(served.decode + "/metrics").text.splitlines()
        if line.startswith("hybrid_pd_") and ("_count" in line or "_total" in line)))
    assert got == want, f"metrics {got} != spans {want}"
    assert want["reads"] and want["transfers"] >= 2, want  # the warm-up and this one at least
    moved, optimal = total(d, "hybrid_pd_kv_bytes_moved_total"), total(d, "hybrid_pd_kv_bytes_optimal_total")
    assert moved == sum(b for _, b in want["reads"].values()), (moved, want)
    assert 0 < optimal <= moved, (moved, optimal)
    assert total(d, "vllm:nixl_xfer_time_seconds_count") == sum(n for n, _ in want["reads"].values())
    assert total(d, "hybrid_pd_engine_spans_exported_total", sink="sqlite") > 0
    print(f"bytes moved / optimal = {moved / optimal:.3f}")


# ------------------------------------------------- the dashboard on this serve's database

PAGES = ("", "timeline", "handover", "layers", "descriptors", "failures")
UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# every st.metric value and label, and whether its text overflows its box (CSS ellipsis)
CLIPPED_JS = """
return Array.from(document.querySelectorAll(
    '[data-testid="stMetricValue"], [data-testid="stMetricLabel"]'))
  .map(e => [e.innerText, e.scrollWidth > e.clientWidth + 1]);
"""


def test_dashboard_pages_at_1280px_on_this_serves_database(served: Served, browser) -> None:  # type: ignore[no-untyped-def]
    """Every page, on the database this serve wrote with its default flags, in Chromium at
    1280 px: something drawn, no metric value or label cut off, no raw engine UUID, no
    Deploy button; the Layers page has the per-layer READs of the default sampling (the
    warm-up is read layer by layer); screenshots of the Handover page go to artifacts/."""
    import re

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from e2e.test_dashboard_browser import ARTIFACTS, dashboard_at

    layered = _query(served.db, "SELECT COUNT(*) FROM spans WHERE name = ? AND layer IS NOT NULL",
                     A.SPAN_KV_READ)
    assert layered and layered[0][0] > 0, "serve's default granularity read no request per layer"
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 1280, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
    ARTIFACTS.mkdir(exist_ok=True)
    with dashboard_at(served.db) as base:
        for page in PAGES:
            browser.get(f"{base}/{page}")
            wait = WebDriverWait(browser, 90)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")
                       or d.find_elements(By.CSS_SELECTOR, '[data-testid="stAlert"]'))
            time.sleep(2.0)  # the rest of the page's elements after the first chart
            text = browser.find_element(By.TAG_NAME, "body").text
            assert "Traceback" not in text and "Error" not in text.split("\n")[0], (page, text[:2000])
            clipped = [t for t, over in browser.execute_script(CLIPPED_JS) if over]
            assert not clipped, f"page /{page}: metric text cut off at 1280 px: {clipped}"
            assert not re.search(UUID_RE, text), (page, re.search(UUID_RE, text))
            assert "Deploy" not in text, page
            if page in ("", "layers", "handover"):
                assert browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot"), (page, text[:1500])
            if page == "handover":
                browser.save_screenshot(str(ARTIFACTS / "dashboard_handover.png"))
        browser.get(f"{base}/handover?request=handover-1100-stream")
        WebDriverWait(browser, 90).until(
            lambda d: "handover-1100-stream" in d.find_element(By.TAG_NAME, "body").text)
        time.sleep(2.0)
        waterfall = browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")[-1]
        browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", waterfall)
        time.sleep(0.5)
        waterfall.screenshot(str(ARTIFACTS / "dashboard_handover_request.png"))
        assert (ARTIFACTS / "dashboard_handover.png").stat().st_size > 10_000
