"""D side of ``hybrid-pd bench``: one rank's NIXL agent, registered regions and peers,
driving the read path of :mod:`hybrid_pd.transfer.reads` (the same posting, polling,
stall guard and records the vLLM connector uses) in a busy poll loop.

Lifecycle::

    ex = NixlExecutor("d0-rank0", regions, mem_type="DRAM")
    me = ex.metadata(engine_id="d0", spec=spec, layout=d_layout, rank=0)
    ex.add_peer(remote_meta)                      # handshake: checked, agent added,
                                                  # dual views prepped once per peer
    res = ex.read_request("req-1", plan, engine_id="p0", per_layer=False,
                          decode_block_ids=d_ids, timeout_s=30)
    res.status  # "ok" | "failed" (res.reason says why); P was notified either way

What the bench adds around the shared read path, and why:

* **Prepped dual views** (mode ``"prepped"``, default): one ``prep_xfer_dlist`` per
  side per peer (:func:`hybrid_pd.planner.plan.dual_view`); each request is then only
  ``make_prepped_xfer`` with index lists.  Mode ``"dlist"`` builds per-request lists
  (``initialize_xfer``) from merged descriptors instead; the bench measures both.
* **The poll loop**: vLLM polls once per engine step; here every pending READ is polled
  round-robin with a ``sched_yield`` between rounds (2 cores: the peer's progress needs
  the CPU), so a read span ends at most one round after the real completion
  (``kv.completion_lag_ns`` records the bound).
* **Notifications** (D -> P): ``done:<request_id>`` rides on the READ when it is the
  only one for that peer, else is sent after the last; ``fail:<request_id>:<reason>``
  frees P's lease at once (:class:`~hybrid_pd.transfer.leases.LeaseTable`).
* **Held READs** (the rule of the vLLM connector's quarantine): a READ given up on a
  stall is not released -- NIXL 1.5.1 does not cancel an in-flight READ on release
  (``scripts/late_read_probe.py``: all bytes land once the frozen peer resumes) -- but
  held and polled; while any is held, the next request fails before posting (its
  destination could still be written) and :meth:`close` keeps the memory registered.
* **Spans** come from :mod:`hybrid_pd.telemetry.recorder` after the poll loop and the
  notifications, from the stamps only, with ``hybrid_pd.connector = bench``.
  ``read_contiguous`` (the raw-READ baseline) emits none.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from opentelemetry import trace
from opentelemetry.trace import Tracer

from hybrid_pd.planner.descs import merge_arrays
from hybrid_pd.planner.layout import EngineLayout
from hybrid_pd.planner.model_spec import HybridModelSpec
from hybrid_pd.planner.pair import PairPlan
from hybrid_pd.planner.plan import ReadPlan, RequestPlan, dual_view, to_addr_descs
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.transfer import handshake as hs
from hybrid_pd.transfer import spans as S
from hybrid_pd.transfer.agent import addr_array, buffer_span, make_agent
from hybrid_pd.transfer.reads import (
    PostError,
    ReadPart,
    ReadResult,
    StallGuard,
    abort_read,
    held_read_ended,
    layer_kinds,
    now_ns,
    plan_parts,
    poll_read,
    post_reads,
    release,
    short_reason,
    start_reads,
)

Mode = Literal["prepped", "dlist"]
CONNECTOR = "bench"


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


@dataclass
class _Job:
    """One peer's share of a request: its parts, posted together."""

    peer: _Peer
    read: ReadPlan | None
    parts: list[ReadPart]


