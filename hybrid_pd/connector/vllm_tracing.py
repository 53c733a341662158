"""Spans from inside vLLM's NIXL pull connector: ours (``HybridNixlConnector``) and
upstream's (through the ``nixl-upstream-tracing`` engine patch).

Two mixins sit in front of upstream's classes, so the same code traces both connectors:

* :class:`TracedSchedulerMixin` copies each request's trace hand-off
  (``kv_transfer_params["hybrid_pd_trace"]``, put there by the proxy) into the connector
  metadata (attribute ``hybrid_pd_trace``: req id -> {traceparent, request_id}); the
  metadata reaches every worker (pickled for TP > 1), so worker spans join the trace.
* :class:`TracedWorkerMixin` (in front of :class:`~.read_path.ReadPathWorkerMixin`)
  emits, per worker rank:

  - ``hybrid_pd.kv.desc_build`` for each descriptor list upstream (or we) build:
    ``kv.desc.scope`` local (registration) / remote (per handshake, under the
    ``hybrid_pd.kv.handshake`` span) / request (block ids -> descriptor ids);
  - ``hybrid_pd.kv.transfer`` on D: a request's whole pull, from the first read attempt
    (including a handshake it waited for) to the step that reports it finished;
  - ``hybrid_pd.kv.read`` per NIXL READ handle, from the records of the read path,
    with NIXL's own post/transfer durations, bytes and descriptor count;
  - ``hybrid_pd.kv.stall`` + ``hybrid_pd.kv.abort`` when the stall guard gives a READ up;
  - ``hybrid_pd.kv.notify`` on P: the request's blocks held for D, from the step that
    handed them over to the notification that D is done (or the lease expiry).

Tracing only: no NIXL call here (the read path polls; this layer reads its records),
and attribute dicts are built only for recording spans.  vLLM polls once per engine
step, so a read span ends at the step that saw DONE; ``kv.completion_lag_ns`` bounds
the lag (that poll minus the previous one) and ``kv.nixl.xfer_us`` is NIXL's own time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from opentelemetry.context import Context

from hybrid_pd.connector import handover
from hybrid_pd.connector.stats import EVENTS_KEY, READS_KEY, SPANS_KEY, SpanTally
from hybrid_pd.settings import TRACE_PARAMS_KEY
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry import engine as tel
from hybrid_pd.telemetry.recorder import BACKEND, SpanRecorder, clock_offset_ns, read_window
from hybrid_pd.transfer.reads import ReadResult, now_ns

META_ATTR = TRACE_PARAMS_KEY


def desc_stats(descs: Any) -> tuple[int, int]:
    """(count, bytes) of an Nx3 (addr, len, dev) descriptor array or list of rows."""
    if hasattr(descs, "shape"):  # numpy rows (upstream's builders, our views)
        arr = descs.reshape(-1, 3)
        return int(arr.shape[0]), int(arr[:, 1].sum())
    rows = list(descs)  # lists of tuples (our local splits)
    return len(rows), sum(int(r[1]) for r in rows)


def completed_ns(rec: ReadResult) -> int:
    """When NIXL completed a READ (monotonic): its handle's creation plus NIXL's own
    transfer time, within [post, first poll that saw DONE]; the poll without NIXL's
    telemetry."""
    seen = rec.t_done_ns or rec.t_end_ns
    t = rec.telemetry
    if t is None or not rec.t_created_ns:
        return seen
    est = rec.t_created_ns + int(t.xfer_us * 1000)
    return min(max(est, rec.t_post_ns), seen) if seen else est


# ------------------------------------------------------------------------------ scheduler


class TracedSchedulerMixin:
    """Front of ``NixlPullConnectorScheduler``: forwards trace hand-offs to the workers."""

    def _hy_held_traces(self) -> dict[str, dict[str, str]]:
        store = self.__dict__.get("_hy_held")
        if store is None:
            store = self.__dict__["_hy_held"] = {}
        return store

    def request_finished(self, request: Any, block_ids: Any) -> Any:
        out = super().request_finished(request, block_ids)  # type: ignore[misc]
        info = tel.from_params(request.kv_transfer_params)
        if info is not None and out and out[0]:  # P keeps the blocks for D
            self._hy_held_traces()[request.request_id] = info
        return out

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        recv = {rid: tel.from_params(entry[0].kv_transfer_params)
                for rid, entry in getattr(self, "_reqs_need_recv", {}).items()}
        meta = super().build_connector_meta(scheduler_output)  # type: ignore[misc]
        traces = {rid: info for rid, info in recv.items() if info}
        held = self._hy_held_traces()
        for rid in getattr(meta, "reqs_to_send", {}) or {}:
            if rid in held:
                traces[rid] = held.pop(rid)
        if traces:
            setattr(meta, META_ATTR, traces)
        return meta


# --------------------------------------------------------------------------------- worker


@dataclass
class _Transfer:
    t0: int  # first read attempt (after a handshake it waited for)
    peer_engine: str
    reads: int = 0
    bytes: int = 0
    descriptors: int = 0
    load: int = 0  # the worker first saw the request to load (start_load_kv)
    posted: int = 0  # NIXL took the last READ of the request (its transfer() returned)
    done: int = 0  # NIXL completed the last READ (its own transfer time), else the poll


@dataclass
class _State:
    rec: SpanRecorder
    info: dict[str, dict[str, str]] = field(default_factory=dict)
    transfers: dict[str, _Transfer] = field(default_factory=dict)
    holds: dict[str, list[Any]] = field(default_factory=dict)  # rid -> [t0, expired]
    failures: dict[str, str] = field(default_factory=dict)
    adding: tuple[str, int, int] | None = None  # (engine, rank, tp) in add_remote_agent
    mapped: tuple[int, int, int | None, int] | None = None  # t0, t1, bytes, descriptors
    spans: SpanTally = field(default_factory=SpanTally)
    loads: dict[str, int] = field(default_factory=dict)  # rid -> first start_load_kv
    handshakes: dict[str, int] = field(default_factory=dict)  # peer engine -> handshake end


class TracedWorkerMixin:
    """Front of a read-path worker (ours or upstream's); see the module doc."""

    HY_CONNECTOR = "upstream"

    # -- state (lazy: the upstream class is swapped in after __init__) -----------------
    def _hy_state(self) -> _State:
        st = self.__dict__.get("_hy_tracing")
        if st is None:
            w: Any = self
            base = {A.CONNECTOR: self.HY_CONNECTOR, A.KV_RANK: w.tp_rank,
                    A.KV_TP_SIZE: w.vllm_config.parallel_config.tensor_parallel_size,
                    A.ENGINE_ID: w.engine_id}
            tracer = tel.engine_tracer(f"{w.engine_id}-rank{w.tp_rank}")
            st = _State(SpanRecorder(tracer, base, self._hy_request_attrs))
            self.__dict__["_hy_tracing"] = st
        return st

    def _hy_request_attrs(self, req_id: str) -> dict[str, A.AttrValue | None]:
        info = self._hy_state().info.get(req_id, {})
        return {A.REQUEST_ID: info.get("request_id", req_id)}

    def _hy_ctx(self, req_id: str | None) -> Context | None:
        return tel.context_of(self._hy_state().info.get(req_id)) if req_id else None

    def _hy_emit(self, name: str, req_id: str | None, t0: int, t1: int, attrs: Any,
                 fail: str = "") -> None:
        self._hy_state().rec.emit(name, self._hy_ctx(req_id), t0, t1, attrs, req_id=req_id,
                                  fail=fail)

    # -- descriptor builds ---------------------------------------------------------------
    def _hy_build(self, scope: str, view: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = now_ns()
        out = fn(*args, **kwargs)
        t1 = now_ns()
        adding = self._hy_state().adding

        def attrs() -> dict[str, A.AttrValue | None]:
            n, nbytes = desc_stats(out)
            more: dict[str, A.AttrValue | None] = {}
            if scope == "remote" and adding is not None:
                more = {A.KV_PEER_ENGINE_ID: adding[0], A.KV_PEER_RANK: adding[1],
                        A.KV_PEER_TP_SIZE: adding[2]}
            return {A.KV_DESC_SCOPE: scope, A.KV_VIEW: view, A.KV_DESCRIPTORS: n,
                    A.KV_BYTES: nbytes, **more}

        self._hy_emit(A.SPAN_KV_DESC_BUILD, None, t0, t1, attrs)
        return out

    def _build_fa_local(self, *args: Any, **kwargs: Any) -> Any:
        return self._hy_build("local", "fa", super()._build_fa_local, *args, **kwargs)  # type: ignore[misc]

    def _build_mamba_local(self, *args: Any, **kwargs: Any) -> Any:
        return self._hy_build("local", "mamba", super()._build_mamba_local, *args, **kwargs)  # type: ignore[misc]

    def _build_fa_remote(self, *args: Any, **kwargs: Any) -> Any:
        return self._hy_build("remote", "fa", super()._build_fa_remote, *args, **kwargs)  # type: ignore[misc]

    def _build_mamba_remote(self, *args: Any, **kwargs: Any) -> Any:
        return self._hy_build("remote", "mamba", super()._build_mamba_remote, *args, **kwargs)  # type: ignore[misc]

    def add_remote_agent(self, nixl_agent_meta: Any, remote_tp_rank: int = 0,
                         remote_tp_size: int = 1, remote_dcp_size: int = 1) -> str:
        st = self._hy_state()
        st.adding = (nixl_agent_meta.engine_id, remote_tp_rank, remote_tp_size)
        try:
            return super().add_remote_agent(  # type: ignore[misc]
                nixl_agent_meta, remote_tp_rank, remote_tp_size, remote_dcp_size)
        finally:
            st.adding = None

    def _nixl_handshake(self, host: str, port: int, remote_tp_size: int,
                        expected_engine_id: str, *args: Any, **kwargs: Any) -> Any:
        st = self._hy_state()
        with st.rec.tracer.start_as_current_span(
            A.SPAN_KV_HANDSHAKE, record_exception=False, set_status_on_exception=False,
        ) as span:
            if span.is_recording():
                A.set_attrs(span, {**st.rec.base, A.KV_PEER_ENGINE_ID: expected_engine_id,
                                   A.KV_PEER_TP_SIZE: remote_tp_size})
            try:
                return super()._nixl_handshake(  # type: ignore[misc]
                    host, port, remote_tp_size, expected_engine_id, *args, **kwargs)
            except Exception as exc:
                A.mark_failed(span, f"{type(exc).__name__}: {exc}"[:200], exc)
                raise
            finally:
                st.handshakes[expected_engine_id] = now_ns()

    # -- requests ------------------------------------------------------------------------
    def start_load_kv(self, metadata: Any) -> None:
        st = self._hy_state()
        st.info.update(getattr(metadata, META_ATTR, None) or {})
        now = now_ns()
        for rid in getattr(metadata, "reqs_to_send", {}) or {}:
            st.holds.setdefault(rid, [now, False])
        for rid in getattr(metadata, "reqs_to_recv", {}) or {}:
            st.loads.setdefault(rid, now)
        super().start_load_kv(metadata)  # type: ignore[misc]

    def _read_blocks_for_req(self, req_id: str, meta: Any) -> None:
        st = self._hy_state()
        if req_id not in st.transfers and meta.remote is not None:
            now = now_ns()
            st.transfers[req_id] = _Transfer(now, meta.remote.engine_id,
                                             load=st.loads.pop(req_id, now))
        super()._read_blocks_for_req(req_id, meta)  # type: ignore[misc]

    def _compute_desc_ids(self, *args: Any, **kwargs: Any) -> Any:
        """Upstream's id mapping, timed (our worker reports its own via _hy_mapped)."""
        t0 = now_ns()
        out = super()._compute_desc_ids(*args, **kwargs)  # type: ignore[misc]
        st = self._hy_state()
        prev = st.mapped
        st.mapped = (prev[0] if prev else t0, now_ns(), None, len(out))
        return out

    def _hy_mapped(self, t0: int, t1: int, nbytes: int, descriptors: int) -> None:
        self._hy_state().mapped = (t0, t1, nbytes, descriptors)

    def _read_blocks(self, read_spec: Any, dst_engine_id: str, request_id: str,
                     *args: Any, **kwargs: Any) -> bool:
        st = self._hy_state()
        st.mapped = None
        ok = super()._read_blocks(read_spec, dst_engine_id, request_id, *args, **kwargs)  # type: ignore[misc]
        if st.mapped is not None:
            t0, t1, nbytes, ndesc = st.mapped
            self._hy_emit(A.SPAN_KV_DESC_BUILD, request_id, t0, t1, lambda: {
                A.KV_DESC_SCOPE: "request", A.KV_VIEW: "all", A.KV_DESCRIPTORS: ndesc,
                A.KV_BYTES: nbytes, A.KV_PEER_ENGINE_ID: dst_engine_id,
                A.KV_PEER_RANK: read_spec.remote_rank,
            })
            st.mapped = None
        if not ok:
            st.failures.setdefault(request_id, "transfer_setup_failed")
        return ok

    def _hy_read_finished(self, rec: ReadResult) -> None:
        super()._hy_read_finished(rec)  # type: ignore[misc]
        st = self._hy_state()
        tr = st.transfers.get(rec.request_id)
        if tr is not None:
            t = rec.telemetry
            tr.reads += 1
            tr.bytes += t.total_bytes if t is not None else rec.bytes
            tr.descriptors += t.desc_count if t is not None else rec.descriptors
            tr.posted = max(tr.posted, rec.t_post_ns)
            tr.done = max(tr.done, completed_ns(rec))
            rec.peer_engine = rec.peer_engine or tr.peer_engine
        if rec.status != "DONE" and not rec.reason:
            rec.reason = st.failures.get(rec.request_id, "")
        st.rec.read(self._hy_ctx(rec.request_id), rec, req_id=rec.request_id)
        if rec.status == "DONE":  # the same duration and bytes as the read span
            t0, t1 = read_window(rec)
            handover.record(self._hy_stats(), READS_KEY, [rec.kind, max(0, t1 - t0) / 1e9,
                                                          int(rec.bytes)])

    def _hy_read_aborted(self, req_id: str, rec: ReadResult, t_abort: int) -> None:
        super()._hy_read_aborted(req_id, rec, t_abort)  # type: ignore[misc]
        st = self._hy_state()
        st.failures.setdefault(req_id, rec.reason)
        handover.record(self._hy_stats(), EVENTS_KEY, ["stall", 1])
        handover.record(self._hy_stats(), EVENTS_KEY, ["abort", 1])
        st.rec.stall_and_abort(self._hy_ctx(req_id), rec.t_post_ns, t_abort, now_ns(), [rec],
                               rec.reason, stalled=True, req_id=req_id, extra={
                                   A.KV_PEER_ENGINE_ID: rec.peer_engine or None,
                                   A.KV_PEER_RANK: rec.prefill_rank})

    def _log_failure(self, failure_type: str, req_id: str | None, *args: Any, **kwargs: Any) -> None:
        if req_id is not None:
            err = kwargs.get("error")
            reason = failure_type + (f": {type(err).__name__}: {err}" if err is not None else "")
            self._hy_state().failures.setdefault(req_id, reason[:200])
        super()._log_failure(failure_type, req_id, *args, **kwargs)  # type: ignore[misc]

    def _hy_stats(self) -> Any:
        return getattr(self, "xfer_stats", None)

    # upstream: NixlBaseConnectorWorker.get_kv_connector_stats (extended)
    def get_kv_connector_stats(self) -> Any:
        for row in self._hy_state().spans.rows():
            handover.record(self._hy_stats(), SPANS_KEY, row)
        return super().get_kv_connector_stats()  # type: ignore[misc]

    def get_transfer_results(self) -> Any:
        res = super().get_transfer_results()  # type: ignore[misc]
        st = self._hy_state()
        now = now_ns()
        failed = set(getattr(res, "failed_recving", ()) or ())
        for rid in res.finished_recving:
            tr = st.transfers.pop(rid, None)
            if tr is not None:
                self._hy_end_transfer(rid, tr, now, rid in failed)
            st.failures.pop(rid, None)
            st.info.pop(rid, None)
        for rid in res.finished_sending:
            hold = st.holds.pop(rid, None)
            if hold is not None:
                expired = hold[1]
                self._hy_emit(A.SPAN_KV_NOTIFY, rid, hold[0], now, {
                    A.KV_STATUS: "aborted" if expired else "done",
                    A.KV_FAILURE_REASON: "lease expired before the decode side's notification"
                    if expired else None,
                }, "lease_expired" if expired else "")
            st.info.pop(rid, None)
        return res

    def _hy_end_transfer(self, rid: str, tr: _Transfer, now: int, failed: bool) -> None:
        st = self._hy_state()
        fail = (st.failures.get(rid) or "failed") if failed else ""
        proxy_rid = st.info.get(rid, {}).get("request_id")
        if proxy_rid and not failed:
            off = clock_offset_ns()
            cold = st.handshakes.get(tr.peer_engine, 0) >= tr.load
            handover.record(self._hy_stats(), handover.D_WORKER_KEY, [
                proxy_rid, int(getattr(self, "tp_rank", 0)), tr.load + off, tr.t0 + off,
                (tr.posted or tr.t0) + off, (tr.done or now) + off, int(cold)])
        self._hy_emit(A.SPAN_KV_TRANSFER, rid, tr.t0, now, lambda: {
            A.KV_READS: tr.reads, A.KV_BYTES: tr.bytes, A.KV_DESCRIPTORS: tr.descriptors,
            A.KV_PEER_ENGINE_ID: tr.peer_engine, A.KV_LAYER_KIND: "mixed",
            A.KV_BACKEND: BACKEND, A.KV_STATUS: "failed" if fail else "done",
            A.KV_FAILURE_REASON: fail or None,
        }, fail)

    def _reap_expired_send_leases(self, done_sending: set[str]) -> None:
        before = set(done_sending)
        super()._reap_expired_send_leases(done_sending)  # type: ignore[misc]
        st = self._hy_state()
        for rid in done_sending - before:
            if rid in st.holds:
                st.holds[rid][1] = True


__all__ = ["META_ATTR", "TracedSchedulerMixin", "TracedWorkerMixin", "desc_stats"]
