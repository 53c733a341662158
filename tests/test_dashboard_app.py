"""Each dashboard page under streamlit's AppTest, on real bench spans and on bad databases.

One AppTest per page: the router in app.py is run, then switched to the page.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, insert
from streamlit.testing.v1 import AppTest

from hybrid_pd.dashboard import figures
from hybrid_pd.settings import ENV_TELEMETRY_DB
from hybrid_pd.telemetry.schema import SCHEMA_VERSION, metadata_obj, schema_version_table

APP = str(Path(__file__).resolve().parents[1] / "hybrid_pd" / "dashboard" / "app.py")
PAGES = ("overview", "timeline", "handover", "layers", "descriptors", "failures")
CONNECTORS_CAPTION = "Connectors in this range: "  # views/descriptors.py, under the metrics


def open_page(monkeypatch: pytest.MonkeyPatch, db: Path | str | None, page: str) -> AppTest:
    if db is None:
        monkeypatch.delenv(ENV_TELEMETRY_DB, raising=False)
    else:
        monkeypatch.setenv(ENV_TELEMETRY_DB, str(db))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    if page != "overview":  # overview is the default page
        at.switch_page(f"views/{page}.py")
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def count(text: str) -> int:
    """A metric's count as a number (``1,234`` -> 1234)."""
    return int(text.replace(",", ""))


def connectors_caption(at: AppTest) -> str:
    """The connector names the Descriptors page lists under its metrics."""
    (text,) = [c.value for c in at.caption if c.value.startswith(CONNECTORS_CAPTION)]
    return text.removeprefix(CONNECTORS_CAPTION)


def make_db(path: Path, version: int) -> Path:
    engine = create_engine(f"sqlite:///{path}")
    metadata_obj.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(schema_version_table), [{"version": version, "applied_ns": 0, "writer": "t"}])
    engine.dispose()
    return path


# ------------------------------------------------------------------ real bench database


def test_overview(monkeypatch: pytest.MonkeyPatch, bench_spans_db: Path) -> None:
    at = open_page(monkeypatch, bench_spans_db, "overview")
    m = metrics(at)
    assert m["transfers"] == "10", m  # 5 requests x 2 D ranks
    assert m["latency p50"].endswith(("µs", " ms")) and m["latency p99"].endswith(("µs", " ms"))
    assert m["bytes moved"].endswith(("KiB", "MiB")) and m["bandwidth"].endswith("iB/s"), m
    assert (m["failed"], m["stalled"], m["aborted"]) == ("0", "0", "0")
    specs = charts(at)
    assert len(specs) == 3  # latency, bytes on the wire, transfers per P-D pair
    assert specs[0]["layout"]["yaxis"]["title"]["text"] == "transfer latency (ms)"
    assert specs[2]["layout"]["yaxis"]["title"]["text"] == figures.PAIR_AXIS_TITLE
    assert len(at.dataframe) == 3  # per engine/rank, per P-D pair, reads by kind


def test_timeline(monkeypatch: pytest.MonkeyPatch, bench_spans_db: Path) -> None:
    at = open_page(monkeypatch, bench_spans_db, "timeline")
    assert len(charts(at)) == 1  # the latest request is shown without any click
    at.radio(key="pick_mode").set_value("by id").run()
    at.text_input(key="request_id").input("r0").run()
    assert not at.exception
    m = metrics(at)
    assert m["layer READs"] == "10" and m["errors"] == "0", m
    (spec,) = charts(at)
    ys = {y for tr in spec["data"] for y in tr["y"]}
    reads = sorted(y for y in ys if y.startswith(figures.READ_ROW_PREFIX))
    assert len(reads) == 10, reads  # 5 layers x (P0->D0, P0->D1)
    assert spec["layout"]["xaxis"]["title"]["text"] == figures.TIME_AXIS_TITLE
    assert {tr["name"] for tr in spec["data"]} >= {"attention", "mamba", "transfer", "notify"}
    # r0's handshakes ran before it: hidden by default, drawn on request.
    assert "handshake" not in {tr["name"] for tr in spec["data"]}
    at.toggle(key="show_handshakes").set_value(True).run()
    (spec,) = charts(at)
    assert "handshake" in {tr["name"] for tr in spec["data"]}
    assert at.query_params["request"] in ("r0", ["r0"])  # shareable URL
    at.radio(key="pick_mode").set_value("slowest").run()
    assert not at.exception and len(charts(at)) == 1


