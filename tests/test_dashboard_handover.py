"""The Handover page: the proxy's TTFT phase spans, their queries, figures and the page.

Phase spans are written through the real exporter by a "proxy" (service
``hybrid-pd-proxy``) beside test_dashboard_instances' engines (D reading from P0 and P1,
requests r0..r3), with durations chosen so every figure can be worked out by hand (see
``REQUESTS``); the generator's (scripts/gen_spans_db.py) are checked against pandas
oracles.  No GPU, NIXL or vLLM required.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind
from streamlit.testing.v1 import AppTest
from test_dashboard_app import APP, charts, metrics, open_page
from test_dashboard_instances import HT0, LABELS, P0, P1, D, write_multi_host
from test_dashboard_queries import SpanWriter, load_gen, nearest_rank, write_connector_db

from hybrid_pd.dashboard import handover_figures as hf
from hybrid_pd.dashboard import handover_queries as hq
from hybrid_pd.dashboard import queries
from hybrid_pd.settings import ENV_TELEMETRY_DB
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry.sqlite_exporter import SQLiteSpanExporter

MS = 10**6
# request id, prompt tokens, factor f, cold.  Phase j (0..11) of a request lasts (j+1)*f
# ms, except the handshake (j = 6): 7*f ms when cold, else 0.  So
#   TTFT: r0 78 ms (1+...+12), r1 2*71 = 142 ms, r2 213 ms, r3 284 ms
#   transfer (handshake + read_post + read_in_flight): r0 7+8+9 = 24 of 78 ms (30.8 %),
#   the warm ones 17f of 71f ms (23.9 %)
#   prompt buckets: r0 <1k, r1 + r2 1k-4k, r3 unknown (no usage attribute)
REQUESTS: tuple[tuple[str, int | None, int, bool], ...] = (
    ("r0", 500, 1, True), ("r1", 2_000, 2, False), ("r2", 3_000, 3, False),
    ("r3", None, 4, False),
)
# r1's p_queue end was moved 2 µs forward (a clock behind), as the proxy records it.
SKEW = ("r1", "p_queue", 2_000)
HANDSHAKE = A.TTFT_PHASES.index("handshake")
PROXY = {A.RESOURCE_SERVICE_NAME: "hybrid-pd-proxy", A.RESOURCE_ROLE: "proxy",
         A.RESOURCE_PID: 303, A.RESOURCE_HOST_NAME: "host-a"}


def request_start(i: int) -> int:
    """Request i starts at HT0 - 20 ms + i * 100 ms (its transfer at HT0 + i * 100 ms)."""
    return HT0 - 20 * MS + i * 100 * MS


def durations(f: int, cold: bool) -> list[int]:
    """The phase durations (ns) of a request with factor ``f`` (see ``REQUESTS``)."""
    return [0 if j == HANDSHAKE and not cold else (j + 1) * f * MS
            for j in range(len(A.TTFT_PHASES))]


def write_handover(targets: list[str]) -> None:
    """``REQUESTS`` as the proxy writes them: a request span and its 12 phases, tiled."""
    resource = Resource.create(PROXY)
    provider = TracerProvider(resource=resource)
    for target in targets:
        exporter = SQLiteSpanExporter(target)
        exporter.set_origin(resource)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("proxy")
    for i, (rid, tokens, f, cold) in enumerate(REQUESTS):
        durs, t = durations(f, cold), request_start(i)
        base: dict[str, Any] = {A.REQUEST_ID: rid, A.TTFT_MS: sum(durs) / MS, A.TTFT_COLD: cold,
                                A.GEN_AI_USAGE_INPUT_TOKENS: tokens}
        root = tracer.start_span(A.SPAN_PROXY_REQUEST, kind=SpanKind.SERVER, start_time=t)
        A.set_attrs(root, base)
        ctx = trace.set_span_in_context(root)
        for j, (phase, d) in enumerate(zip(A.TTFT_PHASES, durs, strict=True)):
            span = tracer.start_span(hq.PREFIX + phase, context=ctx, start_time=t)
            skew = SKEW[2] if (rid, phase) == SKEW[:2] else 0
            A.set_attrs(span, {**base, A.TTFT_PHASE: phase, A.TTFT_INDEX: j, A.TTFT_SKEW_NS: skew})
            span.end(end_time=t + d)
            t += d
        root.end(end_time=t + 5 * MS)
    provider.shutdown()


def write_handover_db(path: Path) -> Path:
    """test_dashboard_instances' engines (transfers of r0..r3) and the proxy's phases."""
    write_multi_host([str(path)])
    write_handover([str(path)])
    return path


@pytest.fixture(scope="module")
def handover_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_handover_db(tmp_path_factory.mktemp("handover") / "spans.db")


@pytest.fixture(scope="module")
def gen_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~20k synthetic spans: ~160 requests, 3 % of them without prompt length."""
    db = tmp_path_factory.mktemp("gen_handover") / "spans.db"
    load_gen().generate(db, 20_000, seed=11)
    return db


