"""Proxy spans with InMemorySpanExporter and fake engines (httpx.MockTransport): the trace
continues the caller's traceparent and reaches P and D.  No GPU, NIXL or vLLM required."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, StatusCode

from hybrid_pd.serve.proxy import ProxyConfig, create_app
from hybrid_pd.telemetry import attributes as A
from tests.test_proxy import KV, FakeEngines

P, D = "http://p", "http://d"
CALLER_TRACE = "a" * 32
CALLER_SPAN = "b" * 16


def client(engines: FakeEngines, provider: TracerProvider) -> TestClient:
    app = create_app(ProxyConfig(P, D, timeout_s=5), transport=httpx.MockTransport(engines),
                     tracer=provider.get_tracer("test"))
    return TestClient(app)


def parse(traceparent: str) -> tuple[str, str]:
    version, trace_id, span_id, flags = traceparent.split("-")
    assert version == "00" and int(flags, 16) & 1, traceparent  # sampled
    return trace_id, span_id


@pytest.mark.parametrize("stream", [False, True])
def test_trace_joins_caller_proxy_p_and_d(mem, stream: bool) -> None:
    provider, exporter = mem
    engines = FakeEngines()
    with client(engines, provider) as c:
        r = c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 9,
                                            "stream": stream},
                   headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
    assert r.status_code == 200
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {A.SPAN_PROXY_REQUEST, A.SPAN_PROXY_PREFILL, A.SPAN_PROXY_DECODE}
    root = spans[A.SPAN_PROXY_REQUEST]
    # The proxy span continues the caller's trace, under the caller's span.
    assert format(root.context.trace_id, "032x") == CALLER_TRACE
    assert format(root.parent.span_id, "016x") == CALLER_SPAN and root.parent.is_remote
    assert root.kind is SpanKind.SERVER
    assert root.attributes[A.REQUEST_ID] == r.headers["x-request-id"]
    assert root.attributes[A.GEN_AI_REQUEST_MODEL] == "m"
    assert root.attributes[A.GEN_AI_OPERATION_NAME] == "text_completion"
    (p_req,), (d_req,) = engines.seen["p"], engines.seen["d"]
    for engine, seen in ((A.SPAN_PROXY_PREFILL, p_req), (A.SPAN_PROXY_DECODE, d_req)):
        child = spans[engine]
        assert child.parent.span_id == root.context.span_id and child.kind is SpanKind.CLIENT
        # The traceparent the engine got names the proxy's trace and its call span.
        trace_id, span_id = parse(seen["headers"]["traceparent"])
        assert trace_id == CALLER_TRACE == format(root.context.trace_id, "032x")
        assert span_id == format(child.context.span_id, "016x")


def test_new_trace_without_caller_traceparent(mem) -> None:
    provider, exporter = mem
    engines = FakeEngines()
    with client(engines, provider) as c:
        assert c.post("/v1/chat/completions", json={"model": "m", "messages": []}).status_code == 200
    root = next(s for s in exporter.get_finished_spans() if s.name == A.SPAN_PROXY_REQUEST)
    assert root.parent is None
    assert root.attributes[A.GEN_AI_OPERATION_NAME] == "chat"
    for seen in (engines.seen["p"][0], engines.seen["d"][0]):
        assert parse(seen["headers"]["traceparent"])[0] == format(root.context.trace_id, "032x")


def test_engine_error_marks_spans_failed(mem) -> None:
    provider, exporter = mem
    with client(FakeEngines(decode_status=500), provider) as c:
        r = c.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert r.status_code == 500
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans[A.SPAN_PROXY_PREFILL].status.status_code is StatusCode.UNSET
    for name in (A.SPAN_PROXY_DECODE, A.SPAN_PROXY_REQUEST):
        assert spans[name].status.status_code is StatusCode.ERROR
        assert spans[name].attributes[A.KV_FAILURE_REASON] == "decode engine: HTTP 500"


def test_no_tracer_forwards_callers_traceparent_untouched() -> None:
    # Telemetry off (OTel's no-op global tracer): the caller's context still reaches P and D.
    engines = FakeEngines()
    tp = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    app = create_app(ProxyConfig(P, D, timeout_s=5), transport=httpx.MockTransport(engines))
    with TestClient(app) as c:
        c.post("/v1/completions", json={"model": "m", "prompt": "hi"}, headers={"traceparent": tp})
    assert engines.seen["p"][0]["headers"]["traceparent"] == tp
    assert engines.seen["d"][0]["headers"]["traceparent"] == tp


def _asgi_call(app, body: bytes, leave_after: asyncio.Event) -> float:
    """One POST /v1/completions straight into the ASGI app; the client disconnects once
    ``leave_after`` is set.  Returns how long the app took to answer."""
    msgs = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        # as uvicorn: a disconnect that happened is answered at once
        if msgs:
            return msgs.pop(0)
        if not leave_after.is_set():
            await leave_after.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        pass

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions",
             "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("proxy", 80)}
    t0 = time.monotonic()
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 20))
    return time.monotonic() - t0


@pytest.mark.parametrize("stuck", ["p", "d"])
def test_client_that_leaves_closes_the_engine_call_and_spans_say_cancelled(mem, stuck) -> None:
    """A non-streaming client that disconnects while P prefills (or D generates): the
    engine call is closed at once (vLLM then aborts that engine's request), the proxy's
    spans say ``kv.status=cancelled``, and nothing waits for the engine."""
    provider, exporter = mem
    cancelled: list[str] = []
    in_engine = asyncio.Event()

    async def engines(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if request.method == "GET":  # D's model list: its max_model_len unknown here
            return httpx.Response(404)
        if host == stuck:
            in_engine.set()
            try:
                await asyncio.sleep(60)  # a long prefill / generation
            except asyncio.CancelledError:
                cancelled.append(host)
                raise
        if host == "p":
            return httpx.Response(200, json={"choices": [{"text": "x"}], "kv_transfer_params": KV})
        return httpx.Response(200, json={"choices": [{"text": "decoded"}]})

    app = create_app(ProxyConfig(P, D, timeout_s=120), transport=httpx.MockTransport(engines),
                     tracer=provider.get_tracer("test"))
    took = _asgi_call(app, json.dumps({"model": "m", "prompt": "hi", "max_tokens": 9}).encode(),
                      in_engine)
    assert cancelled == [stuck] and took < 5, (cancelled, took)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    engine_span = A.SPAN_PROXY_PREFILL if stuck == "p" else A.SPAN_PROXY_DECODE
    for name in (A.SPAN_PROXY_REQUEST, engine_span):
        assert spans[name].attributes[A.KV_STATUS] == "cancelled", name
        assert spans[name].status.status_code is StatusCode.UNSET  # the client's choice


@pytest.mark.parametrize("leave", [False, True])
def test_stream_span_ends_with_the_stream_and_says_cancelled_if_the_client_left(mem, leave) -> None:
    """A streamed answer: the request's span ends when the relay ends (after D's span,
    which ends at D's headers); a client that leaves mid-stream closes D's stream and
    the request's span says ``kv.status=cancelled`` (status unset: the client's choice)."""
    provider, exporter = mem
    closed: list[int] = []

    async def chunks():
        sent = 0
        try:
            for sent in range(1, 21):
                yield f"data: {sent}\n\n".encode()
                await asyncio.sleep(0.02)
        finally:
            closed.append(sent)

    async def engines(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":  # D's model list: its max_model_len unknown here
            return httpx.Response(404)
        if request.url.host == "p":
            return httpx.Response(200, json={"choices": [{"text": "x"}], "kv_transfer_params": KV})
        return httpx.Response(200, content=chunks(), headers={"content-type": "text/event-stream"})

    app = create_app(ProxyConfig(P, D, timeout_s=120), transport=httpx.MockTransport(engines),
                     tracer=provider.get_tracer("test"))
    body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 9, "stream": True}).encode()
    msgs = [{"type": "http.request", "body": body, "more_body": False}]
    bodies: list[bytes] = []

    async def run() -> None:
        got_some = asyncio.Event()

        async def receive():
            if msgs:
                return msgs.pop(0)
            if leave:
                await got_some.wait()
            else:
                await asyncio.sleep(60)
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.body" and message.get("body"):
                bodies.append(message["body"])
                if len(bodies) >= 3:
                    got_some.set()

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/completions",
                 "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("proxy", 80)}
        await asyncio.wait_for(app(scope, receive, send), 20)

    asyncio.run(run())
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root, d_span = spans[A.SPAN_PROXY_REQUEST], spans[A.SPAN_PROXY_DECODE]
    assert root.end_time > d_span.end_time  # D's span ends at its headers
    assert d_span.attributes.get(A.KV_STATUS) is None
    assert root.status.status_code is StatusCode.UNSET
    if leave:
        assert closed and closed[0] < 20, closed  # D's stream was closed before its end
        assert root.attributes[A.KV_STATUS] == "cancelled"
    else:
        assert closed == [20] and len(bodies) == 20
        assert root.attributes.get(A.KV_STATUS) is None
        # the whole relay (20 chunks, 20 ms apart) is inside the request's span
        assert root.end_time - root.start_time >= 0.35e9 > d_span.end_time - d_span.start_time
