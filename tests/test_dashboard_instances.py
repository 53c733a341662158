"""Engine instances and hosts: table ``processes``, labels, the P-D pair table, filters.

Spans come through the real exporter from three "processes" whose resources name two
hosts: prefill engines P0 (host-a) and P1 (host-b, same pid as P0), decode engine D
(host-b).  Their resources carry ``<engine>-rank0`` as vLLM workers' do, their spans the
engine's own id.  Expected figures are worked out by hand in the comments.  No GPU,
NIXL or vLLM required.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from test_dashboard_app import charts, metrics, open_page

from hybrid_pd.dashboard import (
    connector_queries,
    figures,
    queries,
    timeline_queries,
    transfer_queries,
)
from hybrid_pd.dashboard import instance_queries as iq
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry.sqlite_exporter import SQLiteSpanExporter

HT0 = 1_790_000_000_000_000_000
MS, MIB = 10**6, 1 << 20
P0 = "11111111-aaaa-4aaa-8aaa-000000000001"
P1 = "22222222-bbbb-4bbb-8bbb-000000000002"
D = "33333333-cccc-4ccc-8ccc-000000000003"
# name -> (service, role, engine id of the spans, pid, host)
PROCS: dict[str, tuple[str, str, str, int, str]] = {
    "p0": ("hybrid-pd-prefill", "prefill", P0, 101, "host-a"),
    "p1": ("hybrid-pd-prefill", "prefill", P1, 101, "host-b"),
    "d": ("hybrid-pd-decode", "decode", D, 202, "host-b"),
}
# D's transfers: request, P read from, MiB, ms, failed.  Pairs:
#   (P0, D): r0 + r2 -> 2 transfers, 1 error, 3 MiB, p50 = 1st of [2, 6] = 2 ms, p99 = 6 ms
#   (P1, D): r1 + r3 -> 2 transfers, 0 errors, 4 MiB, p50 = 1st of [4, 8] = 4 ms, p99 = 8 ms
TRANSFERS = (("r0", P0, 1, 2, False), ("r1", P1, 3, 4, False), ("r2", P0, 2, 6, True),
             ("r3", P1, 1, 8, False))
LABELS = {P0: "prefill @ host-a (11111111)", P1: "prefill @ host-b (22222222)",
          D: "decode @ host-b (33333333)"}


def _provider(name: str, targets: list[str]) -> TracerProvider:
    service, role, engine_id, pid, host = PROCS[name]
    resource = Resource.create({A.RESOURCE_SERVICE_NAME: service, A.RESOURCE_ROLE: role,
                                A.RESOURCE_ENGINE_ID: f"{engine_id}-rank0",
                                A.RESOURCE_PID: pid, A.RESOURCE_HOST_NAME: host})
    provider = TracerProvider(resource=resource)
    for target in targets:
        exporter = SQLiteSpanExporter(target)
        exporter.set_origin(resource)  # as telemetry.setup does
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def _emit(provider: TracerProvider, name: str, t0: int, dur: int, attrs: dict[str, Any],
          parent: trace.Span | None = None, fail: bool = False) -> trace.Span:
    ctx = trace.set_span_in_context(parent) if parent is not None else None
    span = provider.get_tracer("t").start_span(name, context=ctx, start_time=t0)
    A.set_attrs(span, attrs)
    if fail:
        A.mark_failed(span, "peer died")
    span.end(end_time=t0 + dur)
    return span


def write_multi_host(targets: list[str]) -> None:
    """The module's spans into every target (paths or URLs), each by its own exporter.

    D: a registration build, then per request a transfer (rank 0) holding a mapping
    build and one READ (same bytes; a failed transfer's READ fails too); each P: one
    notify span per request it served."""
    p = {name: _provider(name, targets) for name in PROCS}
    _emit(p["d"], A.SPAN_KV_DESC_BUILD, HT0 - 10 * MS, MS,
          {A.ENGINE_ID: D, A.KV_DESC_SCOPE: "local", A.KV_DESCRIPTORS: 100, A.KV_RANK: 0})
    for i, (rid, peer, mib, ms, fail) in enumerate(TRANSFERS):
        t = HT0 + i * 100 * MS
        base = {A.ENGINE_ID: D, A.REQUEST_ID: rid, A.KV_RANK: 0, A.KV_PEER_RANK: 0,
                A.KV_PEER_ENGINE_ID: peer, A.KV_BYTES: mib * MIB}
        tr = p["d"].get_tracer("t").start_span(A.SPAN_KV_TRANSFER, start_time=t)
        A.set_attrs(tr, base)
        _emit(p["d"], A.SPAN_KV_DESC_BUILD, t + 1_000, 10_000,
              {**base, A.KV_DESC_SCOPE: "request", A.KV_DESCRIPTORS: 10, A.KV_BYTES: None}, tr)
        _emit(p["d"], A.SPAN_KV_READ, t + 20_000, ms * MS - 40_000,
              {**base, A.KV_LAYER: 0, A.KV_LAYER_KIND: "attention", A.KV_DESCRIPTORS: 4},
              tr, fail)
        if fail:
            A.mark_failed(tr, "peer died")
        tr.end(end_time=t + ms * MS)
        p_name = "p0" if peer == P0 else "p1"
        _emit(p[p_name], A.SPAN_KV_NOTIFY, t - MS, ms * MS + 2 * MS,
              {A.ENGINE_ID: peer, A.REQUEST_ID: rid, A.KV_RANK: 0})
    for provider in p.values():
        provider.shutdown()


@pytest.fixture(scope="module")
def hosts_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("hosts") / "spans.db"
    write_multi_host([str(db)])
    return db


def without_processes(src: Path, dst: Path) -> Path:
    """A copy of ``src`` as a database made before table ``processes`` existed."""
    dst.write_bytes(src.read_bytes())
    with sqlite3.connect(dst) as con:
        con.execute("DROP TABLE processes")
    return dst


# --------------------------------------------------------------------------- queries


def test_processes_rows(hosts_db: Path) -> None:
    procs = iq.processes(queries.open_engine(str(hosts_db)))
    assert list(procs.columns) == list(iq.PROCESS_COLUMNS)
    # per process: the resource's id (<engine>-rank0) and the id its spans carry
    got = sorted(procs[["engine_id", "role", "host", "pid"]].itertuples(index=False, name=None))
    want = sorted((e + sfx, role, host, pid) for _, role, e, pid, host in PROCS.values()
                  for sfx in ("", "-rank0"))
    assert got == want
    assert (procs["first_seen_ns"] > 0).all()
    assert iq.hosts(procs) == ["host-a", "host-b"]


def test_labels(hosts_db: Path) -> None:
    d = iq.engine_directory(iq.processes(queries.open_engine(str(hosts_db))), ("old-engine",))
    labels = dict(zip(d["engine_id"], d["label"], strict=True))
    assert {e: labels[e] for e in LABELS} == LABELS
    assert labels[f"{D}-rank0"] == "decode @ host-b (33333333-rank0)"
    assert labels["old-engine"] == "old-engine"  # only seen in spans: raw id, as before
    assert iq.engine_label(D, "decode", "host-b", 0) == "decode rank 0 @ host-b (33333333)"
    assert iq.engine_label("decode-h", None, None, 1) == "decode-h rank 1"
    assert iq.engine_label(None) == "unknown engine"


def test_transfer_pairs_by_hand(hosts_db: Path) -> None:
    engine = queries.open_engine(str(hosts_db))
    pairs = iq.transfer_pairs(engine)
    got = pairs.set_index("p_engine_id")[["d_engine_id", "transfers", "errors", "bytes",
                                          "p50_ns", "p99_ns", "max_ns"]].to_dict("index")
    assert got == {
        P0: {"d_engine_id": D, "transfers": 2, "errors": 1, "bytes": 3 * MIB,
             "p50_ns": 2 * MS, "p99_ns": 6 * MS, "max_ns": 6 * MS},
        P1: {"d_engine_id": D, "transfers": 2, "errors": 0, "bytes": 4 * MIB,
             "p50_ns": 4 * MS, "p99_ns": 8 * MS, "max_ns": 8 * MS},
    }
    directory = iq.engine_directory(iq.processes(engine))
    table = iq.pair_table(iq.label_pairs(pairs, directory))
    assert table[["P instance", "D instance", "transfers", "errors", "bytes", "p50 (ms)",
                  "p99 (ms)"]].values.tolist() == [
        [LABELS[P0], LABELS[D], 2, 1, "3.00 MiB", 2.0, 6.0],
        [LABELS[P1], LABELS[D], 2, 0, "4.00 MiB", 4.0, 8.0]]
    # 3 MiB over 8 ms of transfers: 3 / 1024 GiB / 0.008 s
    assert table["GiB/s"].iloc[0] == pytest.approx(3 / 1024 / 0.008)
    # filtered to P1: its pair only; window after r1: r2 + r3
    assert list(iq.transfer_pairs(engine, engines=(P1,))["p_engine_id"]) == [P1]
    late = iq.transfer_pairs(engine, HT0 + 150 * MS)
    assert late["transfers"].tolist() == [1, 1]


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (1023, "1,023 B"), (1536, "1.50 KiB"),
                                         (3 * MIB, "3.00 MiB"), (5 << 30, "5.00 GiB")])
def test_fmt_bin_bytes(n: int, text: str) -> None:
    assert iq.fmt_bin_bytes(n) == text


def test_engine_filter_on_every_query(hosts_db: Path) -> None:
    """A transfer (and its READ / mapping build) counts for D and for the P it read
    from; P's notify spans for P only; D's registration build for D only."""
    e = queries.open_engine(str(hosts_db))
    x = transfer_queries
    for engines, n_tr, failed in (((P0,), 2, 1), ((P1,), 2, 0), ((D,), 4, 1), ((P0, P1), 4, 1),
                                  ((), 0, 0)):
        total = x.transfer_stats(e, by=(), engines=engines).iloc[0]
        assert (total["transfers"], total["failed"]) == (n_tr, failed), engines
        assert len(x.transfers(e, engines=engines)) == n_tr
        assert len(x.reads(e, engines=engines)) == n_tr
        assert int(x.read_stats(e, engines=engines)["reads"].sum()) == n_tr
        assert int(x.transfer_buckets(e, HT0, HT0 + 10**9, engines=engines)["transfers"].sum()) == n_tr
        # failed: r2's transfer and READ
        assert x.failure_counts(e, engines=engines)["errors"] == 2 * failed
        assert len(x.failures(e, engines=engines)) == 2 * failed
        rids = set(timeline_queries.request_list(e, engines=engines)["request_id"])
        assert len(rids) == n_tr
    assert set(timeline_queries.request_list(e, engines=(P1,))["request_id"]) == {"r1", "r3"}
    builds = connector_queries.desc_build_stats(e, engines=(P0,))
    assert builds[[A.KV_DESC_SCOPE, "builds"]].values.tolist() == [["request", 2]]
    assert connector_queries.desc_build_stats(e, engines=(D,))["builds"].tolist() == [1, 4]
    assert len(connector_queries.desc_builds(e, engines=(P1,))) == 2
    notify = queries.spans_by_name(e, (A.SPAN_KV_NOTIFY,), engines=(P0,))
    assert sorted(notify["request_id"]) == ["r0", "r2"]
    # unfiltered = every engine
    pd.testing.assert_frame_equal(x.transfer_stats(e), x.transfer_stats(e, engines=(D,)))


def test_database_without_processes_table(hosts_db: Path, tmp_path: Path) -> None:
    old = without_processes(hosts_db, tmp_path / "old.db")
    engine = queries.open_engine(str(old))
    assert queries.check_db(str(old), engine).ok
    procs = iq.processes(engine)
    assert procs.empty and list(procs.columns) == list(iq.PROCESS_COLUMNS)
    assert iq.hosts(procs) == []
    d = iq.engine_directory(procs, (D, P0))
    # hosts and roles unknown: "engine", the UUID cut as for known ones
    assert d["label"].tolist() == ["engine (11111111)", "engine (33333333)"]
    # the roles the transfer spans show: D decodes, the P it read from prefills
    d = iq.engine_directory(procs, (D, P0), iq.span_roles(iq.transfer_pairs(engine)))
    assert d["label"].tolist() == ["prefill (11111111)", "decode (33333333)"]
    assert len(iq.transfer_pairs(engine)) == 2
    # a writer opening it adds the table (CREATE TABLE IF NOT EXISTS), rows come later
    SQLiteSpanExporter(old).shutdown()
    assert iq.processes(queries.open_engine(str(old))).empty


# ---------------------------------------------------------------- pages under AppTest


def pair_rows(at: Any) -> list[list[Any]]:
    (table,) = [d.value for d in at.dataframe if "P instance" in d.value]
    return table[["P instance", "D instance", "transfers", "errors", "bytes"]].values.tolist()


def test_overview_pairs_and_labels(monkeypatch: pytest.MonkeyPatch, hosts_db: Path) -> None:
    at = open_page(monkeypatch, hosts_db, "overview")
    assert metrics(at)["transfers"] == "4"
    assert pair_rows(at) == [[LABELS[P0], LABELS[D], 2, 1, "3.00 MiB"],
                             [LABELS[P1], LABELS[D], 2, 0, "4.00 MiB"]]
    latency, wire, pairs = charts(at)
    assert {tr["name"] for tr in latency["data"]} == {
        "decode rank 0 @ host-b (33333333) p50", "decode rank 0 @ host-b (33333333) slowest"}
    assert {tr["name"] for tr in wire["data"]} == {"decode rank 0 @ host-b (33333333)"}
    assert {tr["name"] for tr in pairs["data"]} == {LABELS[P0], LABELS[P1]}
    assert pairs["layout"]["yaxis"]["title"]["text"] == figures.PAIR_AXIS_TITLE
    per = at.dataframe[0].value
    assert per["engine"].tolist() == ["decode rank 0 @ host-b (33333333)"]
    assert at.multiselect(key="hosts").options == ["host-a", "host-b"]
    shown = set(at.multiselect(key="engines").options)
    assert set(LABELS.values()) <= shown, shown


def test_overview_filtered_by_host_and_engine(monkeypatch: pytest.MonkeyPatch,
                                              hosts_db: Path) -> None:
    at = open_page(monkeypatch, hosts_db, "overview")
    at.multiselect(key="hosts").set_value(["host-a"]).run()
    assert not at.exception
    m = metrics(at)  # host-a runs P0 only: the transfers read from it, r0 and r2
    assert (m["transfers"], m["failed"], m["stalled"], m["aborted"]) == ("2", "1", "0", "0"), m
    assert pair_rows(at) == [[LABELS[P0], LABELS[D], 2, 1, "3.00 MiB"]]
    # the engine picker now offers host-a's engines only
    assert set(at.multiselect(key="engines").options) == {
        LABELS[P0], "prefill @ host-a (11111111-rank0)"}
    at.multiselect(key="hosts").set_value([]).run()
    at.multiselect(key="engines").set_value([P1]).run()
    assert not at.exception
    assert metrics(at)["transfers"] == "2"
    assert pair_rows(at) == [[LABELS[P1], LABELS[D], 2, 0, "4.00 MiB"]]


@pytest.mark.parametrize(("page", "engines", "check"), [
    ("failures", [P0], lambda at: metrics(at) == {"failed spans": "2", "stalls": "0",
                                                  "aborts": "0"}),
    ("failures", [P1], lambda at: any("No failed" in s.value for s in at.success)),
    ("layers", [P1], lambda at: sorted(at.dataframe[0].value["request"]) == ["r1", "r3"]
     and set(at.dataframe[0].value["engine"]) == {"decode rank 0 @ host-b (33333333)"}),
    ("descriptors", [P0], lambda at: metrics(at)["builds"] == "2"),
    ("descriptors", [D], lambda at: metrics(at)["builds"] == "5"),
])
def test_pages_filtered_by_engine(monkeypatch: pytest.MonkeyPatch, hosts_db: Path, page: str,
                                  engines: list[str], check: Any) -> None:
    at = open_page(monkeypatch, hosts_db, page)
    at.multiselect(key="engines").set_value(engines).run()
    assert not at.exception, [e.value for e in at.exception]
    assert check(at), (metrics(at), [d.value for d in at.dataframe])


def test_timeline_filtered_and_labelled(monkeypatch: pytest.MonkeyPatch, hosts_db: Path) -> None:
    at = open_page(monkeypatch, hosts_db, "timeline")
    at.multiselect(key="hosts").set_value(["host-a"]).run()
    assert not at.exception
    assert {o.split()[0] for o in at.selectbox(key="req_latest").options} == {"r0", "r2"}
    (table,) = [d.value for d in at.dataframe]  # the latest of them, r2, with P0's notify
    assert set(table["engine"]) == {"decode rank 0 @ host-b (33333333)",
                                    "prefill rank 0 @ host-a (11111111)"}


def test_pages_without_processes_table(monkeypatch: pytest.MonkeyPatch, hosts_db: Path,
                                       tmp_path: Path) -> None:
    old = without_processes(hosts_db, tmp_path / "old.db")
    for page in ("overview", "failures", "layers", "descriptors", "timeline"):
        at = open_page(monkeypatch, old, page)
        assert any("Hosts unknown" in c.value for c in at.sidebar.caption), page
        assert not [w for w in at.multiselect if w.key == "hosts"], page
    at = open_page(monkeypatch, old, "overview")
    # no processes: roles from the transfer spans, ids cut (they were raw UUIDs before)
    assert pair_rows(at) == [["prefill (11111111)", "decode (33333333)", 2, 1, "3.00 MiB"],
                             ["prefill (22222222)", "decode (33333333)", 2, 0, "4.00 MiB"]]
