"""Unit tests of the connector's read path and tracing mixins over a fake upstream worker.

The fake keeps upstream's contracts that the mixins rely on (``_recving_transfers``
handles, ``_handle_failed_transfer`` / ``_log_failure`` / ``xfer_stats`` semantics,
``get_transfer_results``) and is checked against the same manifest as the real classes
(tests/test_vllm_contract.py); the real thing is exercised end to end in
tests/e2e/test_hybrid_connector.py (spans from real engines, both connectors)."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracer, StatusCode

from hybrid_pd.connector import vllm_tracing as vt
from hybrid_pd.connector.read_path import ReadPathWorkerMixin
from hybrid_pd.settings import KEY_READ_TIMEOUT, TRACE_PARAMS_KEY
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry import engine as tel
from hybrid_pd.transfer.reads import ReadResult

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


class FakeNixl:
    def __init__(self) -> None:
        self.states: dict[int, str] = {}
        self.released: list[int] = []
        self.calls: Counter[str] = Counter()

    def check_xfer_state(self, h: int) -> str:
        self.calls["check_xfer_state"] += 1
        return self.states[h]

    def get_xfer_telemetry(self, h: int) -> Any:
        self.calls["get_xfer_telemetry"] += 1
        return SimpleNamespace(startTime=1, postDuration=5, xferDuration=70, totalBytes=4096,
                               descCount=3)

    def release_xfer_handle(self, h: int) -> None:
        self.calls["release_xfer_handle"] += 1
        self.released.append(h)


class FakeStats:
    def __init__(self) -> None:
        self.transfers: list[Any] = []
        self.failed = 0

    def record_transfer(self, res: Any) -> None:
        self.transfers.append(res)

    def record_failed_transfer(self) -> None:
        self.failed += 1


class FakeUpstreamWorker:
    """The parts of vLLM 0.32's NixlPullConnectorWorker the mixins wrap."""

    def __init__(self, timeout: object = None) -> None:
        extra = {} if timeout is None else {KEY_READ_TIMEOUT: timeout}
        self.vllm_config = SimpleNamespace(
            kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra),
            parallel_config=SimpleNamespace(tensor_parallel_size=1))
        self.engine_id, self.tp_rank = "decode-engine", 0
        self.nixl_wrapper = FakeNixl()
        self.xfer_stats = FakeStats()
        self._recving_transfers: dict[str, list[int]] = defaultdict(list)
        self._recv_failures: set[str] = set()
        self._recving_metadata: dict[str, Any] = {}
        self._reqs_to_send: dict[str, float] = {}
        self.logged: list[str] = []
        self._next = 100

    def start_load_kv(self, metadata: Any) -> None:
        for rid, meta in metadata.reqs_to_recv.items():
            self._read_blocks_for_req(rid, meta)
        self._reqs_to_send.update(metadata.reqs_to_send)

    def _read_blocks_for_req(self, req_id: str, meta: Any) -> None:
        self._recving_metadata[req_id] = meta
        self._read_blocks(SimpleNamespace(remote_rank=0, local_block_ids=[[1]]), meta.remote.engine_id, req_id,
                          f"remote-{req_id}", 1, None, 2, 1, True)

    def _compute_desc_ids(self, block_ids: Any, dst_num_blocks: int, block_size_ratio: Any,
                          physical_blocks_per_logical: int, region_num_blocks: Any = None,
                          region_group_ids: Any = None,
                          uses_region_group_mapping: bool = False) -> list[int]:
        return [1, 2, 3]

    def _read_blocks(self, read_spec: Any, dst_engine_id: str, request_id: str,
                     remote_request_id: str, local_xfer_side_handle: int,
                     local_dram_handle: int | None, remote_xfer_side_handle: int,
                     expected_consumers: int, awaiting_kvs: bool) -> bool:
        self._compute_desc_ids([[1]], 10, None, 1)
        self._compute_desc_ids([[1]], 10, 1, 1)
        self._next += 1
        self.nixl_wrapper.states[self._next] = "PROC"
        self._recving_transfers[request_id].append(self._next)
        return True

    def _log_failure(self, failure_type: str, req_id: str | None, msg: str = "",
                     error: Exception | None = None, meta: Any = None,
                     **extra_context: Any) -> None:
        self.logged.append(f"{failure_type} {req_id} {msg}")

    def _handle_failed_transfer(self, req_id: str, handle: int | None,
                                failed_req_ids: set[str] | None = None,
                                record_failed_transfer: bool = True) -> bool:
        if record_failed_transfer:
            self.xfer_stats.record_failed_transfer()
        if failed_req_ids is not None:
            failed_req_ids.add(req_id)
        if handle is not None:
            self.nixl_wrapper.release_xfer_handle(handle)
        return True

    def _pop_done_transfers(self, transfers: dict[str, list[int]]) -> tuple[set[str], set[str]]:
        raise AssertionError("the read path replaces upstream's poll")

    def _engines_with_inflight_transfers(self) -> set[str]:
        return {self._recving_metadata[r].remote.engine_id for r in self._recving_transfers
                if r in self._recving_metadata}

    def get_kv_connector_stats(self) -> Any:
        return self.xfer_stats

    # descriptor builds and handshakes (the tracing layer times them)
    def _build_fa_local(self, base_addresses: list[int], block_size_ratio: int) -> Any:
        return [(a, 64, 0) for a in base_addresses]

    def _build_mamba_local(self, base_addresses: list[int]) -> Any:
        return [(a, 32, 0) for a in base_addresses]

    def _build_fa_remote(self, plan: Any, nixl_agent_meta: Any, block_size_ratio: int) -> Any:
        return [(0, 64, 0)]

    def _build_mamba_remote(self, nixl_agent_meta: Any, tp_ratio: int, transfer_info: Any) -> Any:
        return [(0, 32, 0)]

    def add_remote_agent(self, nixl_agent_meta: Any, remote_tp_rank: int = 0,
                         remote_tp_size: int = 1, remote_dcp_size: int = 1) -> str:
        self._build_fa_remote(None, nixl_agent_meta, 1)
        return "agent"

    def _nixl_handshake(self, host: str, port: int, remote_tp_size: int,
                        expected_engine_id: str, remote_dcp_size: int = 1,
                        remote_pp_size: int = 1, notif_agents_only: bool = False) -> Any:
        return {0: self.add_remote_agent(SimpleNamespace(engine_id=expected_engine_id))}

    def _reap_expired_send_leases(self, done_sending: set[str]) -> None:
        for rid in [r for r, t in self._reqs_to_send.items() if t <= time.perf_counter()]:
            del self._reqs_to_send[rid]
            done_sending.add(rid)

    def _get_new_notifs(self) -> set[str]:
        return set()

    def get_transfer_results(self) -> Any:
        done, failed = self._pop_done_transfers(self._recving_transfers)
        self._recv_failures |= failed
        failed_done = {r for r in self._recv_failures if r not in self._recving_transfers}
        self._recv_failures -= failed_done
        for rid in done | failed_done:
            self._recving_metadata.pop(rid, None)
        sending = self._get_new_notifs()
        self._reap_expired_send_leases(sending)
        return SimpleNamespace(finished_recving=done | failed_done, failed_recving=failed_done,
                               finished_sending=sending)


