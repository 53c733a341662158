"""Recorded stamps -> finished spans, for every emitter of KV-transfer spans.

The read path (:mod:`hybrid_pd.transfer.reads`) writes plain ``time.monotonic_ns()``
stamps into :class:`~hybrid_pd.transfer.reads.ReadResult` records; after the fact, this
recorder turns them into spans with explicit start/end times.  The vLLM worker (ours and
upstream's, :mod:`hybrid_pd.connector.vllm_tracing`) and the bench executor both emit
through it, so a READ span means the same thing wherever it came from.

A non-recording tracer costs one ``start_span`` + ``end`` per span and no attribute
work: attribute dicts are only built once ``span.is_recording()`` said yes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context

from hybrid_pd.telemetry import attributes as A

BACKEND = "UCX"
_STATUS = {"DONE": "done", "ERR": "failed", "POST_FAILED": "failed", "TIMEOUT": "timeout",
           "ABORTED": "aborted", "PROC": "aborted"}

Attrs = Mapping[str, A.AttrValue | None]


def clock_offset_ns() -> int:
    """monotonic -> wall clock (span times are wall-clock ns)."""
    return time.time_ns() - time.monotonic_ns()


def read_attrs(rec: Any) -> dict[str, A.AttrValue | None]:
    """Attributes of one READ span from its :class:`ReadResult`.

    ``kv.bytes`` / ``kv.descriptors``: what NIXL reported for the READ when it reported
    (its descriptor count is after merging adjacent descriptors, the number vLLM's
    ``vllm:nixl_num_descriptors`` counts), else what we posted."""
    t = rec.telemetry
    attrs: dict[str, A.AttrValue | None] = {
        A.KV_LAYER_KIND: rec.kind or "mixed",
        A.KV_PEER_RANK: rec.prefill_rank,
        A.KV_PEER_ENGINE_ID: rec.peer_engine or None,
        A.KV_BACKEND: BACKEND,
        A.KV_POLLS: rec.polls,
        A.KV_STATUS: _STATUS.get(rec.status, rec.status.lower()),
        A.KV_BYTES: t.total_bytes if t is not None else rec.bytes,
        A.KV_DESCRIPTORS: t.desc_count if t is not None else rec.descriptors,
    }
    if rec.layer is not None:
        attrs[A.KV_LAYER] = rec.layer
        if rec.group >= 0:
            attrs[A.KV_GROUP] = rec.group
    if rec.t_done_ns:
        attrs[A.KV_COMPLETION_LAG_NS] = rec.t_done_ns - rec.t_prev_poll_ns
    if t is not None:
        attrs[A.KV_NIXL_POST_US] = float(t.post_us)
        attrs[A.KV_NIXL_XFER_US] = float(t.xfer_us)
        attrs[A.KV_NIXL_DESC_COUNT] = t.desc_count
    if rec.status != "DONE":
        attrs[A.KV_FAILURE_REASON] = rec.reason[:200] or rec.status
    return attrs


def read_window(rec: Any) -> tuple[int, int]:
    """A READ record's (start, end), monotonic ns: handle creation (else the post) to the
    outcome seen -- the read span's, and the connector's READ-time metric's."""
    t0 = rec.t_make_ns or rec.t_post_ns or rec.t_end_ns
    return t0, rec.t_end_ns or rec.t_done_ns or t0


class SpanRecorder:
    """Emits finished spans from monotonic stamps on one tracer.

    ``base`` attributes go on every span (who emitted it: connector, rank, engine);
    ``request_attrs(req_id)`` adds the per-request ones (the proxy's request id)."""

    def __init__(self, tracer: trace.Tracer, base: Attrs,
                 request_attrs: Callable[[str], Attrs] | None = None) -> None:
        self.tracer = tracer
        self.base = dict(base)
        self._request_attrs = request_attrs
        self.spans = 0  # spans that recorded
        self.ns = 0  # perf_counter ns spent building them

    def emit(self, name: str, ctx: Context | None, t0: int, t1: int,
             attrs: Attrs | Callable[[], Attrs], *, req_id: str | None = None,
             fail: str = "", off: int | None = None) -> trace.Span:
        """One finished span from monotonic ``t0``..``t1``; ``attrs`` may be a callable
        so that nothing is built for a non-recording tracer."""
        c0 = time.perf_counter_ns()
        off = clock_offset_ns() if off is None else off
        span = self.tracer.start_span(name, context=ctx, start_time=t0 + off)
        if span.is_recording():
            if fail:  # first, so that kv.status / kv.failure_reason below win
                A.mark_failed(span, fail)
            values = attrs() if callable(attrs) else attrs
            extra = self._request_attrs(req_id) if (req_id and self._request_attrs) else {}
            A.set_attrs(span, {**self.base, **extra, **values})
            self.spans += 1
        span.end(end_time=max(t1, t0) + off)
        self.ns += time.perf_counter_ns() - c0
        return span

    def read(self, ctx: Context | None, rec: Any, *, req_id: str | None = None,
             extra: Attrs | None = None, off: int | None = None) -> None:
        """The READ span of one record: post (or handle creation) to its outcome."""
        t0, t1 = read_window(rec)
        fail = "" if rec.status == "DONE" else (rec.reason[:200] or rec.status)
        self.emit(A.SPAN_KV_READ, ctx, t0, t1,
                  lambda: {**read_attrs(rec), **(extra or {})}, req_id=req_id, fail=fail,
                  off=off)

    def stall_and_abort(self, ctx: Context | None, t_start: int, t_abort: int, t_end: int,
                        aborted: list[Any], reason: str, *, stalled: bool,
                        req_id: str | None = None, extra: Attrs | None = None,
                        off: int | None = None) -> None:
        """Reads given up: on a stall timeout the wait (``kv.stall``, from the start to
        the decision), then the give-up (``kv.abort``, the releases)."""
        status = "timeout" if stalled else "aborted"
        more = dict(extra or {})
        if stalled:
            self.emit(A.SPAN_KV_STALL, ctx, t_start, t_abort, lambda: {
                **more, A.KV_READS: len(aborted), A.KV_WAITED_MS: (t_abort - t_start) / 1e6,
                A.KV_STATUS: "timeout", A.KV_FAILURE_REASON: reason[:200],
            }, req_id=req_id, fail="stall timeout", off=off)
        self.emit(A.SPAN_KV_ABORT, ctx, t_abort, t_end, lambda: {
            **more, A.KV_READS: len(aborted), A.KV_BYTES: sum(r.bytes for r in aborted),
            A.KV_WAITED_MS: (t_end - t_start) / 1e6, A.KV_STATUS: status,
            A.KV_FAILURE_REASON: reason[:200],
        }, req_id=req_id, fail=status, off=off)


__all__ = ["BACKEND", "SpanRecorder", "clock_offset_ns", "read_attrs", "read_window"]