def ms(phase: str, f: int, cold: bool = False) -> float:
    """Phase ``phase``'s duration (ms) in a request with factor ``f``."""
    return durations(f, cold)[A.TTFT_PHASES.index(phase)] / MS


# --------------------------------------------------------------------------- queries


def test_phase_rows(handover_db: Path) -> None:
    ph = hq.phase_spans(queries.open_engine(str(handover_db)))
    assert list(ph.columns) == list(hq.PHASE_COLUMNS)
    assert len(ph) == 4 * 12
    # newest request first, its phases in order
    assert list(dict.fromkeys(ph["request_id"])) == ["r3", "r2", "r1", "r0"]
    for (rid, tokens, f, cold), (_, g) in zip(REQUESTS[::-1], ph.groupby("request_id", sort=False),
                                              strict=True):
        assert g["phase"].tolist() == list(A.TTFT_PHASES), rid
        assert g["index"].tolist() == list(range(12)), rid
        assert g["dur_ms"].tolist() == [d / MS for d in durations(f, cold)], rid
        # the phases tile the TTFT: each starts where the previous ended, and sum to it
        assert (g["start_ns"].iloc[1:].to_numpy() == g["end_ns"].iloc[:-1].to_numpy()).all()
        assert g["offset_ms"].tolist() == pytest.approx(g["dur_ms"].cumsum().shift(fill_value=0).tolist())
        assert g["dur_ms"].sum() == pytest.approx(g["ttft_ms"].iloc[0], abs=1e-9)
        assert g["cold"].tolist() == [cold] * 12, rid
        assert g["size"].unique().tolist() == [hq.size_bucket(tokens)], rid
        assert (g["input_tokens"].isna().all() if tokens is None
                else (g["input_tokens"] == tokens).all()), rid
    r1 = ph[(ph["request_id"] == "r1")].set_index("phase")
    assert r1.loc["p_queue", "skew_ns"] == 2_000 and r1["skew_ns"].drop("p_queue").eq(0).all()


def test_requests_and_summary(handover_db: Path) -> None:
    reqs = hq.requests(hq.phase_spans(queries.open_engine(str(handover_db)))).set_index("request_id")
    assert reqs["ttft_ms"].to_dict() == pytest.approx({"r0": 78, "r1": 142, "r2": 213, "r3": 284})
    assert (reqs["ttft_ms"] - reqs["phases_ms"]).abs().max() < 1e-9
    assert reqs["transfer_ms"].to_dict() == pytest.approx({"r0": 24, "r1": 34, "r2": 51, "r3": 68})
    assert reqs["transfer_share"].to_dict() == pytest.approx(
        {"r0": 24 / 78, "r1": 17 / 71, "r2": 17 / 71, "r3": 17 / 71})
    assert reqs["size"].to_dict() == {"r0": "<1k", "r1": "1k-4k", "r2": "1k-4k", "r3": "unknown"}
    assert reqs.loc["r2", "read_in_flight"] == 27 and reqs.loc["r2", "handshake"] == 0
    s = hq.summary(reqs.reset_index())
    # TTFT [78, 142, 213, 284]: p50 = 2nd, p99 = 4th; share [17/71 x3, 24/78]: p50 = 2nd
    assert (s["requests"], s["cold"], s["ttft_p50"], s["ttft_p99"]) == (4, 1, 142, 284)
    assert s["share_p50"] == pytest.approx(17 / 71) and s["share_p90"] == pytest.approx(24 / 78)
    assert hf.fmt_percent(s["share_p50"]) == "23.9%" and hf.fmt_percent(s["share_p90"]) == "30.8%"


