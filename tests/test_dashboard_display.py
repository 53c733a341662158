"""What a person reads on the pages: human units, short metric values, engines named by
role / rank / host and never by a raw UUID, human table headers, the Layers hint.

Databases are written through the real exporter (test_dashboard_instances' two hosts,
test_dashboard_queries' connectors); expected texts are worked out in the comments.
No GPU, NIXL or vLLM required.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from streamlit import dataframe_util
from streamlit.testing.v1 import AppTest
from test_dashboard_app import charts, metrics, open_page
from test_dashboard_handover import write_handover_db
from test_dashboard_instances import P0, P1, D, without_processes
from test_dashboard_queries import MS, T0, SpanWriter, write_upstream

from hybrid_pd.dashboard import display
from hybrid_pd.dashboard import instance_queries as iq
from hybrid_pd.telemetry import attributes as A

PAGES = ("overview", "timeline", "handover", "layers", "descriptors", "failures")
UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# A metric value: a count, or a number with its unit ("25.2 ms", "229 MiB", "1.23 GiB/s",
# "23.9%").
METRIC_VALUE = re.compile(r"^-?[\d,]+(\.\d+)? ?(µs|ms|s|B|KiB|MiB|GiB|TiB|%)?(/s)?$")
MAX_METRIC_CHARS = 10  # what fits a metric's column at 1280 px, three per row


@pytest.fixture(scope="module")
def hosts_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two hosts' engines and the proxy's TTFT phases of their requests."""
    return write_handover_db(tmp_path_factory.mktemp("display") / "spans.db")


