"""The bench executor's span tree for one request, built after the transfer from the
stamps in a :class:`RunLog` through the shared :class:`~hybrid_pd.telemetry.recorder.SpanRecorder`:
``kv.transfer`` (request start to after the notifications) holding one
``desc_build scope=request`` per peer, one ``kv.read`` per READ, ``kv.stall`` /
``kv.abort`` on a timeout and one ``kv.notify`` per standalone notification."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry.recorder import BACKEND, SpanRecorder, clock_offset_ns
from hybrid_pd.transfer.reads import ReadResult, short_reason

if TYPE_CHECKING:
    from hybrid_pd.planner.plan import ReadPlan
    from hybrid_pd.transfer.executor import NixlExecutor, RequestResult

__all__ = ["BACKEND", "RunLog", "SpanCost", "emit_failed_transfer", "emit_transfer"]


@dataclass
class SpanCost:
    """Time spent creating / filling / ending the read path's spans (perf_counter ns).

    All of it is spent after a request's READs are DONE (see the executor's doc)."""

    spans: int = 0
    ns: int = 0

    @property
    def us_per_span(self) -> float:
        return self.ns / self.spans / 1e3 if self.spans else 0.0


@dataclass
class RunLog:
    """What one request's read path saw, as plain monotonic stamps."""

    t_start: int
    # (t0, t1, read plan, READs) of each peer's block-id -> descriptor-id mapping
    maps: list[tuple[int, int, ReadPlan, int]] = field(default_factory=list)
    reads: list[ReadResult] = field(default_factory=list)  # in the order outcomes were seen
    stall: tuple[int, int, int, str] | None = None  # t0, t1, READs pending, reason
    abort: tuple[int, int, list[ReadResult], str] | None = None  # t0, t1, READs, reason
    # (t0, t1, peer rank, peer engine id, error) per standalone notification
    notifies: list[tuple[int, int, int, str, str]] = field(default_factory=list)


def emit_failed_transfer(ex: NixlExecutor, t_start: int, exc: BaseException) -> None:
    """A ``kv.transfer`` span for a request that raised (the caller re-raises)."""
    xfer = ex.tracer.start_span(A.SPAN_KV_TRANSFER, start_time=t_start + clock_offset_ns())
    if xfer.is_recording():
        xfer.set_attribute(A.CONNECTOR, ex.connector)
        A.mark_failed(xfer, short_reason(exc), exc)
    xfer.end()


def emit_transfer(ex: NixlExecutor, out: RequestResult, log: RunLog, engine_id: str) -> None:
    """The request's span tree from ``log`` (nothing but one no-op span when the tracer
    does not record)."""
    c0 = time.perf_counter_ns()
    off = clock_offset_ns()
    xfer = ex.tracer.start_span(A.SPAN_KV_TRANSFER, start_time=out.t_start_ns + off)
    if not xfer.is_recording():
        xfer.end()
        return
    assert ex.local_meta is not None
    rank, tp = ex.local_meta.layout.rank, ex.local_meta.layout.tp
    rec = SpanRecorder(ex.tracer, {A.CONNECTOR: ex.connector, A.REQUEST_ID: out.request_id,
                                   A.KV_RANK: rank})
    ctx = trace.set_span_in_context(xfer)
    for t0, t1, read, parts in log.maps:
        rec.emit(A.SPAN_KV_DESC_BUILD, ctx, t0, t1, {
            A.KV_DESC_SCOPE: "request", A.KV_VIEW: "all",
            A.KV_DESCRIPTORS: len(read.local_id_array), A.KV_BYTES: read.bytes, A.KV_READS: parts,
            A.KV_PEER_RANK: read.prefill_rank, A.KV_PEER_ENGINE_ID: engine_id,
        }, off=off)
    for r in log.reads:
        r.peer_engine = r.peer_engine or engine_id
        rec.read(ctx, r, off=off)
    if log.stall is not None or log.abort is not None:
        _emit_give_up(rec, ctx, log, off)
    for t0, t1, peer_rank, peer_engine, err in log.notifies:
        rec.emit(A.SPAN_KV_NOTIFY, ctx, t0, t1, {
            A.KV_PEER_RANK: peer_rank, A.KV_PEER_ENGINE_ID: peer_engine,
            A.KV_STATUS: "done" if out.status == "ok" else "failed",
            A.KV_FAILURE_REASON: err or None,
        }, fail="notify failed" if err else "", off=off)
    A.set_attrs(xfer, {
        A.CONNECTOR: ex.connector, A.REQUEST_ID: out.request_id,
        A.KV_RANK: rank, A.KV_TP_SIZE: tp, A.KV_PEER_ENGINE_ID: engine_id,
        A.KV_BYTES: out.bytes, A.KV_DESCRIPTORS: out.descriptors, A.KV_READS: len(out.reads),
        A.KV_POLLS: out.polls, A.KV_BACKEND: BACKEND,
        A.KV_STATUS: "done" if out.status == "ok" else "failed",
    })
    if out.status != "ok":
        A.mark_failed(xfer, out.reason[:200])
    xfer.end(end_time=out.t_notified_ns + off)
    out.emit_ns = time.perf_counter_ns() - c0
    ex.span_cost.spans += rec.spans + 1
    ex.span_cost.ns += out.emit_ns


def _emit_give_up(rec: SpanRecorder, ctx: Any, log: RunLog, off: int) -> None:
    if log.abort is not None:
        t_abort, t_end, aborted, reason = log.abort
    else:  # a stall noticed with nothing left to release cannot happen; be safe
        assert log.stall is not None
        t_abort = t_end = log.stall[1]
        aborted, reason = [], log.stall[3]
    rec.stall_and_abort(ctx, log.t_start, t_abort, t_end, aborted, reason,
                        stalled=log.stall is not None, off=off)
