"""NIXL executor: moves the planner's reads with real READs (D side) and tracks block
leases (P side).

Lifecycle (D side)::

    ex = NixlExecutor("d0-rank0", regions, mem_type="DRAM")
    me = ex.metadata(engine_id="d0", spec=spec, layout=d_layout, rank=0)
    ex.add_peer(me, remote_meta)                  # handshake: checked, agent added,
                                                  # dual views prepped once per peer
    plan = plan_request(..., merge=False)         # unmerged: ids 1:1 with descriptors
    res = ex.read_request("req-1", plan, engine_id="p0", granularity="request",
                          decode_block_ids=d_ids, timeout_s=30)
    res.status  # "ok" | "failed" (res.reason says why); P was notified either way

Why these choices:

* **Prepped dual views** (mode ``"prepped"``, default): one ``prep_xfer_dlist`` per
  side per peer, sized ``regions * runs * blocks`` (see :func:`plan.dual_view`); each
  request is then only ``make_prepped_xfer`` with index lists - no per-request
  descriptor validation.  Mode ``"dlist"`` builds per-request descriptor lists
  (``initialize_xfer``) from merged descriptors instead; the bench measures both.
* **Granularity**: ``"request"`` = one READ per peer per request (upstream's choice),
  ``"layer"`` = one READ per cache layer per peer (what per-layer timelines need),
  ``"sampled:K"`` = per-layer for one request in K.  All READs of a request are posted
  before any is polled, so per-layer costs only handle creation, not serialisation.
* **Stall timeout**: every request has a deadline; READs not DONE by then are released
  (NIXL cancels an active transfer on release), the request is ``failed`` with the
  reason, and each peer gets a ``fail:`` notification so it frees the blocks at once
  (its own lease timeout covers a D that died before saying anything).
* **Threads**: ``num_threads`` defaults to 0.  On a 2-core box NIXL's UCX worker threads
  starve everything (vLLM's default of 4 stalled handshakes 15-30 s here).

* **Spans** (names and keys from :mod:`hybrid_pd.telemetry.attributes`): ``desc_build``
  for the local registration (``__init__``) and per peer for both dual views
  (``scope=local`` / ``remote``, under a ``handshake`` span), ``desc_build scope=request``
  for each request's block-id -> descriptor-id mapping, one ``kv.read`` per READ handle
  under a ``kv.transfer`` span, and ``kv.stall`` / ``kv.abort`` / ``kv.notify``.  Read
  spans are timed from this executor's own clock, not an engine step: start = before the
  handle is made, end = the first ``check_xfer_state`` poll that saw DONE.  The real
  completion happened after the previous poll of that handle, so a span's end is late
  by at most one poll round (one ``check_xfer_state`` per pending READ plus a
  ``sched_yield``); ``kv.completion_lag_ns`` records that bound for every read (the
  bench reports its median / max: a few microseconds unloaded, more when the box is
  oversubscribed).
* **No span work on the hot path.**  While READs are posted and polled the executor only
  records ``time.monotonic_ns()`` stamps (it does that traced or not); every span -
  ``kv.transfer`` included, with explicit start / end times - is built and emitted after
  the poll loop and after D's notifications to P, so tracing never delays a READ or
  P's lease release.  Attribute dicts are built only when the ``kv.transfer`` span
  records (house rule 9); the emission time is in :class:`SpanCost` and
  ``RequestResult.emit_ns``.  The baseline ``read_contiguous`` emits none.

Notifications (D -> P): ``done:<request_id>`` (attached to the READ itself when there
is exactly one READ for that peer, else sent after the last one) or
``fail:<request_id>:<reason>``.  :class:`LeaseTable` is the P side.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Tracer

from hybrid_pd.planner.layout import EngineLayout
from hybrid_pd.planner.model_spec import HybridModelSpec
from hybrid_pd.planner.plan import (
    Desc,
    ReadPlan,
    RequestPlan,
    dual_view,
    merge_descs,
    peer_templates,
    to_addr_descs,
)
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.transfer import handshake as hs

Mode = Literal["prepped", "dlist"]


# ---------------------------------------------------------------------------------
# Plain-data helpers (tested without NIXL)
# ---------------------------------------------------------------------------------


def parse_granularity(value: str) -> tuple[str, int]:
    """``"request"`` -> ("request", 0); ``"layer"`` -> ("layer", 1); ``"sampled:K"`` ->
    ("sampled", K): per-layer for one request in K."""
    if value in ("request", "layer"):
        return value, 0 if value == "request" else 1
    if value.startswith("sampled:"):
        try:
            k = int(value.split(":", 1)[1])
        except ValueError:
            k = 0
        if k >= 1:
            return "sampled", k
    raise ValueError(
        f"granularity must be 'request', 'layer' or 'sampled:K' with K >= 1, got {value!r}"
    )


def per_layer_for(granularity: str, request_index: int) -> bool:
    """Whether request number ``request_index`` (0-based) is read layer by layer."""
    kind, k = parse_granularity(granularity)
    if kind == "sampled":
        return request_index % k == 0
    return kind == "layer"


def layer_of_units(
    read: ReadPlan,
    layout: EngineLayout,
    decode_block_ids: Sequence[Sequence[int]],
) -> tuple[int, ...]:
    """Cache layer of every unmerged unit of ``read`` (D side): the unit's region and
    block name the HMA group, and the group's layer at that region position.  Needs an
    unmerged plan (``local`` 1:1 with ``local_ids``)."""
    if len(read.local) != len(read.local_ids):
        raise ValueError(
            "per-layer reads need an unmerged plan (plan_request(..., merge=False)); got "
            f"{len(read.local)} descriptors for {len(read.local_ids)} units"
        )
    group_of: dict[int, int] = {}
    for gi, ids in enumerate(decode_block_ids):
        for b in ids:
            group_of[b] = gi
    out = []
    for off, _, region in read.local:
        gi = group_of[off // layout.page_size_bytes]
        out.append(layout.hma_groups[gi].layers[region])
    return tuple(out)


def split_units(
    read: ReadPlan,
    layout: EngineLayout,
    decode_block_ids: Sequence[Sequence[int]],
    per_layer: bool,
) -> list[tuple[int | None, list[int]]]:
    """Unit indices of ``read`` per READ: one list (layer None), or one per cache layer
    in plan order."""
    n = len(read.local_ids)
    if not per_layer:
        return [(None, list(range(n)))]
    groups: dict[int, list[int]] = {}
    for i, layer in enumerate(layer_of_units(read, layout, decode_block_ids)):
        groups.setdefault(layer, []).append(i)
    return list(groups.items())


def addr_array(descs: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """NIXL's Nx3 uint64 ``(addr, len, dev)`` array."""
    return np.asarray(descs, dtype=np.uint64).reshape(-1, 3)


