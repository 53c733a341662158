"""KV integrity inside the connector (hybrid_pd.connector.integrity) over fakes: per-block
units and in-place digests against the real planner's transfer (any TP pair, D holding
a prefix in its own cache), the wire, P's scheduler hand-over, P's digest and guard, D's
hold / compare / fail path with its spans and counters, P's route, D's fetch against a
real HTTP server, the CLI flag.  No GPU, NIXL or engine required."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import xxhash
from helpers import free_port
from opentelemetry.trace import StatusCode
from starlette.testclient import TestClient
from test_integrity_units import TINY, TINY_G2, make_layout
from test_vllm_tracing import FakeStats, FakeUpstreamWorker, by_name, spans  # noqa: F401

from hybrid_pd import cli as main_cli
from hybrid_pd.connector import integrity as I
from hybrid_pd.connector import stats as S
from hybrid_pd.connector import vllm_tracing as vt
from hybrid_pd.connector.handover_route import HandoverRoute
from hybrid_pd.connector.read_path import ReadPathWorkerMixin
from hybrid_pd.connector.sides import LocalSide, Side
from hybrid_pd.planner.integrity_units import (
    BlockKey,
    compare_units,
    gather,
    rank_units,
    request_units,
)
from hybrid_pd.planner.model_spec import LayerKind
from hybrid_pd.planner.plan import peer_templates, plan_request
from hybrid_pd.planner.views import dual_view, to_addr_descs
from hybrid_pd.serve import cli
from hybrid_pd.serve.proxy_requests import with_trace
from hybrid_pd.settings import (
    ENV_TEST_INTEGRITY_FLIP,
    INTEGRITY_ROUTE,
    KEY_KV_INTEGRITY,
    KEY_READ_TIMEOUT,
    TRACE_PARAMS_KEY,
)
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.transfer.integrity import digest_units


def bases_of(regions: list[np.ndarray]) -> tuple[list[int], list[int]]:
    return [r.ctypes.data for r in regions], [r.size for r in regions]


# ----------------------------------------------------------------------------------
# Units per block, digests in place
# ----------------------------------------------------------------------------------
def test_request_units_cut_attention_per_block_and_keep_mamba_whole() -> None:
    # TP1, block 272 (kernel 16): 600 tokens = blocks 0 (272), 1 (272), 2 (56 tokens)
    lay, ids = make_layout(TINY, 1, 600)
    units = request_units(TINY, lay, 0, ids, 600)
    whole = {u.key: u for u in rank_units(TINY, lay, 0, ids, 600)}
    kv = [u for u in units if u.key.view in "KV"]
    assert {u.key.block for u in kv} == {0, 1, 2}
    assert all(u.key.block == -1 for u in units if u.key.view not in "KV")
    rng = np.random.default_rng(0)
    regions = [rng.integers(0, 256, lay.region_bytes, dtype=np.uint8)
               for _ in range(lay.num_regions)]
    for key, u in whole.items():  # the blocks of a K/V unit, in order, are the whole unit
        parts = sorted((x for x in units if x.key[:3] == key), key=lambda x: x.key.block)
        got = b"".join(gather(p.runs, regions).tobytes() for p in parts)
        assert got == gather(u.runs, regions).tobytes(), key
    # D holding block 0 in its prefix cache: the same keys from block 1 on
    tail = tuple(g[1:] if k.kind is LayerKind.ATTENTION else g
                 for g, k in zip(ids, lay.hma_groups, strict=True))
    later = request_units(TINY, lay, 0, tail, 600 - 272, first_block=1)
    assert {u.key for u in later} == {u.key for u in units if u.key.block != 0}
    assert str(BlockKey(3, "K", 1, 2)) == "layer 3 K head 1 block 2"
    assert str(BlockKey(0, "B", 0, -1)) == "layer 0 B group 0"
    with pytest.raises(ValueError, match="attention group 2 has 1 blocks, 600 tokens need 3"):
        request_units(TINY, lay, 0, tuple(g[:1] for g in ids), 600)


def test_digest_units_is_xxh3_of_the_gathered_bytes_whatever_the_runs() -> None:
    lay, ids = make_layout(TINY, 1, 300)
    rng = np.random.default_rng(1)
    regions = [rng.integers(0, 256, lay.region_bytes, dtype=np.uint8)
               for _ in range(lay.num_regions)]
    bases, lens = bases_of(regions)
    units = request_units(TINY, lay, 0, ids, 300)
    got = digest_units([u.runs for u in units], bases, lens)
    want = [xxhash.xxh3_64_intdigest(gather(u.runs, regions).tobytes()) for u in units]
    assert got.tolist() == want
    # the same bytes cut into other runs: the same digest
    off, n, reg = units[0].runs[0].tolist()
    split = np.array([[off, 5, reg], [off + 5, n - 5, reg]], np.int64)
    assert digest_units([split], bases, lens)[0] == xxhash.xxh3_64_intdigest(
        gather(units[0].runs[:1], regions).tobytes())
    with pytest.raises(ValueError, match="outside"):
        digest_units([np.array([[lay.region_bytes - 4, 8, 0]])], bases, lens)


@pytest.mark.parametrize(("spec", "p_tp", "d_tp"), [(TINY, 1, 1), (TINY, 1, 2), (TINY, 2, 1),
                                                    (TINY_G2, 2, 1), (TINY_G2, 1, 2),
                                                    (TINY, 2, 4)])
@pytest.mark.parametrize("cached", [0, 1])
def test_planner_transfer_compares_equal_with_d_prefix_hits(spec, p_tp, d_tp, cached) -> None:
    """P digests all it computed, D (holding ``cached`` blocks in its prefix cache) what it
    read, both with digest_units over real memory; the real planner's READs move the bytes."""
    n = 600
    p, p_ids = make_layout(spec, p_tp, n, start=1)
    d, d_all = make_layout(spec, d_tp, n, start=3, shuffle=5)
    bs = d.block_size
    att = [g.kind is LayerKind.ATTENTION for g in d.hma_groups]
    d_ids = tuple(g[cached:] if a else g for g, a in zip(d_all, att, strict=True))
    p_read = tuple(g[cached:] if a else g for g, a in zip(p_ids, att, strict=True))
    rng = np.random.default_rng(7)
    p_mem = {r: [rng.integers(0, 256, p.region_bytes, dtype=np.uint8)
                 for _ in range(p.num_regions)] for r in range(p_tp)}
    d_mem = {r: [rng.integers(0, 256, d.region_bytes, dtype=np.uint8)
                 for _ in range(d.num_regions)] for r in range(d_tp)}
    for rank in range(d_tp):
        plan = plan_request(spec=spec, decode=d, prefill=p, decode_rank=rank,
                            decode_block_ids=d_ids, prefill_block_ids=p_read,
                            num_tokens=n - cached * bs)
        for read in plan.reads:
            for (lo, ln, lr), (ro, _, rr) in zip(read.local_array.tolist(),
                                                 read.remote_array.tolist(), strict=True):
                d_mem[rank][lr][lo:lo + ln] = p_mem[read.prefill_rank][rr][ro:ro + ln]

    def digests(spec_lay, rank, mem, ids, tokens, first):
        units = request_units(spec, spec_lay, rank, ids, tokens, first_block=first)
        vals = digest_units([u.runs for u in units], *bases_of(mem))
        return {u.key: int(v) for u, v in zip(units, vals.tolist(), strict=True)}

    p_dig = {r: digests(p, r, p_mem[r], p_ids, n, 0) for r in range(p_tp)}
    d_dig = {r: digests(d, r, d_mem[r], d_ids, n - cached * bs, cached) for r in range(d_tp)}
    assert compare_units(p_dig, d_dig) == []
    assert min(k.block for dd in d_dig.values() for k in dd if k.block >= 0) == cached
    # one byte of one D rank's B state off: named, and nothing else
    (b_key,) = [u for u in request_units(spec, d, 0, d_ids, n - cached * bs,
                                         first_block=cached)
                if u.key.view == "B" and u.key.layer == spec.mamba_layers[0]][:1]
    off, _, reg = b_key.runs[0].tolist()
    d_mem[0][reg][off] ^= 0xFF
    d_dig[0] = digests(d, 0, d_mem[0], d_ids, n - cached * bs, cached)
    (bad,) = compare_units(p_dig, d_dig)
    assert (bad.key, bad.decode_rank) == (b_key.key, 0) and bad.prefill_ranks


