"""Proxy edge cases with fake engines (httpx transport): bodies that are not a JSON object,
request fields P/D cannot serve (refused before P is asked) or must route per engine,
client kv_transfer_params, per-engine pool limits (503 + Retry-After), /metrics and the
Authorization header on /v1/models."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, Counter

from hybrid_pd.serve.proxy import ProxyConfig, create_app
from hybrid_pd.settings import TRACE_PARAMS_KEY
from tests.test_proxy import KV, MAX_LEN, FakeEngines, client_for

P, D = "http://p", "http://d"
BASE = {"model": "m", "prompt": "hi", "max_tokens": 9}


# -- bodies that are not a JSON object -------------------------------------------------


@pytest.mark.parametrize(("raw", "why"), [
    (b'{"prompt": "\xff\xfe"}', "not valid UTF-8"),
    (b"\xc3", "not valid UTF-8"),
    (b"{nope", "not JSON"),
    (b"", "not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    (b"[1, 2]", "must be a JSON object, not list"),
    (b'"text"', "must be a JSON object, not str"),
    (b"null", "must be a JSON object, not NoneType"),
])
def test_undecodable_or_non_object_body_is_400_naming_the_problem(raw, why):
    engines = FakeEngines()
    with client_for(engines) as c:
        r = c.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert why in err["message"] and err["type"] == "invalid_request_error"
    assert engines.seen == {"p": [], "d": []}


# -- fields P/D cannot serve: 400 before P runs ----------------------------------------


@pytest.mark.parametrize(("extra", "param"), [
    ({"n": 2}, "n"),
    ({"n": "2"}, "n"),
    ({"best_of": 3}, "best_of"),
    ({"prompt_logprobs": 1}, "prompt_logprobs"),
    ({"echo": True, "logprobs": 1}, "prompt_logprobs"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [[1, 2], [3, 4]]}, "prompt"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"min_tokens": 10, "max_tokens": 9}, "min_tokens"),
])
def test_unservable_field_is_400_before_prefill(extra, param):
    engines = FakeEngines()
    with client_for(engines) as c:
        r = c.post("/v1/completions", json={**BASE, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == 400
    assert param in err["message"] or "prompts" in err["message"]
    assert engines.seen == {"p": [], "d": []}, "P must not be asked"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_output_longer_than_the_model_is_400_before_prefill(field):
    # P gets max_tokens=1 and would prefill; only D knows the request cannot fit
    engines = FakeEngines()
    with client_for(engines) as c:
        r = c.post("/v1/completions", json={**BASE, field: MAX_LEN})
        ok = c.post("/v1/completions", json={**BASE, field: MAX_LEN - 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == field
    assert f"max_model_len is {MAX_LEN}" in r.json()["error"]["message"]
    assert ok.status_code == 200 and len(engines.seen["p"]) == 1  # only the one that fits


def test_unknown_max_model_len_is_asked_again_later(monkeypatch):
    """D's model list cannot be read (D starting): the request goes on (D checks it);
    the list is asked again only after MODELS_RETRY_S."""
    from hybrid_pd.serve import proxy as proxy_mod

    asked: list[str] = []
    engines = FakeEngines()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            asked.append(request.url.host)
            if len(asked) == 1:
                return httpx.Response(503)
        return engines(request)

    clock = [1000.0]
    monkeypatch.setattr(proxy_mod.time, "monotonic", lambda: clock[0])
    app = create_app(ProxyConfig(P, D, timeout_s=5), transport=httpx.MockTransport(handler))
    with TestClient(app) as c:
        assert c.post("/v1/completions", json={**BASE, "max_tokens": MAX_LEN}).status_code == 200
        assert c.post("/v1/completions", json={**BASE, "max_tokens": MAX_LEN}).status_code == 200
        assert asked == ["d"]
        clock[0] += proxy_mod.MODELS_RETRY_S + 1
        assert c.post("/v1/completions", json={**BASE, "max_tokens": MAX_LEN}).status_code == 400
        assert c.post("/v1/completions", json={**BASE, "max_tokens": MAX_LEN}).status_code == 400
    assert asked == ["d", "d"]


def test_chat_n_above_one_is_400_before_prefill():
    engines = FakeEngines()
    with client_for(engines) as c:
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": [], "n": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert engines.seen["p"] == []


# -- fields P/D serves: each engine gets what it can handle ----------------------------


def run_through(body: dict, path: str = "/v1/completions") -> tuple[dict, dict]:
    """(P's body, D's body) after one successful request."""
    engines = FakeEngines()
    with client_for(engines) as c:
        r = c.post(path, json=body)
    assert r.status_code == 200, r.text
    (p_req,), (d_req,) = engines.seen["p"], engines.seen["d"]
    return p_req["body"], d_req["body"]


def test_min_tokens_goes_to_d_only():
    p, d = run_through({**BASE, "min_tokens": 5})
    assert "min_tokens" not in p and p["max_tokens"] == 1
    assert d["min_tokens"] == 5 and d["max_tokens"] == 9


@pytest.mark.parametrize("extra", [{"n": 1}, {"best_of": 1}, {"n": None}])
def test_single_sequence_n_and_best_of_pass(extra):
    p, d = run_through({**BASE, **extra})
    assert p["max_tokens"] == 1 and not set(extra) & set(p)
    assert all(d[k] == v for k, v in extra.items())


def test_completion_logprobs_go_to_d_only():
    p, d = run_through({**BASE, "logprobs": 2})
    assert "logprobs" not in p and d["logprobs"] == 2


def test_chat_logprobs_go_to_d_only():
    p, d = run_through({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                        "max_completion_tokens": 7, "logprobs": True, "top_logprobs": 2},
                       "/v1/chat/completions")
    assert p["max_tokens"] == 1 and not {"logprobs", "top_logprobs", "max_completion_tokens"} & set(p)
    assert d["logprobs"] is True and d["top_logprobs"] == 2 and d["max_completion_tokens"] == 7


def test_token_id_prompt_reaches_both_engines():
    p, d = run_through({**BASE, "prompt": [5, 6, 7]})
    assert p["prompt"] == d["prompt"] == [5, 6, 7] and p["max_tokens"] == 1


@pytest.mark.parametrize("prompt", [["one prompt"], [[5, 6, 7]]])
def test_batch_of_one_is_that_prompt(prompt):
    p, d = run_through({**BASE, "prompt": prompt})
    assert p["prompt"] == d["prompt"] == prompt[0]


def test_stream_options_with_stream_pass_to_d_only():
    engines = FakeEngines()
    with client_for(engines) as c:
        r = c.post("/v1/completions", json={**BASE, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    assert "stream_options" not in engines.seen["p"][0]["body"]
    assert engines.seen["d"][0]["body"]["stream_options"] == {"include_usage": True}


# -- client kv_transfer_params never reach an engine -----------------------------------


def test_client_kv_transfer_params_are_replaced_for_p_and_d():
    evil = {"do_remote_prefill": True, "remote_engine_id": "x", "remote_block_ids": [[0, 1, 2]],
            "remote_host": "10.0.0.9", "remote_port": 1, TRACE_PARAMS_KEY: {"request_id": "forged"}}
    engines = FakeEngines()
    with client_for(engines) as c:
        r = c.post("/v1/completions", json={**BASE, "kv_transfer_params": evil})
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    (p_req,), (d_req,) = engines.seen["p"], engines.seen["d"]
    assert p_req["body"]["kv_transfer_params"] == {"do_remote_decode": True,
                                                   TRACE_PARAMS_KEY: {"request_id": rid}}
    assert d_req["body"]["kv_transfer_params"] == {**KV, TRACE_PARAMS_KEY: {"request_id": rid,
                                                                             "prefill_url": P}}


# -- per-engine pools: 503 + Retry-After when full -------------------------------------


class SlowPrefill:
    """P answers after ``delay`` seconds; D at once.  Counts calls per engine."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls = {"p": 0, "d": 0}

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST":  # D's model list: its max_model_len unknown here
            return httpx.Response(404)
        self.calls[request.url.host] += 1
        if request.url.host == "p":
            await asyncio.sleep(self.delay)
            return httpx.Response(200, json={"kv_transfer_params": KV})
        if json.loads(request.content).get("stream"):
            return httpx.Response(200, content=b"data: [DONE]\n\n", headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={"choices": [{"text": "decoded"}]})