def buffer_span(buf: Any) -> tuple[int, int]:
    """(address, bytes) of a contiguous torch tensor or numpy array."""
    if hasattr(buf, "data_ptr"):  # torch.Tensor (CPU or CUDA)
        if not buf.is_contiguous():
            raise ValueError("regions must be contiguous tensors")
        return int(buf.data_ptr()), int(buf.numel() * buf.element_size())
    arr = np.asarray(buf)
    if not arr.flags.c_contiguous:
        raise ValueError("regions must be C-contiguous arrays")
    return int(arr.ctypes.data), int(arr.nbytes)


# ---------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------


@dataclass
class XferTelemetry:
    """NIXL's own numbers for one READ (``get_xfer_telemetry``), microseconds."""

    start_us: int
    post_us: int
    xfer_us: int
    total_bytes: int
    desc_count: int


@dataclass
class ReadResult:
    """One READ: which peer, which layer (None = whole request), and how it went."""

    prefill_rank: int
    layer: int | None
    bytes: int
    descriptors: int  # descriptors we handed NIXL (units in prepped mode)
    status: str  # "DONE" | "ERR" | "TIMEOUT" | "POST_FAILED"
    reason: str = ""
    t_make_ns: int = 0  # before the handle was created
    t_created_ns: int = 0  # handle made, before transfer()
    t_post_ns: int = 0  # after transfer() returned
    t_done_ns: int = 0  # first poll that saw DONE (0 if never)
    # Previous poll of this handle (or the post): the real completion lies in
    # (t_prev_poll_ns, t_done_ns], so t_done_ns - t_prev_poll_ns bounds the span-end lag.
    t_prev_poll_ns: int = 0
    telemetry: XferTelemetry | None = None


@dataclass
class RequestResult:
    request_id: str
    status: str  # "ok" | "failed"
    reason: str
    reads: list[ReadResult]
    t_start_ns: int
    t_end_ns: int
    notified: list[int] = field(default_factory=list)  # P ranks told done / fail
    polls: int = 0  # check_xfer_state rounds
    t_notified_ns: int = 0  # after D's notifications to P (= t_end_ns when none)
    emit_ns: int = 0  # building / emitting this request's spans, after t_notified_ns

    @property
    def seconds(self) -> float:
        return (self.t_end_ns - self.t_start_ns) / 1e9

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.reads)

    @property
    def descriptors(self) -> int:
        return sum(r.descriptors for r in self.reads)


# ---------------------------------------------------------------------------------
# Executor
# ---------------------------------------------------------------------------------


@dataclass
class SpanCost:
    """Time spent creating / filling / ending the read path's spans (perf_counter ns).

    All of it is spent after a request's READs are DONE (see the module docstring)."""

    spans: int = 0
    ns: int = 0

    @property
    def us_per_span(self) -> float:
        return self.ns / self.spans / 1e3 if self.spans else 0.0


@dataclass
class _Trace:
    """Per-request span context for the spans built after the transfer."""

    ctx: Context
    off: int  # time.time_ns() - time.monotonic_ns(): executor clock -> span clock
    request_id: str
    peer_engine_id: str