# ----------------------------------------------------------------------------------
# Wire and route
# ----------------------------------------------------------------------------------
def test_pack_unpack_round_trip_and_refusals() -> None:
    keys = [BlockKey(3, "K", 1, 0), BlockKey(0, "SSM", 7, -1), BlockKey(5, "C", 0, -1)]
    vals = np.array([1, 2**64 - 1, 12345], np.uint64)
    k, v = I.pack_digests(keys, vals)
    assert isinstance(k, str) and I.unpack_digests(k, v) == dict(zip(keys, vals.tolist(),
                                                                     strict=True))
    with pytest.raises(ValueError, match="malformed"):
        I.unpack_digests(k, "!!")
    with pytest.raises(ValueError, match="malformed digests: 3 keys, 2 digests"):
        I.unpack_digests(k, I.pack_digests(keys[:2], vals[:2])[1])
    doc = {"tp": 2, "block_size": 272, "ranks": {"0": {"keys": k, "digests": v}}}
    with pytest.raises(I.DigestsUnavailable, match="1 of its 2 ranks"):
        I.prefill_digests(doc, 272)
    doc["tp"] = 1
    with pytest.raises(I.DigestsUnavailable, match="P's logical block is 272 tokens, D's 256"):
        I.prefill_digests(doc, 256)
    assert I.prefill_digests(doc, 272)[0][keys[1]] == 2**64 - 1
    with pytest.raises(I.DigestsUnavailable, match="malformed"):
        I.prefill_digests({"tp": 1}, 272)