def test_percentiles_per_prompt_bucket_by_hand(handover_db: Path) -> None:
    stats = hq.phase_percentiles(hq.phase_spans(queries.open_engine(str(handover_db))))
    # only the buckets with requests, in bucket order, phases in order within each
    assert list(dict.fromkeys(stats["size"])) == ["<1k", "1k-4k", "unknown"]
    for _, g in stats.groupby("size", sort=False):
        assert g["phase"].tolist() == list(A.TTFT_PHASES)
    by = stats.set_index(["size", "phase"])
    for phase in A.TTFT_PHASES:
        # <1k: r0 alone (f = 1, cold)
        assert by.loc[("<1k", phase), ["p50_ms", "p90_ms", "p99_ms"]].tolist() == [ms(phase, 1, True)] * 3
        # 1k-4k: r1 (f = 2), r2 (f = 3): p50 = ceil(1.0) = 1st, p90 = p99 = 2nd
        assert by.loc[("1k-4k", phase), ["p50_ms", "p90_ms", "p99_ms"]].tolist() == [
            ms(phase, 2), ms(phase, 3), ms(phase, 3)], phase
        assert by.loc[("unknown", phase), "p99_ms"] == ms(phase, 4)
    assert by["requests"].to_dict() == {k: {"<1k": 1, "1k-4k": 2, "unknown": 1}[k[0]] for k in by.index}
    assert set(stats["where"]) == {"proxy", "P", "D", "transfer"}


def test_percentiles_overall_by_hand(handover_db: Path) -> None:
    stats = hq.phase_percentiles(hq.phase_spans(queries.open_engine(str(handover_db))),
                                 by_size=False)
    assert stats["phase"].tolist() == list(A.TTFT_PHASES) and "size" not in stats
    by = stats.set_index("phase")
    for phase in A.TTFT_PHASES:
        if phase == "handshake":  # [0, 0, 0, 7]: p50 = 2nd = 0, p90 = p99 = 4th = 7
            assert by.loc[phase, ["p50_ms", "p90_ms", "p99_ms"]].tolist() == [0, 7, 7]
            continue
        j = A.TTFT_PHASES.index(phase) + 1  # f in [1, 2, 3, 4]: p50 = 2nd, p90 = p99 = 4th
        assert by.loc[phase, ["p50_ms", "p90_ms", "p99_ms"]].tolist() == [2 * j, 4 * j, 4 * j]
    assert (by["requests"] == 4).all()
    long = hq.long_percentiles(stats)
    assert len(long) == 3 * 12 and set(long["percentile"]) == {"p50", "p90", "p99"}
    assert long.set_index(["percentile", "phase"]).loc[("p90", "p_prefill"), "ms"] == 12


def test_time_buckets_by_hand(handover_db: Path) -> None:
    lo = request_start(0)
    b = hq.phase_buckets(hq.phase_spans(queries.open_engine(str(handover_db))))
    # from the first request to the last: 300 ms in at most 60 buckets: 5 ms wide; one request per bucket, 20 buckets apart
    assert (b["width_ns"] == 5 * MS).all()
    assert sorted(set(b["bucket"])) == [0, 20, 40, 60]
    assert (b["requests"] == 1).all() and len(b) == 4 * 12
    first = b[b["bucket"] == 0].set_index("phase")
    assert first["p99_ms"].tolist() == [d / MS for d in durations(1, True)]
    assert b.loc[b["bucket"] == 60, "start"].iloc[0] == pd.Timestamp(lo + 300 * MS, unit="ns", tz="UTC")


def test_window_keeps_requests_whole(handover_db: Path) -> None:
    """A request is in a range when its first phase starts there, with all its phases."""
    engine = queries.open_engine(str(handover_db))
    ph = hq.phase_spans(engine, request_start(1), request_start(3))
    assert sorted(set(ph["request_id"])) == ["r1", "r2", "r3"] and len(ph) == 3 * 12
    assert ph["end_ns"].max() > request_start(3)  # r3's phases end after the range
    assert (hq.phase_percentiles(ph, by_size=False)["requests"] == 3).all()
    empty = hq.phase_spans(engine, HT0 + 10**9, None)
    assert empty.empty and list(empty.columns) == list(hq.PHASE_COLUMNS)
    assert hq.phase_percentiles(empty).empty and hq.phase_buckets(empty).empty
    assert hq.requests(empty).empty


def test_engine_filter(handover_db: Path) -> None:
    """Requests whose transfer read from P0 (r0, r2) or ran on D (all)."""
    engine = queries.open_engine(str(handover_db))
    assert sorted(set(hq.phase_spans(engine, engines=(P0,))["request_id"])) == ["r0", "r2"]
    assert sorted(set(hq.phase_spans(engine, engines=(D,))["request_id"])) == ["r0", "r1", "r2", "r3"]
    stats = hq.phase_percentiles(hq.phase_spans(engine, engines=(P1,)), by_size=False)
    assert (stats["requests"] == 2).all()  # r1, r3
    assert hq.phase_spans(engine, engines=()).empty
    inst = hq.request_instances(engine, ("r0", "r1", "nope")).set_index("request_id")
    assert inst.to_dict("index") == {"r0": {"d_engine_id": D, "p_engine_id": P0},
                                     "r1": {"d_engine_id": D, "p_engine_id": P1}}