class NixlExecutor:
    """One rank's NIXL agent, its registered regions, and its peers."""

    def __init__(self, name: str, regions: Sequence[Any], *, mem_type: str = "DRAM",
                 dev_id: int = 0, num_threads: int = 0, capture_telemetry: bool = True,
                 mode: Mode = "prepped", agent: Any = None, tracer: Tracer | None = None,
                 connector: str = CONNECTOR) -> None:
        if mode not in ("prepped", "dlist"):
            raise ValueError(f"mode must be 'prepped' or 'dlist', got {mode!r}")
        self.name, self.mem_type, self.dev_id, self.mode = name, mem_type, dev_id, mode
        self.capture_telemetry = capture_telemetry
        self.connector = connector
        # The global tracer is a no-op until configure_tracing() runs; the bench swaps
        # ``self.tracer`` per request to compare telemetry on / off in one process.
        self.tracer: Tracer = tracer or trace.get_tracer(__name__)
        self.span_cost = S.SpanCost()
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
            A.set_attrs(span, {A.CONNECTOR: connector, A.KV_DESC_SCOPE: "local",
                               A.KV_VIEW: "all", A.KV_DESCRIPTORS: len(spans),
                               A.KV_BYTES: sum(self.region_lens)})
            try:
                self._reg = self.agent.register_memory(
                    addr_array([(b, n, dev_id) for b, n in spans]), mem_type
                )
            except Exception as exc:
                A.mark_failed(span, short_reason(exc), exc)
                raise
        self._extra_regs: list[Any] = []
        self.held: list[tuple[Any, ReadResult, str]] = []  # given up, maybe still landing
        self.peers: dict[tuple[str, int], _Peer] = {}
        self.local_meta: hs.HandshakeMetadata | None = None
        self.local_layout: EngineLayout | None = None
        self.spec: HybridModelSpec | None = None
        self._layer_info: dict[int, tuple[str, int]] = {}

    # -- handshake --------------------------------------------------------------------
    def metadata(self, *, engine_id: str, spec: HybridModelSpec, layout: EngineLayout,
                 rank: int) -> hs.HandshakeMetadata:
        self.spec, self.local_layout = spec, layout
        self._layer_info = layer_kinds(layout)  # span labels only
        self.local_meta = hs.build_metadata(
            engine_id=engine_id, agent_name=self.name,
            agent_metadata=self.agent.get_agent_metadata(), spec=spec, layout=layout,
            rank=rank, regions=list(zip(self.region_bases, self.region_lens, strict=True)),
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
                A.mark_failed(span, short_reason(exc), exc)
                raise

    def _pair_attrs(self, remote: hs.HandshakeMetadata) -> dict[str, A.AttrValue]:
        assert self.local_meta is not None
        return {
            A.CONNECTOR: self.connector,
            A.KV_RANK: self.local_meta.layout.rank, A.KV_TP_SIZE: self.local_meta.layout.tp,
            A.KV_PEER_ENGINE_ID: remote.engine_id, A.KV_PEER_RANK: remote.layout.rank,
            A.KV_PEER_TP_SIZE: remote.layout.tp, A.KV_BACKEND: S.BACKEND,
        }

    def _add_peer(self, remote: hs.HandshakeMetadata) -> tuple[str, int]:
        hs.check_compatible(self.local_meta, remote)
        _, layout = hs.engine_layout(remote)
        agent = self.agent.add_remote_agent(remote.agent_metadata)
        if isinstance(agent, bytes):
            agent = agent.decode()
        peer = _Peer(meta=remote, agent=agent, layout=layout,
                     bases=tuple(r.base for r in remote.regions),
                     lens=tuple(r.length for r in remote.regions))
        key = (remote.engine_id, remote.layout.rank)
        self.peers[key] = peer
        if self.mode == "prepped":
            self._prep_views(peer)
        return key

    def _prep_views(self, peer: _Peer) -> None:
        """Both sides' dual views for this (D rank, P rank) pair, prepped once."""
        assert self.spec is not None and self.local_layout is not None
        d_rank = self.local_meta.layout.rank if self.local_meta else 0
        # The pair's checks (TP, layouts, kernel blocks, regions) run once, here.
        pair_plan = PairPlan.build(spec=self.spec, decode=self.local_layout, prefill=peer.layout,
                                   decode_rank=d_rank, decode_region_lens=self.region_lens,
                                   prefill_region_lens={peer.meta.layout.rank: peer.lens})
        t = pair_plan.template(peer.meta.layout.rank)
        if t is None:  # this D rank reads nothing from that P rank
            return
        pair = self._pair_attrs(peer.meta)
        sides = (("local", self.local_layout, self.region_bases, self.region_lens,
                  "NIXL_INIT_AGENT", self.mem_type),
                 ("remote", peer.layout, peer.bases, peer.lens, peer.agent,
                  peer.meta.mem_type))
        for scope, layout, bases, lens, agent, mem in sides:
            with self.tracer.start_as_current_span(A.SPAN_KV_DESC_BUILD) as span:
                descs = to_addr_descs(dual_view(layout, t, scope), bases, lens, self.dev_id)
                handle = self.agent.prep_xfer_dlist(agent, addr_array(descs), mem)
                if span.is_recording():
                    span.set_attributes({**pair, A.KV_DESC_SCOPE: scope, A.KV_VIEW: "all",
                                         A.KV_DESCRIPTORS: len(descs),
                                         A.KV_BYTES: int(descs[:, 1].sum())})
            if scope == "local":
                peer.local_view, peer.view_len = handle, len(descs)
            else:
                peer.remote_view = handle

    # -- extra registrations (the bench's baseline buffers) ----------------------------
    def register_extra(self, buf: Any) -> tuple[int, int]:
        base, n = buffer_span(buf)
        self._keep.append(buf)
        self._extra_regs.append(
            self.agent.register_memory(addr_array([(base, n, self.dev_id)]), self.mem_type)
        )
        return base, n

    # -- the read path ------------------------------------------------------------------
    def read_request(self, request_id: str, plan: RequestPlan, *, engine_id: str,
                     decode_block_ids: Sequence[Sequence[int]], per_layer: bool = False,
                     timeout_s: float = 30.0, notify: bool = True) -> RequestResult:
        """Post every READ of ``plan``, poll until all are DONE or the deadline passes.

        Traced (when the tracer records) as a ``kv.transfer`` span holding one
        ``desc_build scope=request`` span per peer and one ``kv.read`` span per READ,
        all built after the transfer from the stamps taken during it."""
        assert self.local_layout is not None and self.local_meta is not None
        log = S.RunLog(t_start=now_ns())
        jobs: list[_Job] = []
        try:
            for read in plan.reads:
                peer = self.peers.get((engine_id, read.prefill_rank))
                if peer is None:
                    raise KeyError(f"no handshake with engine {engine_id!r} rank "
                                   f"{read.prefill_rank}; known peers: {sorted(self.peers)}")
                t_map = now_ns()
                parts = plan_parts(read, self.local_layout, decode_block_ids, per_layer)
                jobs.append(_Job(peer, read, parts))
                log.maps.append((t_map, now_ns(), read, len(parts)))
            out = self._run(request_id, jobs, timeout_s, notify, log)
        except BaseException as exc:
            S.emit_failed_transfer(self, log.t_start, exc)
            raise
        S.emit_transfer(self, out, log, engine_id)
        return out

    def read_contiguous(self, request_id: str,
                        spans: Mapping[tuple[str, int], tuple[tuple[int, int], tuple[int, int]]],
                        *, timeout_s: float = 30.0) -> RequestResult:
        """Baseline: one READ per peer of ``((local addr, len), (remote addr, len))`` - one
        contiguous descriptor each side, per-request dlists, no notification."""
        jobs = []
        for key, ((laddr, n), (raddr, rn)) in spans.items():
            if n != rn:
                raise ValueError(f"baseline span lengths differ: local {n}, remote {rn}")
            part = ReadPart(addr_array([(laddr, n, self.dev_id)]),
                            addr_array([(raddr, n, self.dev_id)]), n)
            jobs.append(_Job(self.peers[key], None, [part]))
        return self._run(request_id, jobs, timeout_s, False, S.RunLog(t_start=now_ns()))

    def _post(self, job: _Job, notif: bytes | None) -> list[tuple[Any, ReadResult]]:
        peer = job.peer
        rank = peer.meta.layout.rank
        if job.read is not None and self.mode == "prepped":
            if peer.local_view is None:
                raise RuntimeError(f"no prepped views for peer {peer.agent}")
            return post_reads(self.agent, peer.local_view, peer.remote_view, job.parts,
                              prefill_rank=rank, notif=notif)
        # Per-request descriptor lists: the "dlist" mode and the raw-READ baseline.
        handles, recs = [], []
        for part in job.parts:
            rec = ReadResult(rank, part.layer, part.bytes, 1, "PROC", t_make_ns=now_ns(),
                             kind=part.kind, group=part.group)
            if job.read is None:
                la, ra = part.local_ids, part.remote_ids
            else:
                idx = part.units
                loc, rem = merge_arrays(job.read.local_array[idx], job.read.remote_array[idx])
                la = addr_array(to_addr_descs(loc, self.region_bases, self.region_lens,
                                              self.dev_id))
                ra = addr_array(to_addr_descs(rem, peer.bases, peer.lens, self.dev_id))
                rec.descriptors = len(part.local_ids)
            kw = {"notif_msg": notif} if notif is not None and len(job.parts) == 1 else {}
            handles.append(self.agent.initialize_xfer(
                "READ", self.agent.get_xfer_descs(la, self.mem_type),
                self.agent.get_xfer_descs(ra, peer.meta.mem_type), peer.agent, **kw))
            rec.t_created_ns = now_ns()
            recs.append(rec)
        return start_reads(self.agent, handles, recs)

    def _run(self, request_id: str, jobs: Sequence[_Job], timeout_s: float, notify: bool,
             log: S.RunLog) -> RequestResult:
        """Post, poll, abort, notify.  No span work here: only stamps go into ``log``."""
        guard = StallGuard(timeout_s)
        pending: list[tuple[Any, ReadResult, str]] = []
        results: list[ReadResult] = []
        failure = self._still_held()
        done_msg = f"done:{request_id}".encode() if notify else None
        for job in ([] if failure else jobs):
            try:
                started = self._post(job, done_msg)
            except Exception as exc:  # NIXL raises nixlBackendError & co on a dead peer
                started = exc.started if isinstance(exc, PostError) else []
                res = ReadResult(job.peer.meta.layout.rank, None, 0, 0, "POST_FAILED",
                                 reason=f"posting READ to {job.peer.agent} failed: {exc}")
                res.t_end_ns = now_ns()
                results.append(res)
                log.reads.append(res)
                failure = res.reason
            results.extend(rec for _, rec in started)
            pending.extend((h, rec, job.peer.agent) for h, rec in started)
            if failure:
                break
        pending, failure, polls = self._poll(pending, guard, failure, log)
        if pending:  # give up what is left, but hold it: a release would not cancel it
            t_abort = now_ns()
            status = "TIMEOUT" if "timeout" in failure else "ABORTED"
            for _, rec, _ in pending:
                rec.status, rec.reason, rec.t_end_ns = status, failure, now_ns()
                log.reads.append(rec)
            self.held.extend(pending)
            log.abort = (t_abort, now_ns(), [rec for _, rec, _ in pending], failure)
        t_end = now_ns()
        out = RequestResult(request_id=request_id, status="failed" if failure else "ok",
                            reason=failure, reads=results, t_start_ns=log.t_start,
                            t_end_ns=t_end, polls=polls, t_notified_ns=t_end)
        if notify:
            self._notify(out, jobs, log)
            out.t_notified_ns = now_ns()
        return out

    def _poll(self, pending: list[tuple[Any, ReadResult, str]], guard: StallGuard,
              failure: str, log: S.RunLog) -> tuple[list[Any], str, int]:
        """Poll round-robin until everything is DONE, one fails, or the guard fires."""
        polls = 0
        while pending and not failure:
            polls += 1
            still = []
            for handle, rec, peer_agent in pending:
                poll_read(self.agent, handle, rec, telemetry=self.capture_telemetry)
                if rec.status == "PROC":
                    still.append((handle, rec, peer_agent))
                    continue
                if rec.status == "ERR":
                    rec.reason = f"READ of {rec.bytes} B from {peer_agent} returned ERR"
                    failure = failure or rec.reason
                    abort_read(self.agent, handle, rec, "ERR", rec.reason)
                else:
                    self._release_done(handle, rec)
                log.reads.append(rec)
            pending = still
            now = now_ns()
            if pending and any(guard.expired(rec, now) for _, rec, _ in pending):
                failure = (f"stall timeout: {len(pending)} READ(s) not done after "
                           f"{timeout_text(guard)} s (peers {sorted({p for *_, p in pending})}); "
                           "aborted")
                log.stall = (log.t_start, now_ns(), len(pending), failure)
                break
            if pending:
                os.sched_yield()  # 2 cores: give the peer's progress a chance
        return pending, failure, polls

    def _still_held(self) -> str:
        """Poll the held READs once, release the ended ones; "" when none is left, else
        why a new READ must not start."""
        still = []
        for handle, rec, peer_agent in self.held:
            if held_read_ended(self.agent, handle) is None:
                still.append((handle, rec, peer_agent))
            else:
                release(self.agent, handle)
        self.held = still
        if not still:
            return ""
        return (f"{len(still)} READ(s) given up earlier are still in flight from "
                f"{sorted({p for *_, p in still})}: NIXL cannot cancel them, so no new READ "
                "may write the destination until they end")

    def _release_done(self, handle: Any, rec: ReadResult) -> None:
        rec.t_end_ns = rec.t_done_ns
        try:
            self.agent.release_xfer_handle(handle)
        except Exception as exc:  # a DONE handle NIXL would not free: say so, keep going
            rec.reason = f"release failed: {exc}"

    def _notify(self, out: RequestResult, jobs: Sequence[_Job], log: S.RunLog) -> None:
        peers = {job.peer.agent: job for job in jobs}
        for agent, job in peers.items():
            peer = job.peer
            if out.status == "ok":
                if len(job.parts) == 1:
                    out.notified.append(peer.meta.layout.rank)  # rode on the READ
                    continue
                msg = f"done:{out.request_id}".encode()
            else:
                msg = f"fail:{out.request_id}:{out.reason}".encode()[:1024]
            t0 = now_ns()
            err = ""
            try:
                self.agent.send_notif(agent, msg)
                out.notified.append(peer.meta.layout.rank)
            except Exception as exc:  # dead peer: its lease timeout frees the blocks
                out.reason += f"; notify {agent} failed: {exc}"
                err = short_reason(exc)
            log.notifies.append((t0, now_ns(), peer.meta.layout.rank, peer.meta.engine_id,
                                 err))

    # -- teardown ---------------------------------------------------------------------
    def close(self) -> None:
        """Release prepped views, remove peers, deregister memory (idempotent).  While a
        given-up READ is still in flight the memory stays registered and referenced
        (kept for the life of the process: freeing it would let the READ write freed
        memory)."""
        if self._still_held():
            _LEAKED.append((self.agent, self._keep))
            return
        for peer in self.peers.values():
            for h in (peer.local_view, peer.remote_view):
                if h is not None:
                    _quietly(self.agent.release_dlist_handle, h)
            peer.local_view = peer.remote_view = None
            _quietly(self.agent.remove_remote_agent, peer.agent)
        self.peers.clear()
        for reg in [self._reg, *self._extra_regs]:
            if reg is not None:
                _quietly(self.agent.deregister_memory, reg)
        self._reg = None
        self._extra_regs = []


_LEAKED: list[Any] = []  # agents + buffers with READs that may still land (see close)


def timeout_text(guard: StallGuard) -> str:
    return f"{guard.timeout_s:g}"


def _quietly(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # teardown: the agent may already be gone
        pass


__all__ = ["CONNECTOR", "NixlExecutor", "RequestResult"]
