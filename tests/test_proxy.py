"""Proxy logic: request rewriting and error mapping, with fake engines (httpx transport).

The real proxy in front of real engines is covered by tests/e2e/test_pd_e2e.py.
"""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from hybrid_pd.serve.proxy import ProxyConfig, create_app, decode_request, prefill_request
from hybrid_pd.serve.proxy_calls import EngineError
from hybrid_pd.settings import TRACE_PARAMS_KEY

P, D = "http://p", "http://d"
KV = {"do_remote_prefill": True, "remote_engine_id": "e1", "remote_block_ids": [[1, 2]],
      "remote_host": "127.0.0.1", "remote_port": 5600}


def test_prefill_request_is_one_token_no_stream_with_marker():
    body = {"model": "m", "prompt": "hi", "max_tokens": 50, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0}
    out = prefill_request(body)
    assert out["max_tokens"] == 1 and out["stream"] is False
    assert "stream_options" not in out
    assert out["kv_transfer_params"]["do_remote_decode"] is True
    assert out["prompt"] == "hi" and out["temperature"] == 0
    assert body["max_tokens"] == 50 and body["stream"] is True  # caller's body untouched


def test_decode_request_passes_prefill_params_unchanged():
    body = {"model": "m", "prompt": "hi", "max_tokens": 50}
    out = decode_request(body, {"kv_transfer_params": KV})
    assert out["kv_transfer_params"] == KV and out["max_tokens"] == 50


def test_decode_request_without_params_names_the_fix():
    with pytest.raises(EngineError, match="kv_role=kv_producer"):
        decode_request({"prompt": "x"}, {"choices": []})


MAX_LEN = 4096


class FakeEngines:
    """Answers like vLLM's OpenAI server would; records what each engine received."""

    def __init__(self, prefill_status=200, decode_status=200, prefill_down=False):
        self.seen: dict[str, list[dict]] = {"p": [], "d": []}
        self.prefill_status, self.decode_status, self.prefill_down = prefill_status, decode_status, prefill_down

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": MAX_LEN}]})
        body = json.loads(request.content)
        self.seen[host].append({"body": body, "headers": dict(request.headers)})
        if host == "p":
            if self.prefill_down:
                raise httpx.ConnectError("connection refused", request=request)
            if self.prefill_status != 200:
                return httpx.Response(self.prefill_status, json={"error": {"message": "prompt too long"}})
            return httpx.Response(200, json={"choices": [{"text": "x"}], "kv_transfer_params": KV})
        if self.decode_status != 200:
            return httpx.Response(self.decode_status, json={"error": {"message": "kv load failed"}})
        if body.get("stream"):
            sse = b"".join(f"data: {json.dumps({'choices': [{'text': t}]})}\n\n".encode() for t in "abc")
            return httpx.Response(200, content=sse + b"data: [DONE]\n\n",
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={"choices": [{"text": "decoded"}]})


