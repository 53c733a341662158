"""The handover breakdown of one P/D request: its time to first token in 12 phases.

The proxy stamps its own instants (request in, P called, P's answer in, first token
out); P's answer carries P's (``kv_transfer_params[HANDOVER_PARAMS_KEY]``); D's API
server serves D's (``GET /hybrid_pd/handover/{request_id}``, see
:mod:`hybrid_pd.connector.handover`).  The 13 instants bound the phases of
``attributes.TTFT_PHASES``; each phase becomes a ``hybrid_pd.ttft.<phase>`` span under
the request's span, and the phases also feed ``hybrid_pd_proxy_handover_phase_seconds``.

All instants are wall-clock nanoseconds.  Between hosts the clocks differ: an instant
that another host's clock puts before the previous one (or after the first token) is
moved to the nearest bound, and the phase says by how much (``hybrid_pd.ttft.skew_ns``),
so the phases still tile the proxy's own TTFT exactly; on one box nothing moves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from opentelemetry import trace
from opentelemetry.trace import Span, Tracer
from prometheus_client import Counter, Histogram

from hybrid_pd.settings import HANDOVER_PARAMS_KEY, HANDOVER_ROUTE, ROUTE_HEADER
from hybrid_pd.telemetry import attributes as A

logger = logging.getLogger("hybrid_pd.proxy")

# D's instants reach its API server with the step that sampled the first token; the
# proxy asks once the answer is out, so a short wait covers a late stats delivery.
FETCH_TRIES = 10
FETCH_WAIT_S = 0.1
FETCH_TIMEOUT_S = 2.0

# D's instants, in tiling order after D's arrival.
D_KEYS = ("d_arrival_ns", "d_load_ns", "d_read_begin_ns", "d_posted_ns", "d_done_ns",
          "d_noticed_ns", "d_first_token_ns")

# The phases' span names, in tiling order (the bounds of phase i: instants i and i + 1).
PHASE_SPANS = (
    A.SPAN_TTFT_ROUTER_RECEIVE, A.SPAN_TTFT_P_QUEUE, A.SPAN_TTFT_P_PREFILL, A.SPAN_TTFT_P_ANSWER,
    A.SPAN_TTFT_ROUTER_TO_D, A.SPAN_TTFT_D_QUEUE, A.SPAN_TTFT_HANDSHAKE, A.SPAN_TTFT_READ_POST,
    A.SPAN_TTFT_READ_IN_FLIGHT, A.SPAN_TTFT_COMPLETION_NOTICED, A.SPAN_TTFT_D_FIRST_STEP,
    A.SPAN_TTFT_FIRST_TOKEN_SENT,
)

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0, 30.0, 60.0)
PHASE_SECONDS = Histogram(
    "hybrid_pd_proxy_handover_phase_seconds",
    "Handover phases of P/D requests (the hybrid_pd.ttft.* spans), by phase.",
    ["phase"], buckets=_BUCKETS)
TTFT_SECONDS = Histogram(
    "hybrid_pd_proxy_ttft_seconds",
    "Time to first token of P/D requests as the proxy measured it.", buckets=_BUCKETS)
MISSING = Counter(
    "hybrid_pd_proxy_handover_missing",
    "P/D requests without a handover breakdown (an engine gave no instants), by engine.",
    ["engine"])


def now_ns() -> int:
    return time.time_ns()


@dataclass
class Handover:
    """The instants of one request, filled in as it goes."""

    request_id: str
    received_ns: int = field(default_factory=now_ns)
    p_call_ns: int = 0
    p_answer_ns: int = 0
    p: dict[str, int] = field(default_factory=dict)
    input_tokens: int | None = None
    first_token_ns: int = 0
    prefill_url: str = ""  # the P engine that answered (D's hand-off names it)

    def prefill_answered(self, answer: dict[str, Any], called_ns: int) -> None:
        self.p_call_ns, self.p_answer_ns = called_ns, now_ns()
        params = answer.get("kv_transfer_params")
        p = params.get(HANDOVER_PARAMS_KEY) if isinstance(params, dict) else None
        self.p = {k: int(v) for k, v in p.items()} if isinstance(p, dict) else {}
        usage = answer.get("usage")
        tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        self.input_tokens = tokens if isinstance(tokens, int) else None

    @property
    def ttft_ms(self) -> float:
        return (self.first_token_ns - self.received_ns) / 1e6

    def instants(self, d: dict[str, Any]) -> list[int]:
        """The 13 phase bounds, in order (KeyError when an engine's are missing)."""
        return [self.received_ns, self.p_call_ns, self.p["p_sched_ns"], self.p["p_done_ns"],
                self.p_answer_ns, *(int(d[k]) for k in D_KEYS), self.first_token_ns]


def tile(instants: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, skew_ns) per phase: each instant held within [previous instant, last
    instant], so the phases are >= 0 and sum to last - first exactly."""
    last = instants[-1]
    out: list[tuple[int, int, int]] = []
    prev = instants[0]
    for mark in instants[1:]:
        held = min(max(mark, prev), last)
        out.append((prev, held, abs(held - mark)))
        prev = held
    return out


async def fetch_d(http: httpx.AsyncClient, d_url: str, request_id: str) -> dict[str, Any] | None:
    """D's instants of ``request_id`` from its API server, None when it has none."""
    url = f"{d_url}{HANDOVER_ROUTE}/{quote(request_id, safe='')}"
    for _ in range(FETCH_TRIES):
        try:
            resp = await http.get(url, timeout=FETCH_TIMEOUT_S)
        except httpx.HTTPError as exc:
            logger.debug("handover of %s: D unreachable: %r", request_id, exc)
            return None
        if resp.status_code == 200:
            return resp.json()
        if resp.status_code != 404 or ROUTE_HEADER not in resp.headers:
            return None  # an engine without our route (upstream's connector): no retries
        await asyncio.sleep(FETCH_WAIT_S)
    return None


def emit(tracer: Tracer, root: Span, h: Handover, d: dict[str, Any]) -> bool:
    """The phase spans of one request under ``root``; False when an engine's instants
    are missing (nothing emitted)."""
    try:
        phases = tile(h.instants(d))
    except (KeyError, TypeError, ValueError):
        MISSING.labels(engine="prefill" if not h.p else "decode").inc()
        return False
    ctx = trace.set_span_in_context(root)
    common: dict[str, A.AttrValue | None] = {
        A.REQUEST_ID: h.request_id, A.TTFT_MS: h.ttft_ms, A.TTFT_COLD: bool(d.get("cold")),
        A.GEN_AI_USAGE_INPUT_TOKENS: h.input_tokens}
    for index, ((t0, t1, skew), name) in enumerate(zip(phases, PHASE_SPANS, strict=True)):
        phase = A.TTFT_PHASES[index]
        span = tracer.start_span(name, context=ctx, start_time=t0)
        A.set_attrs(span, {**common, A.TTFT_PHASE: phase, A.TTFT_INDEX: index,
                           A.TTFT_SKEW_NS: skew})
        span.end(end_time=t1)
        PHASE_SECONDS.labels(phase=phase).observe((t1 - t0) / 1e9)
    return True


def first_token(root: Span, h: Handover) -> None:
    """The first token went out: the TTFT on the request's span and the histogram."""
    h.first_token_ns = h.first_token_ns or now_ns()
    TTFT_SECONDS.observe(h.ttft_ms / 1e3)
    A.set_attrs(root, {A.TTFT_MS: h.ttft_ms, A.GEN_AI_USAGE_INPUT_TOKENS: h.input_tokens})


async def breakdown(tracer: Tracer, root: Span, h: Handover, http: httpx.AsyncClient,
                    d_url: str) -> None:
    """Ask D for its instants and emit the phases (a task after the answer went out)."""
    d = await fetch_d(http, d_url, h.request_id)
    if d is None:
        MISSING.labels(engine="decode").inc()
        logger.debug("request %s: D has no handover instants; no breakdown", h.request_id)
        return
    emit(tracer, root, h, d)


__all__ = ["Handover", "breakdown", "emit", "fetch_d", "first_token", "tile"]