async def timed_post(client: httpx.AsyncClient, body: dict) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = await client.post("/v1/completions", json=body)
    return r, time.monotonic() - t0


def test_full_pool_is_503_with_retry_after_at_once():
    limit, delay = 4, 0.6
    engines = SlowPrefill(delay)
    app = create_app(ProxyConfig(P, D, timeout_s=5, max_connections=limit),
                     transport=httpx.MockTransport(engines))

    async def burst() -> tuple[list[tuple[httpx.Response, float]], httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as c:
            results = await asyncio.gather(*(timed_post(c, BASE) for _ in range(2 * limit)))
            # slots are given back: the pool serves again, plain and streamed
            after = await c.post("/v1/completions", json=BASE)
            streamed = await c.post("/v1/completions", json={**BASE, "stream": True})
            return results, after, streamed

    results, after, streamed = asyncio.run(burst())
    ok = [(r, t) for r, t in results if r.status_code == 200]
    busy = [(r, t) for r, t in results if r.status_code == 503]
    assert len(ok) == len(busy) == limit, [r.status_code for r, _ in results]
    for r, elapsed in busy:
        assert r.headers["retry-after"] == "1" and elapsed < delay / 2, elapsed
        err = r.json()["error"]
        # D's slot is taken before P runs, so a saturated pair refuses before P prefills
        assert err["type"] == "decode_error" and "busy" in err["message"]
    assert all(elapsed >= delay for _, elapsed in ok)
    assert after.status_code == 200 and streamed.status_code == 200
    assert engines.calls == {"p": limit + 2, "d": limit + 2}  # refused ones never reached P


def test_every_call_gives_its_slot_back():
    # One connection per engine: any slot not given back would make the next call a 503.
    engines = FakeEngines()
    app = create_app(ProxyConfig(P, D, timeout_s=5, max_connections=1),
                     transport=httpx.MockTransport(engines))
    with TestClient(app) as c:
        for body in ({**BASE, "stream": True}, BASE, {**BASE, "stream": True}):
            assert c.post("/v1/completions", json=body).status_code == 200
        engines.decode_status = 500  # a failed stream and a failed call give theirs back too
        assert c.post("/v1/completions", json={**BASE, "stream": True}).status_code == 500
        assert c.post("/v1/completions", json=BASE).status_code == 500
        engines.decode_status = 200
        assert c.post("/v1/completions", json={**BASE, "stream": True}).status_code == 200


def test_pool_timeout_from_httpx_is_503_with_retry_after():
    def engines(request: httpx.Request) -> httpx.Response:
        raise httpx.PoolTimeout("no connection free", request=request)

    app = create_app(ProxyConfig(P, D, timeout_s=5), transport=httpx.MockTransport(engines))
    with TestClient(app) as c:
        r = c.post("/v1/completions", json=BASE)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["message"].startswith("prefill engine: busy")


# -- /metrics and /v1/models -----------------------------------------------------------


def test_metrics_serves_the_default_registry():
    counter = Counter("hybrid_pd_test_edges_total", "registered by tests/test_proxy_edges.py")
    try:
        counter.inc(3)
        with client_for(FakeEngines()) as c:
            r = c.get("/metrics")
    finally:
        REGISTRY.unregister(counter)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "hybrid_pd_test_edges_total 3.0" in r.text


def test_models_forwards_authorization():
    seen: list[httpx.Headers] = []

    def engines(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers)
        return httpx.Response(200, json={"data": [{"id": "m"}]})

    app = create_app(ProxyConfig(P, D, timeout_s=5), transport=httpx.MockTransport(engines))
    with TestClient(app) as c:
        r = c.get("/v1/models", headers={"Authorization": "Bearer sk-test"})
    assert r.status_code == 200
    (headers,) = seen
    assert headers["authorization"] == "Bearer sk-test"


# -- API key ------------------------------------------------------------------------------


def _keyed(engines: FakeEngines) -> TestClient:
    return TestClient(create_app(ProxyConfig(P, D, timeout_s=5, api_key="sk-right"),
                                 transport=httpx.MockTransport(engines)))


@pytest.mark.parametrize("auth", [None, "Bearer sk-wrong", "sk-right", "Bearer sk-right2", "Basic sk-right"])
@pytest.mark.parametrize(("method", "path"), [("post", "/v1/completions"),
                                              ("post", "/v1/chat/completions"),
                                              ("get", "/v1/models")])
def test_api_key_is_required_on_every_v1_route_before_any_engine_call(auth, method, path):
    engines = FakeEngines()
    headers = {"Authorization": auth} if auth else {}
    with _keyed(engines) as c:
        r = getattr(c, method)(path, headers=headers,
                               **({"json": BASE} if method == "post" else {}))
    assert r.status_code == 401, r.text
    assert r.json()["error"]["type"] == "authentication_error"
    assert engines.seen == {"p": [], "d": []}


def test_api_key_request_reaches_both_engines_with_the_key_and_health_stays_open():
    engines = FakeEngines()
    with _keyed(engines) as c:
        r = c.post("/v1/completions", json=BASE, headers={"Authorization": "Bearer sk-right"})
        assert c.get("/health").status_code == 200
        assert c.get("/metrics").status_code == 200
    assert r.status_code == 200, r.text
    (p_req,), (d_req,) = engines.seen["p"], engines.seen["d"]
    assert p_req["headers"]["authorization"] == d_req["headers"]["authorization"] == "Bearer sk-right"


def test_api_key_never_shows_in_the_config_repr():
    assert "sk-right" not in repr(ProxyConfig(P, D, api_key="sk-right"))
