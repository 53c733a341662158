"""Each dashboard page under streamlit's AppTest, on real bench spans and on bad databases.

One AppTest per page (STYLE §5): the router in app.py is run, then switched to the page.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, insert
from streamlit.testing.v1 import AppTest

from hybrid_pd.dashboard import figures
from hybrid_pd.dashboard.queries import ENV_DB
from hybrid_pd.telemetry.schema import SCHEMA_VERSION, metadata_obj, schema_version_table

APP = str(Path(__file__).resolve().parents[1] / "hybrid_pd" / "dashboard" / "app.py")
PAGES = ("overview", "timeline", "layers", "descriptors", "failures")


def open_page(monkeypatch: pytest.MonkeyPatch, db: Path | str | None, page: str) -> AppTest:
    if db is None:
        monkeypatch.delenv(ENV_DB, raising=False)
    else:
        monkeypatch.setenv(ENV_DB, str(db))
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
    assert m["latency p50"].endswith(" ms") and m["latency p99"].endswith(" ms")
    assert m["bytes moved"].endswith("MB") and float(m["GB/s (per transfer)"]) > 0
    assert m["failed / stalled / aborted"] == "0 / 0 / 0"
    specs = charts(at)
    assert len(specs) == 2
    assert specs[0]["layout"]["yaxis"]["title"]["text"] == "transfer latency (ms)"
    assert len(at.dataframe) == 2  # per engine/rank, reads by kind


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
    at = open_page(monkeypatch, bench_spans_db, "descriptors")
    m = metrics(at)
    assert int(m["builds"]) > 0 and m["connectors"] == "hybrid", m
    assert len(charts(at)) == 1


def test_failures_none(monkeypatch: pytest.MonkeyPatch, bench_spans_db: Path) -> None:
    at = open_page(monkeypatch, bench_spans_db, "failures")
    assert any("No failed" in s.value for s in at.success)


def test_failures_synthetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tests.test_dashboard_queries import load_gen

    db = tmp_path / "f.db"
    load_gen().generate(db, 3_000, seed=3, fail_rate=0.5)
    at = open_page(monkeypatch, db, "failures")
    m = metrics(at)
    assert int(m["aborts"]) > 0 and int(m["stalls"]) == int(m["aborts"]), m
    assert len(at.dataframe) == 1


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
    assert any(ENV_DB in w.value for w in at.warning)