def test_timeline_unknown_request(monkeypatch: pytest.MonkeyPatch, bench_spans_db: Path) -> None:
    at = open_page(monkeypatch, bench_spans_db, "timeline")
    at.radio(key="pick_mode").set_value("by id").run()
    at.text_input(key="request_id").input("nope").run()
    assert not at.exception and not charts(at)
    assert any("No spans for request" in w.value for w in at.warning)


def test_layers(monkeypatch: pytest.MonkeyPatch, bench_spans_db: Path) -> None:
    at = open_page(monkeypatch, bench_spans_db, "layers")
    specs = charts(at)
    assert len(specs) == 3
    assert specs[0]["layout"]["yaxis"]["title"]["text"] == "READ latency (µs)"
    assert len(at.dataframe) == 1  # outliers


def test_descriptors(monkeypatch: pytest.MonkeyPatch, bench_spans_db: Path) -> None:
    from tests.test_dashboard_queries import raw_connectors

    at = open_page(monkeypatch, bench_spans_db, "descriptors")
    m = metrics(at)
    # a bench that writes the attribute labels its spans "bench"; one from before it
    # wrote none, and those count as ours
    bench = raw_connectors(bench_spans_db) == {"bench"}
    assert int(m["builds"]) > 0 and m["connectors"] == "1", m
    assert connectors_caption(at) == ("`bench`" if bench else "`hybrid`")
    assert len(charts(at)) == 1
    # one connector only: the comparison says so instead of a chart
    infos = [i.value for i in at.info]
    if bench:
        assert any("Only `bench` spans" in i and "not compared" in i for i in infos), infos
    else:
        assert any("Only the `hybrid` connector ran" in i and "--connector upstream" in i
                   for i in infos), infos


