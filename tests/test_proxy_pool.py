"""The proxy as a router over 2 P and 2 D: the real app (create_app) over the network,
against small HTTP servers standing in for vLLM engines (uvicorn on loopback, each in a
thread).  Load spread, a P that refuses connections (retried on the other P, taken out,
back after a health probe), a D that fails (out, never retried), KV-aware choice,
/health, /v1/models and /metrics per backend, and the backend attributes of the spans.
No GPU, NIXL or vLLM required."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.testclient import TestClient
from helpers import free_port
from opentelemetry.trace import StatusCode
from prometheus_client.parser import text_string_to_metric_families

from hybrid_pd.serve.proxy import ProxyConfig, create_app
from hybrid_pd.serve.proxy_pool import health_answer
from hybrid_pd.telemetry import attributes as A

MAX_LEN = 4096
BASE = {"model": "m", "prompt": "hi", "max_tokens": 5}


class FakeEngine:
    """One engine on loopback answering like vLLM's OpenAI server: P with
    kv_transfer_params naming its engine id, D with its own name as the completion text.
    ``status`` (completions) and ``health`` (GET /health) are what it answers next;
    ``kv_usage`` is its ``vllm:kv_cache_usage_perc``; ``break_stream`` drops a streamed
    answer's connection after the first chunk; ``delay`` slows its completions."""

    def __init__(self, name: str, role: str) -> None:
        self.name, self.role, self.port = name, role, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.calls = 0
        self.status, self.health, self.kv_usage, self.break_stream = 200, 200, 0.0, False
        self.delay, self.max_model_len = 0.0, MAX_LEN
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=self.health)

        @app.get("/v1/models")
        async def models() -> dict:
            return {"data": [{"id": "m", "max_model_len": self.max_model_len}]}

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse("# TYPE vllm:kv_cache_usage_perc gauge\n"
                                     f'vllm:kv_cache_usage_perc{{engine="0",model_name="m"}} {self.kv_usage}\n')

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            self.calls += 1
            body = await request.json()
            await asyncio.sleep(self.delay)
            if self.status != 200:
                return JSONResponse(status_code=self.status, content={"error": {"message": f"{self.name} failed"}})
            if self.role == "prefill":
                return JSONResponse({"choices": [{"text": "x"}], "kv_transfer_params": {
                    "do_remote_prefill": True, "remote_engine_id": f"engine-{self.name}",
                    "remote_block_ids": [[1]], "remote_host": "127.0.0.1", "remote_port": 5600}})
            if body.get("stream"):
                return StreamingResponse(self._chunks(), media_type="text/event-stream")
            return JSONResponse({"choices": [{"text": self.name}]})

        return app

    async def _chunks(self) -> Iterator[bytes]:
        yield f"data: {json.dumps({'choices': [{'text': self.name}]})}\n\n".encode()
        if self.break_stream:
            await asyncio.sleep(0.05)
            raise RuntimeError("engine died mid-stream")  # uvicorn drops the connection
        yield b"data: [DONE]\n\n"

    def start(self) -> FakeEngine:
        config = uvicorn.Config(self.app(), host="127.0.0.1", port=self.port, log_level="critical",
                                lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            assert time.monotonic() < deadline, f"fake engine {self.name} did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)


@pytest.fixture
def cluster() -> Iterator[dict[str, FakeEngine]]:
    """p1, p2 (prefill) and d1, d2 (decode), started; p3 is a port nobody listens on yet."""
    engines = {name: FakeEngine(name, "prefill" if name[0] == "p" else "decode")
               for name in ("p1", "p2", "p3", "d1", "d2")}
    for name in ("p1", "p2", "d1", "d2"):
        engines[name].start()
    yield engines
    for engine in engines.values():
        engine.stop()


def proxy(prefill: list[FakeEngine], decode: list[FakeEngine], tracer=None, **config) -> TestClient:
    config.setdefault("health_interval_s", 60.0)  # probes only when a test asks (GET /health)
    cfg = ProxyConfig(tuple(e.url for e in prefill), tuple(e.url for e in decode), timeout_s=10,
                      connect_timeout_s=2, **config)
    return TestClient(create_app(cfg, tracer=tracer))


def samples(client: TestClient, name: str) -> dict[tuple[str, str], float]:
    """{(role, backend URL): value} of one metric on the proxy's /metrics."""
    r = client.get("/metrics")
    assert r.status_code == 200
    return {(s.labels["role"], s.labels["backend"]): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples
            if s.name == name}


def metric(client: TestClient, name: str, engine: FakeEngine) -> float:
    return samples(client, name)[(engine.role, engine.url)]


def post(client: TestClient, n: int, **extra) -> list[str]:
    """``n`` requests, one after the other; the D that answered each (its name)."""
    out = []
    for i in range(n):
        r = client.post("/v1/completions", json={**BASE, **extra, "stream": bool(extra.get("stream")) and i % 2 == 0})
        assert r.status_code == 200, r.text
        text = r.text if r.headers["content-type"].startswith("text/event-stream") else r.json()["choices"][0]["text"]
        out.append("d1" if "d1" in text else "d2")
    return out


def wait_for(check: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)


# -- load spread and per-backend metrics --------------------------------------------------


@pytest.mark.parametrize("policy", ["least-outstanding", "round-robin"])
def test_load_spreads_over_both_p_and_both_d_and_metrics_count_it(cluster, policy):
    p1, p2, d1, d2 = (cluster[n] for n in ("p1", "p2", "d1", "d2"))
    with proxy([p1, p2], [d1, d2], policy=policy) as c:
        answered = post(c, 8, stream=True)  # every other one streamed
        assert (p1.calls, p2.calls, d1.calls, d2.calls) == (4, 4, 4, 4)
        assert sorted(answered) == ["d1"] * 4 + ["d2"] * 4
        for engine in (p1, p2, d1, d2):
            assert metric(c, "hybrid_pd_proxy_backend_requests_total", engine) == 4, engine.name
            assert metric(c, "hybrid_pd_proxy_backend_failures_total", engine) == 0
            assert metric(c, "hybrid_pd_proxy_backend_healthy", engine) == 1
            # every call ended, streamed ones included: nothing left in flight
            assert metric(c, "hybrid_pd_proxy_backend_in_flight", engine) == 0
        # the pool's /health: both roles ok, every backend listed
        r = c.get("/health")
        assert r.status_code == 200
        assert r.json() == {"prefill": "ok", "decode": "ok", "backends": {
            "prefill": {p1.url: "ok", p2.url: "ok"}, "decode": {d1.url: "ok", d2.url: "ok"}}}


# -- a P that refuses connections ---------------------------------------------------------------


def test_refused_p_is_retried_on_the_other_p_taken_out_and_back_after_a_probe(cluster, mem):
    provider, exporter = mem
    p1, p3, d1, d2 = (cluster[n] for n in ("p1", "p3", "d1", "d2"))  # p3: nothing listens
    with proxy([p1, p3], [d1, d2], tracer=provider.get_tracer("test")) as c:
        post(c, 4)  # the 2nd request goes to p3 first (in turn), is refused, runs on p1
        assert p1.calls == 4
        assert metric(c, "hybrid_pd_proxy_backend_requests_total", p3) == 1
        assert metric(c, "hybrid_pd_proxy_backend_failures_total", p3) == 1
        assert metric(c, "hybrid_pd_proxy_backend_healthy", p3) == 0
        assert metric(c, "hybrid_pd_proxy_backend_requests_total", p1) == 4

        # spans: one failed prefill call on p3, then every prefill on p1 (engine id from its answer)
        prefill = [s for s in exporter.get_finished_spans() if s.name == A.SPAN_PROXY_PREFILL]
        failed = [s for s in prefill if s.status.status_code is StatusCode.ERROR]
        assert [s.attributes[A.BACKEND_URL] for s in failed] == [p3.url]
        assert failed[0].attributes[A.KV_FAILURE_REASON] == "prefill engine: HTTP 502"
        assert A.BACKEND_ENGINE_ID not in failed[0].attributes
        ok = [s for s in prefill if s not in failed]
        assert len(ok) == 4 and {s.attributes[A.BACKEND_URL] for s in ok} == {p1.url}
        assert {s.attributes[A.BACKEND_ENGINE_ID] for s in ok} == {"engine-p1"}
        assert {s.attributes[A.BACKEND_HOST] for s in prefill} == {"127.0.0.1"}
        # the retried request's two prefill spans share its trace, under one request span
        retried = {s.context.trace_id for s in failed}
        assert len([s for s in prefill if s.context.trace_id in retried]) == 2
        decode = [s for s in exporter.get_finished_spans() if s.name == A.SPAN_PROXY_DECODE]
        assert {s.attributes[A.BACKEND_URL] for s in decode} == {d1.url, d2.url}
        assert {s.attributes[A.KV_PEER_ENGINE_ID] for s in decode} == {"engine-p1"}

        r = c.get("/health")  # one P of two is enough
        assert r.status_code == 200 and r.json()["backends"]["prefill"][p3.url] == "unreachable: ConnectError"
        p3.start()  # it comes back; the next probe (here: GET /health) brings it back in
        assert c.get("/health").json()["backends"]["prefill"][p3.url] == "ok"
        assert metric(c, "hybrid_pd_proxy_backend_healthy", p3) == 1
        post(c, 4)
        assert p3.calls == 2 and p1.calls == 6


@pytest.mark.parametrize(("status", "retried"), [(500, True), (503, True), (400, False), (422, False)])
def test_p_5xx_is_retried_on_the_other_p_but_a_4xx_is_the_answer(cluster, status, retried):
    p1, p2, d1 = (cluster[n] for n in ("p1", "p2", "d1"))
    p1.status = status  # p1 is first in turn
    with proxy([p1, p2], [d1]) as c:
        r = c.post("/v1/completions", json=BASE)
        assert (p1.calls, p2.calls) == (1, 1 if retried else 0)
        assert metric(c, "hybrid_pd_proxy_backend_healthy", p1) == (0 if retried else 1)
        assert metric(c, "hybrid_pd_proxy_backend_failures_total", p1) == (1 if retried else 0)
    if retried:
        assert r.status_code == 200 and d1.calls == 1
    else:  # about the request: the same request would fail on any P
        assert r.status_code == status and r.json()["error"]["message"] == f"prefill engine: HTTP {status}: p1 failed"
        assert d1.calls == 0


def test_periodic_health_checks_take_a_backend_out_and_bring_it_back(cluster):
    p1, d1, d2 = (cluster[n] for n in ("p1", "d1", "d2"))
    d2.health = 503
    with proxy([p1], [d1, d2], health_interval_s=0.1) as c:
        wait_for(lambda: metric(c, "hybrid_pd_proxy_backend_healthy", d2) == 0, what="d2 out")
        assert post(c, 4) == ["d1"] * 4
        d2.health = 200
        wait_for(lambda: metric(c, "hybrid_pd_proxy_backend_healthy", d2) == 1, what="d2 back")
        assert sorted(post(c, 4)) == ["d1", "d1", "d2", "d2"]


def test_no_healthy_p_is_503_on_health_and_the_request_names_prefill(cluster):
    p3, d1 = cluster["p3"], cluster["d1"]
    unused = FakeEngine("p4", "prefill")  # never started either
    with proxy([p3, unused], [d1]) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["prefill"] == "no healthy backend"
        assert r.json()["decode"] == "ok"
        r = c.post("/v1/completions", json=BASE)
    assert r.status_code == 502 and r.json()["error"]["message"].startswith("prefill engine: unreachable")
    assert d1.calls == 0


# -- a D that fails ------------------------------------------------------------------------------


def test_failed_d_is_taken_out_and_never_retried(cluster):
    p1, d1, d2 = (cluster[n] for n in ("p1", "d1", "d2"))
    d1.status = 500
    with proxy([p1], [d1, d2]) as c:
        r = c.post("/v1/completions", json=BASE)  # d1 first, in turn
        assert r.status_code == 500 and r.json()["error"]["message"] == "decode engine: HTTP 500: d1 failed"
        assert (d1.calls, d2.calls) == (1, 0)  # D is not retried
        assert metric(c, "hybrid_pd_proxy_backend_healthy", d1) == 0
        assert post(c, 3) == ["d2"] * 3  # d1 is out
        assert metric(c, "hybrid_pd_proxy_backend_failures_total", d1) == 1


def test_a_d_stream_that_breaks_is_not_retried_and_takes_d_out(cluster):
    p1, d1, d2 = (cluster[n] for n in ("p1", "d1", "d2"))
    d1.break_stream = True
    with proxy([p1], [d1, d2]) as c:
        r = c.post("/v1/completions", json={**BASE, "stream": True})
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert r.status_code == 200 and events[0]["choices"][0]["text"] == "d1"
        assert events[-1]["error"]["type"] == "decode_error"  # told in the stream, not retried
        assert (d1.calls, d2.calls) == (1, 0)
        wait_for(lambda: metric(c, "hybrid_pd_proxy_backend_healthy", d1) == 0, what="d1 out")
        assert metric(c, "hybrid_pd_proxy_backend_in_flight", d1) == 0
        assert post(c, 2) == ["d2", "d2"]


# -- per D: its call slots and its max_model_len ---------------------------------------------------


def test_a_full_d_is_passed_over_and_only_all_full_is_503(cluster):
    p1, p2, d1, d2 = (cluster[n] for n in ("p1", "p2", "d1", "d2"))
    d1.delay = d2.delay = 0.5  # each D holds its one slot while the third request comes
    app = create_app(ProxyConfig((p1.url, p2.url), (d1.url, d2.url), timeout_s=10,
                                 max_connections=1, health_interval_s=60))

    async def burst() -> list:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as c:
            answers = await asyncio.gather(*(c.post("/v1/completions", json=BASE) for _ in range(3)))
        await app.state.proxy.engines.aclose()
        return answers

    answers = asyncio.run(burst())
    assert sorted(r.status_code for r in answers) == [200, 200, 503]
    assert (d1.calls, d2.calls) == (1, 1)  # one each: the second went to the free D
    busy = next(r for r in answers if r.status_code == 503)
    assert busy.json()["error"]["type"] == "decode_error" and "busy" in busy.json()["error"]["message"]
    assert p1.calls + p2.calls == 2  # the refused one never reached a P


def test_max_model_len_is_the_chosen_ds(cluster):
    p1, d1, d2 = (cluster[n] for n in ("p1", "d1", "d2"))
    d2.max_model_len = 100
    with proxy([p1], [d1, d2]) as c:
        fits = c.post("/v1/completions", json={**BASE, "max_tokens": 200})  # d1: 4096
        too_long = c.post("/v1/completions", json={**BASE, "max_tokens": 200})  # d2: 100
    assert fits.status_code == 200 and fits.json()["choices"][0]["text"] == "d1"
    assert too_long.status_code == 400 and "max_model_len is 100" in too_long.json()["error"]["message"]
    assert (p1.calls, d1.calls, d2.calls) == (1, 1, 0)  # refused before P


# -- KV-aware D choice -------------------------------------------------------------------------


def test_kv_aware_prefers_the_d_with_less_kv_cache_in_use(cluster):
    p1, d1, d2 = (cluster[n] for n in ("p1", "d1", "d2"))
    d1.kv_usage, d2.kv_usage = 0.9, 0.1
    with proxy([p1], [d1, d2], kv_aware=True, kv_refresh_s=0.05) as c:
        usage = "hybrid_pd_proxy_backend_kv_cache_usage"
        wait_for(lambda: (metric(c, usage, d1), metric(c, usage, d2)) == (0.9, 0.1), what="scraped")
        assert post(c, 4) == ["d2"] * 4
        d1.kv_usage, d2.kv_usage = 0.0, 0.7
        wait_for(lambda: metric(c, usage, d2) == 0.7 and metric(c, usage, d1) == 0.0, what="rescraped")
        assert post(c, 3) == ["d1"] * 3


# -- /v1/models and the pure /health answer --------------------------------------------------------


def test_models_come_from_a_d_that_answers(cluster):
    p1, d2 = cluster["p1"], cluster["d2"]
    dead = FakeEngine("d3", "decode")  # never started
    with proxy([p1], [dead, d2]) as c:
        r = c.get("/v1/models")
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "m"


def test_health_answer_keeps_the_one_pair_shape():
    assert health_answer({"prefill": {"http://p": "ok"}, "decode": {"http://d": "HTTP 500"}}) == (
        503, {"prefill": "ok", "decode": "HTTP 500"})
    code, body = health_answer({"prefill": {"http://p1": "HTTP 503", "http://p2": "ok"},
                                "decode": {"http://d": "ok"}})
    assert code == 200 and body["prefill"] == "ok" and body["decode"] == "ok"
    assert body["backends"]["prefill"] == {"http://p1": "HTTP 503", "http://p2": "ok"}


@pytest.mark.parametrize(("given", "env", "expected"), [
    (None, None, socket.gethostname()),           # by default: this machine
    ({"host.name": "p-host"}, None, "p-host"),    # the caller's own wins
    (None, "host.name=from-env", "from-env"),     # and OTEL_RESOURCE_ATTRIBUTES
])
def test_engine_resource_names_its_host(monkeypatch, given, env, expected):
    # With P and D on different hosts, host.name tells their spans apart.
    from hybrid_pd.telemetry import setup as S

    if env is None:
        monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    else:
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", env)
    tel = S.configure_tracing("hybrid-pd-prefill", "prefill", otlp=False, set_global=False,
                              engine_id="e", resource_attributes=given)
    try:
        attrs = tel.provider.resource.attributes
        assert attrs[A.RESOURCE_HOST_NAME] == expected
        assert attrs[A.RESOURCE_ROLE] == "prefill" and attrs[A.RESOURCE_ENGINE_ID] == "e"
    finally:
        S.shutdown()
