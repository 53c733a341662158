"""The proxy's calls to one engine: JSON POSTs, the streamed answer relayed to the caller,
health probes, and every failure mapped to an :class:`EngineError` that names the engine
and the cause.  Every call has a timeout, so nothing hangs.

Each engine has its own HTTP client and at most ``max_connections`` calls in flight
(:data:`POOL_MAX_CONNECTIONS` by default).  A call beyond that is answered 503 with a
``Retry-After`` header at once: queueing it would only add latency while the caller's
own timeout runs, and a busy P must not starve D of connections (or the reverse)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from fastapi.responses import JSONResponse, StreamingResponse

from hybrid_pd.serve.router import (
    CAUSE_ANSWER,
    CAUSE_BUSY,
    CAUSE_PROXY,
    CAUSE_TIMEOUT,
    CAUSE_UNREACHABLE,
)

HEALTH_TIMEOUT_S = 5.0
# Connections (= calls in flight) per engine.  A vLLM server handles far fewer requests
# at once than this on CPU, so the limit only bounds sockets and memory under overload.
POOL_MAX_CONNECTIONS = 256
# How long a call may wait for a free connection before the 503: short, since our own
# slot count already matches the pool; this only covers connections still closing.
POOL_WAIT_S = 0.5
# Seconds a client is told to wait when an engine's pool is full.
RETRY_AFTER_S = 1


class EngineError(Exception):
    """An engine answered with an error or could not be reached."""

    def __init__(self, engine: str, status: int, message: str,
                 retry_after_s: int | None = None, cause: str = CAUSE_PROXY) -> None:
        super().__init__(f"{engine} engine: {message}")
        self.engine = engine
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s
        # who failed (router.CAUSE_*): the router takes an engine out only for its own failures
        self.cause = cause

    def to_response(self) -> JSONResponse:
        headers = None if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}
        return JSONResponse(
            status_code=self.status,
            headers=headers,
            content={
                "error": {
                    "message": f"{self.engine} engine: {self.message}",
                    "type": f"{self.engine}_error",
                    "code": self.status,
                }
            },
        )


def error_text(response: httpx.Response) -> str:
    """The most useful one-line cause from an engine's error answer."""
    try:
        data = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"HTTP {response.status_code}: {response.text[:500]}"
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        msg = err.get("message") or err.get("detail") or json.dumps(err)[:500]
    else:
        msg = str(err)[:500]
    return f"HTTP {response.status_code}: {msg}"


def busy(engine: str, limit: int) -> EngineError:
    return EngineError(engine, 503, f"busy: all {limit} connections in use, retry later",
                       retry_after_s=RETRY_AFTER_S, cause=CAUSE_BUSY)


