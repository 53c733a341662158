"""The P/D proxy: an OpenAI-compatible front that runs each request on P, then on D.

Flow of one request (``/v1/completions`` or ``/v1/chat/completions``, :meth:`PDProxy.handle`):

0. the body must be a UTF-8 JSON object that P/D can serve as one KV hand-off
   (:func:`check_request`), else 400 before P is asked;
1. P gets the request with ``max_tokens=1``, ``stream=false`` and
   ``kv_transfer_params={"do_remote_decode": true}``: it prefills, keeps the KV cache and
   Mamba state, and answers with the ``kv_transfer_params`` D needs to pull them;
2. D gets the user's original request plus P's ``kv_transfer_params`` unchanged: it reads
   the state over NIXL and generates; its answer (streamed or not) is the user's answer.
   A client's own ``kv_transfer_params`` reach neither engine.

Errors from either engine come back as HTTP errors that name the engine and the cause
(:mod:`.proxy_calls`); every upstream call has a timeout, so nothing hangs.  Each engine
has its own connection pool; a full one answers 503 with ``Retry-After``.
``/metrics`` serves prometheus_client's default registry.  With an API key
(``VLLM_API_KEY`` in the environment, never a flag) every ``/v1/*`` call needs
``Authorization: Bearer <key>``, which goes on to P and D (they enforce the same key).

P and D may each be a pool of several engines (:mod:`.router` chooses, :mod:`.proxy_pool`
checks their health and counts per backend).  D is chosen first (its slot is taken
before P prefills, and its ``max_model_len`` is checked); a P that fails before
answering (unreachable, timeout, 5xx) is taken out and the prefill runs once more on
another healthy P.  D is never retried: once it has the request it may be reading P's
blocks or streaming.

Tracing: each request is a ``hybrid_pd.proxy.request`` span (continuing the caller's W3C
``traceparent`` when there is one) with a ``hybrid_pd.proxy.prefill`` and a
``hybrid_pd.proxy.decode`` child (a retried prefill: one child per P tried), each naming
the engine it ran on (``hybrid_pd.backend.*``); each engine call carries the child's
``traceparent`` (OpenTelemetry ``propagate.inject``), so P's and D's spans join the same
trace.  The tracer is OpenTelemetry's global one unless ``create_app(tracer=...)`` gives
one; ``hybrid-pd proxy --telemetry-db PATH`` configures it (off without the flag).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Tracer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from hybrid_pd.serve import ttft
from hybrid_pd.serve.engines import DEFAULT_PROXY_TIMEOUT_S
from hybrid_pd.serve.proxy_calls import POOL_MAX_CONNECTIONS, EngineError, Relayed, Slot
from hybrid_pd.serve.proxy_pool import Engines, health_answer
from hybrid_pd.serve.proxy_requests import (
    check_length,
    check_request,
    decode_request,
    normalize_request,
    parse_body,
    prefill_request,
    remote_engine_id,
    with_trace,
)
from hybrid_pd.serve.router import DEFAULT_POLICY, HEALTH_INTERVAL_S, KV_REFRESH_S, Backend
from hybrid_pd.telemetry import attributes as A

# Tracer and logger name, independent of where this module lives: stored spans and log
# filters select on it.
INSTRUMENTATION_NAME = "hybrid_pd.proxy"
logger = logging.getLogger(INSTRUMENTATION_NAME)

# How often a request waiting on an engine checks that its client is still there.
DISCONNECT_POLL_S = 0.25
CLIENT_CLOSED_REQUEST = 499  # nobody reads it: the client has gone
MODELS_RETRY_S = 60.0  # D's model list could not be read: ask again after this long
# Request headers every engine call carries on.
_FORWARDED = ("authorization", "traceparent", "tracestate")


def forward_headers(request: Request, request_id: str) -> dict[str, str]:
    headers = {"X-Request-Id": request_id}
    for name in _FORWARDED:
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


def authorized(request: Request, api_key: str | None) -> bool:
    """No key configured, or the request carries ``Authorization: Bearer <key>``
    (compared in constant time)."""
    if api_key is None:
        return True
    sent = request.headers.get("authorization", "").encode()
    return hmac.compare_digest(sent, f"Bearer {api_key}".encode())


def unauthorized() -> JSONResponse:
    return JSONResponse(status_code=401, content={"error": {
        "message": "missing or wrong API key: send 'Authorization: Bearer <key>'",
        "type": "authentication_error", "param": None, "code": 401}})


def invalid_request(message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=400, content={"error": {
        "message": message, "type": "invalid_request_error", "param": param, "code": 400}})


def describe_request(span: Span, body: dict[str, Any], path: str, request_id: str) -> None:
    if span.is_recording():
        A.set_attrs(span, {
            A.REQUEST_ID: request_id, A.ROLE: "proxy",
            A.GEN_AI_REQUEST_MODEL: body.get("model") if isinstance(body.get("model"), str) else None,
            A.GEN_AI_OPERATION_NAME: "chat" if path.endswith("chat/completions") else "text_completion",
            A.GEN_AI_REQUEST_MAX_TOKENS: body.get("max_tokens") if isinstance(body.get("max_tokens"), int) else None,
        })


def mark_cancelled(span: Span) -> None:
    # the client's choice, not a server error: the status stays unset
    if span.is_recording():
        A.set_attrs(span, {A.KV_STATUS: "cancelled", A.KV_FAILURE_REASON: "client disconnected"})


async def until_disconnected(request: Request, work: Coroutine[Any, Any, Response]
                             ) -> Response | None:
    """``work``'s answer, or None once the client has gone: then ``work`` is cancelled,
    which closes the engine call in flight, and vLLM aborts that engine's request (P
    while it prefills, D while it generates) instead of running it to ``max_tokens``.
    A stream that has started is relayed by Starlette, which stops it the same way."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return None
    finally:
        task.cancel()  # no-op when done; the proxy itself being cancelled stops the call


