"""Which P and which D a request runs on (pure logic: no HTTP, no clock, no I/O).

The proxy keeps one :class:`Pool` per role.  A pool chooses among its *healthy*
backends with a policy:

* ``least-outstanding`` (default): the backend with the fewest requests in flight
  through this proxy; ties go round the pool, so an idle pool is used evenly;
* ``round-robin``: the next healthy backend after the last one chosen.

With ``kv_aware`` (D only) the backend with the lower KV cache usage (``vllm:kv_cache_usage_perc``,
0..1, scraped from each D's ``/metrics``) wins first.  Usages within
:data:`KV_USAGE_STEP` of each other count as equal, and any backend whose usage is unknown
makes the whole choice least-outstanding.  The usage is seconds old by the time
it is read, so a slightly emptier D must not take every new request.

A backend whose call fails *for the engine's sake* (:func:`is_backend_failure`) is taken
out until a health probe (or a request sent to it) succeeds again.  When every backend of a
role is out, a request still goes to the one that has been out longest.  A pool of one then
behaves as the proxy did before pools, and a backend that has come back is found even
before its next probe.  A full backend (every call slot in use) is chosen only when all
are full, and then its 503 stands.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

POLICIES = ("least-outstanding", "round-robin")
DEFAULT_POLICY = "least-outstanding"
# KV cache usages closer than this are a tie (then: fewest in flight).
KV_USAGE_STEP = 0.05
# Seconds between health probes of every backend (GET /health), and between KV usage scrapes.
HEALTH_INTERVAL_S = 5.0
KV_REFRESH_S = 1.0

# EngineError.cause values (hybrid_pd.serve.proxy_calls) that say the engine failed.
CAUSE_ANSWER = "answer"  # the engine itself answered with an HTTP error status
CAUSE_UNREACHABLE = "unreachable"  # refused, reset, DNS, broken connection
CAUSE_TIMEOUT = "timeout"  # no answer in time (not a full pool of ours: that is "busy")
# ... and those that do not: our own call limit, or something we refused in the answer.
CAUSE_BUSY = "busy"
CAUSE_PROXY = "proxy"


def is_backend_failure(cause: str, status: int) -> bool:
    """True when a failed call says the *engine* is unwell: it could not be reached, did
    not answer in time, or answered 5xx.  A 4xx is about the request, and "busy" (our own
    call limit) or a malformed answer says nothing about the engine's health."""
    return cause in (CAUSE_UNREACHABLE, CAUSE_TIMEOUT) or (cause == CAUSE_ANSWER and status >= 500)


@dataclass
class Backend:
    """One engine of a pool and what the router knows about it."""

    url: str
    role: str  # "prefill" | "decode"
    capacity: int = 1 << 30  # calls in flight at most (the proxy's per-engine slots)
    in_flight: int = 0
    healthy: bool = True
    out_since: float | None = None  # when it was taken out (caller's clock); None: in
    last_error: str | None = None
    kv_usage: float | None = None  # 0..1; None: unknown (not scraped, or the scrape failed)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def full(self) -> bool:
        return self.in_flight >= self.capacity


def _kv_key(b: Backend) -> int:
    assert b.kv_usage is not None
    return int(b.kv_usage / KV_USAGE_STEP)


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"unknown routing policy {policy!r}: choose one of {', '.join(POLICIES)}")
    return policy


def pick(candidates: Sequence[Backend], policy: str, kv_aware: bool = False) -> Backend:
    """The backend ``policy`` picks from ``candidates`` (non-empty, already in rotation
    order: the first one is next in turn, so ties go round the pool)."""
    if check_policy(policy) == "round-robin":
        return next((b for b in candidates if not b.full), candidates[0])
    if kv_aware and all(b.kv_usage is not None for b in candidates):
        return min(candidates, key=lambda b: (b.full, _kv_key(b), b.in_flight))
    return min(candidates, key=lambda b: (b.full, b.in_flight))  # min keeps the first of ties


class Pool:
    """The backends of one role; chooses the next one and tracks which are out."""

    def __init__(self, role: str, urls: Iterable[str], policy: str = DEFAULT_POLICY,
                 kv_aware: bool = False, capacity: int = 1 << 30) -> None:
        self.role, self.policy, self.kv_aware = role, check_policy(policy), kv_aware
        self.backends = [Backend(url, role, capacity) for url in urls]
        if not self.backends:
            raise ValueError(f"a {role} pool needs at least one backend URL")
        self._next = 0  # index where the next rotation starts

    def healthy(self) -> list[Backend]:
        return [b for b in self.backends if b.healthy]

    def choose(self, exclude: Iterable[Backend] = (), healthy_only: bool = False) -> Backend | None:
        """The backend for the next call (see the module docstring); None when
        ``exclude`` leaves nothing (or, with ``healthy_only``, nothing healthy)."""
        skip = {id(b) for b in exclude}
        n = len(self.backends)
        order = [self.backends[(self._next + i) % n] for i in range(n)]
        order = [b for b in order if id(b) not in skip]
        healthy = [b for b in order if b.healthy]
        if healthy:
            chosen = pick(healthy, self.policy, self.kv_aware)
        elif order and not healthy_only:
            chosen = min(order, key=lambda b: b.out_since or 0.0)  # out longest: try it again
        else:
            return None
        self._next = (self.backends.index(chosen) + 1) % n
        return chosen

    def retry_target(self, failed: Backend) -> Backend | None:
        """Another healthy backend for a call that failed on ``failed`` (None: no other)."""
        return self.choose(exclude=(failed,), healthy_only=True)

    @staticmethod
    def take_out(b: Backend, reason: str, now: float) -> bool:
        """Take ``b`` out; True when it was in (it is newly out)."""
        was_in = b.healthy
        b.healthy, b.last_error = False, reason
        if was_in:
            b.out_since = now
        return was_in

    @staticmethod
    def bring_back(b: Backend) -> bool:
        """Put ``b`` back in; True when it was out."""
        was_out = not b.healthy
        b.healthy, b.out_since, b.last_error = True, None, None
        return was_out
