"""Executor spans with InMemorySpanExporter: real NIXL READs in one process, plus a fake
agent for the stall / abort / refusal paths.

The real tests put a P rank and its D ranks (bench.worker.Rank: real HMA regions filled
from the reference state, byte-verified) in this process, so the spans land in an
in-memory exporter; a thread polls P's agent for notifications.  NIXL required for those
(marker ``nixl``); the fake-agent tests need no NIXL.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import StatusCode

from hybrid_pd.bench.runner import BenchCase, build_case, make_init
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.transfer import handshake as hs
from hybrid_pd.transfer.executor import NixlExecutor

HERE = Path(__file__).parent
TINY = json.loads((HERE / "data" / "tiny_nemotron_h_config.json").read_text())


def mem_tracer(provider: TracerProvider | None = None) -> tuple[Any, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = provider or TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def by_name(spans: Any, name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


# ----------------------------------------------------------------------------------
# Real NIXL, one process
# ----------------------------------------------------------------------------------


class Pair:
    """P rank 0 and every D rank of a (1, d_tp) case in this process, handshakes done."""

    def __init__(self, d_tp: int) -> None:
        from hybrid_pd.bench.worker import Rank

        self.tracer, self.exporter = mem_tracer()
        self.init = make_init(TINY, prefill_tp=1, decode_tp=d_tp, num_tokens=40, timeout_s=20)
        self.init["run_id"] = f"spans{d_tp}-{time.monotonic_ns() % 10**6}"
        self.case: BenchCase = build_case(self.init)
        self.p = Rank("prefill", 0, self.init, tracer=self.tracer)
        self.d = [Rank("decode", r, self.init, tracer=self.tracer) for r in range(d_tp)]
        self._stop = threading.Event()
        # P makes no calls of its own here; polling its notifications gives its UCX
        # worker progress (and frees the leases), as the bench's P process does.
        self._pump = threading.Thread(target=self._poll_p, daemon=True)
        self._pump.start()
        for d in self.d:
            reply = d.handle({"op": "peers", "handshakes": [hs.encode(self.p.meta)],
                              "baselines": {"0": self.p.baseline_addr}})
            assert reply["ok"], reply

    def _poll_p(self) -> None:
        while not self._stop.is_set():
            self.p.leases.poll(self.p.ex.agent)
            time.sleep(0.0005)

    def read(self, rid: str, per_layer: bool) -> list[dict[str, Any]]:
        replies = [d.handle({"op": "read", "request_id": rid, "kind": "hybrid",
                             "per_layer": per_layer}) for d in self.d]
        for r in replies:
            assert r["result"]["status"] == "ok" and r["verify"] == "", r
        return replies

    def close(self) -> None:
        self._stop.set()
        self._pump.join(timeout=10)
        for r in [*self.d, self.p]:
            r.close()


@pytest.fixture(scope="module", params=[1, 2], ids=["P1-D1", "P1-D2"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    pytest.importorskip("nixl")
    p = Pair(request.param)
    yield p
    p.close()


@pytest.mark.nixl
@pytest.mark.timeout(300)
def test_setup_spans_local_remote_handshake(pair: Pair) -> None:
    spans = pair.exporter.get_finished_spans()
    n_d = len(pair.d)
    # One handshake per D rank (each reads from the one P rank), with both dual views.
    shakes = by_name(spans, A.SPAN_KV_HANDSHAKE)
    assert len(shakes) == n_d
    for s in shakes:
        assert s.status.status_code is StatusCode.UNSET
        assert s.attributes[A.KV_PEER_ENGINE_ID] == "prefill"
        assert s.attributes[A.KV_PEER_TP_SIZE] == 1 and s.attributes[A.KV_TP_SIZE] == n_d
        kids = [c for c in spans if c.parent and c.parent.span_id == s.context.span_id]
        assert sorted(c.attributes[A.KV_DESC_SCOPE] for c in kids) == ["local", "remote"]
        for c in kids:
            assert c.name == A.SPAN_KV_DESC_BUILD
            assert c.attributes[A.KV_DESCRIPTORS] > 0 and c.attributes[A.KV_BYTES] > 0
    # Local registration: one root desc_build per rank process (P + every D).
    regs = [s for s in by_name(spans, A.SPAN_KV_DESC_BUILD)
            if s.attributes[A.KV_DESC_SCOPE] == "local" and s.parent is None]
    assert len(regs) == 1 + n_d
    assert all(s.attributes[A.KV_DESCRIPTORS] == pair.case.decode.num_regions
               for s in regs[1:])


@pytest.mark.nixl
@pytest.mark.timeout(300)
def test_per_layer_reads_one_span_per_layer_bytes_sum_to_plan(pair: Pair) -> None:
    pair.exporter.clear()
    rid = f"layer-{len(pair.d)}"
    pair.read(rid, per_layer=True)
    spans = pair.exporter.get_finished_spans()
    case = pair.case
    n_layers = len(case.spec.attention_layers) + len(case.spec.mamba_layers)
    transfers = by_name(spans, A.SPAN_KV_TRANSFER)
    assert len(transfers) == len(pair.d)
    for d, xfer in enumerate(transfers):
        assert xfer.attributes[A.KV_RANK] == d and xfer.attributes[A.KV_STATUS] == "done"
        kids = [s for s in spans if s.parent and s.parent.span_id == xfer.context.span_id]
        reads = by_name(kids, A.SPAN_KV_READ)
        plan = case.plans[d]
        # One READ per cache layer per peer; their bytes add up to the plan's bytes.
        assert len(reads) == n_layers * len(plan.reads), Counter(s.name for s in kids)
        assert sum(s.attributes[A.KV_BYTES] for s in reads) == plan.bytes
        assert xfer.attributes[A.KV_BYTES] == plan.bytes
        attn, mamba = set(case.spec.attention_layers), set(case.spec.mamba_layers)
        assert {s.attributes[A.KV_LAYER] for s in reads} == attn | mamba
        for s in reads:
            a = s.attributes
            assert a[A.REQUEST_ID] == rid and a[A.KV_STATUS] == "done"
            assert a[A.KV_LAYER_KIND] == ("attention" if a[A.KV_LAYER] in attn else "mamba")
            assert a[A.KV_PEER_RANK] in plan.prefill_ranks and a[A.KV_RANK] == d
            assert a[A.KV_BACKEND] == "UCX" and a[A.KV_DESCRIPTORS] > 0
            assert a[A.KV_NIXL_XFER_US] >= 0 and a[A.KV_NIXL_POST_US] >= 0
            assert a[A.KV_NIXL_DESC_COUNT] >= 1
            assert 0 <= a[A.KV_COMPLETION_LAG_NS] < 1_000_000_000
            assert s.start_time <= s.end_time
            assert xfer.start_time <= s.start_time and s.end_time <= xfer.end_time
        # The per-request block-id -> descriptor-id mapping, one per peer.
        (mapping,) = by_name(kids, A.SPAN_KV_DESC_BUILD)
        assert mapping.attributes[A.KV_DESC_SCOPE] == "request"
        assert mapping.attributes[A.KV_BYTES] == plan.bytes
        assert mapping.attributes[A.KV_READS] == n_layers
        # Several READs per peer: D notifies P after the last one.
        assert len(by_name(kids, A.SPAN_KV_NOTIFY)) == len(plan.reads)
    kinds = Counter(s.attributes[A.KV_LAYER_KIND] for s in by_name(spans, A.SPAN_KV_READ))
    per_d = len(pair.d)
    assert kinds == {"attention": len(case.spec.attention_layers) * per_d,
                     "mamba": len(case.spec.mamba_layers) * per_d}


@pytest.mark.nixl
@pytest.mark.timeout(300)
def test_request_granularity_one_read_span_per_peer(pair: Pair) -> None:
    pair.exporter.clear()
    pair.read("whole", per_layer=False)
    reads = by_name(pair.exporter.get_finished_spans(), A.SPAN_KV_READ)
    assert len(reads) == sum(len(pair.case.plans[d].reads) for d in range(len(pair.d)))
    for s in reads:
        assert s.attributes[A.KV_LAYER_KIND] == "mixed" and A.KV_LAYER not in s.attributes
    # The done notification rode on the single READ: no separate notify span.
    assert by_name(pair.exporter.get_finished_spans(), A.SPAN_KV_NOTIFY) == []


@pytest.mark.nixl
@pytest.mark.timeout(300)
def test_refused_handshake_span_failed_and_reraised(pair: Pair) -> None:
    pair.exporter.clear()
    p_meta = pair.p.meta
    bad = msgspec.structs.replace(
        p_meta, model=msgspec.structs.replace(p_meta.model, kv_dtype="float16"))
    with pytest.raises(hs.HandshakeError):
        pair.d[0].ex.add_peer(bad)
    (s,) = by_name(pair.exporter.get_finished_spans(), A.SPAN_KV_HANDSHAKE)
    assert s.status.status_code is StatusCode.ERROR
    assert s.attributes[A.KV_STATUS] == "failed"
    assert "HandshakeError" in s.attributes[A.KV_FAILURE_REASON]


# ----------------------------------------------------------------------------------
# Fake agent: stall / abort / no-recording (no NIXL required)
# ----------------------------------------------------------------------------------


class FakeAgent:
    """Just enough of nixl_agent: READs stay in PROC (a stalled peer) or return ERR."""

    def __init__(self, name: str, state: str = "PROC") -> None:
        self.name, self.state = name, state
        self.released = 0

    def register_memory(self, *_: Any) -> object:
        return object()

    def get_agent_metadata(self) -> bytes:
        return self.name.encode()

    def add_remote_agent(self, meta: bytes) -> bytes:
        return meta

    def prep_xfer_dlist(self, *_: Any) -> object:
        return object()

    def make_prepped_xfer(self, *_: Any, **__: Any) -> object:
        return object()

    def transfer(self, _: Any) -> str:
        return "PROC"

    def check_xfer_state(self, _: Any) -> str:
        return self.state

    def release_xfer_handle(self, _: Any) -> None:
        self.released += 1

    def send_notif(self, *_: Any) -> None:
        pass

    def release_dlist_handle(self, *_: Any) -> None:
        pass

    remove_remote_agent = deregister_memory = release_dlist_handle


def fake_pair(tracer: Any, state: str,
              agent_cls: type[FakeAgent] = FakeAgent) -> tuple[NixlExecutor, BenchCase]:
    init = make_init(TINY, prefill_tp=1, decode_tp=1, num_tokens=40)
    case = build_case(init)

    def regions(layout: Any) -> list[np.ndarray]:
        return [np.zeros(layout.region_bytes, np.uint8) for _ in range(layout.num_regions)]

    p = NixlExecutor("p", regions(case.prefill), agent=FakeAgent("p"), tracer=tracer)
    p_meta = p.metadata(engine_id="prefill", spec=case.spec, layout=case.prefill, rank=0)
    d = NixlExecutor("d", regions(case.decode), agent=agent_cls("d", state), tracer=tracer)
    d.metadata(engine_id="decode", spec=case.spec, layout=case.decode, rank=0)
    d.add_peer(p_meta)
    return d, case


def test_stall_emits_stall_abort_and_timeout_read_spans() -> None:
    tracer, exporter = mem_tracer()
    d, case = fake_pair(tracer, "PROC")
    res = d.read_request("stuck", case.unmerged_plans[0], engine_id="prefill",
                         decode_block_ids=case.decode_ids, per_layer=True, timeout_s=0.01)
    assert res.status == "failed" and "stall timeout" in res.reason
    spans = exporter.get_finished_spans()
    (stall,) = by_name(spans, A.SPAN_KV_STALL)
    (abort,) = by_name(spans, A.SPAN_KV_ABORT)
    (xfer,) = by_name(spans, A.SPAN_KV_TRANSFER)
    reads = by_name(spans, A.SPAN_KV_READ)
    assert stall.attributes[A.KV_WAITED_MS] >= 10
    assert abort.attributes[A.KV_READS] == len(reads) == len(res.reads)
    assert abort.attributes[A.KV_BYTES] == case.plans[0].bytes
    for s in (stall, abort, xfer, *reads):
        assert s.status.status_code is StatusCode.ERROR, s.name
    assert {s.attributes[A.KV_STATUS] for s in reads} == {"timeout"}
    assert all("stall timeout" in s.attributes[A.KV_FAILURE_REASON] for s in reads)
    assert all(s.parent.span_id == xfer.context.span_id for s in (stall, abort, *reads))
    # P was told to free the blocks: one fail notification, traced.
    (note,) = by_name(spans, A.SPAN_KV_NOTIFY)
    assert note.attributes[A.KV_STATUS] == "failed"


def test_stalled_reads_are_held_until_they_end_and_block_new_reads() -> None:
    """The quarantine rule in the bench: a READ given up is not released (NIXL would not
    cancel it); while it is in flight the next request fails before posting anything and
    close() keeps the memory registered; once it ends it is released and reads resume."""
    tracer, _ = mem_tracer()
    d, case = fake_pair(tracer, "PROC")
    first = d.read_request("stuck", case.unmerged_plans[0], engine_id="prefill",
                           decode_block_ids=case.decode_ids, timeout_s=0.01)
    assert first.status == "failed" and d.agent.released == 0 and len(d.held) == len(first.reads)
    second = d.read_request("next", case.unmerged_plans[0], engine_id="prefill",
                            decode_block_ids=case.decode_ids, timeout_s=5)
    assert second.status == "failed" and not second.reads
    assert "given up earlier are still in flight" in second.reason
    d.close()
    assert d._reg is not None  # still registered: the READ may land
    d.agent.state = "DONE"
    third = d.read_request("after", case.unmerged_plans[0], engine_id="prefill",
                           decode_block_ids=case.decode_ids, timeout_s=5)
    assert third.status == "ok" and not d.held
    assert d.agent.released == len(first.reads) + len(third.reads)
    d.close()
    assert d._reg is None


def test_err_read_span_failed() -> None:
    tracer, exporter = mem_tracer()
    d, case = fake_pair(tracer, "ERR")
    res = d.read_request("bad", case.unmerged_plans[0], engine_id="prefill",
                         decode_block_ids=case.decode_ids, timeout_s=5)
    assert res.status == "failed"
    (read,) = by_name(exporter.get_finished_spans(), A.SPAN_KV_READ)
    assert read.attributes[A.KV_STATUS] == "failed"
    assert "returned ERR" in read.attributes[A.KV_FAILURE_REASON]
    assert read.status.status_code is StatusCode.ERROR


def test_not_recording_costs_no_span_work() -> None:
    # House rule 9: a sampled-out tracer builds no attributes and emits nothing.
    tracer, exporter = mem_tracer(TracerProvider(sampler=ALWAYS_OFF))
    d, case = fake_pair(tracer, "PROC")
    d.read_request("quiet", case.unmerged_plans[0], engine_id="prefill",
                   decode_block_ids=case.decode_ids, per_layer=True, timeout_s=0.005)
    assert exporter.get_finished_spans() == ()
    assert d.span_cost.spans == 0 and d.span_cost.ns == 0


class StampingAgent(FakeAgent):
    """FakeAgent that stamps every poll and notification (monotonic ns)."""

    def __init__(self, name: str, state: str = "PROC") -> None:
        super().__init__(name, state)
        self.stamps: list[int] = []

    def check_xfer_state(self, h: Any) -> str:
        self.stamps.append(time.monotonic_ns())
        return super().check_xfer_state(h)

    def send_notif(self, *a: Any) -> None:
        self.stamps.append(time.monotonic_ns())


class StampingTracer:
    """Wraps a tracer; stamps every start_span call (monotonic ns)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.stamps: list[int] = []

    def start_span(self, *a: Any, **k: Any) -> Any:
        self.stamps.append(time.monotonic_ns())
        return self.inner.start_span(*a, **k)

    def start_as_current_span(self, *a: Any, **k: Any) -> Any:
        return self.inner.start_as_current_span(*a, **k)


