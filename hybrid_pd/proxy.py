"""The P/D proxy: an OpenAI-compatible front that runs each request on P, then on D.

Flow of one request (``/v1/completions`` or ``/v1/chat/completions``):

1. P gets the request with ``max_tokens=1``, ``stream=false`` and
   ``kv_transfer_params={"do_remote_decode": true}``: it prefills, keeps the KV cache and
   Mamba state, and answers with the ``kv_transfer_params`` D needs to pull them;
2. D gets the user's original request plus P's ``kv_transfer_params`` unchanged: it reads
   the state over NIXL and generates; its answer (streamed or not) is the user's answer.

Errors from either engine come back as HTTP errors that name the engine and the cause;
every upstream call has a timeout, so nothing hangs.

Tracing: each request is a ``hybrid_pd.proxy.request`` span (continuing the caller's W3C
``traceparent`` when there is one) with a ``hybrid_pd.proxy.prefill`` and a
``hybrid_pd.proxy.decode`` child; each engine call carries the child's ``traceparent``
(OpenTelemetry ``propagate.inject``), so P's and D's spans join the same trace.  The
tracer is OpenTelemetry's global one unless ``create_app(tracer=...)`` gives one;
``hybrid-pd proxy --telemetry-db PATH`` configures it (off without the flag).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Tracer

from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry import engine as engine_tel

logger = logging.getLogger("hybrid_pd.proxy")

# Sampling/streaming fields that must not reach P: P only prefills one token.
_PREFILL_DROP = ("stream", "stream_options", "max_completion_tokens", "n", "best_of")


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


# -- pure request rewriting (unit-tested without servers) ------------------------------


def prefill_request(body: dict[str, Any]) -> dict[str, Any]:
    """The body P gets: one token, no streaming, and the remote-decode marker."""
    out = {k: v for k, v in copy.deepcopy(body).items() if k not in _PREFILL_DROP}
    out["max_tokens"] = 1
    out["stream"] = False
    out["kv_transfer_params"] = {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    return out


def with_trace(body: dict[str, Any], request_id: str, headers: dict[str, str]) -> dict[str, Any]:
    """``body`` with the trace hand-off for the engines' KV connector added to its
    ``kv_transfer_params``: the ``traceparent``/``tracestate`` of the engine call
    (``headers``, as sent) and our request id, so the connector's spans join the trace
    under that call (see :mod:`hybrid_pd.telemetry.engine`)."""
    hand_off = {k: headers[k] for k in ("traceparent", "tracestate") if k in headers}
    hand_off["request_id"] = request_id
    out = dict(body)
    out["kv_transfer_params"] = {**out["kv_transfer_params"], engine_tel.PARAMS_KEY: hand_off}
    return out


def decode_request(body: dict[str, Any], prefill_response: dict[str, Any]) -> dict[str, Any]:
    """The body D gets: the user's request plus P's kv_transfer_params, unchanged."""
    params = prefill_response.get("kv_transfer_params")
    if not isinstance(params, dict):
        raise EngineError(
            "prefill",
            502,
            "answer has no kv_transfer_params: is the prefill engine started with a KV "
            "connector and kv_role=kv_producer (hybrid-pd serve does this)?",
        )
    out = copy.deepcopy(body)
    out["kv_transfer_params"] = params
    return out


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


# -- the app ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyConfig:
    prefill_url: str
    decode_url: str
    timeout_s: float = 300.0
    connect_timeout_s: float = 10.0


def create_app(
    config: ProxyConfig,
    transport: httpx.AsyncBaseTransport | None = None,
    tracer: Tracer | None = None,
) -> FastAPI:
    """The proxy app; ``transport`` replaces the network (unit tests use fake engines),
    ``tracer`` replaces OpenTelemetry's global tracer (unit tests use an in-memory one)."""
    tracer = tracer or trace.get_tracer(__name__)
    timeout = httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if app.state.client is not None:
            await app.state.client.aclose()

    app = FastAPI(title="hybrid-pd proxy", lifespan=lifespan)
    app.state.config = config
    app.state.client = None

    def client() -> httpx.AsyncClient:
        if app.state.client is None:
            app.state.client = httpx.AsyncClient(timeout=timeout, transport=transport)
        return app.state.client

    def forward_headers(request: Request, request_id: str) -> dict[str, str]:
        headers = {"X-Request-Id": request_id}
        for name in ("authorization", "traceparent", "tracestate"):
            if name in request.headers:
                headers[name] = request.headers[name]
        return headers

    def traced_headers(headers: dict[str, str]) -> dict[str, str]:
        """``headers`` with the current span's traceparent (replacing the caller's, whose
        trace id it keeps) - a no-op tracer leaves the caller's headers untouched."""
        out = dict(headers)
        if trace.get_current_span().get_span_context().is_valid:
            out.pop("traceparent", None)
            out.pop("tracestate", None)
            propagate.inject(out)
        return out

    def engine_span(engine: str, request_id: str) -> Any:
        name = A.SPAN_PROXY_PREFILL if engine == "prefill" else A.SPAN_PROXY_DECODE
        return tracer.start_as_current_span(
            name, kind=SpanKind.CLIENT, record_exception=False, set_status_on_exception=False,
            attributes={A.REQUEST_ID: request_id},
        )

    def mark_engine_error(span: Any, exc: EngineError) -> None:
        if span.is_recording():
            A.mark_failed(span, f"{exc.engine} engine: HTTP {exc.status}", exc)

    async def post_json(engine: str, url: str, body: dict, headers: dict) -> dict[str, Any]:
        try:
            resp = await client().post(url, json=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise EngineError(engine, 504, f"no answer within {config.timeout_s:.0f} s ({exc!r})") from exc
        except httpx.HTTPError as exc:
            raise EngineError(engine, 502, f"unreachable at {url}: {exc!r}") from exc
        if resp.status_code >= 400:
            raise EngineError(engine, resp.status_code, error_text(resp))
        try:
            return resp.json()
        except json.JSONDecodeError as exc:
            raise EngineError(engine, 502, f"answer is not JSON: {resp.text[:200]!r}") from exc

    async def handle(request: Request, path: str) -> Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return JSONResponse(status_code=400, content={"error": {"message": "body is not JSON", "type": "invalid_request"}})
        if not isinstance(body, dict):
            return JSONResponse(status_code=400, content={"error": {"message": "body must be a JSON object", "type": "invalid_request"}})
        request_id = request.headers.get("x-request-id") or f"pd-{uuid.uuid4().hex}"
        headers = forward_headers(request, request_id)
        # Continue the caller's trace (W3C traceparent) when it sent one.
        parent = propagate.extract(dict(request.headers))
        with tracer.start_as_current_span(
            A.SPAN_PROXY_REQUEST, context=parent, kind=SpanKind.SERVER,
            record_exception=False, set_status_on_exception=False,
        ) as root:
            if root.is_recording():
                A.set_attrs(root, {
                    A.REQUEST_ID: request_id, A.ROLE: "proxy",
                    A.GEN_AI_REQUEST_MODEL: body.get("model") if isinstance(body.get("model"), str) else None,
                    A.GEN_AI_OPERATION_NAME: "chat" if path.endswith("chat/completions") else "text_completion",
                    A.GEN_AI_REQUEST_MAX_TOKENS: body.get("max_tokens") if isinstance(body.get("max_tokens"), int) else None,
                })
            try:
                with engine_span("prefill", request_id) as span:
                    try:
                        p_headers = traced_headers(headers)
                        p_resp = await post_json(
                            "prefill", config.prefill_url + path,
                            with_trace(prefill_request(body), request_id, p_headers), p_headers)
                    except EngineError as exc:
                        mark_engine_error(span, exc)
                        raise
                d_body = decode_request(body, p_resp)
                with engine_span("decode", request_id) as span:
                    d_headers = traced_headers(headers)
                    d_body = with_trace(d_body, request_id, d_headers)
                    try:
                        if body.get("stream"):
                            # The span covers the call up to the response headers; the
                            # stream itself is relayed after the span ends.
                            return await stream_decode(config.decode_url + path, d_body, d_headers)
                        d_resp = await post_json("decode", config.decode_url + path, d_body,
                                                 d_headers)
                    except EngineError as exc:
                        mark_engine_error(span, exc)
                        raise
            except EngineError as exc:
                mark_engine_error(root, exc)
                logger.warning("request %s failed: %s", request_id, exc)
                return exc.to_response()
        return JSONResponse(content=d_resp, headers={"X-Request-Id": request_id})

    async def stream_decode(url: str, body: dict, headers: dict) -> Response:
        req = client().build_request("POST", url, json=body, headers=headers)
        try:
            resp = await client().send(req, stream=True)
        except httpx.TimeoutException as exc:
            raise EngineError("decode", 504, f"no answer within {config.timeout_s:.0f} s") from exc
        except httpx.HTTPError as exc:
            raise EngineError("decode", 502, f"unreachable at {url}: {exc!r}") from exc
        if resp.status_code >= 400:
            await resp.aread()
            await resp.aclose()
            raise EngineError("decode", resp.status_code, error_text(resp))

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.aiter_bytes():
                    yield chunk
            except httpx.HTTPError as exc:
                # Headers are already sent: the error goes into the SSE stream itself.
                err = {"error": {"message": f"decode engine: stream broke: {exc!r}", "type": "decode_error"}}
                yield f"data: {json.dumps(err)}\n\n".encode()
            finally:
                await resp.aclose()

        return StreamingResponse(chunks(), media_type="text/event-stream", headers={"X-Request-Id": headers["X-Request-Id"]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models() -> Response:
        try:
            resp = await client().get(config.decode_url + "/v1/models")
        except httpx.HTTPError as exc:
            return EngineError("decode", 502, f"unreachable: {exc!r}").to_response()
        return Response(content=resp.content, status_code=resp.status_code, media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        status = {}
        for engine, url in (("prefill", config.prefill_url), ("decode", config.decode_url)):
            try:
                resp = await client().get(url + "/health", timeout=5.0)
                status[engine] = "ok" if resp.status_code == 200 else f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                status[engine] = f"unreachable: {exc.__class__.__name__}"
        ok = all(v == "ok" for v in status.values())
        return JSONResponse(status_code=200 if ok else 503, content=status)

    return app


# -- CLI -------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("proxy", help="run only the P/D proxy in front of running engines")
    p.add_argument("--prefill-url", required=True, help="e.g. http://127.0.0.1:8100")
    p.add_argument("--decode-url", required=True, help="e.g. http://127.0.0.1:8200")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per engine call")
    p.add_argument("--telemetry-db", default=None,
                   help="write proxy spans to this SQLite file (plus OTLP from OTEL_* "
                   "variables); off when not given")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    tel = None
    if args.telemetry_db:
        from hybrid_pd.telemetry import setup

        tel = setup.configure_tracing("hybrid-pd-proxy", "proxy", db_url=args.telemetry_db)
        print(f"[hybrid-pd proxy] spans -> {args.telemetry_db}", flush=True)
    app = create_app(ProxyConfig(args.prefill_url.rstrip("/"), args.decode_url.rstrip("/"), args.timeout))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        if tel is not None:
            tel.shutdown()  # flush what is queued
    return 0
