"""The proxy's engines: a :class:`~.router.Pool` of P backends and one of D backends, one
pooled HTTP client per backend (:class:`~.proxy_calls.EngineClient`, each with its own
call slots), the health checks that take backends out and bring them back, the KV usage
scrapes of ``kv_aware``, and per-backend Prometheus metrics.

Metrics (prometheus_client's default registry, which the proxy's ``/metrics`` serves),
each labelled ``role`` (``prefill`` | ``decode``) and ``backend`` (its URL):

* ``hybrid_pd_proxy_backend_requests_total``: calls sent to it (a P call retried on
  another P counts once on each);
* ``hybrid_pd_proxy_backend_failures_total``: calls that failed for the engine's sake
  (:func:`~.router.is_backend_failure`; a D stream that broke counts too), each of
  which took it out;
* ``hybrid_pd_proxy_backend_in_flight``: its calls in flight through this proxy. A D
  counts a request from its reservation (before P runs) to the end of its answer;
* ``hybrid_pd_proxy_backend_healthy``: 1 while in, 0 while out;
* ``hybrid_pd_proxy_backend_kv_cache_usage``: a D's last scraped KV cache usage (0..1;
  NaN when unknown), only with ``kv_aware``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import httpx
from prometheus_client import Counter, Gauge

from hybrid_pd.metrics import parse_kv_cache_usage
from hybrid_pd.serve.proxy_calls import HEALTH_TIMEOUT_S, EngineClient, EngineError, Slot
from hybrid_pd.serve.router import Backend, Pool, is_backend_failure

if TYPE_CHECKING:
    from hybrid_pd.serve.proxy import ProxyConfig

logger = logging.getLogger("hybrid_pd.proxy")
ROLES = ("prefill", "decode")
_LABELS = ("role", "backend")
# Registered once per process; every proxy app of the process labels its own backends.
REQUESTS = Counter("hybrid_pd_proxy_backend_requests", "Calls the proxy sent to each engine", _LABELS)
FAILURES = Counter("hybrid_pd_proxy_backend_failures",
                   "Calls that failed for the engine's sake (unreachable, timeout, 5xx, broken stream)",
                   _LABELS)
IN_FLIGHT = Gauge("hybrid_pd_proxy_backend_in_flight", "Calls in flight through this proxy", _LABELS)
HEALTHY = Gauge("hybrid_pd_proxy_backend_healthy", "1: the router uses it; 0: taken out", _LABELS)
KV_USAGE = Gauge("hybrid_pd_proxy_backend_kv_cache_usage",
                 "Last scraped vllm:kv_cache_usage_perc (0..1; NaN: unknown)", _LABELS)


def health_answer(statuses: dict[str, dict[str, str]]) -> tuple[int, dict]:
    """The proxy's ``/health`` (status, body) from each backend's probe result, by role
    and URL.  200 when at least one P and one D are "ok".  With one backend per role the
    body is ``{"prefill": <status>, "decode": <status>}``; when a role has several, each
    role says "ok" or "no healthy backend" and ``backends`` lists every backend."""
    body: dict = {}
    for role, by_url in statuses.items():
        if any(s == "ok" for s in by_url.values()):
            body[role] = "ok"
        else:
            body[role] = next(iter(by_url.values())) if len(by_url) == 1 else "no healthy backend"
    code = 200 if all(body[role] == "ok" for role in statuses) else 503
    if any(len(by_url) > 1 for by_url in statuses.values()):
        body["backends"] = statuses
    return code, body


class Engines:
    """Every backend of the proxy, its HTTP client and its state."""

    def __init__(self, config: ProxyConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.pools = {
            "prefill": Pool("prefill", config.urls("prefill"), config.policy,
                            capacity=config.max_connections),
            "decode": Pool("decode", config.urls("decode"), config.policy, config.kv_aware,
                           capacity=config.max_connections),
        }
        # One client (and connection pool) per engine: a saturated one cannot take the
        # others' connections.
        self._clients = {
            b.url: EngineClient(b.role, config.timeout_s, config.connect_timeout_s, transport,
                                config.max_connections)
            for b in self.backends()
        }
        self._tasks: list[asyncio.Task] = []
        for b in self.backends():
            self._register_metrics(b)

    def backends(self) -> list[Backend]:
        return [b for role in ROLES for b in self.pools[role].backends]

    def client(self, b: Backend) -> EngineClient:
        return self._clients[b.url]

    def choose(self, role: str) -> Backend:
        chosen = self.pools[role].choose()
        assert chosen is not None  # a pool is never empty, and choose falls back to any
        return chosen

    def _register_metrics(self, b: Backend) -> None:
        labels = (b.role, b.url)
        REQUESTS.labels(*labels)  # listed at 0 before the first call
        FAILURES.labels(*labels)
        IN_FLIGHT.labels(*labels).set_function(lambda: b.in_flight)
        HEALTHY.labels(*labels).set_function(lambda: float(b.healthy))
        if b.role == "decode" and self.config.kv_aware:
            KV_USAGE.labels(*labels).set_function(
                lambda: math.nan if b.kv_usage is None else b.kv_usage)

    # -- calls ------------------------------------------------------------------------

    def reserve(self, b: Backend) -> Slot:
        """One of ``b``'s call slots (503 at once when none is free), counted in flight
        until the call that takes it over gives it back."""
        slot = self.client(b).reserve()
        b.in_flight += 1

        def released() -> None:
            b.in_flight -= 1

        slot.on_release(released)
        return slot

    def calling(self, b: Backend) -> EngineClient:
        """``b``'s client, for a call about to be sent (counted as one of its requests)."""
        REQUESTS.labels(b.role, b.url).inc()
        return self.client(b)

    def failed(self, b: Backend, exc: EngineError) -> bool:
        """Note a failed call on ``b``; True (and ``b`` is out) when the engine failed."""
        if not is_backend_failure(exc.cause, exc.status):
            return False
        self._take_out(b, str(exc))
        return True

    def stream_ended(self, b: Backend, outcome: str) -> None:
        """A relayed D stream ended (see proxy_calls.Relayed); a broken one takes D out."""
        if outcome.startswith("failed: "):
            self._take_out(b, outcome[len("failed: "):])

    def _take_out(self, b: Backend, reason: str, count: bool = True) -> None:
        if count:  # a failed call (a failed health probe is no call)
            FAILURES.labels(b.role, b.url).inc()
        if Pool.take_out(b, reason, time.monotonic()):
            logger.warning("%s backend %s taken out: %s", b.role, b.url, reason)

    def succeeded(self, b: Backend) -> None:
        if Pool.bring_back(b):
            logger.info("%s backend %s answered again: back in", b.role, b.url)

    def retry_target(self, failed: Backend, exc: EngineError) -> Backend | None:
        """Another healthy backend of ``failed``'s role for a call that failed for the
        engine's sake; None when it failed otherwise or there is no other."""
        if not is_backend_failure(exc.cause, exc.status):
            return None
        return self.pools[failed.role].retry_target(failed)

    async def models(self, headers: dict) -> httpx.Response:
        """D's model list from the first D that answers, healthy ones first."""
        pool = self.pools["decode"]
        error: EngineError | None = None
        for b in pool.healthy() + [b for b in pool.backends if not b.healthy]:
            try:
                return await self.client(b).get(b.url + "/v1/models", headers)
            except EngineError as exc:
                self.failed(b, exc)
                error = exc
        assert error is not None
        raise error

    # -- health and KV usage ------------------------------------------------------------

    async def probe(self, b: Backend) -> str:
        """``b``'s health now ("ok" or why not); takes it out or brings it back."""
        status = await self.client(b).probe(b.url)
        if status == "ok":
            self.succeeded(b)
        else:
            self._take_out(b, f"health check: {status}", count=False)
        return status

    async def probe_all(self) -> dict[str, dict[str, str]]:
        """Every backend's health, by role and URL (probed concurrently)."""
        backends = self.backends()
        statuses = await asyncio.gather(*(self.probe(b) for b in backends))
        out: dict[str, dict[str, str]] = {role: {} for role in ROLES}
        for b, status in zip(backends, statuses, strict=True):
            out[b.role][b.url] = status
        return out

    async def scrape_kv_usage(self) -> None:
        """Every D's KV cache usage from its ``/metrics``; None where it cannot be read."""

        async def scrape(b: Backend) -> None:
            try:
                resp = await self.client(b).http.get(b.url + "/metrics", timeout=HEALTH_TIMEOUT_S)
                b.kv_usage = parse_kv_cache_usage(resp.text) if resp.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                b.kv_usage = None

        await asyncio.gather(*(scrape(b) for b in self.pools["decode"].backends))

    def start(self) -> None:
        """The periodic checks (inside the server's event loop): health always, KV usage
        with ``kv_aware``."""
        self._tasks.append(asyncio.ensure_future(_every(self.config.health_interval_s, self.probe_all)))
        if self.config.kv_aware:
            self._tasks.append(asyncio.ensure_future(
                _every(self.config.kv_refresh_s, self.scrape_kv_usage, at_once=True)))

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for client in self._clients.values():
            await client.aclose()


async def _every(interval_s: float, check: Callable[[], Awaitable[object]],
                 at_once: bool = False) -> None:
    # The first health probe waits one interval: a backend is in until it fails.
    if not at_once:
        await asyncio.sleep(interval_s)
    while True:
        try:
            await check()
        except Exception:  # a check must never stop the checks (nor the proxy)
            logger.exception("periodic backend check failed")
        await asyncio.sleep(interval_s)