def test_policy_and_urls() -> None:
    assert str(I.policy_from(None)) == "off" and not I.policy_from({}).enabled
    assert I.policy_from({KEY_KV_INTEGRITY: "sampled:4"}).k == 4
    with pytest.raises(ValueError, match=r"kv_connector_extra_config.hybrid_kv_integrity: "
                                         r"integrity policy must be .* got 'sometimes'"):
        I.policy_from({KEY_KV_INTEGRITY: "sometimes"})
    assert I.integrity_url("http://p:8100/", "cmpl-1 x") == \
        f"http://p:8100{INTEGRITY_ROUTE}/cmpl-1%20x"
    for bad in ("", "file:///etc/passwd", "p:8100", "http://p?x=1"):
        with pytest.raises(ValueError, match="not an http"):
            I.integrity_url(bad, "r")
    assert I.parse_flip("3:B") == (3, "B") and I.parse_flip("x:B") is None
    assert I.parse_flip("3:Q") is None and I.parse_flip(None) is None


def test_route_serves_p_digests_once_the_stats_brought_them() -> None:
    S.INTEGRITY.clear()

    async def inner(scope, receive, send):  # anything else passes through
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    c = TestClient(HandoverRoute(inner))  # no lifespan: the fake app only answers http
    if True:
        assert c.get(f"{INTEGRITY_ROUTE}/req-1").status_code == 404
        S.take_integrity({S.INTEGRITY_KEY: [["req-1", 1, 2, 272, "a2V5", "ZGln"]]})
        got = c.get(f"{INTEGRITY_ROUTE}/req-1").json()
        assert got == {"request_id": "req-1", "tp": 2, "block_size": 272,
                       "ranks": {"1": {"keys": "a2V5", "digests": "ZGln"}}}
        assert c.post(f"{INTEGRITY_ROUTE}/req-1").status_code == 405
        assert c.get("/v1/models").status_code == 204
    S.INTEGRITY.clear()


def test_route_store_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    S.INTEGRITY.clear()
    monkeypatch.setattr(S, "INTEGRITY_MAX", 3)
    for i in range(5):
        S.take_integrity({S.INTEGRITY_KEY: [[f"r{i}", 0, 1, 16, "k", "d"]]})
    assert list(S.INTEGRITY) == ["r2", "r3", "r4"]
    S.INTEGRITY.clear()