class Guarded(ReadPathWorkerMixin, FakeUpstreamWorker):
    """The read path alone (tracing off)."""


def post(w: Any, rid: str) -> None:
    w._read_blocks(SimpleNamespace(remote_rank=0, local_block_ids=[[1]]), "prefill-engine", rid, f"remote-{rid}", 1,
                   None, 2, 1, True)


class Worker(vt.TracedWorkerMixin, ReadPathWorkerMixin, FakeUpstreamWorker):
    HY_CONNECTOR = "hybrid"


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    mem = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(mem))
    monkeypatch.setattr(tel, "engine_tracer", lambda engine_id=None: provider.get_tracer("t"))
    return mem


def recv_meta(rid: str = "req-1") -> Any:
    remote = SimpleNamespace(engine_id="prefill-engine")
    meta = SimpleNamespace(reqs_to_recv={rid: SimpleNamespace(remote=remote)}, reqs_to_send={})
    setattr(meta, vt.META_ATTR, {rid: {"traceparent": f"00-{TRACE}-{PARENT}-01", "request_id": "pd-42"}})
    return meta


def by_name(mem: InMemorySpanExporter) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = defaultdict(list)
    for s in mem.get_finished_spans():
        out[s.name].append(s)
    return out


def test_read_spans_join_the_request_trace_with_nixl_numbers(spans: InMemorySpanExporter) -> None:
    w = Worker()
    w.start_load_kv(recv_meta())
    res = w.get_transfer_results()  # still PROC: nothing ends
    assert res.finished_recving == set() and not by_name(spans)[A.SPAN_KV_READ]
    (h,) = w._recving_transfers["req-1"]
    w.nixl_wrapper.states[h] = "DONE"
    res = w.get_transfer_results()
    assert res.finished_recving == {"req-1"} and res.failed_recving == set()
    got = by_name(spans)
    (read,), (xfer,), (mapping,) = got[A.SPAN_KV_READ], got[A.SPAN_KV_TRANSFER], got[A.SPAN_KV_DESC_BUILD]
    for s in (read, xfer, mapping):
        assert format(s.context.trace_id, "032x") == TRACE
        assert format(s.parent.span_id, "016x") == PARENT
        assert s.attributes[A.REQUEST_ID] == "pd-42" and s.attributes[A.CONNECTOR] == "hybrid"
    assert read.attributes[A.KV_BYTES] == 4096 and read.attributes[A.KV_DESCRIPTORS] == 3
    assert read.attributes[A.KV_NIXL_POST_US] == 5 and read.attributes[A.KV_NIXL_XFER_US] == 70
    assert read.attributes[A.KV_STATUS] == "done" and read.attributes[A.KV_POLLS] == 2
    assert 0 < read.attributes[A.KV_COMPLETION_LAG_NS] <= read.end_time - read.start_time
    assert xfer.attributes[A.KV_READS] == 1 and xfer.attributes[A.KV_BYTES] == 4096
    assert xfer.status.status_code != StatusCode.ERROR
    assert mapping.attributes[A.KV_DESC_SCOPE] == "request" and mapping.attributes[A.KV_DESCRIPTORS] == 3
    assert xfer.start_time <= mapping.start_time <= read.start_time <= read.end_time <= xfer.end_time


