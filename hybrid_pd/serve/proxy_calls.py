"""The proxy's calls to one engine: JSON POSTs, the streamed answer relayed to the caller,
health probes, and every failure mapped to an :class:`EngineError` that names the engine
and the cause.  Every call has a timeout, so nothing hangs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi.responses import JSONResponse, StreamingResponse

HEALTH_TIMEOUT_S = 5.0


class EngineError(Exception):
    """An engine answered with an error or could not be reached."""

    def __init__(self, engine: str, status: int, message: str) -> None:
        super().__init__(f"{engine} engine: {message}")
        self.engine = engine
        self.status = status
        self.message = message

    def to_response(self) -> JSONResponse:
        return JSONResponse(
            status_code=self.status,
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


class EngineClient:
    """One pooled HTTP client for both engines.  ``transport`` replaces the network
    (unit tests use fake engines)."""

    def __init__(self, timeout_s: float, connect_timeout_s: float,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.timeout_s = timeout_s
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    @property
    def http(self) -> httpx.AsyncClient:
        # Built on first use, inside the server's event loop.
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout, transport=self._transport)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def post_json(self, engine: str, url: str, body: dict, headers: dict) -> dict[str, Any]:
        try:
            resp = await self.http.post(url, json=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise EngineError(engine, 504, f"no answer within {self.timeout_s:.0f} s ({exc!r})") from exc
        except httpx.HTTPError as exc:
            raise EngineError(engine, 502, f"unreachable at {url}: {exc!r}") from exc
        if resp.status_code >= 400:
            raise EngineError(engine, resp.status_code, error_text(resp))
        try:
            return resp.json()
        except json.JSONDecodeError as exc:
            raise EngineError(engine, 502, f"answer is not JSON: {resp.text[:200]!r}") from exc

    async def post_stream(self, engine: str, url: str, body: dict, headers: dict) -> StreamingResponse:
        """POST with a streamed answer; returns once the engine's headers are in, relaying
        the body (server-sent events) as it comes."""
        req = self.http.build_request("POST", url, json=body, headers=headers)
        try:
            resp = await self.http.send(req, stream=True)
        except httpx.TimeoutException as exc:
            raise EngineError(engine, 504, f"no answer within {self.timeout_s:.0f} s") from exc
        except httpx.HTTPError as exc:
            raise EngineError(engine, 502, f"unreachable at {url}: {exc!r}") from exc
        if resp.status_code >= 400:
            await resp.aread()
            await resp.aclose()
            raise EngineError(engine, resp.status_code, error_text(resp))
        return StreamingResponse(_relay(engine, resp), media_type="text/event-stream",
                                 headers={"X-Request-Id": headers["X-Request-Id"]})

    async def probe(self, url: str) -> str:
        """One engine's health: "ok", "HTTP <status>" or "unreachable: <error class>"."""
        try:
            resp = await self.http.get(url + "/health", timeout=HEALTH_TIMEOUT_S)
        except httpx.HTTPError as exc:
            return f"unreachable: {exc.__class__.__name__}"
        return "ok" if resp.status_code == 200 else f"HTTP {resp.status_code}"


async def _relay(engine: str, resp: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in resp.aiter_bytes():
            yield chunk
    except httpx.HTTPError as exc:
        # Headers are already sent: the error goes into the SSE stream itself.
        err = {"error": {"message": f"{engine} engine: stream broke: {exc!r}", "type": f"{engine}_error"}}
        yield f"data: {json.dumps(err)}\n\n".encode()
    finally:
        await resp.aclose()
