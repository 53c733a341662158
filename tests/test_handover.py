"""Handover breakdown logic (unit): the proxy's tiling of the 13 instants, the phase spans,
P's and D's scheduler instants, and D's rows folded in its API server.  The real thing,
on engines: tests/e2e/test_serve_telemetry.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from hybrid_pd.connector import stats
from hybrid_pd.connector.handover import D_SCHED_KEY, D_WORKER_KEY, HandoverSchedulerMixin
from hybrid_pd.serve import ttft
from hybrid_pd.settings import HANDOVER_PARAMS_KEY, TRACE_PARAMS_KEY
from hybrid_pd.telemetry import attributes as A


def test_phase_spans_follow_the_registry_order() -> None:
    assert [n.rsplit(".", 1)[1] for n in ttft.PHASE_SPANS] == list(A.TTFT_PHASES)
    assert len(A.TTFT_PHASES) == 12


def test_tile_in_order_keeps_every_instant() -> None:
    marks = [0, 5, 9, 9, 20, 21, 30, 31, 40, 41, 50, 60, 100]
    out = tile = ttft.tile(marks)
    assert [(a, b) for a, b, _ in tile] == list(zip(marks, marks[1:], strict=False))
    assert all(skew == 0 for *_, skew in out)
    assert sum(b - a for a, b, _ in out) == 100


def test_tile_holds_a_skewed_clock_within_bounds() -> None:
    # D's clock 7 units behind: its first instants fall before the proxy's; one after the end
    marks = [0, 5, 9, 12, 20, 13, 15, 31, 40, 41, 50, 130, 100]
    out = ttft.tile(marks)
    assert all(b >= a for a, b, _ in out)
    assert [b for _, b, _ in out][-1] == 100 and sum(b - a for a, b, _ in out) == 100
    assert out[3][2] == 0 and out[4][2] == 7 and out[5][2] == 5  # held up to 20
    assert out[10][2] == 30  # 130 held down to the proxy's first token


def _handover() -> ttft.Handover:
    h = ttft.Handover("req-1", received_ns=1_000)
    h.prefill_answered({"kv_transfer_params": {HANDOVER_PARAMS_KEY: {
        "p_sched_ns": 3_000, "p_done_ns": 9_000}}, "usage": {"prompt_tokens": 42}}, 2_000)
    h.p_answer_ns = 10_000
    h.first_token_ns = 30_000
    return h


D = {"d_arrival_ns": 11_000, "d_load_ns": 12_000, "d_read_begin_ns": 12_500,
     "d_posted_ns": 13_000, "d_done_ns": 14_000, "d_noticed_ns": 15_000,
     "d_first_token_ns": 20_000, "cold": False}


def _tracer() -> tuple[Any, InMemorySpanExporter]:
    mem = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(mem))
    return provider.get_tracer("t"), mem


def test_emit_writes_twelve_contiguous_children_of_the_request() -> None:
    tracer, mem = _tracer()
    root = tracer.start_span(A.SPAN_PROXY_REQUEST)
    assert ttft.emit(tracer, root, _handover(), D)
    root.end()
    phases = [s for s in mem.get_finished_spans() if s.name.startswith("hybrid_pd.ttft.")]
    assert [s.name for s in phases] == list(ttft.PHASE_SPANS)
    assert all(s.parent.span_id == root.get_span_context().span_id for s in phases)
    assert [s.start_time for s in phases[1:]] == [s.end_time for s in phases[:-1]]
    assert phases[0].start_time == 1_000 and phases[-1].end_time == 30_000
    a = phases[3].attributes
    assert a[A.TTFT_MS] == 0.029 and a[A.GEN_AI_USAGE_INPUT_TOKENS] == 42
    assert a[A.TTFT_INDEX] == 3 and a[A.TTFT_PHASE] == "p_answer" and a[A.REQUEST_ID] == "req-1"


def test_emit_nothing_without_an_engines_instants() -> None:
    tracer, mem = _tracer()
    root = tracer.start_span(A.SPAN_PROXY_REQUEST)
    h = _handover()
    h.p = {}  # P answered without instants (upstream connector)
    assert not ttft.emit(tracer, root, h, D)
    assert not ttft.emit(tracer, root, _handover(), {"cold": False})
    assert mem.get_finished_spans() == ()


class _Upstream:
    def __init__(self) -> None:
        self.allocated: list[str] = []

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self.allocated.append(request.request_id)

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict | None]:
        return True, {"remote_engine_id": "P"}

    def update_connector_output(self, connector_output: Any) -> None:
        pass


class _Sched(HandoverSchedulerMixin, _Upstream):
    pass


def _request(rid: str, params: dict, outputs: int = 0) -> Any:
    return SimpleNamespace(request_id=rid, arrival_time=1.5, num_output_tokens=outputs,
                           kv_transfer_params={**params, TRACE_PARAMS_KEY: {"request_id": "proxy-" + rid}})


def test_prefill_instants_go_back_in_p_answer() -> None:
    s = _Sched()
    req = _request("a", {"do_remote_decode": True})
    s.update_state_after_alloc(req, None, 0)
    delay, params = s.request_finished(req, [])
    inst = params[HANDOVER_PARAMS_KEY]
    assert delay and 0 < inst["p_sched_ns"] <= inst["p_done_ns"]
    d_rows, p_rows = s.hy_handover_take()
    assert d_rows == [] and p_rows == [[inst["p_sched_ns"], inst["p_done_ns"]]]
    assert s.hy_handover_take() == ([], [])


def test_decode_row_once_the_first_token_is_sampled() -> None:
    s = _Sched()
    req = _request("b", {"do_remote_prefill": True})
    s.update_state_after_alloc(req, None, 100)
    assert s.hy_handover_take() == ([], [])  # KV not there yet
    s.update_connector_output(SimpleNamespace(finished_recving={"b"}))
    assert s.hy_handover_take() == ([], [])  # seen, but no token sampled yet
    req.num_output_tokens = 1
    (row,), _ = s.hy_handover_take()
    assert row[0] == "proxy-b" and row[1] == 1_500_000_000 and 0 < row[2] <= row[3]
    assert s.hy_handover_take() == ([], [])


def test_api_server_folds_ranks_and_serves_complete_entries() -> None:
    rid = "proxy-fold"
    stats.take_rows({D_WORKER_KEY: [[rid, 0, 10, 20, 30, 40, 0], [rid, 1, 11, 19, 35, 38, 1]]})
    assert stats.handover(rid) is None  # no first token yet
    (entry,) = stats.take_rows({D_SCHED_KEY: [[rid, 5, 50, 60]]})
    assert stats.handover(rid) == entry
    assert (entry["d_load_ns"], entry["d_read_begin_ns"], entry["d_posted_ns"],
            entry["d_done_ns"], entry["cold"]) == (11, 20, 35, 40, True)
    phases = stats.d_phase_seconds(entry)
    assert list(phases) == list(stats.D_PHASES) and abs(sum(phases.values()) - 55e-9) < 1e-15


def test_stats_rows_travel_and_aggregate() -> None:
    a, b = stats.HybridKVConnectorStats(), stats.HybridKVConnectorStats()
    assert a.is_empty()
    b.data[stats.READS_KEY].append(["attention", 0.001, 4096])
    assert not b.is_empty()
    a.aggregate(b)
    again = stats.HybridKVConnectorStats(data=a.to_dict())
    assert again.data[stats.READS_KEY] == [["attention", 0.001, 4096]]
    assert again.reduce() == {"Num successful transfers": 0}


def test_decode_row_when_the_first_token_also_finishes_the_request() -> None:
    s = _Sched()
    req = _request("c", {"do_remote_prefill": True})
    s.update_state_after_alloc(req, None, 100)
    s.update_connector_output(SimpleNamespace(finished_recving={"c"}))
    req.num_output_tokens = 1  # max_tokens=1: finished in the step that sampled it
    s.request_finished(req, [])
    (row,), _ = s.hy_handover_take()
    assert row[0] == "proxy-c"


def test_proxy_asks_again_only_while_the_route_says_not_yet(monkeypatch) -> None:
    import asyncio

    import httpx

    from hybrid_pd.connector.handover_route import HandoverRoute

    calls: list[str] = []

    async def plain(scope: Any, receive: Any, send: Any) -> None:  # an engine without our route
        calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    monkeypatch.setattr(ttft, "FETCH_WAIT_S", 0.0)
    rid = "proxy-fetch"

    async def run(app: Any) -> Any:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as http:
            return await ttft.fetch_d(http, "http://d", rid)

    assert asyncio.run(run(plain)) is None and len(calls) == 1  # no retries
    routed = HandoverRoute(plain)
    assert asyncio.run(run(routed)) is None and len(calls) == 1  # ours: "not yet", every try
    stats.take_rows({D_SCHED_KEY: [[rid, 5, 50, 60]]})
    assert asyncio.run(run(routed))["d_first_token_ns"] == 60