def test_stalled_read_is_aborted_held_and_failed(spans: InMemorySpanExporter) -> None:
    w = Worker(timeout=0.05)
    w.start_load_kv(recv_meta())
    (h,) = w._recving_transfers["req-1"]
    assert w.get_transfer_results().finished_recving == set()  # young: left alone
    time.sleep(0.08)
    res = w.get_transfer_results()
    assert res.finished_recving == {"req-1"} and res.failed_recving == {"req-1"}
    assert w.nixl_wrapper.released == [] and "req-1" not in w._recving_transfers
    assert list(w.hy_held) == [h]  # quarantined: NIXL would not cancel it
    assert any(line.startswith("transfer_stalled req-1") for line in w.logged), w.logged
    got = by_name(spans)
    (abort,), (read,), (xfer,) = got[A.SPAN_KV_ABORT], got[A.SPAN_KV_READ], got[A.SPAN_KV_TRANSFER]
    assert abort.attributes[A.KV_STATUS] == "timeout" and abort.attributes[A.KV_WAITED_MS] >= 50
    assert read.status.status_code == StatusCode.ERROR and read.attributes[A.KV_STATUS] == "timeout"
    assert xfer.status.status_code == StatusCode.ERROR
    assert "transfer_stalled" in xfer.attributes[A.KV_FAILURE_REASON]


def test_no_timeout_configured_never_aborts(spans: InMemorySpanExporter) -> None:
    w = Worker()
    w.start_load_kv(recv_meta())
    time.sleep(0.02)
    assert w.get_transfer_results().finished_recving == set()
    assert w.nixl_wrapper.released == [] and not by_name(spans)[A.SPAN_KV_ABORT]


def test_nixl_error_state_fails_the_read_span(spans: InMemorySpanExporter) -> None:
    w = Worker()
    w.start_load_kv(recv_meta())
    (h,) = w._recving_transfers["req-1"]
    w.nixl_wrapper.states[h] = "ERR"
    res = w.get_transfer_results()
    assert res.failed_recving == {"req-1"}
    (read,) = by_name(spans)[A.SPAN_KV_READ]
    assert read.status.status_code == StatusCode.ERROR
    assert read.attributes[A.KV_FAILURE_REASON] == "transfer_failed"


def test_bad_timeout_is_a_clear_error(spans: InMemorySpanExporter) -> None:
    with pytest.raises(ValueError, match="hybrid_read_timeout_s='soon' is not a number of seconds"):
        Worker(timeout="soon").start_load_kv(recv_meta())