@dataclass
class _RunLog:
    """What one request's read path saw, as plain monotonic stamps: spans are built
    from it after the poll loop (and only when the tracer records)."""

    # (t0, t1, read plan, READs) of each peer's block-id -> descriptor-id mapping
    maps: list[tuple[int, int, ReadPlan, int]] = field(default_factory=list)
    # (read, t_end) in the order outcomes were seen (DONE / ERR / post failure / abort)
    reads: list[tuple[ReadResult, int]] = field(default_factory=list)
    stall: tuple[int, int, int, str] | None = None  # t0, t1, READs pending, reason
    abort: tuple[int, int, list[ReadResult], str] | None = None  # t0, t1, READs, reason
    # (t0, t1, peer rank, peer engine id, error) per standalone notification
    notifies: list[tuple[int, int, int, str, str]] = field(default_factory=list)


_STATUS = {"DONE": "done", "ERR": "failed", "POST_FAILED": "failed", "TIMEOUT": "timeout",
           "ABORTED": "aborted"}
BACKEND = "UCX"


def _short_reason(exc: BaseException) -> str:
    # Span reasons stay short and payload-free: exception type plus the message head.
    return f"{type(exc).__name__}: {str(exc)[:200]}"


@dataclass
class _Peer:
    meta: hs.HandshakeMetadata
    agent: str
    layout: EngineLayout
    bases: tuple[int, ...]
    lens: tuple[int, ...]
    local_view: Any = None  # prepped dlist handles (mode "prepped")
    remote_view: Any = None
    view_len: int = 0


def make_agent(name: str, *, num_threads: int = 0, capture_telemetry: bool = True) -> Any:
    from nixl._api import nixl_agent, nixl_agent_config

    cfg = nixl_agent_config(
        backends=["UCX"], capture_telemetry=capture_telemetry, num_threads=num_threads
    )
    return nixl_agent(name, cfg)