def end_stream_span(span: Span, outcome: str, request_id: str) -> None:
    """End a streamed request's span with how its relay ended (see ``Relayed``)."""
    if outcome == "cancelled":
        mark_cancelled(span)
        logger.info("request %s: the client left mid-stream; D's stream was closed", request_id)
    elif outcome.startswith("failed: ") and span.is_recording():
        A.mark_failed(span, outcome[len("failed: "):])
    span.end()


def mark_engine_error(span: Span, exc: EngineError) -> None:
    if span.is_recording():
        A.mark_failed(span, f"{exc.engine} engine: HTTP {exc.status}", exc)


# -- the P then D flow -----------------------------------------------------------------


@dataclass(frozen=True)
class ProxyConfig:
    # one engine's base URL, or several: a pool the router chooses from (router.py)
    prefill_url: str | tuple[str, ...]
    decode_url: str | tuple[str, ...]
    timeout_s: float = DEFAULT_PROXY_TIMEOUT_S
    connect_timeout_s: float = 10.0
    # calls in flight per engine (P and D each); more get 503 + Retry-After
    max_connections: int = POOL_MAX_CONNECTIONS
    # required on /v1/* as "Authorization: Bearer <key>" (and forwarded to P and D, which
    # enforce the same key); None: open. Never printed.
    api_key: str | None = field(default=None, repr=False)
    policy: str = DEFAULT_POLICY  # router.POLICIES
    kv_aware: bool = False  # D: prefer lower KV cache usage (scraped from its /metrics)
    health_interval_s: float = HEALTH_INTERVAL_S
    kv_refresh_s: float = KV_REFRESH_S

    def urls(self, role: str) -> tuple[str, ...]:
        """The base URLs of ``role``'s engines ("prefill" or "decode")."""
        value = self.prefill_url if role == "prefill" else self.decode_url
        return (value,) if isinstance(value, str) else tuple(value)