def test_prefill_hold_span_ends_at_notification_or_lease_expiry(spans: InMemorySpanExporter) -> None:
    class P(Worker):
        notified: set[str] = set()

        def _get_new_notifs(self) -> set[str]:
            out, self.notified = set(self.notified), set()
            return out

    w = P()
    meta = SimpleNamespace(reqs_to_recv={}, reqs_to_send={"a": time.perf_counter() + 60,
                                                         "b": time.perf_counter() - 1})
    setattr(meta, vt.META_ATTR, {"a": {"request_id": "pd-a"}, "b": {"request_id": "pd-b"}})
    w.start_load_kv(meta)
    w.notified = {"a"}
    assert w.get_transfer_results().finished_sending == {"a", "b"}
    holds = {s.attributes[A.REQUEST_ID]: s for s in by_name(spans)[A.SPAN_KV_NOTIFY]}
    assert holds["pd-a"].attributes[A.KV_STATUS] == "done"
    assert holds["pd-a"].status.status_code != StatusCode.ERROR
    assert holds["pd-b"].attributes[A.KV_STATUS] == "aborted"
    assert holds["pd-b"].status.status_code == StatusCode.ERROR


class FakeScheduler:
    def __init__(self, tp: int = 1) -> None:
        self.vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=tp))
        self._reqs_need_recv: dict[str, tuple[Any, ...]] = {}
        self._reqs_need_send: dict[str, float] = {}
        self._nixl_handshake_listener_t: Any = None

    def set_xfer_handshake_metadata(self, metadata: Any) -> None:
        self._nixl_handshake_listener_t = metadata

    @staticmethod
    def _nixl_handshake_listener(encoded_data: Any, ready_event: Any, stop_event: Any,
                                 host: str, port: int) -> None:
        ready_event.set()

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict | None]:
        self._reqs_need_send[request.request_id] = 1.0
        return True, {"remote_engine_id": "P"}

    def update_connector_output(self, connector_output: Any) -> None:
        self.outputs = [*getattr(self, "outputs", []), connector_output]

    def update_state_after_alloc(self, request: Any, blocks: Any,
                                 num_external_tokens: int) -> None:
        self.allocated = [*getattr(self, "allocated", []), request.request_id]

    def has_pending_push_work(self) -> bool:
        return False

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        meta = SimpleNamespace(reqs_to_send=self._reqs_need_send, reqs_to_recv=dict(self._reqs_need_recv))
        self._reqs_need_recv, self._reqs_need_send = {}, {}
        return meta


class Scheduler(vt.TracedSchedulerMixin, FakeScheduler):
    pass


def test_scheduler_forwards_trace_hand_off_to_workers() -> None:
    s = Scheduler()
    hand_off = {"traceparent": f"00-{TRACE}-{PARENT}-01", "request_id": "pd-1"}
    p_req = SimpleNamespace(request_id="p1", kv_transfer_params={"do_remote_decode": True,
                                                                   TRACE_PARAMS_KEY: hand_off})
    d_req = SimpleNamespace(request_id="d1", kv_transfer_params={TRACE_PARAMS_KEY: {"request_id": "pd-2"}})
    plain = SimpleNamespace(request_id="x", kv_transfer_params={"remote_engine_id": "P"})
    s.request_finished(p_req, ())
    s._reqs_need_recv = {"d1": (d_req, [], (), True), "x": (plain, [], (), True)}
    meta = s.build_connector_meta(None)
    assert getattr(meta, vt.META_ATTR) == {"p1": hand_off, "d1": {"request_id": "pd-2"}}
    assert not hasattr(s.build_connector_meta(None), vt.META_ATTR)  # nothing left over


def test_hand_off_from_params_ignores_junk() -> None:
    assert tel.from_params(None) is None
    assert tel.from_params({TRACE_PARAMS_KEY: "nope"}) is None
    assert tel.from_params({TRACE_PARAMS_KEY: {"traceparent": 5, "evil": "x"}}) is None
    assert tel.from_params({TRACE_PARAMS_KEY: {"request_id": "r" * 600}}) is None
    assert tel.context_of({"request_id": "r"}) is None