def test_one_request(handover_db: Path) -> None:
    engine = queries.open_engine(str(handover_db))
    ph = hq.request_phases(engine, "r2")
    assert ph["phase"].tolist() == list(A.TTFT_PHASES)
    offsets = [sum(durations(3, False)[:j]) / MS for j in range(12)]
    assert ph["offset_ms"].tolist() == pytest.approx(offsets)
    assert ph["dur_ms"].sum() == pytest.approx(213) and (ph["ttft_ms"] == 213).all()
    assert hq.request_phases(engine, "nope").empty


def test_request_id_used_twice_shows_the_newest(tmp_path: Path) -> None:
    db = write_handover_db(tmp_path / "twice.db")
    write_handover([str(db)])  # the same ids again: new traces at the same times
    engine = queries.open_engine(str(db))
    ph = hq.request_phases(engine, "r1")
    assert len(ph) == 12 and ph["trace_id"].nunique() == 1
    assert len(hq.phase_spans(engine)) == 2 * 4 * 12  # a request is (trace, id)


def test_size_buckets() -> None:
    got = [hq.size_bucket(n) for n in (None, float("nan"), 0, 1023, 1024, 4095, 4096, 16_384,
                                       65_535, 65_536, 10**6)]
    assert got == ["unknown", "unknown", "<1k", "<1k", "1k-4k", "1k-4k", "4k-16k", "16k-64k",
                   "16k-64k", ">=64k", ">=64k"]


# ------------------------------------------------------------------------- generator


def test_generator_phases_tile_and_match_sql(gen_db: Path) -> None:
    engine = queries.open_engine(str(gen_db))
    ph = hq.phase_spans(engine, limit=100_000)
    reqs = hq.requests(ph)
    assert len(reqs) > 100 and (reqs["phases"] == 12).all()
    for _, g in ph.groupby(["trace_id", "request_id"]):
        assert g["index"].tolist() == list(range(12))
        assert (g["start_ns"].iloc[1:].to_numpy() == g["end_ns"].iloc[:-1].to_numpy()).all()
        assert g["dur_ms"].sum() == pytest.approx(g["ttft_ms"].iloc[0], abs=1e-6)
    assert reqs["transfer_share"].between(0, 1).all()
    assert reqs["cold"].sum() == 1  # request 0, after the first handshake
    sizes = set(reqs["size"])
    assert {"<1k", "1k-4k", "4k-16k", "unknown"} <= sizes
    # the vectorised percentiles equal the brute-force oracle's, group by group
    stats = hq.phase_percentiles(ph).set_index(["size", "phase"])
    assert set(stats.index.get_level_values("size")) == sizes  # only non-empty buckets
    for (size, phase), g in ph.groupby(["size", "phase"]):
        for p in hq.PERCENTILES:
            assert stats.loc[(size, phase), f"p{p}_ms"] == nearest_rank(g["dur_ms"], p)
        assert stats.loc[(size, phase), "requests"] == len(g)
    b = hq.phase_buckets(ph)
    width, lo = int(b["width_ns"].iloc[0]), int(reqs["req_start_ns"].min())
    assert b["bucket"].max() < hq.MAX_BUCKETS
    ph["bucket"] = (ph["req_start_ns"] - lo) // width
    for (bucket, phase), g in ph.groupby(["bucket", "phase"]):
        row = b[(b["bucket"] == bucket) & (b["phase"] == phase)].iloc[0]
        assert row["p50_ms"] == nearest_rank(g["dur_ms"], 50)
        assert row["p99_ms"] == nearest_rank(g["dur_ms"], 99)
        assert row["requests"] == len(g)
    assert len(b) == ph.groupby(["bucket", "phase"]).ngroups
    assert [hq.nearest_rank(reqs["ttft_ms"], p) for p in hq.PERCENTILES] == [
        nearest_rank(reqs["ttft_ms"], p) for p in hq.PERCENTILES]


def test_generator_without_handover(tmp_path: Path) -> None:
    db = tmp_path / "plain.db"
    load_gen().generate(db, 2_000, seed=2, handover=False)
    assert hq.phase_spans(queries.open_engine(str(db))).empty