# ----------------------------------------------------------------------------------
# D's fetch against a real HTTP server
# ----------------------------------------------------------------------------------
@pytest.fixture
def p_server() -> Iterator[tuple[str, list[Any]]]:
    """An HTTP server answering the integrity route from a script of (status, body)."""
    script: list[Any] = []

    class H(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            status, body = script.pop(0) if len(script) > 1 else script[0]
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", script
    srv.shutdown()


def test_fetch_polls_until_every_p_rank_is_there(p_server) -> None:
    url, script = p_server
    full = {"tp": 2, "block_size": 16, "ranks": {"0": {}, "1": {}}}
    script += [(404, {}), (200, {"tp": 2, "block_size": 16, "ranks": {"0": {}}}), (200, full)]
    got = I.fetch_prefill_digests(I.integrity_url(url, "r"), time.monotonic() + 5, poll_s=0.01)
    assert got == full and script == [(200, full)]


def test_fetch_gives_up_at_its_deadline_or_at_once_when_unreachable(p_server) -> None:
    url, script = p_server
    script.append((404, {}))
    t0 = time.monotonic()
    with pytest.raises(I.DigestsUnavailable, match=r"not at .* in time \(HTTP 404\)"):
        I.fetch_prefill_digests(I.integrity_url(url, "r"), t0 + 0.3, poll_s=0.01)
    assert 0.25 < time.monotonic() - t0 < 2
    t0 = time.monotonic()
    with pytest.raises(I.DigestsUnavailable, match="unreachable"):
        I.fetch_prefill_digests(f"http://127.0.0.1:{free_port()}/x", t0 + 5)
    assert time.monotonic() - t0 < 2


# ----------------------------------------------------------------------------------
# P's scheduler: guard at allocation, block lists at the end
# ----------------------------------------------------------------------------------
class FakeScheduler:
    """The parts of NixlPullConnectorScheduler the integrity mixin wraps."""

    def __init__(self, policy: str) -> None:
        self.vllm_config = SimpleNamespace(kv_transfer_config=SimpleNamespace(
            kv_connector_extra_config={KEY_KV_INTEGRITY: policy}))
        self.allocated: list[str] = []

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self.allocated.append(request.request_id)

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict | None]:
        if request.aborted:
            return False, None
        return True, {"remote_block_ids": block_ids, "remote_num_tokens": 300,
                      "remote_request_id": request.request_id}

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        return SimpleNamespace(reqs_to_send={})


class Sched(I.IntegritySchedulerMixin, FakeScheduler):
    pass


def p_request(rid: str, proxy_rid: str, aborted: bool = False) -> Any:
    return SimpleNamespace(request_id=rid, aborted=aborted, kv_transfer_params={
        "do_remote_decode": True, TRACE_PARAMS_KEY: {"request_id": proxy_rid}})


def test_scheduler_guards_selected_requests_and_hands_their_blocks_over() -> None:
    s = Sched("sampled:2")
    picked = [f"pd-{i}" for i in range(40) if I.policy_from(
        {KEY_KV_INTEGRITY: "sampled:2"}).selects(f"pd-{i}")]
    other = next(f"pd-{i}" for i in range(40) if f"pd-{i}" not in picked)
    for rid, proxy in (("a", picked[0]), ("b", picked[1]), ("c", other)):
        s.update_state_after_alloc(p_request(rid, proxy), None, 0)
    assert s.allocated == ["a", "b", "c"]
    meta = s.build_connector_meta(None)
    assert getattr(meta, I.META_ATTR) == {"guard": ["a", "b"], "digest": {}, "unguard": []}
    assert not hasattr(s.build_connector_meta(None), I.META_ATTR)  # handed over once
    s.request_finished(p_request("a", picked[0]), [[4, 5], [9]])
    s.request_finished(p_request("b", picked[1], aborted=True), [[6], [8]])
    s.request_finished(p_request("c", other), [[1], [2]])
    assert getattr(s.build_connector_meta(None), I.META_ATTR) == {
        "guard": [], "unguard": ["b"], "digest": {"a": {
            "request_id": picked[0], "block_ids": [[4, 5], [9]], "num_tokens": 300}}}