@pytest.mark.parametrize("state", ["DONE", "PROC"])
def test_spans_built_after_poll_loop_and_notify(state: str) -> None:
    # No span work while READs are posted / polled, nor before P is notified: every
    # start_span comes after the last poll and the notification.  The spans still carry
    # the executor's own stamps (shifted by one wall-clock offset per request).
    inner, exporter = mem_tracer()
    tracer = StampingTracer(inner)
    d, case = fake_pair(tracer, state, StampingAgent)
    agent = d.agent
    assert isinstance(agent, StampingAgent)
    exporter.clear()
    tracer.stamps.clear()
    agent.stamps.clear()
    res = d.read_request("stamped", case.unmerged_plans[0], engine_id="prefill",
                         decode_block_ids=case.decode_ids, per_layer=True, timeout_s=0.01)
    assert res.status == ("ok" if state == "DONE" else "failed"), res.reason
    assert agent.stamps and tracer.stamps
    assert min(tracer.stamps) > max(agent.stamps)  # last poll / notify before any span
    assert min(tracer.stamps) >= res.t_notified_ns >= res.t_end_ns >= res.t_start_ns
    spans = exporter.get_finished_spans()
    (xfer,) = by_name(spans, A.SPAN_KV_TRANSFER)
    reads = by_name(spans, A.SPAN_KV_READ)
    assert len(reads) == len(res.reads) == 5  # tiny: 5 cache layers, one peer
    off = xfer.start_time - res.t_start_ns  # wall clock - monotonic, one per request
    assert xfer.end_time - off == res.t_notified_ns
    # Read spans: start = before the handle was made; end = the poll that saw DONE
    # (DONE) or the abort (PROC: timed out).
    for s, r in zip(sorted(reads, key=lambda x: x.start_time),
                    sorted(res.reads, key=lambda x: x.t_make_ns), strict=True):
        assert s.start_time - off == r.t_make_ns
        if state == "DONE":
            assert s.end_time - off == r.t_done_ns
        assert s.parent.span_id == xfer.context.span_id
    # One notify (several READs for the peer) inside the transfer span.
    (note,) = by_name(spans, A.SPAN_KV_NOTIFY)
    assert xfer.start_time <= note.start_time <= note.end_time <= xfer.end_time
    # The cost ledger covers every span of the request, and only when recording.
    assert d.span_cost.spans == len(spans) and res.emit_ns > 0
    assert d.span_cost.ns == res.emit_ns