class NixlExecutor:
    """One rank's NIXL agent, its registered regions, and its peers."""

    def __init__(
        self,
        name: str,
        regions: Sequence[Any],
        *,
        mem_type: str = "DRAM",
        dev_id: int = 0,
        num_threads: int = 0,
        capture_telemetry: bool = True,
        mode: Mode = "prepped",
        agent: Any = None,
        tracer: Tracer | None = None,
    ) -> None:
        if mode not in ("prepped", "dlist"):
            raise ValueError(f"mode must be 'prepped' or 'dlist', got {mode!r}")
        self.name = name
        self.mem_type = mem_type
        self.dev_id = dev_id
        self.mode: Mode = mode
        self.capture_telemetry = capture_telemetry
        # The global tracer is a no-op until configure_tracing() runs; the bench swaps
        # ``self.tracer`` per request to compare telemetry on / off in one process.
        self.tracer: Tracer = tracer or trace.get_tracer(__name__)
        self.span_cost = SpanCost()
        self.agent = agent or make_agent(
            name, num_threads=num_threads, capture_telemetry=capture_telemetry
        )
        spans = [buffer_span(r) for r in regions]
        self.region_bases = tuple(b for b, _ in spans)
        self.region_lens = tuple(n for _, n in spans)
        self._keep = list(regions)  # registered memory must outlive the registration
        with self.tracer.start_as_current_span(
            A.SPAN_KV_DESC_BUILD, record_exception=False, set_status_on_exception=False
        ) as span:
            A.set_attrs(span, {A.KV_DESC_SCOPE: "local", A.KV_VIEW: "all",
                               A.KV_DESCRIPTORS: len(spans),
                               A.KV_BYTES: sum(self.region_lens)})
            try:
                self._reg = self.agent.register_memory(
                    addr_array([(b, n, dev_id) for b, n in spans]), mem_type
                )
            except Exception as exc:
                A.mark_failed(span, _short_reason(exc), exc)
                raise
        self._extra_regs: list[Any] = []
        self.peers: dict[tuple[str, int], _Peer] = {}
        self.local_meta: hs.HandshakeMetadata | None = None
        self.local_layout: EngineLayout | None = None
        self.spec: HybridModelSpec | None = None
        self._layer_info: dict[int, tuple[str, int]] = {}  # layer -> (kind, HMA group)

    # -- handshake --------------------------------------------------------------------
    def metadata(
        self, *, engine_id: str, spec: HybridModelSpec, layout: EngineLayout, rank: int
    ) -> hs.HandshakeMetadata:
        self.spec, self.local_layout = spec, layout
        # Span labels only (the read path never branches on them).
        self._layer_info = {
            layer: (str(g.kind.value), gi)
            for gi, g in enumerate(layout.hma_groups) for layer in g.layers
        }
        self.local_meta = hs.build_metadata(
            engine_id=engine_id,
            agent_name=self.name,
            agent_metadata=self.agent.get_agent_metadata(),
            spec=spec,
            layout=layout,
            rank=rank,
            regions=list(zip(self.region_bases, self.region_lens, strict=True)),
            mem_type=self.mem_type,
        )
        return self.local_meta

    def add_peer(self, remote: hs.HandshakeMetadata) -> tuple[str, int]:
        """Check compatibility, add the remote agent, prep the dual views (D side).

        Traced as one ``kv.handshake`` span with the two ``desc_build`` spans (local and
        remote dual view) under it; a refused handshake marks it failed and re-raises."""
        if self.local_meta is None or self.spec is None or self.local_layout is None:
            raise RuntimeError("call metadata() before add_peer()")
        with self.tracer.start_as_current_span(
            A.SPAN_KV_HANDSHAKE, record_exception=False, set_status_on_exception=False
        ) as span:
            if span.is_recording():
                span.set_attributes(self._pair_attrs(remote))
            try:
                return self._add_peer(remote)
            except Exception as exc:
                A.mark_failed(span, _short_reason(exc), exc)
                raise

    def _pair_attrs(self, remote: hs.HandshakeMetadata) -> dict[str, A.AttrValue]:
        assert self.local_meta is not None
        return {
            A.KV_RANK: self.local_meta.layout.rank,
            A.KV_TP_SIZE: self.local_meta.layout.tp,
            A.KV_PEER_ENGINE_ID: remote.engine_id,
            A.KV_PEER_RANK: remote.layout.rank,
            A.KV_PEER_TP_SIZE: remote.layout.tp,
            A.KV_BACKEND: BACKEND,
        }

    def _add_peer(self, remote: hs.HandshakeMetadata) -> tuple[str, int]:
        hs.check_compatible(self.local_meta, remote)
        _, layout = hs.engine_layout(remote)
        agent = self.agent.add_remote_agent(remote.agent_metadata)
        if isinstance(agent, bytes):
            agent = agent.decode()
        peer = _Peer(
            meta=remote,
            agent=agent,
            layout=layout,
            bases=tuple(r.base for r in remote.regions),
            lens=tuple(r.length for r in remote.regions),
        )
        key = (remote.engine_id, remote.layout.rank)
        self.peers[key] = peer
        if self.mode == "prepped":
            self._prep_views(peer)
        return key

    def _prep_views(self, peer: _Peer) -> None:
        """Both sides' dual views for this (D rank, P rank) pair, prepped once."""
        assert self.spec is not None and self.local_layout is not None
        d_rank = self.local_meta.layout.rank if self.local_meta else 0
        tpl = {
            t.prefill_rank: t
            for t in peer_templates(self.spec, self.local_layout, peer.layout, d_rank)
        }
        t = tpl.get(peer.meta.layout.rank)
        if t is None:  # this D rank reads nothing from that P rank
            return
        pair = self._pair_attrs(peer.meta)
        with self.tracer.start_as_current_span(A.SPAN_KV_DESC_BUILD) as span:
            local = to_addr_descs(dual_view(self.local_layout, t, "local"), self.region_bases,
                                  self.region_lens, self.dev_id)
            peer.local_view = self.agent.prep_xfer_dlist(
                "NIXL_INIT_AGENT", addr_array(local), self.mem_type
            )
            if span.is_recording():
                span.set_attributes({**pair, A.KV_DESC_SCOPE: "local", A.KV_VIEW: "all",
                                     A.KV_DESCRIPTORS: len(local),
                                     A.KV_BYTES: sum(d[1] for d in local)})
        with self.tracer.start_as_current_span(A.SPAN_KV_DESC_BUILD) as span:
            remote = to_addr_descs(dual_view(peer.layout, t, "remote"), peer.bases, peer.lens,
                                   self.dev_id)
            peer.remote_view = self.agent.prep_xfer_dlist(
                peer.agent, addr_array(remote), peer.meta.mem_type
            )
            if span.is_recording():
                span.set_attributes({**pair, A.KV_DESC_SCOPE: "remote", A.KV_VIEW: "all",
                                     A.KV_DESCRIPTORS: len(remote),
                                     A.KV_BYTES: sum(d[1] for d in remote)})
        peer.view_len = len(local)

    # -- extra registrations (the bench's baseline buffers) ----------------------------
    def register_extra(self, buf: Any) -> tuple[int, int]:
        base, n = buffer_span(buf)
        self._keep.append(buf)
        self._extra_regs.append(
            self.agent.register_memory(addr_array([(base, n, self.dev_id)]), self.mem_type)
        )
        return base, n

    # -- the read path ------------------------------------------------------------------
    def _make(self, peer: _Peer, read: ReadPlan, idx: list[int], notif: bytes) -> Any:
        if self.mode == "prepped":
            if peer.local_view is None:
                raise RuntimeError(f"no prepped views for peer {peer.agent}")
            lids = np.asarray([read.local_ids[i] for i in idx], dtype=np.int32)
            rids = np.asarray([read.remote_ids[i] for i in idx], dtype=np.int32)
            return self.agent.make_prepped_xfer(
                "READ", peer.local_view, lids, peer.remote_view, rids, notif_msg=notif
            )
        loc, rem = merge_descs([read.local[i] for i in idx], [read.remote[i] for i in idx])
        return self._initialize(peer, loc, rem, notif)

    def _initialize(
        self, peer: _Peer, loc: Sequence[Desc], rem: Sequence[Desc], notif: bytes
    ) -> Any:
        la = addr_array(to_addr_descs(loc, self.region_bases, self.region_lens, self.dev_id))
        ra = addr_array(to_addr_descs(rem, peer.bases, peer.lens, self.dev_id))
        return self.agent.initialize_xfer(
            "READ",
            self.agent.get_xfer_descs(la, self.mem_type),
            self.agent.get_xfer_descs(ra, peer.meta.mem_type),
            peer.agent,
            notif_msg=notif,
        )

    def read_request(
        self,
        request_id: str,
        plan: RequestPlan,
        *,
        engine_id: str,
        decode_block_ids: Sequence[Sequence[int]],
        per_layer: bool = False,
        timeout_s: float = 30.0,
        notify: bool = True,
    ) -> RequestResult:
        """Post every READ of ``plan``, poll until all are DONE or the deadline passes.

        Traced (when the tracer records) as a ``kv.transfer`` span holding one
        ``desc_build scope=request`` span per peer and one ``kv.read`` span per READ,
        all built after the transfer from the stamps taken during it."""
        assert self.local_layout is not None and self.local_meta is not None
        t_start = time.monotonic_ns()
        log = _RunLog()
        jobs: list[tuple[_Peer, ReadPlan, int | None, list[int]]] = []
        for read in plan.reads:
            peer = self.peers.get((engine_id, read.prefill_rank))
            if peer is None:
                exc = KeyError(
                    f"no handshake with engine {engine_id!r} rank {read.prefill_rank}; "
                    f"known peers: {sorted(self.peers)}"
                )
                self._emit_failed_transfer(t_start, exc)
                raise exc
            t_map = time.monotonic_ns()
            parts = split_units(read, self.local_layout, decode_block_ids, per_layer)
            for layer, idx in parts:
                jobs.append((peer, read, layer, idx))
            log.maps.append((t_map, time.monotonic_ns(), read, len(parts)))
        reads_per_peer: dict[str, int] = {}
        for peer, *_ in jobs:
            reads_per_peer[peer.agent] = reads_per_peer.get(peer.agent, 0) + 1
        done_msg = f"done:{request_id}".encode()

        def post(job: tuple[_Peer, ReadPlan, int | None, list[int]]) -> tuple[Any, ReadResult]:
            peer, read, layer, idx = job
            attach = done_msg if notify and reads_per_peer[peer.agent] == 1 else b""
            res = ReadResult(
                prefill_rank=read.prefill_rank,
                layer=layer,
                bytes=sum(read.local[i][1] for i in idx),
                descriptors=len(idx),
                status="PROC",
                t_make_ns=time.monotonic_ns(),
            )
            return self._make(peer, read, idx, attach), res

        try:
            out = self._run(request_id, jobs, post, reads_per_peer, timeout_s, notify,
                            log=log, t_start=t_start)
        except BaseException as exc:
            self._emit_failed_transfer(t_start, exc)
            raise
        self._emit_transfer(out, log, engine_id)
        return out

    def read_contiguous(
        self,
        request_id: str,
        spans: Mapping[tuple[str, int], tuple[tuple[int, int], tuple[int, int]]],
        *,
        timeout_s: float = 30.0,
    ) -> RequestResult:
        """Baseline: one READ per peer of ``((local addr, len), (remote addr, len))`` - one
        contiguous descriptor each side, per-request dlists, no notification."""
        jobs = []
        for key, ((laddr, n), (raddr, rn)) in spans.items():
            if n != rn:
                raise ValueError(f"baseline span lengths differ: local {n}, remote {rn}")
            jobs.append((self.peers[key], laddr, raddr, n))

        def post(job: tuple[_Peer, int, int, int]) -> tuple[Any, ReadResult]:
            peer, laddr, raddr, n = job
            res = ReadResult(peer.meta.layout.rank, None, n, 1, "PROC",
                             t_make_ns=time.monotonic_ns())
            la = addr_array([(laddr, n, self.dev_id)])
            ra = addr_array([(raddr, n, self.dev_id)])
            h = self.agent.initialize_xfer(
                "READ",
                self.agent.get_xfer_descs(la, self.mem_type),
                self.agent.get_xfer_descs(ra, peer.meta.mem_type),
                peer.agent,
            )
            return h, res

        return self._run(request_id, jobs, post, {}, timeout_s, notify=False, log=_RunLog())

    def _run(
        self,
        request_id: str,
        jobs: Sequence[Any],
        post: Callable[[Any], tuple[Any, ReadResult]],
        reads_per_peer: Mapping[str, int],
        timeout_s: float,
        notify: bool,
        *,
        log: _RunLog,
        t_start: int | None = None,
    ) -> RequestResult:
        """Post, poll, abort, notify.  No span work here: only stamps go into ``log``."""
        t_start = time.monotonic_ns() if t_start is None else t_start
        deadline = t_start + int(timeout_s * 1e9)
        pending: list[tuple[Any, ReadResult, Any]] = []
        results: list[ReadResult] = []
        failure = ""
        for job in jobs:
            peer_agent = job[0].agent
            try:
                handle, res = post(job)
                res.t_created_ns = time.monotonic_ns()
                state = self.agent.transfer(handle)
                res.t_post_ns = time.monotonic_ns()
            except Exception as exc:  # NIXL raises nixlBackendError & co on a dead peer
                res = ReadResult(job[0].meta.layout.rank, None, 0, 0, "POST_FAILED",
                                 reason=f"posting READ to {peer_agent} failed: {exc}")
                results.append(res)
                failure = failure or res.reason
                log.reads.append((res, time.monotonic_ns()))
                break
            results.append(res)
            res.t_prev_poll_ns = res.t_post_ns
            if state == "ERR":
                res.status, res.reason = "ERR", f"READ from {peer_agent} failed at post"
                self._release(handle, res)
                failure = failure or res.reason
                log.reads.append((res, time.monotonic_ns()))
                break
            pending.append((handle, res, peer_agent))
        # Poll round-robin until everything is DONE, one fails, or the deadline passes.
        # A read span closes at the first poll that saw DONE (its own clock, not an
        # engine step), so it ends at most one round after the real completion.
        polls = 0
        while pending and not failure:
            polls += 1
            still = []
            for handle, res, peer_agent in pending:
                state = self.agent.check_xfer_state(handle)
                now = time.monotonic_ns()
                if state == "DONE":
                    res.t_done_ns = now
                    res.status = "DONE"
                    self._finish(handle, res)
                    log.reads.append((res, now))
                elif state == "ERR":
                    res.status = "ERR"
                    res.reason = f"READ of {res.bytes} B from {peer_agent} returned ERR"
                    failure = failure or res.reason
                    self._release(handle, res)
                    log.reads.append((res, now))
                else:
                    res.t_prev_poll_ns = now
                    still.append((handle, res, peer_agent))
            pending = still
            if pending and time.monotonic_ns() > deadline:
                failure = (
                    f"stall timeout: {len(pending)} READ(s) not done after {timeout_s:g} s "
                    f"(peers {sorted({p for _, _, p in pending})}); aborted"
                )
                log.stall = (t_start, time.monotonic_ns(), len(pending), failure)
                break
            if pending:
                os.sched_yield()  # 2 cores: give the peer's progress a chance
        if pending:  # abort what is left (NIXL cancels an active READ on release)
            t_abort = time.monotonic_ns()
            for handle, res, _ in pending:
                res.status = "TIMEOUT" if "timeout" in failure else "ABORTED"
                res.reason = failure
                self._release(handle, res)
            now = time.monotonic_ns()
            log.reads.extend((res, now) for _, res, _ in pending)
            log.abort = (t_abort, now, [res for _, res, _ in pending], failure)
        t_end = time.monotonic_ns()
        out = RequestResult(
            request_id=request_id,
            status="failed" if failure else "ok",
            reason=failure,
            reads=results,
            t_start_ns=t_start,
            t_end_ns=t_end,
            polls=polls,
            t_notified_ns=t_end,
        )
        if notify:
            self._notify(out, jobs, reads_per_peer, log)
            out.t_notified_ns = time.monotonic_ns()
        return out

    # -- spans (built after the transfer) -----------------------------------------------
    def _emit_failed_transfer(self, t_start: int, exc: BaseException) -> None:
        """A ``kv.transfer`` span for a request that raised (marked failed when recording;
        the caller re-raises)."""
        off = time.time_ns() - time.monotonic_ns()
        xfer = self.tracer.start_span(A.SPAN_KV_TRANSFER, start_time=t_start + off)
        if xfer.is_recording():
            A.mark_failed(xfer, _short_reason(exc), exc)
        xfer.end()

    def _emit_transfer(self, out: RequestResult, log: _RunLog, engine_id: str) -> None:
        """The request's span tree from ``log``: ``kv.transfer`` (start = the request's
        start, end = after the notifications) with its children."""
        c0 = time.perf_counter_ns()
        off = time.time_ns() - time.monotonic_ns()  # executor clock -> span clock
        xfer = self.tracer.start_span(A.SPAN_KV_TRANSFER, start_time=out.t_start_ns + off)
        if not xfer.is_recording():
            xfer.end()
            return
        assert self.local_meta is not None
        tr = _Trace(trace.set_span_in_context(xfer), off, out.request_id, engine_id)
        rank = self.local_meta.layout.rank
        n = 1
        for t0, t1, read, parts in log.maps:
            self._emit(A.SPAN_KV_DESC_BUILD, tr, t0, t1, {
                A.REQUEST_ID: out.request_id, A.KV_DESC_SCOPE: "request", A.KV_VIEW: "all",
                A.KV_DESCRIPTORS: len(read.local_ids), A.KV_BYTES: read.bytes,
                A.KV_READS: parts, A.KV_RANK: rank,
                A.KV_PEER_RANK: read.prefill_rank, A.KV_PEER_ENGINE_ID: engine_id,
            })
        for res, t_end in log.reads:
            self._emit_read(tr, res, t_end)
        if log.stall is not None:
            t0, t1, npending, reason = log.stall
            self._emit(A.SPAN_KV_STALL, tr, t0, t1, {
                A.REQUEST_ID: out.request_id, A.KV_READS: npending,
                A.KV_WAITED_MS: (t1 - t0) / 1e6, A.KV_STATUS: "timeout",
                A.KV_FAILURE_REASON: reason[:200],
            }, fail="stall timeout")
        if log.abort is not None:
            t0, t1, aborted, reason = log.abort
            status = "timeout" if "timeout" in reason else "aborted"
            self._emit(A.SPAN_KV_ABORT, tr, t0, t1, {
                A.REQUEST_ID: out.request_id, A.KV_READS: len(aborted),
                A.KV_BYTES: sum(r.bytes for r in aborted),
                A.KV_WAITED_MS: (t1 - out.t_start_ns) / 1e6,
                A.KV_STATUS: status, A.KV_FAILURE_REASON: reason[:200],
            }, fail=status)
        for t0, t1, peer_rank, peer_engine, err in log.notifies:
            self._emit(A.SPAN_KV_NOTIFY, tr, t0, t1, {
                A.REQUEST_ID: out.request_id, A.KV_PEER_RANK: peer_rank,
                A.KV_PEER_ENGINE_ID: peer_engine,
                A.KV_STATUS: "done" if out.status == "ok" else "failed",
                **({A.KV_FAILURE_REASON: err} if err else {}),
            }, fail="notify failed" if err else "")
        n += len(log.maps) + len(log.reads) + len(log.notifies)
        n += (log.stall is not None) + (log.abort is not None)
        xfer.set_attributes({
            A.REQUEST_ID: out.request_id,
            A.KV_RANK: rank, A.KV_TP_SIZE: self.local_meta.layout.tp,
            A.KV_PEER_ENGINE_ID: engine_id, A.KV_BYTES: out.bytes,
            A.KV_DESCRIPTORS: out.descriptors, A.KV_READS: len(out.reads),
            A.KV_POLLS: out.polls, A.KV_BACKEND: BACKEND,
            A.KV_STATUS: "done" if out.status == "ok" else "failed",
        })
        if out.status != "ok":
            A.mark_failed(xfer, out.reason[:200])
        xfer.end(end_time=out.t_notified_ns + off)
        out.emit_ns = time.perf_counter_ns() - c0
        self.span_cost.spans += n
        self.span_cost.ns += out.emit_ns

    def _emit(
        self, name: str, tr: _Trace, t0: int, t1: int, attrs: Mapping[str, A.AttrValue],
        fail: str = "",
    ) -> None:
        """One finished span from executor-clock times ``t0``..``t1`` (monotonic ns).

        Only called when the request's transfer span records, so the attribute dicts
        are never built for a no-op tracer."""
        span = self.tracer.start_span(name, context=tr.ctx, start_time=t0 + tr.off)
        if fail:  # first, so that our kv.status / kv.failure_reason below win
            A.mark_failed(span, fail)
        span.set_attributes(attrs)
        span.end(end_time=t1 + tr.off)

    def _emit_read(self, tr: _Trace, res: ReadResult, t_end: int) -> None:
        assert self.local_meta is not None
        kind, group = (self._layer_info.get(res.layer, ("", -1)) if res.layer is not None
                       else ("mixed", -1))
        attrs: dict[str, A.AttrValue] = {
            A.REQUEST_ID: tr.request_id, A.KV_LAYER_KIND: kind,
            A.KV_BYTES: res.bytes, A.KV_DESCRIPTORS: res.descriptors,
            A.KV_RANK: self.local_meta.layout.rank, A.KV_PEER_RANK: res.prefill_rank,
            A.KV_PEER_ENGINE_ID: tr.peer_engine_id, A.KV_BACKEND: BACKEND,
            A.KV_STATUS: _STATUS.get(res.status, res.status.lower()),
        }
        if res.layer is not None:
            attrs[A.KV_LAYER] = res.layer
            attrs[A.KV_GROUP] = group
        if res.t_done_ns:
            attrs[A.KV_COMPLETION_LAG_NS] = res.t_done_ns - res.t_prev_poll_ns
        t = res.telemetry
        if t is not None:
            attrs[A.KV_NIXL_POST_US] = float(t.post_us)
            attrs[A.KV_NIXL_XFER_US] = float(t.xfer_us)
            attrs[A.KV_NIXL_DESC_COUNT] = t.desc_count
        fail = ""
        if res.status != "DONE":
            attrs[A.KV_FAILURE_REASON] = fail = res.reason[:200] or res.status
        self._emit(A.SPAN_KV_READ, tr, res.t_make_ns or t_end, t_end, attrs, fail)

    def _finish(self, handle: Any, res: ReadResult) -> None:
        if self.capture_telemetry:
            try:
                t = self.agent.get_xfer_telemetry(handle)
                res.telemetry = XferTelemetry(
                    int(t.startTime), int(t.postDuration), int(t.xferDuration),
                    int(t.totalBytes), int(t.descCount),
                )
            except Exception:  # telemetry is best effort; the READ itself succeeded
                res.telemetry = None
        self._release(handle, res)

    def _release(self, handle: Any, res: ReadResult) -> None:
        try:
            self.agent.release_xfer_handle(handle)
        except Exception as exc:
            # NIXL could not cancel an active transfer: the handle stays owned by NIXL's
            # leak list (freed with the agent); say so in the result.
            res.reason = (res.reason + "; " if res.reason else "") + f"release failed: {exc}"

    def _notify(
        self, out: RequestResult, jobs: Sequence[Any], per_peer: Mapping[str, int],
        log: _RunLog,
    ) -> None:
        peers = {job[0].agent: job[0] for job in jobs}
        for agent, peer in peers.items():
            if out.status == "ok":
                if per_peer.get(agent, 0) == 1:
                    out.notified.append(peer.meta.layout.rank)  # rode on the READ
                    continue
                msg = f"done:{out.request_id}".encode()
            else:
                msg = f"fail:{out.request_id}:{out.reason}".encode()[:1024]
            t0 = time.monotonic_ns()
            err = ""
            try:
                self.agent.send_notif(agent, msg)
                out.notified.append(peer.meta.layout.rank)
            except Exception as exc:  # dead peer: its lease timeout frees the blocks
                out.reason += f"; notify {agent} failed: {exc}"
                err = _short_reason(exc)
            log.notifies.append((t0, time.monotonic_ns(), peer.meta.layout.rank,
                                 peer.meta.engine_id, err))

    # -- teardown ---------------------------------------------------------------------
    def close(self) -> None:
        """Release prepped views, remove peers, deregister memory (idempotent)."""
        for peer in self.peers.values():
            for h in (peer.local_view, peer.remote_view):
                if h is not None:
                    try:
                        self.agent.release_dlist_handle(h)
                    except Exception:
                        pass
            peer.local_view = peer.remote_view = None
            try:
                self.agent.remove_remote_agent(peer.agent)
            except Exception:
                pass
        self.peers.clear()
        for reg in [self._reg, *self._extra_regs]:
            if reg is not None:
                try:
                    self.agent.deregister_memory(reg)
                except Exception:
                    pass
        self._reg = None
        self._extra_regs = []