def test_scheduler_does_nothing_when_off_or_without_a_hand_off() -> None:
    s = Sched("off")
    s.update_state_after_alloc(p_request("a", "pd-1"), None, 0)
    assert s.request_finished(p_request("a", "pd-1"), [[1]])[0]
    assert not hasattr(s.build_connector_meta(None), I.META_ATTR)
    s = Sched("every")
    s.update_state_after_alloc(SimpleNamespace(request_id="x", kv_transfer_params={
        "do_remote_decode": True}), None, 0)  # straight to P: no proxy id, never selected
    assert not hasattr(s.build_connector_meta(None), I.META_ATTR)


# ----------------------------------------------------------------------------------
# Workers: P digests (and guards), D holds, compares, fails
# ----------------------------------------------------------------------------------
N = 600
LAY, IDS = make_layout(TINY, 1, N, start=1)


class Stats(FakeStats):
    def __init__(self) -> None:
        super().__init__()
        self.data: dict[str, list[Any]] = {k: [] for k in S.HY_KEYS}


class FakeWorker(FakeUpstreamWorker):
    """The fake upstream worker plus the core's local layout over numpy memory."""

    def __init__(self, policy: str = "every", mem: list[np.ndarray] | None = None) -> None:
        super().__init__()
        self.vllm_config.kv_transfer_config.kv_connector_extra_config = {
            KEY_KV_INTEGRITY: policy, KEY_READ_TIMEOUT: None}
        self.xfer_stats = Stats()
        rng = np.random.default_rng(3)
        self.mem = mem if mem is not None else [
            rng.integers(0, 256, LAY.region_bytes, dtype=np.uint8)
            for _ in range(LAY.num_regions)]
        bases, lens = bases_of(self.mem)
        self._hy_local = LocalSide(
            spec=TINY, side=Side(LAY, tuple(bases), tuple(lens), 0),
            perm=tuple(range(len(LAY.hma_groups))),
            kinds=tuple(g.kind for g in LAY.hma_groups), name_region={}, layer_kinds={})


class Worker(vt.TracedWorkerMixin, I.IntegrityWorkerMixin, ReadPathWorkerMixin, FakeWorker):
    HY_CONNECTOR = "hybrid"


def p_meta(**ours: Any) -> Any:
    meta = SimpleNamespace(reqs_to_recv={}, reqs_to_send={})
    setattr(meta, I.META_ATTR, {"guard": [], "digest": {}, "unguard": [], **ours})
    return meta


def d_meta(rid: str, proxy_rid: str, url: str = "http://p:8100") -> Any:
    remote = SimpleNamespace(engine_id="prefill-engine", request_id=f"p-{rid}", num_tokens=N,
                             block_ids=IDS)
    req = SimpleNamespace(remote=remote, local_block_ids=IDS, local_num_computed_blocks=())
    meta = SimpleNamespace(reqs_to_recv={rid: req}, reqs_to_send={})
    setattr(meta, vt.META_ATTR, {rid: {"request_id": proxy_rid, "prefill_url": url}})
    return meta


def prefill(rid: str = "req-1", proxy_rid: str = "pd-1") -> tuple[Worker, dict[str, Any]]:
    """P digests ``rid`` and its row reaches 'P's API server'; (P, the route's doc)."""
    S.INTEGRITY.clear()
    p = Worker()
    p.start_load_kv(p_meta(digest={rid: {"request_id": proxy_rid, "block_ids": IDS,
                                          "num_tokens": N}}))
    S.take_integrity(p.xfer_stats.data)
    doc = S.integrity(rid)
    assert doc is not None
    return p, doc


def decode(doc: dict[str, Any] | None, monkeypatch: pytest.MonkeyPatch,
           mem: list[np.ndarray], rid: str = "req-1", future: Future | None = None) -> Worker:
    """D with ``mem`` as its memory after the READ, P's digests as ``doc`` (None: absent)."""
    def fetch(url: str, deadline: float, **kw: Any) -> dict[str, Any]:
        assert url == f"http://p:8100{INTEGRITY_ROUTE}/p-{rid}"
        if doc is None:
            raise I.DigestsUnavailable("P's digests not at ... in time (HTTP 404)")
        return doc

    class Pool:
        def submit(self, fn: Any, *args: Any, **kw: Any) -> Future:
            if future is not None:
                return future
            f: Future = Future()
            try:
                f.set_result(fn(*args, **kw))
            except Exception as exc:
                f.set_exception(exc)
            return f

    monkeypatch.setattr(I, "fetch_prefill_digests", fetch)
    d = Worker(mem=mem)
    d._hy_istate().pool = Pool()  # type: ignore[assignment]
    d.start_load_kv(d_meta(rid, "pd-1"))
    return d