# --------------------------------------------------------------------------- figures


def test_waterfall_figure(handover_db: Path) -> None:
    ph = hq.request_phases(queries.open_engine(str(handover_db)), "r2")
    fig = hf.waterfall(ph, title="request r2")
    assert fig.layout.xaxis.title.text == hf.WATERFALL_AXIS_TITLE
    # the first phase on top: plotly lists a category axis bottom-up
    assert list(fig.layout.yaxis.categoryarray)[::-1] == list(A.TTFT_PHASES)
    bars = {tr.name: tr for tr in fig.data}
    assert list(bars) == list(A.TTFT_PHASES)
    for j, phase in enumerate(A.TTFT_PHASES):
        assert list(bars[phase].base) == [sum(durations(3, False)[:j]) / MS], phase
        assert list(bars[phase].x) == [durations(3, False)[j] / MS], phase
        assert bars[phase].marker.color == hf.PHASE_COLOURS[phase]


def test_stacked_figures(handover_db: Path) -> None:
    engine = queries.open_engine(str(handover_db))
    ph = hq.phase_spans(engine)
    fig = hf.phases_by_size(hq.long_percentiles(hq.phase_percentiles(ph)))
    assert fig.layout.barmode == "stack"
    assert [a.text for a in fig.layout.annotations] == ["p50", "p90", "p99"]
    prefill = [tr for tr in fig.data if tr.name == "p_prefill"]
    assert len(prefill) == 3 and list(prefill[0].x) == ["<1k", "1k-4k", "unknown"]
    assert list(prefill[0].y) == [3, 6, 12]  # p50 of p_prefill: f = 1, 2 (1st of r1, r2), 4
    assert list(prefill[2].y) == [3, 9, 12]  # p99: r2's for 1k-4k
    fig = hf.phases_over_time(hq.phase_buckets(ph), 99)
    assert fig.layout.yaxis.title.text.startswith("p99")
    assert {tr.name for tr in fig.data} == set(A.TTFT_PHASES)


# ---------------------------------------------------------------------------- page