def client_for(engines: FakeEngines) -> TestClient:
    return TestClient(create_app(ProxyConfig(P, D, timeout_s=5), transport=httpx.MockTransport(engines)))


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_request_goes_to_p_then_d(path):
    engines = FakeEngines()
    with client_for(engines) as c:
        r = c.post(path, json={"model": "m", "prompt": "hi", "max_tokens": 9},
                   headers={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "decoded"
    (p_req,), (d_req,) = engines.seen["p"], engines.seen["d"]
    assert p_req["body"]["max_tokens"] == 1 and p_req["body"]["kv_transfer_params"]["do_remote_decode"]
    rid = r.headers["x-request-id"]
    # P's params reach D unchanged, plus the trace hand-off for the engines' connector
    tp = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"  # no tracer here: the caller's, forwarded
    # D's hand-off also names the P engine that prefilled (D fetches P's integrity digests there)
    assert d_req["body"]["kv_transfer_params"] == {
        **KV, TRACE_PARAMS_KEY: {"request_id": rid, "traceparent": tp, "prefill_url": P}}
    assert p_req["body"]["kv_transfer_params"][TRACE_PARAMS_KEY] == {"request_id": rid, "traceparent": tp}
    assert d_req["body"]["max_tokens"] == 9
    # one request id and the caller's trace context reach both engines
    assert p_req["headers"]["x-request-id"] == d_req["headers"]["x-request-id"] == rid
    assert p_req["headers"]["traceparent"] == d_req["headers"]["traceparent"]


def test_streaming_passes_decode_chunks_through():
    with client_for(FakeEngines()) as c:
        r = c.post("/v1/completions", json={"model": "m", "prompt": "hi", "stream": True})
    assert r.status_code == 200
    texts = [json.loads(line[6:])["choices"][0]["text"] for line in r.text.splitlines()
             if line.startswith("data: {")]
    assert texts == ["a", "b", "c"] and r.text.rstrip().endswith("data: [DONE]")


def test_prefill_error_comes_back_with_engine_and_cause():
    engines = FakeEngines(prefill_status=400)
    with client_for(engines) as c:
        r = c.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "prefill engine: HTTP 400: prompt too long"
    assert engines.seen["d"] == []  # D never asked


def test_decode_error_and_unreachable_prefill():
    with client_for(FakeEngines(decode_status=500)) as c:
        r = c.post("/v1/completions", json={"model": "m", "prompt": "hi", "stream": True})
    assert r.status_code == 500 and "decode engine: HTTP 500: kv load failed" in r.text
    with client_for(FakeEngines(prefill_down=True)) as c:
        r = c.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert r.status_code == 502 and "prefill engine: unreachable" in r.json()["error"]["message"]


def test_bad_body_is_400():
    with client_for(FakeEngines()) as c:
        assert c.post("/v1/completions", content=b"{nope").status_code == 400
        assert c.post("/v1/completions", json=[1, 2]).status_code == 400


def test_timeout_is_504_not_a_hang():
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    app = create_app(ProxyConfig(P, D, timeout_s=0.1), transport=httpx.MockTransport(slow))
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert r.status_code == 504 and "prefill engine: no answer within" in r.json()["error"]["message"]


def test_prefill_answer_without_kv_params_is_a_prefill_error():
    def engines(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":  # D's model list (its max_model_len): not a request
            return httpx.Response(404)
        assert request.url.host == "p", "D must not be asked"
        return httpx.Response(200, json={"choices": [{"text": "x"}]})

    app = create_app(ProxyConfig(P, D, timeout_s=5), transport=httpx.MockTransport(engines))
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "prefill_error" and "kv_role=kv_producer" in r.text


def test_broken_decode_stream_ends_with_an_error_event():
    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self):
            yield b'data: {"choices": [{"text": "a"}]}\n\n'
            raise httpx.ReadError("connection reset")

    def engines(request: httpx.Request) -> httpx.Response:
        if request.url.host == "p":
            return httpx.Response(200, json={"kv_transfer_params": KV})
        return httpx.Response(200, stream=Broken(), headers={"content-type": "text/event-stream"})

    app = create_app(ProxyConfig(P, D, timeout_s=5), transport=httpx.MockTransport(engines))
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": "m", "prompt": "hi", "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert r.status_code == 200 and events[0]["choices"][0]["text"] == "a"
    assert events[-1]["error"]["type"] == "decode_error"
    assert events[-1]["error"]["message"].startswith("decode engine: stream broke: ReadError")


def test_health_names_each_engine():
    def engines(request: httpx.Request) -> httpx.Response:
        if request.url.host == "p":
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200)

    with client_for(FakeEngines()) as c:
        r = c.get("/health")
    assert r.status_code == 200 and r.json() == {"prefill": "ok", "decode": "ok"}
    app = create_app(ProxyConfig(P, D, timeout_s=5), transport=httpx.MockTransport(engines))
    with TestClient(app) as c:
        r = c.get("/health")
    assert r.status_code == 503 and r.json() == {"prefill": "unreachable: ConnectError", "decode": "ok"}


def test_models_come_from_decode():
    def engines(request: httpx.Request) -> httpx.Response:
        assert (request.url.host, request.url.path) == ("d", "/v1/models")
        return httpx.Response(200, json={"data": [{"id": "m"}]})

    app = create_app(ProxyConfig(P, D, timeout_s=5), transport=httpx.MockTransport(engines))
    with TestClient(app) as c:
        r = c.get("/v1/models")
    assert r.status_code == 200 and r.json() == {"data": [{"id": "m"}]}

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    app = create_app(ProxyConfig(P, D, timeout_s=5), transport=httpx.MockTransport(down))
    with TestClient(app) as c:
        r = c.get("/v1/models")
    assert r.status_code == 502 and r.json()["error"]["message"].startswith("decode engine: unreachable: ")