def done_read(w: Worker, rid: str = "req-1") -> Any:
    (h,) = w._recving_transfers[rid]
    w.nixl_wrapper.states[h] = "DONE"
    return w.get_transfer_results()


def spans_named(mem_exporter: Any, status: str | None = None) -> list[Any]:
    return [s for s in by_name(mem_exporter)[A.SPAN_KV_INTEGRITY]
            if status is None or s.attributes[A.KV_STATUS] == status]


def test_p_digests_after_the_prefill_with_a_span(spans) -> None:  # noqa: F811
    p, doc = prefill()
    assert doc["tp"] == 1 and doc["block_size"] == LAY.block_size and list(doc["ranks"]) == ["0"]
    keys = I.unpack_digests(**doc["ranks"]["0"])
    assert {k.block for k in keys} == {-1, 0, 1, 2}
    (span,) = spans_named(spans, "digested")
    assert span.attributes[A.KV_UNITS] == len(keys) and span.attributes[A.KV_BYTES] > 0
    assert span.attributes[A.REQUEST_ID] == "req-1"  # no hand-off in this fake metadata


def test_p_withholds_d_notification_until_digested(spans) -> None:  # noqa: F811
    class P(Worker):
        notified: set[str] = set()

        def _get_new_notifs(self) -> set[str]:
            out, self.notified = set(self.notified), set()
            return out

    p = P()
    p.start_load_kv(p_meta(guard=["a", "b"]))
    p.notified = {"a", "b", "c"}  # D done before P digested (async scheduling, long step)
    assert p.get_transfer_results().finished_sending == {"c"}
    p.start_load_kv(p_meta(digest={"a": {"request_id": "pd-a", "block_ids": IDS,
                                          "num_tokens": N}}, unguard=["b"]))
    assert p.get_transfer_results().finished_sending == {"a", "b"}
    assert len(p.xfer_stats.data[S.INTEGRITY_KEY]) == 1


def test_p_releases_an_undigested_request_after_the_bound(monkeypatch: pytest.MonkeyPatch,
                                                          spans) -> None:  # noqa: F811
    class P(Worker):
        notified: set[str] = set()

        def _get_new_notifs(self) -> set[str]:
            out, self.notified = set(self.notified), set()
            return out

    monkeypatch.setattr(I, "WITHHOLD_MAX_S", 0.0)
    p = P()
    p.start_load_kv(p_meta(guard=["a"]))
    p.notified = {"a"}
    assert p.get_transfer_results().finished_sending == set()
    time.sleep(0.01)
    assert p.get_transfer_results().finished_sending == {"a"}
    # its digest, late, is skipped: those blocks may belong to another request now
    p.start_load_kv(p_meta(digest={"a": {"request_id": "pd-a", "block_ids": IDS,
                                          "num_tokens": N}}))
    assert p.xfer_stats.data[S.INTEGRITY_KEY] == []


def test_d_equal_copy_passes_with_an_ok_span_and_a_check_counted(monkeypatch, spans) -> None:  # noqa: F811
    p, doc = prefill()
    d = decode(doc, monkeypatch, [m.copy() for m in p.mem])
    res = done_read(d)
    assert res.finished_recving == {"req-1"} and not res.failed_recving
    (span,) = spans_named(spans, "done")
    assert span.status.status_code != StatusCode.ERROR
    assert span.attributes[A.KV_MISMATCHES] == 0 and span.attributes[A.KV_UNITS] > 0
    assert span.attributes[A.REQUEST_ID] == "pd-1" and span.attributes[A.KV_RANK] == 0
    assert span.attributes[A.KV_PEER_ENGINE_ID] == "prefill-engine"
    assert d.xfer_stats.data[S.EVENTS_KEY] == [["integrity_check", 1]]
    assert d._hy_istate().checks == {}