def test_raised_read_request_emits_failed_transfer_span() -> None:
    # An exception inside the read path (here: no handshake with that engine) is re-raised
    # and leaves one failed kv.transfer span.
    tracer, exporter = mem_tracer()
    d, case = fake_pair(tracer, "DONE")
    exporter.clear()
    with pytest.raises(KeyError, match="no handshake"):
        d.read_request("nobody", case.unmerged_plans[0], engine_id="elsewhere",
                       decode_block_ids=case.decode_ids)
    (xfer,) = exporter.get_finished_spans()
    assert xfer.name == A.SPAN_KV_TRANSFER
    assert xfer.status.status_code is StatusCode.ERROR
    assert "KeyError" in xfer.attributes[A.KV_FAILURE_REASON]


# ----------------------------------------------------------------------------------
# hybrid-pd bench --telemetry sqlite: rank processes -> one SQLite file
# ----------------------------------------------------------------------------------


@pytest.mark.nixl
@pytest.mark.timeout(300)
def test_bench_telemetry_sqlite(tmp_path: Path) -> None:
    import sqlite3
    import subprocess
    import sys

    db = tmp_path / "spans.db"
    cmd = [sys.executable, "-m", "hybrid_pd.cli", "bench", "--config",
           str(HERE / "data" / "tiny_nemotron_h_config.json"), "--prefill-tp", "1",
           "--decode-tp", "2", "--num-tokens", "40", "--requests", "2",
           "--granularity", "layer", "--telemetry", "sqlite", "--telemetry-db", str(db),
           "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"spans -> {db}" in out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    tel = report["telemetry"]
    assert report["verified"] is True
    # Exact ledger: every span created was stored, none dropped, all rows are there.
    assert tel["spans_created"] == tel["spans_ended"] == tel["spans_stored"] == tel["spans_in_db"]
    assert tel["spans_dropped"] == 0 and tel["us_per_span"] > 0 and tel["ratio_on_off"] > 0
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT name, role, count(*), sum(bytes) FROM spans "
                            "GROUP BY name, role").fetchall()
        scopes = dict(conn.execute(
            "SELECT json_extract(attributes, '$.\"kv.desc.scope\"') AS s, count(*) FROM spans "
            "WHERE name = ? GROUP BY s", (A.SPAN_KV_DESC_BUILD,)).fetchall())
        services = {r[0] for r in conn.execute("SELECT DISTINCT service FROM spans")}
    counts = {(n, r): (c, b) for n, r, c, b in rows}
    assert sum(c for c, _ in counts.values()) == tel["spans_in_db"]
    assert services == {"hybrid-pd-bench"}
    case = build_case(make_init(TINY, prefill_tp=1, decode_tp=2, num_tokens=40))
    n_layers = len(case.spec.attention_layers) + len(case.spec.mamba_layers)
    traced = report["requests"] + 1  # + the warm-up, each read once traced
    reads, read_bytes = counts[(A.SPAN_KV_READ, "decode")]
    assert reads == traced * 2 * n_layers  # 2 D ranks, one READ per layer each
    assert read_bytes == traced * sum(p.bytes for p in case.plans.values())
    # local: 3 registrations + 2 local dual views; remote: one per handshake; request:
    # one mapping per D rank per traced request.
    assert scopes == {"local": 3 + 2, "remote": 2, "request": traced * 2}