class PDProxy:
    """One request: P (prefill, one token) then D (the user's answer), each in a span."""

    def __init__(self, config: ProxyConfig, engines: Engines, tracer: Tracer) -> None:
        self.config = config
        self.engines = engines
        self.tracer = tracer
        # max_model_len per (D backend, served model), and when to ask again if unknown
        self._max_lens: dict[tuple[str, str], tuple[int | None, float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # handover breakdowns in progress

    async def handle(self, request: Request, path: str) -> Response:
        received_ns = ttft.now_ns()
        body, error = parse_body(await request.body())
        if body is None:
            return invalid_request(error or "body is not a JSON object")
        problem = check_request(body)
        if problem is not None:
            return invalid_request(problem[1], param=problem[0])
        body = normalize_request(body)
        request_id = request.headers.get("x-request-id") or f"pd-{uuid.uuid4().hex}"
        headers = forward_headers(request, request_id)
        d = self.engines.choose("decode")  # first: its max_model_len, and its slot before P
        problem = check_length(body, await self._max_model_len(body.get("model"), headers, d))
        if problem is not None:
            return invalid_request(problem[1], param=problem[0])
        root = self._request_span(request)
        handover = ttft.Handover(request_id, received_ns)
        try:
            with trace.use_span(root, end_on_exit=False, record_exception=False,
                                set_status_on_exception=False):
                describe_request(root, body, path, request_id)
                answer = await self._answer(request, path, body, handover, headers, root, d)
        except BaseException:
            root.end()
            raise
        if isinstance(answer, Relayed):  # the request's span ends with the stream
            answer.when_ended(lambda outcome: end_stream_span(root, outcome, request_id))
        else:
            root.end()
        return answer

    async def _max_model_len(self, model: object, headers: dict, d: Backend) -> int | None:
        """D's ``max_model_len`` for ``model`` from its ``/v1/models`` (asked once per
        model and D, with the caller's credentials; a failed ask is retried after
        MODELS_RETRY_S); None when D does not say."""
        if not isinstance(model, str):
            return None
        known = self._max_lens.get((d.url, model))
        if known is not None and (known[0] is not None or time.monotonic() < known[1]):
            return known[0]
        try:
            resp = await self.engines.client(d).get(d.url + "/v1/models", headers)
            listed = {m.get("id"): m.get("max_model_len") for m in resp.json()["data"]}
        except (EngineError, ValueError, KeyError, TypeError, AttributeError):
            listed = {}  # D may be starting, or not say: D itself still checks
        retry_at = time.monotonic() + MODELS_RETRY_S
        for name, limit in listed.items():
            if isinstance(name, str) and isinstance(limit, int):
                self._max_lens[(d.url, name)] = (limit, retry_at)
        self._max_lens.setdefault((d.url, model), (None, retry_at))
        return self._max_lens[(d.url, model)][0]

    async def _answer(self, request: Request, path: str, body: dict, h: ttft.Handover,
                      headers: dict, root: Span, d: Backend) -> Response:
        request_id = h.request_id
        try:
            answer = await until_disconnected(
                request, self._prefill_then_decode(path, body, h, headers, d))
        except EngineError as exc:
            mark_engine_error(root, exc)
            logger.warning("request %s failed: %s", request_id, exc)
            return exc.to_response()
        if answer is None:
            mark_cancelled(root)
            logger.info("request %s: the client left; its engine call was closed", request_id)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        self._time_first_token(answer, h, root, d)
        return answer

    def _time_first_token(self, answer: Response, h: ttft.Handover, root: Span,
                          d: Backend) -> None:
        """The handover breakdown, once the first token went out (a task: D is asked for
        its instants after the answer)."""
        def done(_outcome: str = "") -> None:
            if h.first_token_ns:
                task = asyncio.get_running_loop().create_task(ttft.breakdown(
                    self.tracer, root, h, self.engines.client(d).http, d.url))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        if isinstance(answer, Relayed):
            answer.when_first_sent(lambda: ttft.first_token(root, h))
            answer.when_ended(done)
        elif answer.status_code < 400:
            ttft.first_token(root, h)
            done()

    async def _prefill_then_decode(self, path: str, body: dict, h: ttft.Handover,
                                   headers: dict, d: Backend) -> Response:
        # D's slot first: when D is saturated the answer is 503 before P prefills anything
        # (P would otherwise hold the blocks for a D call that never comes).
        slot = self.engines.reserve(d)
        try:
            p_answer = await self._prefill(path, body, h, headers)
            return await self._decode(path, body, p_answer, h.request_id, headers, d, slot,
                                      h.prefill_url)
        finally:
            slot.give_back()  # no-op once the D call took it over

    async def _prefill(self, path: str, body: dict, h: ttft.Handover, headers: dict) -> dict:
        """P's answer, which carries the kv_transfer_params D needs.  A P that fails
        before answering is taken out, and the call runs once more on another healthy P
        (P has no state of the request yet: a new prefill is the whole retry)."""
        p = self.engines.choose("prefill")
        try:
            return await self._prefill_on(p, path, body, h, headers)
        except EngineError as exc:
            other = self.engines.retry_target(p, exc)
            if other is None:
                raise
            logger.warning("request %s: %s; prefill again on %s", h.request_id, exc, other.url)
        return await self._prefill_on(other, path, body, h, headers)

    async def _prefill_on(self, p: Backend, path: str, body: dict, h: ttft.Handover,
                          headers: dict) -> dict:
        with self._engine_span("prefill", h.request_id, p) as span:
            slot = self.engines.reserve(p)
            p_headers = traced_headers(headers)
            p_body = with_trace(prefill_request(body), h.request_id, p_headers)
            called_ns = ttft.now_ns()
            answer = await self.engines.calling(p).post_json(p.url + path, p_body, p_headers, slot)
            h.prefill_answered(answer, called_ns)
            h.prefill_url = p.url
            self.engines.succeeded(p)
            A.set_attrs(span, {A.BACKEND_ENGINE_ID: remote_engine_id(answer)})
            return answer

    async def _decode(self, path: str, body: dict, p_answer: dict, request_id: str,
                      headers: dict, d: Backend, slot: Slot, prefill_url: str = "") -> Response:
        # Outside D's span: an answer without kv_transfer_params is P's failure.
        d_body = decode_request(body, p_answer)
        url = d.url + path
        with self._engine_span("decode", request_id, d) as span:
            A.set_attrs(span, {A.KV_PEER_ENGINE_ID: remote_engine_id(p_answer)})
            d_headers = traced_headers(headers)
            d_body = with_trace(d_body, request_id, d_headers, prefill_url)
            client = self.engines.calling(d)
            if body.get("stream"):
                # D's span covers the call up to the response headers; the request's span
                # goes on to the end of the stream (handle).
                relay = await client.post_stream(url, d_body, d_headers, slot)
                self.engines.succeeded(d)
                relay.when_ended(lambda outcome: self.engines.stream_ended(d, outcome))
                return relay
            d_answer = await client.post_json(url, d_body, d_headers, slot)
        self.engines.succeeded(d)
        return JSONResponse(content=d_answer, headers={"X-Request-Id": request_id})

    def _request_span(self, request: Request) -> Span:
        # Continue the caller's trace (W3C traceparent) when it sent one.  Started, not
        # entered: a streamed answer ends it when the stream ends.
        return self.tracer.start_span(
            A.SPAN_PROXY_REQUEST, context=propagate.extract(dict(request.headers)),
            kind=SpanKind.SERVER, record_exception=False, set_status_on_exception=False,
        )

    @contextlib.contextmanager
    def _engine_span(self, engine: str, request_id: str, backend: Backend) -> Iterator[Span]:
        """The span of one engine call on ``backend``; an EngineError inside marks the
        span failed (and the backend out when the engine failed)."""
        name = A.SPAN_PROXY_PREFILL if engine == "prefill" else A.SPAN_PROXY_DECODE
        with self.tracer.start_as_current_span(
            name, kind=SpanKind.CLIENT, record_exception=False, set_status_on_exception=False,
            attributes={A.REQUEST_ID: request_id, A.BACKEND_URL: backend.url,
                        A.BACKEND_HOST: backend.host},
        ) as span:
            try:
                yield span
            except EngineError as exc:
                mark_engine_error(span, exc)
                self.engines.failed(backend, exc)
                raise
            except asyncio.CancelledError:
                mark_cancelled(span)
                raise

    async def models(self, request: Request) -> Response:
        """D's model list (P serves the same model), asked with the caller's credentials."""
        request_id = request.headers.get("x-request-id") or f"pd-{uuid.uuid4().hex}"
        try:
            resp = await self.engines.models(forward_headers(request, request_id))
        except EngineError as exc:
            return exc.to_response()
        return Response(content=resp.content, status_code=resp.status_code, media_type="application/json")

    async def health(self) -> Response:
        """Every backend probed now (which also takes it out or brings it back)."""
        status, content = health_answer(await self.engines.probe_all())
        return JSONResponse(status_code=status, content=content)


# -- the app ---------------------------------------------------------------------------

routes = APIRouter()


def _proxy(request: Request) -> PDProxy:
    return request.app.state.proxy


def _denied(request: Request) -> Response | None:
    # /v1/* only, as vLLM's own API-key middleware: /health and /metrics stay open
    return None if authorized(request, _proxy(request).config.api_key) else unauthorized()


@routes.post("/v1/completions")
async def completions(request: Request) -> Response:
    return _denied(request) or await _proxy(request).handle(request, "/v1/completions")


@routes.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return _denied(request) or await _proxy(request).handle(request, "/v1/chat/completions")


@routes.get("/v1/models")
async def models(request: Request) -> Response:
    return _denied(request) or await _proxy(request).models(request)


@routes.get("/metrics")
async def metrics() -> Response:
    # prometheus_client's default registry: counters other modules register there (e.g.
    # dropped spans) become scrapeable without knowing about this app.
    return Response(content=generate_latest(), media_type=CONTENT_TYPE_LATEST)


@routes.get("/health")
async def health(request: Request) -> Response:
    return await _proxy(request).health()


def create_app(
    config: ProxyConfig,
    transport: httpx.AsyncBaseTransport | None = None,
    tracer: Tracer | None = None,
) -> FastAPI:
    """The proxy app; ``transport`` replaces the network (unit tests use fake engines),
    ``tracer`` replaces OpenTelemetry's global tracer (unit tests use an in-memory one)."""
    engines = Engines(config, transport)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engines.start()  # the periodic health checks (and KV usage scrapes)
        yield
        await engines.aclose()

    app = FastAPI(title="hybrid-pd proxy", lifespan=lifespan)
    app.state.config = config
    app.state.proxy = PDProxy(config, engines, tracer or trace.get_tracer(INSTRUMENTATION_NAME))
    app.include_router(routes)
    return app
