"""Spans from inside vLLM's NIXL pull connector: ours (``HybridNixlConnector``) and
upstream's (through the ``nixl-upstream-tracing`` engine patch).

Two mixins sit in front of upstream's classes and wrap upstream's method boundaries, so
the same code traces both connectors (house rule: one instrumentation, two users):

* :class:`TracedSchedulerMixin` copies each request's trace hand-off
  (``kv_transfer_params["hybrid_pd_trace"]``, put there by the proxy) into the connector
  metadata (attribute ``hybrid_pd_trace``: req id -> {traceparent, request_id}); the
  metadata reaches every worker (pickled for TP > 1), so worker spans join the request's
  trace.
* :class:`TracedWorkerMixin` emits, per worker rank:

  - ``hybrid_pd.kv.desc_build`` for each descriptor list upstream (or we) build:
    ``kv.desc.scope`` local (registration) / remote (per handshake, under the
    ``hybrid_pd.kv.handshake`` span) / request (block ids -> descriptor ids);
  - ``hybrid_pd.kv.transfer`` on D: a request's whole pull, from the first read attempt
    (including a handshake it waited for) to the step that reports it finished;
  - ``hybrid_pd.kv.read`` per NIXL READ handle, post to completion, with NIXL's own
    post/transfer durations, bytes and descriptor count from ``get_xfer_telemetry``;
  - ``hybrid_pd.kv.abort`` when a READ is given up (stall timeout, NIXL error);
  - ``hybrid_pd.kv.notify`` on P: the request's blocks held for D, from the step that
    handed them over to the notification that D is done (or the lease expiry).

Timing: vLLM polls NIXL once per engine step (``get_finished``), so the step that sees
DONE can be late.  A read span ends at that poll, and ``kv.completion_lag_ns`` bounds the
lag (that poll minus the previous one); NIXL's ``kv.nixl.xfer_us`` is the unquantized
transfer time.  Spans are built after the fact from recorded ``time.time_ns()`` stamps,
never on the transfer's critical path.

Stall timeout (``kv_connector_extra_config["hybrid_read_timeout_s"]``): a READ still
``PROC`` after that many seconds is released (NIXL aborts it) and reported through
upstream's ``_handle_failed_transfer``, so vLLM's ``kv_load_failure_policy`` applies and
the request's blocks are freed; P frees its side at lease expiry.  Known limit (measured,
tests/e2e/test_faults.py): NIXL 1.5.1's release of an in-flight READ returns OK but does
not cancel it over UCX/TCP -- a P that was frozen (SIGSTOP) and resumes still delivers the
bytes into D blocks that may meanwhile belong to another request.  A dead P cannot; a
frozen one for longer than the timeout (default 60 s) is what this trades for "nothing
hangs".
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from opentelemetry import trace
from opentelemetry.context import Context

from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry import engine as tel

logger = logging.getLogger("hybrid_pd.connector")

META_ATTR = "hybrid_pd_trace"
TIMEOUT_KEY = "hybrid_read_timeout_s"


def _desc_stats(descs: Any) -> tuple[int, int]:
    """(count, bytes) of an Nx3 (addr, len, dev) descriptor array or list."""
    arr = np.asarray(descs, dtype=np.uint64).reshape(-1, 3)
    return int(arr.shape[0]), int(arr[:, 1].sum())


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
class _Read:
    req_id: str
    peer_engine: str
    peer_rank: int
    t_post: int
    last_poll: int
    prev_poll: int = 0
    done: int = 0
    polls: int = 0
    telemetry: tuple[float, float, int, int] | None = None  # post_us, xfer_us, bytes, descs
    failure: str = ""
    layer: int | None = None  # per-layer reads (our connector's layer granularity)
    kind: str = "mixed"


@dataclass
class _Transfer:
    req_id: str
    t0: int
    peer_engine: str
    reads: int = 0
    bytes: int = 0
    descriptors: int = 0
    failure: str = ""


@dataclass
class _Hold:
    t0: int
    expired: bool = False


@dataclass
class _State:
    tracer: trace.Tracer
    connector: str
    rank: int
    tp: int
    engine_id: str
    timeout_ns: int | None
    info: dict[str, dict[str, str]] = field(default_factory=dict)
    reads: dict[int, _Read] = field(default_factory=dict)
    transfers: dict[str, _Transfer] = field(default_factory=dict)
    holds: dict[str, _Hold] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    adding: tuple[str, int, int] | None = None  # (engine, rank, tp) during add_remote_agent
    map_t0: int = 0
    map_t1: int = 0
    map_ids: int = 0
    aborted: int = 0


class TracedWorkerMixin:
    """Front of a ``NixlPullConnectorWorker`` (ours or upstream's); see the module doc."""

    HY_CONNECTOR = "upstream"

    # -- state (lazy: the upstream class is swapped in after __init__) -----------------
    def _hy_state(self) -> _State:
        st = self.__dict__.get("_hy_tracing")
        if st is None:
            w: Any = self
            extra = getattr(w.vllm_config.kv_transfer_config, "kv_connector_extra_config", None) or {}
            timeout = extra.get(TIMEOUT_KEY)
            try:
                timeout_ns = int(float(timeout) * 1e9) if timeout is not None else None
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"kv_connector_extra_config.{TIMEOUT_KEY}={timeout!r} is not a number of "
                    "seconds; give e.g. 30"
                ) from exc
            st = _State(
                tracer=tel.engine_tracer(f"{w.engine_id}-rank{w.tp_rank}"),
                connector=self.HY_CONNECTOR, rank=w.tp_rank,
                tp=w.vllm_config.parallel_config.tensor_parallel_size,
                engine_id=w.engine_id, timeout_ns=timeout_ns,
            )
            self.__dict__["_hy_tracing"] = st
        return st

    def _hy_ctx(self, req_id: str) -> Context | None:
        return tel.context_of(self._hy_state().info.get(req_id))

    def _hy_emit(self, name: str, req_id: str | None, t0: int, t1: int,
                 attrs: dict[str, A.AttrValue | None], fail: str = "") -> None:
        st = self._hy_state()
        ctx = self._hy_ctx(req_id) if req_id is not None else None
        span = st.tracer.start_span(name, context=ctx, start_time=t0)
        if span.is_recording():
            if fail:
                A.mark_failed(span, fail)
            base: dict[str, A.AttrValue | None] = {
                A.CONNECTOR: st.connector, A.KV_RANK: st.rank, A.KV_TP_SIZE: st.tp,
                A.ENGINE_ID: st.engine_id,
            }
            if req_id is not None:
                base[A.REQUEST_ID] = st.info.get(req_id, {}).get("request_id", req_id)
            A.set_attrs(span, {**base, **attrs})
        span.end(end_time=max(t1, t0))

    # -- descriptor builds ---------------------------------------------------------------
    def _hy_build(self, scope: str, view: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.time_ns()
        out = fn(*args, **kwargs)
        t1 = time.time_ns()
        st = self._hy_state()
        n, nbytes = _desc_stats(out)
        attrs: dict[str, A.AttrValue | None] = {
            A.KV_DESC_SCOPE: scope, A.KV_VIEW: view, A.KV_DESCRIPTORS: n, A.KV_BYTES: nbytes,
        }
        if scope == "remote" and st.adding is not None:
            attrs.update({A.KV_PEER_ENGINE_ID: st.adding[0], A.KV_PEER_RANK: st.adding[1],
                          A.KV_PEER_TP_SIZE: st.adding[2]})
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
        with st.tracer.start_as_current_span(
            A.SPAN_KV_HANDSHAKE, record_exception=False, set_status_on_exception=False,
        ) as span:
            A.set_attrs(span, {A.CONNECTOR: st.connector, A.KV_RANK: st.rank, A.KV_TP_SIZE: st.tp,
                               A.ENGINE_ID: st.engine_id, A.KV_PEER_ENGINE_ID: expected_engine_id,
                               A.KV_PEER_TP_SIZE: remote_tp_size})
            try:
                return super()._nixl_handshake(  # type: ignore[misc]
                    host, port, remote_tp_size, expected_engine_id, *args, **kwargs)
            except Exception as exc:
                A.mark_failed(span, f"{type(exc).__name__}: {exc}"[:200], exc)
                raise

    # -- requests ------------------------------------------------------------------------
    def start_load_kv(self, metadata: Any) -> None:
        st = self._hy_state()
        st.info.update(getattr(metadata, META_ATTR, None) or {})
        now = time.time_ns()
        for rid in getattr(metadata, "reqs_to_send", {}) or {}:
            st.holds.setdefault(rid, _Hold(now))
        super().start_load_kv(metadata)  # type: ignore[misc]

    def _read_blocks_for_req(self, req_id: str, meta: Any) -> None:
        st = self._hy_state()
        if req_id not in st.transfers and meta.remote is not None:
            st.transfers[req_id] = _Transfer(req_id, time.time_ns(), meta.remote.engine_id)
        super()._read_blocks_for_req(req_id, meta)  # type: ignore[misc]

    def _compute_desc_ids(self, *args: Any, **kwargs: Any) -> Any:
        st = self._hy_state()
        t0 = time.time_ns()
        out = super()._compute_desc_ids(*args, **kwargs)  # type: ignore[misc]
        if not st.map_t0:
            st.map_t0 = t0
        st.map_t1 = time.time_ns()
        st.map_ids = len(out)
        return out

    def _read_blocks(self, read_spec: Any, dst_engine_id: str, request_id: str,
                     *args: Any, **kwargs: Any) -> bool:
        st = self._hy_state()
        w: Any = self
        before = set(w._recving_transfers.get(request_id, ()))
        st.map_t0 = st.map_t1 = st.map_ids = 0
        t0 = time.time_ns()
        ok = super()._read_blocks(read_spec, dst_engine_id, request_id, *args, **kwargs)  # type: ignore[misc]
        t1 = time.time_ns()
        new = [h for h in w._recving_transfers.get(request_id, ()) if h not in before]
        plan = w.__dict__.pop("_hy_last_plan", None)  # ours: (t0, t1, bytes, descriptors)
        if st.map_t0 or plan is not None:
            m0 = plan[0] if plan is not None else st.map_t0
            m1 = st.map_t1 or (plan[1] if plan is not None else t1)
            self._hy_emit(A.SPAN_KV_DESC_BUILD, request_id, m0, m1, {
                A.KV_DESC_SCOPE: "request", A.KV_VIEW: "all",
                A.KV_DESCRIPTORS: plan[3] if plan is not None else st.map_ids,
                A.KV_BYTES: plan[2] if plan is not None else None,
                A.KV_PEER_ENGINE_ID: dst_engine_id, A.KV_PEER_RANK: read_spec.remote_rank,
            })
        post = st.map_t1 or (plan[1] if plan is not None else t0)
        tr = st.transfers.get(request_id)
        layers = w.__dict__.pop("_hy_last_layers", None)  # ours, per-layer: in post order
        if layers is not None and len(layers) != len(new):
            layers = None
        for i, h in enumerate(new):
            rec = st.reads[h] = _Read(request_id, dst_engine_id, read_spec.remote_rank, post, t1)
            if layers is not None:
                rec.layer, rec.kind = layers[i][0], layers[i][1] or "mixed"
            if tr is not None:
                tr.reads += 1
        if not ok:
            st.failures.setdefault(request_id, "transfer_setup_failed")
        return ok

    def _log_failure(self, failure_type: str, req_id: str | None, *args: Any, **kwargs: Any) -> None:
        if req_id is not None:
            err = kwargs.get("error")
            reason = failure_type + (f": {type(err).__name__}: {err}" if err is not None else "")
            self._hy_state().failures.setdefault(req_id, reason[:200])
        super()._log_failure(failure_type, req_id, *args, **kwargs)  # type: ignore[misc]

    def _pop_done_transfers(self, transfers: dict[str, list[int]]) -> tuple[set[str], set[str]]:
        st = self._hy_state()
        w: Any = self
        now = time.time_ns()
        stalled: set[str] = set()
        for req_id, handles in list(transfers.items()):
            for h in list(handles):
                rec = st.reads.get(h)
                if rec is None or rec.failure:
                    continue
                rec.polls += 1
                rec.prev_poll, rec.last_poll = rec.last_poll, now
                try:
                    state = w.nixl_wrapper.check_xfer_state(h)
                except Exception:
                    continue  # upstream's poll below reports it
                if state == "DONE":
                    rec.done = now
                    try:
                        t = w.nixl_wrapper.get_xfer_telemetry(h)
                        rec.telemetry = (float(t.postDuration), float(t.xferDuration),
                                         int(t.totalBytes), int(t.descCount))
                    except Exception:  # telemetry is best effort
                        rec.telemetry = None
                elif state == "PROC" and st.timeout_ns is not None and now - rec.t_post > st.timeout_ns:
                    rec.failure = f"stalled: READ not done after {(now - rec.t_post) / 1e9:.1f} s"
                    st.aborted += 1
                    w._log_failure(failure_type="transfer_stalled", req_id=req_id,
                                   msg=f"{rec.failure}; releasing the handle ({TIMEOUT_KEY})")
                    handles.remove(h)
                    if not w._handle_failed_transfer(req_id, h, stalled):
                        handles.append(h)  # NIXL would not cancel it: upstream retains it
                    self._hy_emit(A.SPAN_KV_ABORT, req_id, rec.t_post, now, {
                        A.KV_WAITED_MS: (now - rec.t_post) / 1e6, A.KV_STATUS: "timeout",
                        A.KV_FAILURE_REASON: rec.failure, A.KV_READS: 1,
                        A.KV_PEER_ENGINE_ID: rec.peer_engine, A.KV_PEER_RANK: rec.peer_rank,
                    }, fail="timeout")
        done, failed = super()._pop_done_transfers(transfers)  # type: ignore[misc]
        failed |= stalled
        live = {h for hs in transfers.values() for h in hs}
        for h in [h for h in st.reads if h not in live]:
            self._hy_end_read(st.reads.pop(h), now, failed)
        return done, failed

    def _hy_end_read(self, rec: _Read, now: int, failed: set[str]) -> None:
        st = self._hy_state()
        attrs: dict[str, A.AttrValue | None] = {
            A.KV_LAYER_KIND: rec.kind, A.KV_LAYER: rec.layer, A.KV_PEER_ENGINE_ID: rec.peer_engine,
            A.KV_PEER_RANK: rec.peer_rank, A.KV_BACKEND: "UCX", A.KV_POLLS: rec.polls,
        }
        if rec.telemetry is not None:
            post_us, xfer_us, nbytes, ndesc = rec.telemetry
            attrs.update({A.KV_NIXL_POST_US: post_us, A.KV_NIXL_XFER_US: xfer_us,
                          A.KV_BYTES: nbytes, A.KV_DESCRIPTORS: ndesc, A.KV_NIXL_DESC_COUNT: ndesc})
            tr = st.transfers.get(rec.req_id)
            if tr is not None:
                tr.bytes += nbytes
                tr.descriptors += ndesc
        fail = ""
        if rec.done:
            attrs[A.KV_STATUS] = "done"
            attrs[A.KV_COMPLETION_LAG_NS] = rec.done - rec.prev_poll
            end = rec.done
        elif not rec.failure and rec.req_id not in failed:
            # finished between our poll and upstream's (same step): done, lag unknown
            attrs[A.KV_STATUS] = "done"
            end = now
        else:
            fail = rec.failure or st.failures.get(rec.req_id) or "failed"
            attrs[A.KV_STATUS] = "timeout" if rec.failure else "failed"
            attrs[A.KV_FAILURE_REASON] = fail
            end = now
        self._hy_emit(A.SPAN_KV_READ, rec.req_id, rec.t_post, end, attrs, fail)

    def get_transfer_results(self) -> Any:
        res = super().get_transfer_results()  # type: ignore[misc]
        st = self._hy_state()
        now = time.time_ns()
        failed = set(getattr(res, "failed_recving", ()) or ())
        for rid in res.finished_recving:
            tr = st.transfers.pop(rid, None)
            if tr is not None:
                fail = (st.failures.get(rid) or "failed") if rid in failed else ""
                self._hy_emit(A.SPAN_KV_TRANSFER, rid, tr.t0, now, {
                    A.KV_READS: tr.reads, A.KV_BYTES: tr.bytes, A.KV_DESCRIPTORS: tr.descriptors,
                    A.KV_PEER_ENGINE_ID: tr.peer_engine, A.KV_LAYER_KIND: "mixed",
                    A.KV_STATUS: "failed" if fail else "done",
                    A.KV_FAILURE_REASON: fail or None,
                }, fail)
            st.failures.pop(rid, None)
            st.info.pop(rid, None)
        for rid in res.finished_sending:
            hold = st.holds.pop(rid, None)
            if hold is not None:
                expired = hold.expired
                self._hy_emit(A.SPAN_KV_NOTIFY, rid, hold.t0, now, {
                    A.KV_STATUS: "aborted" if expired else "done",
                    A.KV_FAILURE_REASON: "lease expired before the decode side's notification"
                    if expired else None,
                }, "lease_expired" if expired else "")
            st.info.pop(rid, None)
        return res

    def _reap_expired_send_leases(self, done_sending: set[str]) -> None:
        before = set(done_sending)
        super()._reap_expired_send_leases(done_sending)  # type: ignore[misc]
        st = self._hy_state()
        for rid in done_sending - before:
            if rid in st.holds:
                st.holds[rid].expired = True