class EngineClient:
    """The pooled HTTP client of one engine ("prefill" or "decode").  ``transport``
    replaces the network (unit tests use fake engines)."""

    def __init__(self, engine: str, timeout_s: float, connect_timeout_s: float,
                 transport: httpx.AsyncBaseTransport | None = None,
                 max_connections: int = POOL_MAX_CONNECTIONS) -> None:
        self.engine = engine
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s, pool=POOL_WAIT_S)
        self._limits = httpx.Limits(max_connections=max_connections,
                                    max_keepalive_connections=max_connections)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        # Our own count of calls in flight: it refuses at once, where httpx's pool would
        # queue, and it also holds for a replaced transport (which has no pool).
        self._in_flight = 0

    @property
    def http(self) -> httpx.AsyncClient:
        # Built on first use, inside the server's event loop.
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout, limits=self._limits,
                                             transport=self._transport)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def reserve(self) -> Slot:
        """One of this engine's call slots, taken now (503 at once when none is free);
        hand it to one call, which gives it back, or give it back yourself."""
        if self._in_flight >= self.max_connections:
            raise busy(self.engine, self.max_connections)
        self._in_flight += 1
        return Slot(self)

    def _call_error(self, url: str, exc: httpx.HTTPError) -> EngineError:
        if isinstance(exc, httpx.PoolTimeout):  # before TimeoutException, its base class
            return busy(self.engine, self.max_connections)
        if isinstance(exc, httpx.TimeoutException):
            return EngineError(self.engine, 504, f"no answer within {self.timeout_s:.0f} s ({exc!r})",
                               cause=CAUSE_TIMEOUT)
        return EngineError(self.engine, 502, f"unreachable at {url}: {exc!r}", cause=CAUSE_UNREACHABLE)

    async def post_json(self, url: str, body: dict, headers: dict,
                        slot: Slot | None = None) -> dict[str, Any]:
        slot = slot or self.reserve()
        try:
            resp = await self.http.post(url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise self._call_error(url, exc) from exc
        finally:
            slot.give_back()
        if resp.status_code >= 400:
            raise EngineError(self.engine, resp.status_code, error_text(resp), cause=CAUSE_ANSWER)
        try:
            return resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EngineError(self.engine, 502, f"answer is not JSON: {resp.text[:200]!r}") from exc

    async def post_stream(self, url: str, body: dict, headers: dict,
                          slot: Slot | None = None) -> Relayed:
        """POST with a streamed answer; returns once the engine's headers are in, relaying
        the body (server-sent events) as it comes.  The slot is held until the relay ends."""
        slot = slot or self.reserve()
        relaying = False
        try:
            req = self.http.build_request("POST", url, json=body, headers=headers)
            try:
                resp = await self.http.send(req, stream=True)
            except httpx.HTTPError as exc:
                raise self._call_error(url, exc) from exc
            if resp.status_code >= 400:
                await resp.aread()
                await resp.aclose()
                raise EngineError(self.engine, resp.status_code, error_text(resp), cause=CAUSE_ANSWER)
            relaying = True
            close = _Closer(resp, slot.give_back)
            return Relayed(self._relay(resp, close), close,
                           media_type="text/event-stream",
                           headers={"X-Request-Id": headers["X-Request-Id"]})
        finally:
            if not relaying:
                slot.give_back()

    async def get(self, url: str, headers: dict) -> httpx.Response:
        """A plain GET (the model list); any failure is a 502."""
        try:
            return await self.http.get(url, headers=headers)
        except httpx.HTTPError as exc:
            raise EngineError(self.engine, 502, f"unreachable: {exc!r}", cause=CAUSE_UNREACHABLE) from exc

    async def probe(self, url: str) -> str:
        """The engine's health: "ok", "HTTP <status>" or "unreachable: <error class>"."""
        try:
            resp = await self.http.get(url + "/health", timeout=HEALTH_TIMEOUT_S)
        except httpx.HTTPError as exc:
            return f"unreachable: {exc.__class__.__name__}"
        return "ok" if resp.status_code == 200 else f"HTTP {resp.status_code}"

    async def _relay(self, resp: httpx.Response, close: _Closer) -> AsyncIterator[bytes]:
        try:
            first = True
            async for chunk in resp.aiter_bytes():
                if first:  # handed to the caller's connection next (a non-blocking write)
                    first = False
                    for callback in close.first_sent:
                        callback()
                yield chunk
            close.outcome = "done"
        except httpx.HTTPError as exc:
            # Headers are already sent: the error goes into the SSE stream itself.
            close.outcome = f"failed: {self.engine} engine: stream broke: {exc!r}"
            err = {"error": {"message": close.outcome[len("failed: "):],
                             "type": f"{self.engine}_error"}}
            yield f"data: {json.dumps(err)}\n\n".encode()
        finally:
            await close()


class Slot:
    """One call slot of an engine; given back once, whoever gets there first."""

    def __init__(self, client: EngineClient) -> None:
        self._client: EngineClient | None = client
        self._on_release: list[Callable[[], None]] = []

    def on_release(self, callback: Callable[[], None]) -> None:
        """``callback()`` when the slot is given back (the router's in-flight count)."""
        self._on_release.append(callback)

    def give_back(self) -> None:
        if self._client is not None:
            self._client._in_flight -= 1
            self._client = None
            for callback in self._on_release:
                callback()


class _Closer:
    """Closes a streamed engine answer and frees its slot, once, whoever gets there first;
    then tells the callbacks how the relay ended: "done", "failed: <why>" or
    "cancelled" (the caller left before the end)."""

    def __init__(self, resp: httpx.Response, give_slot: Callable[[], None]) -> None:
        self._resp, self._give_slot, self._done = resp, give_slot, False
        self.outcome = "cancelled"
        self.callbacks: list[Callable[[str], None]] = []
        self.first_sent: list[Callable[[], None]] = []  # the first chunk goes to the caller

    async def __call__(self) -> None:
        if self._done:
            return
        self._done = True
        self._give_slot()
        await self._resp.aclose()
        for callback in self.callbacks:
            callback(self.outcome)


class Relayed(StreamingResponse):
    """A relayed stream that closes the engine's answer even when the caller leaves
    before the first chunk (the relay generator then never runs its ``finally``)."""

    def __init__(self, content: AsyncIterator[bytes], close: _Closer, **kw: Any) -> None:
        super().__init__(content, **kw)
        self._close = close

    def when_first_sent(self, callback: Callable[[], None]) -> None:
        """``callback()`` as the first chunk is handed to the caller's connection."""
        self._close.first_sent.append(callback)

    def when_ended(self, callback: Callable[[str], None]) -> None:
        """``callback(outcome)`` once the relay ended: "done", "failed: <why>" or
        "cancelled"."""
        self._close.callbacks.append(callback)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._close()