@pytest.mark.parametrize(("layer", "view"), [(3, "K"), (0, "B"), (5, "SSM")])
def test_d_mismatch_fails_the_request_naming_layer_view_and_ranks(monkeypatch, spans,  # noqa: F811
                                                                  layer, view) -> None:
    p, doc = prefill()
    mem = [m.copy() for m in p.mem]
    unit = next(u for u in request_units(TINY, LAY, 0, IDS, N)
                if (u.key.layer, u.key.view) == (layer, view))
    off, _, reg = unit.runs[0].tolist()
    mem[reg][off] ^= 0x01
    d = decode(doc, monkeypatch, mem)
    res = done_read(d)
    assert res.finished_recving == {"req-1"} and res.failed_recving == {"req-1"}
    (span,) = spans_named(spans, "mismatch")
    assert span.status.status_code == StatusCode.ERROR
    at = span.attributes
    assert (at[A.KV_LAYER], at[A.KV_VIEW], at[A.KV_PEER_RANK], at[A.KV_RANK]) == (layer, view, 0, 0)
    assert at[A.KV_MISMATCHES] == 1 and str(unit.key) in at[A.KV_FAILURE_REASON]
    assert ["integrity_failure", 1] in d.xfer_stats.data[S.EVENTS_KEY]
    assert d.xfer_stats.failed == 1  # upstream's failure bookkeeping (vllm:nixl_* metric)
    assert any(line.startswith("integrity_mismatch req-1") for line in d.logged), d.logged
    (xfer,) = by_name(spans)[A.SPAN_KV_TRANSFER]
    assert xfer.status.status_code == StatusCode.ERROR
    assert xfer.attributes[A.KV_FAILURE_REASON].startswith("integrity_mismatch")


def test_d_holds_the_request_until_p_digests_arrive(monkeypatch, spans) -> None:  # noqa: F811
    p, doc = prefill()
    pending: Future = Future()
    d = decode(doc, monkeypatch, [m.copy() for m in p.mem], future=pending)
    assert done_read(d).finished_recving == set()  # READ done, D digested, P's not there
    assert d._recving_transfers["req-1"] == [] and d._hy_istate().checks["req-1"].digests
    assert d.get_transfer_results().finished_recving == set()
    pending.set_result((doc, time.monotonic()))
    res = d.get_transfer_results()
    assert res.finished_recving == {"req-1"} and not res.failed_recving
    assert len(spans_named(spans, "done")) == 1


def test_d_without_p_digests_goes_on_unchecked(monkeypatch, spans) -> None:  # noqa: F811
    _, _ = prefill()
    d = decode(None, monkeypatch, [np.zeros(LAY.region_bytes, np.uint8)
                                   for _ in range(LAY.num_regions)])
    res = done_read(d)
    assert res.finished_recving == {"req-1"} and not res.failed_recving
    (span,) = spans_named(spans, "unchecked")
    assert span.status.status_code == StatusCode.ERROR
    assert "HTTP 404" in span.attributes[A.KV_FAILURE_REASON]
    assert d.xfer_stats.data[S.EVENTS_KEY] == [["integrity_skip", 1]]


def test_d_times_out_waiting_and_goes_on_unchecked(monkeypatch, spans) -> None:  # noqa: F811
    p, doc = prefill()
    monkeypatch.setattr(I, "DEFAULT_INTEGRITY_WAIT_S", 0.05)
    d = decode(doc, monkeypatch, [m.copy() for m in p.mem], future=Future())
    assert done_read(d).finished_recving == set()
    time.sleep(0.1)
    res = d.get_transfer_results()
    assert res.finished_recving == {"req-1"} and not res.failed_recving
    (span,) = spans_named(spans, "unchecked")
    assert "not there 0.05 s after D's READs" in span.attributes[A.KV_FAILURE_REASON]