@pytest.fixture(scope="module")
def no_processes_db(hosts_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same spans in a database made before table ``processes``: no role, no host."""
    return without_processes(hosts_db, tmp_path_factory.mktemp("old") / "old.db")


def shown(table: Any) -> pd.DataFrame:
    """A table's cells as the page writes them: the Styler's display text."""
    return dataframe_util.convert_arrow_bytes_to_pandas_df(
        table.proto.arrow_data.styler.display_values)


def flat(v: Any) -> list[str]:
    """The strings of a chart's data array (``customdata`` nests one list per point)."""
    if isinstance(v, list):
        return [s for x in v for s in flat(x)]
    return [str(v)]


def texts(at: AppTest) -> list[str]:
    """Every text a person reads in the charts and tables of the page: legend names,
    category axes, hovers' data, table headers and cells (values and display text)."""
    out: list[str] = []
    for spec in charts(at):
        for tr in spec["data"]:
            out.append(str(tr.get("name", "")))
            for k in ("x", "y", "customdata"):
                out += flat(tr.get(k, []))
    for d in at.dataframe:
        for df in (d.value, shown(d)):
            out += [str(c) for c in df.columns]
            out += [str(x) for x in df.to_numpy().ravel()]
    return out


# ----------------------------------------------------------------------------- units


@pytest.mark.parametrize(("x", "text"), [(0, "0"), (0.0123, "0.0123"), (0.412, "0.412"),
                                         (4.5, "4.50"), (25.16, "25.2"), (99.96, "100"),
                                         (229.3, "229"), (1234.5, "1,234")])
def test_sig3(x: float, text: str) -> None:
    assert display.sig3(x) == text


@pytest.mark.parametrize(("ms", "text"), [(0.412, "412 µs"), (0.9996, "1.00 ms"), (3, "3.00 ms"),
                                          (25.16, "25.2 ms"), (229.3, "229 ms"),
                                          (999.7, "1.00 s"), (1234.5, "1.23 s"), (None, "–")])
def test_fmt_duration_ms(ms: float | None, text: str) -> None:
    assert display.fmt_duration_ms(ms) == text


@pytest.mark.parametrize(("n", "text"), [(229.3 * (1 << 20), "229 MiB"),
                                         (3296722944, "3.07 GiB"), (4700, "4.59 KiB"),
                                         (1023.7 * 1024, "1.00 MiB"), (3 << 40, "3.00 TiB"),
                                         (5000 << 40, "5,000 TiB")])
def test_fmt_bin_bytes_three_digits(n: float, text: str) -> None:
    assert display.fmt_bin_bytes(n) == text


def test_fmt_rate() -> None:
    assert display.fmt_rate(1.234 * (1 << 30)) == "1.23 GiB/s"
    assert display.fmt_rate(None) == display.fmt_rate(float("inf")) == "–"


def test_unknown_role_uuid_is_cut() -> None:
    """An engine missing from ``processes``: its role from the transfer spans, else
    "engine"; a UUID is cut to 8 hex digits either way, other ids stay whole."""
    assert iq.engine_label(D, None, None, 0) == "engine rank 0 (33333333)"
    assert iq.engine_label("decode-h", None, None, 0) == "decode-h rank 0"
    pairs = pd.DataFrame({"d_engine_id": [D, D], "p_engine_id": [P0, None]})
    assert iq.span_roles(pairs) == {D: "decode", P0: "prefill"}
    procs = pd.DataFrame(columns=list(iq.PROCESS_COLUMNS))
    d = iq.engine_directory(procs, (D, P0, P1), iq.span_roles(pairs))
    assert d["label"].tolist() == ["prefill (11111111)", "engine (22222222)", "decode (33333333)"]


# ----------------------------------------------------------------------------- pages


def test_layers_hint_names_serve_and_bench(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Whole-request READs only (serve's default granularity): the hint names both ways."""
    w = SpanWriter(tmp_path / "request.db")
    write_upstream(w)
    w.provider.shutdown()
    at = open_page(monkeypatch, tmp_path / "request.db", "layers")
    (hint,) = [i.value for i in at.info]
    assert "hybrid-pd serve ... --kv-read-granularity layer|sampled:K" in hint, hint
    assert "hybrid-pd bench ... --granularity layer" in hint, hint
    assert not charts(at)


@pytest.mark.parametrize("db", ["hosts_db", "no_processes_db"])
def test_overview_metrics_are_short(monkeypatch: pytest.MonkeyPatch, db: str,
                                    request: pytest.FixtureRequest) -> None:
    at = open_page(monkeypatch, request.getfixturevalue(db), "overview")
    m = metrics(at)
    # 4 transfers of 1 + 3 + 2 + 1 MiB = 7 MiB over 2 + 4 + 6 + 8 = 20 ms: 350 MiB/s;
    # p50 = 2nd of [2, 4, 6, 8] = 4 ms, p90 = p99 = 8 ms; r2's transfer failed
    assert m == {"transfers": "4", "bytes moved": "7.00 MiB", "bandwidth": "350 MiB/s",
                 "latency p50": "4.00 ms", "latency p90": "8.00 ms", "latency p99": "8.00 ms",
                 "failed": "1", "stalled": "0", "aborted": "0"}, m


@pytest.mark.parametrize("page", PAGES)
def test_every_metric_fits(monkeypatch: pytest.MonkeyPatch, hosts_db: Path, page: str) -> None:
    at = open_page(monkeypatch, hosts_db, page)
    for label, value in metrics(at).items():
        assert len(value) <= MAX_METRIC_CHARS and METRIC_VALUE.match(value), (page, label, value)
        assert len(label) <= 20, (page, label)


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("db", ["hosts_db", "no_processes_db"])
def test_no_raw_uuid_anywhere(monkeypatch: pytest.MonkeyPatch, db: str, page: str,
                              request: pytest.FixtureRequest) -> None:
    """The engines are UUIDs: legends, axes, hovers and tables name them by role, rank
    and host (or role from the spans, without ``processes``), never by the raw id."""
    at = open_page(monkeypatch, request.getfixturevalue(db), page)
    seen = texts(at) + [str(o) for w in at.multiselect if w.key == "engines" for o in w.options]
    raw = sorted({t for t in seen if UUID.search(t)})
    assert not raw, raw
    assert any("(33333333)" in t for t in seen), page  # D is named somewhere on each page


def test_overview_legends_name_roles_without_processes(monkeypatch: pytest.MonkeyPatch,
                                                       no_processes_db: Path) -> None:
    at = open_page(monkeypatch, no_processes_db, "overview")
    latency, wire, pairs = charts(at)
    # role from the spans (D of each transfer decodes), no host known
    assert {tr["name"] for tr in latency["data"]} == {"decode rank 0 (33333333) p50",
                                                      "decode rank 0 (33333333) slowest"}
    assert {tr["name"] for tr in pairs["data"]} == {"prefill (11111111)", "prefill (22222222)"}
    assert wire["layout"]["yaxis"]["title"]["text"].startswith("MiB transferred per ")


def test_descriptors_table_for_people(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """One 44,239.437 µs registration build of 123,456 descriptors over 3,296,722,944 B
    (3.07 GiB), beside upstream's builds (test_dashboard_queries.write_upstream)."""
    w = SpanWriter(tmp_path / "big.db")
    w.emit(A.SPAN_KV_DESC_BUILD, T0 - 60 * MS, 44_239_437, {
        A.CONNECTOR: "hybrid", A.KV_DESC_SCOPE: "local", A.KV_DESCRIPTORS: 123_456,
        A.KV_BYTES: 3_296_722_944, A.ENGINE_ID: "decode-h", A.KV_RANK: 0})
    write_upstream(w)
    w.provider.shutdown()
    at = open_page(monkeypatch, tmp_path / "big.db", "descriptors")
    table = at.dataframe[0]
    headers = list(table.value.columns)
    assert headers == ["scope", "connector", "builds", "descriptors", "bytes", "p50 (ms)",
                       "max (ms)"], headers
    assert not [h for h in headers if "." in h or "_" in h]  # no attribute keys
    cells = shown(table).set_axis(headers, axis=1)
    row = cells[(cells["connector"] == "hybrid")].iloc[0].to_dict()
    assert row == {"scope": "local", "connector": "hybrid", "builds": "1",
                   "descriptors": "123,456", "bytes": "3.07 GiB", "p50 (ms)": "44.2",
                   "max (ms)": "44.2"}, row
    # the numbers stay numbers underneath: the browser sorts by them
    assert table.value.loc[table.value["connector"] == "hybrid", "bytes"].iloc[0] == 3_296_722_944
    # upstream's request builds have no bytes (summed as 0)
    assert set(cells.loc[cells["scope"] == "request", "bytes"]) == {"0 B"}


@pytest.mark.parametrize("page", PAGES)
def test_table_cells_are_formatted(monkeypatch: pytest.MonkeyPatch, hosts_db: Path,
                                   page: str) -> None:
    """Every table of every page: headers without attribute keys or snake_case, no cell
    with more than four digits after the point, no "nan"."""
    at = open_page(monkeypatch, hosts_db, page)
    assert at.dataframe, page
    for d in at.dataframe:
        cells = shown(d)
        headers = [str(c) for c in d.value.columns]
        assert not [h for h in headers if re.search(r"[a-z]\.[a-z]|_", h)], (page, headers)
        bad = [c for c in cells.to_numpy().ravel()
               if re.search(r"\d\.\d{5,}", str(c)) or str(c) in ("nan", "None", "<NA>")]
        assert not bad, (page, headers, bad[:5])


@pytest.mark.parametrize(("before", "after"), [("auto", "viewer"), ("developer", "developer")])
def test_app_run_directly_gets_the_viewer_toolbar(monkeypatch: pytest.MonkeyPatch,
                                                  hosts_db: Path, before: str, after: str) -> None:
    """`streamlit run app.py` without `hybrid-pd dashboard`: app.py turns the default
    ("auto", which shows "Deploy" on localhost) into the viewer's toolbar, and leaves a
    mode given on the command line alone."""
    from streamlit import config

    config.set_option("client.toolbarMode", before)
    try:
        open_page(monkeypatch, hosts_db, "overview")
        assert config.get_option("client.toolbarMode") == after
    finally:
        config.set_option("client.toolbarMode", "auto")