def open_handover(monkeypatch: pytest.MonkeyPatch, db: Path, request: str | None = None) -> AppTest:
    """The Handover page, as opened by a link (``?request=``) when ``request`` is given."""
    monkeypatch.setenv(ENV_TELEMETRY_DB, str(db))
    at = AppTest.from_file(APP, default_timeout=120)
    if request is not None:
        at.query_params["request"] = request
    at.run()
    at.switch_page("views/handover.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def waterfall_title(at: AppTest) -> str | None:
    titles = [s["layout"].get("title", {}).get("text") for s in charts(at)]
    return next((t for t in titles if t), None)


def test_page_by_hand(monkeypatch: pytest.MonkeyPatch, handover_db: Path) -> None:
    at = open_page(monkeypatch, handover_db, "handover")
    assert metrics(at) == {"requests": "4", "TTFT p50": "142 ms", "TTFT p99": "284 ms",
                           "transfer share p50": "23.9%", "transfer share p90": "30.8%",
                           "cold requests": "1"}
    specs = charts(at)
    assert len(specs) == 4  # per prompt length, over time, share, waterfall
    assert waterfall_title(at) == "request r3"  # the slowest, without any click
    slowest, stats, phases = (d.value for d in at.dataframe)
    assert slowest["request"].tolist() == ["r3", "r2", "r1", "r0"]
    assert slowest["D instance"].unique().tolist() == [LABELS[D]]
    assert slowest.set_index("request")["P instance"].to_dict() == {
        "r0": LABELS[P0], "r1": LABELS[P1], "r2": LABELS[P0], "r3": LABELS[P1]}
    assert slowest["waterfall"].iloc[0] == "/handover?request=r3"
    assert slowest["transfer share (%)"].iloc[0] == pytest.approx(100 * 17 / 71)
    assert stats["phase"].tolist() == list(A.TTFT_PHASES)
    assert phases["phase"].tolist() == list(A.TTFT_PHASES)
    assert phases["duration (ms)"].sum() == pytest.approx(284)
    assert at.query_params["request"] in ("r3", ["r3"])
    at.radio(key="handover_over_time_p").set_value(99).run()
    assert not at.exception


def test_page_opened_by_link(monkeypatch: pytest.MonkeyPatch, handover_db: Path) -> None:
    at = open_handover(monkeypatch, handover_db, "r1")
    assert at.radio(key="handover_pick").value == "by id"
    assert at.text_input(key="handover_request_id").value == "r1"
    assert waterfall_title(at) == "request r1"
    assert at.query_params["request"] in ("r1", ["r1"])
    (phases,) = [d.value for d in at.dataframe if "what" in d.value]
    assert phases.set_index("phase").loc["p_queue", "clock skew (ms)"] == 0.002
    assert any("prompt tokens 2,000" in c.value and LABELS[P1] in c.value for c in at.caption)
    (link,) = at.get("page_link")
    assert (link.proto.page, link.proto.query_string) == ("timeline", "request=r1")


def test_page_unknown_request(monkeypatch: pytest.MonkeyPatch, handover_db: Path) -> None:
    at = open_handover(monkeypatch, handover_db, "nope")
    assert any("No handover phase spans for request `nope`" in w.value for w in at.warning)
    assert len(charts(at)) == 3  # the range's charts, no waterfall


def test_page_without_phase_spans(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    at = open_page(monkeypatch, write_connector_db(tmp_path / "none.db"), "handover")
    (hint,) = [i.value for i in at.info]
    assert "hybrid_pd.ttft" in hint and "hybrid-pd serve" in hint, hint
    assert not charts(at) and not at.dataframe and not metrics(at)


def test_page_link_opens_request_without_phases_in_range(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    """A linked request is drawn even when the picked range holds no phases: here the
    newest span is an hour after them, and the range is its last minute."""
    db = write_handover_db(tmp_path / "later.db")
    w = SpanWriter(db)
    w.build(HT0 + 3600 * 10**9, "hybrid", "local", 1, 10, "decode-h")
    w.provider.shutdown()
    at = open_handover(monkeypatch, db, "r0")
    at.selectbox(key="time_range").set_value("last 1 min").run()
    assert not at.exception
    assert any("No handover phase spans" in i.value for i in at.info)
    assert waterfall_title(at) == "request r0" and len(charts(at)) == 1


def test_timeline_links_to_handover(monkeypatch: pytest.MonkeyPatch, handover_db: Path,
                                    tmp_path: Path) -> None:
    at = open_page(monkeypatch, handover_db, "timeline")
    at.radio(key="pick_mode").set_value("by id").run()
    at.text_input(key="request_id").input("r2").run()
    assert not at.exception
    (link,) = at.get("page_link")
    assert (link.proto.page, link.proto.query_string) == ("handover", "request=r2")
    # no phases for the request: no link
    at = open_page(monkeypatch, write_connector_db(tmp_path / "c.db"), "timeline")
    assert len(charts(at)) == 1 and not at.get("page_link")


# ------------------------------------------------------------------------ PostgreSQL


def test_same_answers_on_postgres(pg_cluster: Any, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every handover query, and the page, give the same answers on PostgreSQL (the
    attributes read from JSONB there: JSON true is True, numbers keep their type)."""
    lite = str(tmp_path / "spans.db")
    url = pg_cluster.create_database("handover")
    write_multi_host([lite, url])
    write_handover([lite, url])
    engines = [queries.open_engine(db) for db in (lite, url)]
    lo, hi = request_start(0), request_start(3)
    calls = {
        "phase_spans": lambda e: hq.phase_spans(e),
        "phase_spans(P0, window)": lambda e: hq.phase_spans(e, lo, hi, (P0,)),
        "requests": lambda e: hq.requests(hq.phase_spans(e)),
        "phase_percentiles": lambda e: hq.phase_percentiles(hq.phase_spans(e)),
        "phase_percentiles(all, P1)": lambda e: hq.phase_percentiles(
            hq.phase_spans(e, engines=(P1,)), by_size=False),
        "phase_buckets": lambda e: hq.phase_buckets(hq.phase_spans(e)),
        "request_phases": lambda e: hq.request_phases(e, "r1"),
        "request_instances": lambda e: hq.request_instances(e, ("r0", "r3")),
    }
    for name, call in calls.items():
        a, b = (call(e) for e in engines)
        assert len(a) > 0, name
        pd.testing.assert_frame_equal(a, b, obj=name)
    for e in engines:
        e.dispose()
    at_pg = open_page(monkeypatch, url, "handover")
    at_lite = open_page(monkeypatch, lite, "handover")
    assert metrics(at_pg) == metrics(at_lite)
    assert charts(at_pg) == charts(at_lite)
    for pg_df, lite_df in zip((d.value for d in at_pg.dataframe),
                              (d.value for d in at_lite.dataframe), strict=True):
        pd.testing.assert_frame_equal(pg_df, lite_df)