def test_per_layer_reads_carry_their_layer(spans: InMemorySpanExporter) -> None:
    class LayerCore(FakeUpstreamWorker):  # like HybridWorkerCore: posts one READ per layer
        def _read_blocks(self, read_spec: Any, dst_engine_id: str, request_id: str,
                         *args: Any) -> bool:
            t = time.monotonic_ns()
            self._hy_mapped(t, t + 1000, 8192, 6)
            started = []
            for layer, kind in ((1, "attention"), (3, "mamba")):
                self._next += 1
                self.nixl_wrapper.states[self._next] = "DONE"
                started.append((self._next, ReadResult(0, layer, 4096, 3, "PROC", t_make_ns=t,
                                                       t_post_ns=t, kind=kind)))
            self.hy_register_reads(request_id, started)
            self._recving_transfers[request_id].extend(h for h, _ in started)
            return True

    class LayerWorker(vt.TracedWorkerMixin, ReadPathWorkerMixin, LayerCore):
        pass

    w = LayerWorker()
    w.start_load_kv(recv_meta())
    assert w.get_transfer_results().finished_recving == {"req-1"}
    got = by_name(spans)
    reads = sorted(got[A.SPAN_KV_READ], key=lambda s: s.attributes[A.KV_LAYER])
    assert [(s.attributes[A.KV_LAYER], s.attributes[A.KV_LAYER_KIND]) for s in reads] == [
        (1, "attention"), (3, "mamba")]
    (xfer,), (mapping,) = got[A.SPAN_KV_TRANSFER], got[A.SPAN_KV_DESC_BUILD]
    assert xfer.attributes[A.KV_READS] == 2 and xfer.attributes[A.KV_BYTES] == 8192
    assert mapping.attributes[A.KV_BYTES] == 8192 and mapping.attributes[A.KV_DESCRIPTORS] == 6


# -- behaviour apart from tracing -------------------------------------------------------


def test_stall_guard_works_with_tracing_off() -> None:
    w = Guarded(timeout=0.05)
    post(w, "req-1")
    (h,) = w._recving_transfers["req-1"]
    assert w.get_transfer_results().finished_recving == set()
    time.sleep(0.08)
    res = w.get_transfer_results()
    assert res.finished_recving == {"req-1"} and res.failed_recving == {"req-1"}
    assert w.nixl_wrapper.released == [] and w.xfer_stats.failed == 1
    assert list(w.hy_held) == [h]
    assert any(line.startswith("transfer_stalled req-1") for line in w.logged), w.logged


@pytest.mark.parametrize("off", ["off", 0, None])
def test_stall_guard_switched_off(off: object) -> None:
    w = Guarded(timeout=off)
    assert w.hy_guard.timeout_s is None
    post(w, "req-1")
    time.sleep(0.02)
    assert w.get_transfer_results().finished_recving == set() and not w.nixl_wrapper.released


def _drive(w: Any) -> Counter[str]:
    """Three requests: one DONE at the 2nd poll, one ERR at the 2nd, one still PROC."""
    for rid in ("a", "b", "c"):
        post(w, rid)
    w.get_transfer_results()
    nixl = w.nixl_wrapper
    (ha,), (hb,) = w._recving_transfers["a"], w._recving_transfers["b"]
    nixl.states[ha], nixl.states[hb] = "DONE", "ERR"
    w.get_transfer_results()
    w.get_transfer_results()
    return nixl.calls


def test_non_recording_tracing_makes_no_extra_nixl_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tel, "engine_tracer", lambda engine_id=None: NoOpTracer())
    traced, untraced = _drive(Worker()), _drive(Guarded())
    assert traced == untraced
    # upstream's own cost: one check per live handle per poll, telemetry once per DONE
    assert untraced == Counter({"check_xfer_state": 3 + 3 + 1, "get_xfer_telemetry": 1,
                                "release_xfer_handle": 2})


def test_recording_tracing_makes_no_extra_nixl_calls(spans: InMemorySpanExporter) -> None:
    assert _drive(Worker()) == _drive(Guarded())
    assert len(by_name(spans)[A.SPAN_KV_READ]) == 2


def test_handshake_and_descriptor_builds_are_spans(spans: InMemorySpanExporter) -> None:
    w = Worker()
    w._build_fa_local([0x1000, 0x2000], 1)
    w._nixl_handshake("127.0.0.1", 5600, 1, "prefill-engine")
    got = by_name(spans)
    (hs,) = got[A.SPAN_KV_HANDSHAKE]
    builds = {s.attributes[A.KV_DESC_SCOPE]: s for s in got[A.SPAN_KV_DESC_BUILD]}
    assert builds["local"].attributes[A.KV_DESCRIPTORS] == 2
    assert builds["local"].attributes[A.KV_BYTES] == 128
    assert builds["remote"].parent.span_id == hs.context.span_id
    assert builds["remote"].attributes[A.KV_PEER_ENGINE_ID] == "prefill-engine"
    assert hs.attributes[A.KV_PEER_ENGINE_ID] == "prefill-engine"