# ---------------------------------------------------------------------------------
# P side: block leases freed by D's notifications or by time
# ---------------------------------------------------------------------------------


@dataclass
class Lease:
    request_id: str
    readers: int  # D ranks expected to report
    deadline_ns: int
    done: int = 0
    freed: str = ""  # "" while held; else "done" | "fail: <reason>" | "lease expired"


class LeaseTable:
    """P holds a request's blocks until every D reader says done (or one says fail), or
    until the lease expires - so a dead or stalled D never pins P's blocks forever."""

    def __init__(self) -> None:
        self.leases: dict[str, Lease] = {}

    def add(self, request_id: str, readers: int, lease_s: float) -> None:
        self.leases[request_id] = Lease(
            request_id, readers, time.monotonic_ns() + int(lease_s * 1e9)
        )

    def on_notif(self, msg: bytes) -> None:
        text = msg.decode(errors="replace")
        kind, _, rest = text.partition(":")
        rid, _, reason = rest.partition(":")
        lease = self.leases.get(rid)
        if lease is None or lease.freed:
            return
        if kind == "done":
            lease.done += 1
            if lease.done >= lease.readers:
                lease.freed = "done"
        elif kind == "fail":
            lease.freed = f"fail: {reason}"

    def poll(self, agent: Any) -> None:
        for msgs in agent.get_new_notifs().values():
            for m in msgs:
                self.on_notif(m)
        now = time.monotonic_ns()
        for lease in self.leases.values():
            if not lease.freed and now > lease.deadline_ns:
                lease.freed = "lease expired"

    def held(self) -> list[str]:
        return [r for r, lease in self.leases.items() if not lease.freed]


__all__ = [
    "Lease",
    "LeaseTable",
    "NixlExecutor",
    "ReadResult",
    "RequestResult",
    "SpanCost",
    "XferTelemetry",
    "layer_of_units",
    "make_agent",
    "parse_granularity",
    "per_layer_for",
    "split_units",
]