def test_descriptors_ours_vs_upstream(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tests.test_dashboard_queries import write_connector_db

    at = open_page(monkeypatch, write_connector_db(tmp_path / "both.db"), "descriptors")
    m = metrics(at)
    # builds: hybrid 2 local + 1 remote + 3 mapping, upstream 1 + 1 + 2 = 10; descriptors
    # 200 + 100 + 30 + 300 + 300 + 80 = 1,010 (see write_connector_db)
    assert m == {"builds": "10", "descriptors": "1,010", "connectors": "2"}, m
    assert connectors_caption(at) == "`hybrid`, `upstream`"
    specs = charts(at)
    assert len(specs) == 2, len(specs)  # builds per scope, then ours vs upstream
    cmp = specs[1]
    assert cmp["layout"]["yaxis"]["title"]["text"] == figures.COMPARISON_METRICS["descriptors_per_read"]
    assert cmp["layout"]["yaxis2"]["title"]["text"] == figures.COMPARISON_METRICS["bytes_per_read"]
    assert cmp["layout"]["barmode"] == "group"
    assert {tr["name"] for tr in cmp["data"]} == {"hybrid", "upstream"}
    assert len(at.dataframe) == 2  # builds per scope, medians (AppTest keeps no dataframe keys)
    medians = at.dataframe[1].value.set_index("connector")
    assert medians.loc["hybrid", "descriptors / READ"] == 1.8  # 9 descriptors / 5 READs
    assert medians.loc["upstream", "descriptors / READ"] == 40
    assert medians.loc["hybrid", "bytes / READ"] == 180 and medians.loc["upstream", "bytes / READ"] == 1000
    assert medians["requests"].to_dict() == {"hybrid": 3, "upstream": 2}
    assert not at.info, [i.value for i in at.info]


def test_descriptors_one_connector_in_range(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Both connectors in the database but only upstream's spans in the newest minute."""
    from tests.test_dashboard_queries import T0, UPSTREAM_T0, write_connector_db

    db = write_connector_db(tmp_path / "both.db")
    monkeypatch.setenv(ENV_TELEMETRY_DB, str(db))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("views/descriptors.py")
    at.run()
    at.selectbox(key="time_range").set_value("last 1 min").run()
    assert not at.exception, [e.value for e in at.exception]
    assert metrics(at)["connectors"] == "1" and connectors_caption(at) == "`upstream`"
    assert any("Only the `upstream` connector ran" in i.value for i in at.info)
    assert len(charts(at)) == 1
    assert UPSTREAM_T0 - T0 > 60 * 10**9  # hybrid's spans are older than the last minute


def test_descriptors_bench_not_compared(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Bench spans beside both connectors: their own group in the builds chart and table,
    absent from the ours-vs-upstream chart and medians (see write_bench)."""
    from tests.test_dashboard_queries import write_connector_db

    at = open_page(monkeypatch, write_connector_db(tmp_path / "b.db", bench=True), "descriptors")
    m = metrics(at)
    # 10 builds / 1,010 descriptors of both connectors, plus bench's 1 + 2 builds of
    # 50 + 2*6 = 62 descriptors
    assert m == {"builds": "13", "descriptors": "1,072", "connectors": "3"}, m
    assert connectors_caption(at) == "`bench`, `hybrid`, `upstream`"
    bars, cmp = charts(at)
    by_name = {tr["name"]: tr for tr in bars["data"]}
    assert set(by_name) == {"bench", "hybrid", "upstream"}
    assert by_name["bench"]["marker"]["color"] == figures.CONNECTOR_COLOURS["bench"]
    assert {tr["name"] for tr in cmp["data"]} == {"hybrid", "upstream"}
    table, medians = (d.value for d in at.dataframe)
    assert set(table.loc[table["connector"] == "bench", "scope"]) == {"local", "request"}
    medians = medians.set_index("connector")
    # the medians of the database without bench spans (test_descriptors_ours_vs_upstream)
    assert medians["requests"].to_dict() == {"hybrid": 3, "upstream": 2}
    assert medians.loc["hybrid", "descriptors / READ"] == 1.8
    assert medians.loc["hybrid", "bytes / READ"] == 180
    assert any("`bench` spans" in c.value and "left out" in c.value for c in at.caption)
    assert not at.info, [i.value for i in at.info]


def test_descriptors_bench_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tests.test_dashboard_queries import SpanWriter, write_bench

    w = SpanWriter(tmp_path / "bench.db")
    write_bench(w)
    w.provider.shutdown()
    at = open_page(monkeypatch, tmp_path / "bench.db", "descriptors")
    assert metrics(at) == {"builds": "3", "descriptors": "62", "connectors": "1"}
    assert connectors_caption(at) == "`bench`"
    assert len(charts(at)) == 1  # builds only, no comparison
    infos = [i.value for i in at.info]
    assert any("Only `bench` spans" in i and "not compared" in i for i in infos), infos


def test_failures_none(monkeypatch: pytest.MonkeyPatch, bench_spans_db: Path) -> None:
    at = open_page(monkeypatch, bench_spans_db, "failures")
    assert any("No failed" in s.value for s in at.success)


def test_failures_synthetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tests.test_dashboard_queries import load_gen

    db = tmp_path / "f.db"
    load_gen().generate(db, 3_000, seed=3, fail_rate=0.5)
    at = open_page(monkeypatch, db, "failures")
    m = metrics(at)
    assert count(m["aborts"]) > 0 and count(m["stalls"]) == count(m["aborts"]), m
    assert len(at.dataframe) == 1
    # the counts are over the whole range, the table lists every failure (< the cap)
    table = at.dataframe[0].value
    assert len(table) == count(m["failed spans"]) + count(m["stalls"]), (len(table), m)


def test_failures_by_hand(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tests.test_dashboard_queries import write_connector_db

    at = open_page(monkeypatch, write_connector_db(tmp_path / "both.db"), "failures")
    # upstream r1: READ, transfer and abort ERROR, one stall
    assert metrics(at) == {"failed spans": "3", "stalls": "1", "aborts": "1"}
    (table,) = (d.value for d in at.dataframe)
    assert set(table["request"]) == {"r1"} and len(table) == 4


def test_overview_by_hand(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tests.test_dashboard_queries import write_connector_db

    at = open_page(monkeypatch, write_connector_db(tmp_path / "both.db"), "overview")
    m = metrics(at)
    # transfers of 1..5 ms: nearest-rank p50 = 3rd = 3 ms, p90 = p99 = 5th = 5 ms
    assert (m["transfers"], m["latency p50"], m["latency p90"], m["latency p99"]) == (
        "5", "3.00 ms", "5.00 ms", "5.00 ms"), m
    # 4,700 B = 4.59 KiB
    assert m["bytes moved"] == "4.59 KiB", m
    assert (m["failed"], m["stalled"], m["aborted"]) == ("1", "1", "1"), m
    per = at.dataframe[0].value.set_index("engine")  # per engine and D rank
    assert per["transfers"].to_dict() == {"decode-h rank 0": 3, "decode-u rank 0": 2}
    assert per.loc["decode-u rank 0", "p99 (ms)"] == 5 and per.loc["decode-h rank 0", "p50 (ms)"] == 2
    latency, wire, pair = charts(at)
    # no resource named a role or host: the engines keep their ids, one P ("unknown P")
    assert {tr["name"] for tr in pair["data"]} == {"unknown P"}
    assert sorted(x for tr in pair["data"] for x in tr["x"]) == ["decode-h", "decode-u"]
    # one bucket per engine with transfers: hybrid's at T0, upstream's 2 min later
    assert latency["layout"]["yaxis"]["title"]["text"] == figures.LATENCY_AXIS_TITLE
    traces = {tr["name"]: tr for tr in latency["data"]}
    assert set(traces) == {"decode-h rank 0 p50", "decode-u rank 0 p50",
                           "decode-h rank 0 slowest", "decode-u rank 0 slowest"}
    assert all(len(tr["x"]) == 1 for tr in traces.values())
    # the slowest dot names its request: r2 (3 ms) on decode-h, r1 (5 ms) on decode-u
    assert traces["decode-h rank 0 slowest"]["customdata"][0][0] == "r2"
    assert traces["decode-u rank 0 slowest"]["customdata"][0][0] == "r1"
    assert wire["layout"]["yaxis"]["title"]["text"].startswith("MiB transferred per ")


def test_older_database_works_and_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A file made before the dashboard's indexes: same numbers, a note naming them."""
    from tests.test_dashboard_queries import without_dashboard_indexes, write_connector_db

    new = write_connector_db(tmp_path / "new.db")
    old = without_dashboard_indexes(new, tmp_path / "old.db")
    for page in ("overview", "failures", "descriptors"):
        at_old = open_page(monkeypatch, old, page)
        notes = [w.value for w in at_old.sidebar.warning]
        assert any("ix_spans_transfer_cover" in n and "never writes" in n for n in notes), notes
        sql = [c.value for c in at_old.sidebar.code]
        assert any("CREATE INDEX IF NOT EXISTS ix_spans_error_start_ns" in c for c in sql), sql
        at_new = open_page(monkeypatch, new, page)
        assert not at_new.sidebar.warning
        assert metrics(at_old) == metrics(at_new), page


# ------------------------------------------------------------------ missing / empty / newer


@pytest.mark.parametrize("page", PAGES)
def test_missing_db(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, page: str) -> None:
    at = open_page(monkeypatch, tmp_path / "none.db", page)
    assert any("does not exist" in i.value and "hybrid-pd bench" in i.value for i in at.info)
    assert not charts(at)
    assert not (tmp_path / "none.db").exists()


@pytest.mark.parametrize("page", PAGES)
def test_empty_db(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, page: str) -> None:
    at = open_page(monkeypatch, make_db(tmp_path / "empty.db", SCHEMA_VERSION), page)
    assert any("no spans yet" in i.value for i in at.info), [i.value for i in at.info]
    assert not charts(at)


def test_newer_schema(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    at = open_page(monkeypatch, make_db(tmp_path / "new.db", SCHEMA_VERSION + 1), "timeline")
    assert any("newer than the version" in e.value for e in at.error)


def test_no_db_selected(monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_page(monkeypatch, None, "overview")
    assert any(ENV_TELEMETRY_DB in w.value for w in at.warning)


# ------------------------------------------------------------------ dropped-spans banner


def test_drops_banner_on_every_page(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                    bench_spans_db: Path) -> None:
    import shutil
    import sqlite3

    from hybrid_pd.telemetry.sqlite_exporter import SQLiteSpanExporter

    db = tmp_path / "drops.db"
    shutil.copy(bench_spans_db, db)
    exporter = SQLiteSpanExporter(db)  # a writer: creates telemetry_drops on the copy
    exporter.note_drop("sqlite", "queue_full", 12)
    exporter.note_drop("otlp-grpc", "export_failed", 3)
    assert exporter.write_drops()
    exporter.shutdown()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT SUM(spans) FROM telemetry_drops").fetchone() == (15,)
    for page in PAGES:
        at = open_page(monkeypatch, db, page)
        banners = [w.value for w in at.warning if "dropped" in w.value]
        assert len(banners) == 1, (page, [w.value for w in at.warning])
        assert "12 by sqlite (queue_full)" in banners[0] and "3 by otlp-grpc" in banners[0]


def test_no_drops_no_banner(monkeypatch: pytest.MonkeyPatch, bench_spans_db: Path) -> None:
    for page in PAGES:
        at = open_page(monkeypatch, bench_spans_db, page)
        assert not [w.value for w in at.warning if "dropped" in w.value], page