def test_d_read_failure_needs_no_check(monkeypatch, spans) -> None:  # noqa: F811
    p, doc = prefill()
    d = decode(doc, monkeypatch, [m.copy() for m in p.mem])
    (h,) = d._recving_transfers["req-1"]
    d.nixl_wrapper.states[h] = "ERR"
    res = d.get_transfer_results()
    assert res.failed_recving == {"req-1"} and len(spans_named(spans)) == 1  # P's digest only
    assert d._hy_istate().checks == {}


def test_off_or_unselected_changes_nothing(monkeypatch, spans) -> None:  # noqa: F811
    for policy in ("off", "sampled:1000000"):
        d = Worker(policy=policy)
        d.start_load_kv(d_meta("req-1", "pd-1"))
        assert done_read(d).finished_recving == {"req-1"}
        assert d._hy_istate().checks == {}
    assert not spans_named(spans)


def test_p_flip_hook_corrupts_after_the_digest(monkeypatch, spans) -> None:  # noqa: F811
    monkeypatch.setenv(ENV_TEST_INTEGRITY_FLIP, "0:B")
    p = Worker()
    before = [m.copy() for m in p.mem]
    for rid, proxy in (("a", "pd-1"), ("b", f"{I.FLIP_MARKER}-2")):
        p.start_load_kv(p_meta(digest={rid: {"request_id": proxy, "block_ids": IDS,
                                              "num_tokens": N}}))
        changed = sum(int((m != b).sum()) for m, b in zip(p.mem, before, strict=True))
        assert changed == (0 if rid == "a" else 1)


def test_planted_template_shifts_b_or_conv_one_row_inside_the_page() -> None:
    p2, _ = make_layout(TINY, 2, 300)
    d1, _ = make_layout(TINY, 1, 300)
    (t,) = [t for t in peer_templates(TINY, d1, p2, 0) if t.prefill_rank == 0]
    planted = I.planted_template(t, d1)
    row = d1.conv_rows * d1.conv_dtype_size
    moved = [(a.name, b.local_offset - a.local_offset)
             for a, b in zip(t.mamba_runs, planted.mamba_runs, strict=True) if a != b]
    assert moved == [("B", row)]
    (same,) = peer_templates(TINY, d1, d1, 0)
    moved = [(a.name, b.local_offset - a.local_offset)
             for a, b in zip(same.mamba_runs, I.planted_template(same, d1).mamba_runs,
                             strict=True) if a != b]
    assert moved == [("conv", row)]
    for tmpl, lay in ((planted, d1), (I.planted_template(same, d1), d1)):
        for r in tmpl.mamba_runs:  # stays in the page (no other block touched)
            assert r.local_offset + r.length <= lay.mamba_state_bytes
        to_addr_descs(dual_view(lay, tmpl, "local"), [0, lay.region_bytes],
                      [lay.region_bytes] * 2)


# ----------------------------------------------------------------------------------
# Hand-off, CLI
# ----------------------------------------------------------------------------------
def test_proxy_names_the_prefill_engine_in_d_hand_off() -> None:
    body = {"kv_transfer_params": {"remote_engine_id": "e"}}
    out = with_trace(body, "pd-1", {"traceparent": "tp"}, "http://p:8100")
    assert out["kv_transfer_params"][TRACE_PARAMS_KEY] == {
        "traceparent": "tp", "request_id": "pd-1", "prefill_url": "http://p:8100"}
    assert "prefill_url" not in with_trace(body, "pd-1", {})["kv_transfer_params"][TRACE_PARAMS_KEY]


def test_cli_flag_reaches_both_engines_and_refuses_bad_forms() -> None:
    parser = main_cli.build_parser("serve")
    args, _ = parser.parse_known_args(["serve", "/m", "--kv-integrity", "sampled:8"])
    assert dict(cli.kv_extra_from_args(args))[KEY_KV_INTEGRITY] == "sampled:8"
    args, _ = parser.parse_known_args(["serve", "/m"])
    assert KEY_KV_INTEGRITY not in dict(cli.kv_extra_from_args(args))  # off: not passed
    args, _ = parser.parse_known_args(["serve", "/m", "--kv-integrity", "sampled:0"])
    with pytest.raises(SystemExit, match="--kv-integrity: integrity policy must be"):
        cli.kv_extra_from_args(args)
