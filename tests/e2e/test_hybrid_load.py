"""Load through our connector, on one P/D pair shared by the module: 32 concurrent P/D
requests, 64 concurrent streams of which a third are cancelled mid-stream, and a
request D refuses after P prefilled.

Every finished output must equal the single engine's (one reference engine, run first
for every prompt), and afterwards both engines' KV cache usage must be back to idle (P
frees a request's blocks when D's read notification arrives, or D's refusal; a leak
would keep usage above zero).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from helpers import free_port
from prometheus_client.parser import text_string_to_metric_families

from hybrid_pd.serve.engines import LaunchConfig
from hybrid_pd.serve.supervisor import Ports, build_reference_supervisor, build_supervisor
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.tiny_models import engine_args_for

pytestmark = pytest.mark.e2e

N_REQUESTS = 32
MAX_TOKENS = 8
N_STREAMS = 64
STREAM_TOKENS = 48
CANCEL_AFTER = 4  # tokens a cancelling client reads before it leaves
# what a cancelling client asks for: D would run for many seconds if it were not stopped
CANCELLED_TOKENS = 1000
IDLE_BOUND_S = 10.0
IDLE = ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting")


def prompt(i: int) -> list[int]:
    n = 5 + (i * 97) % 600  # 5..604 tokens: crosses the 256-token block edge both ways
    return [(j * 31 + i * 7) % 500 + 3 for j in range(n)]


def stream_prompt(i: int) -> list[int]:
    return [(j * 17 + i * 13) % 500 + 3 for j in range(20 + (i * 53) % 400)]


def body(model: str, p: list[int], max_tokens: int = MAX_TOKENS) -> dict:
    return {"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}


def gauge(client: httpx.Client, base: str, name: str) -> float:
    text = client.get(base + "/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


async def fire(url: str, bodies: list[dict]) -> list[list[int]]:
    async with httpx.AsyncClient(timeout=600) as c:
        rs = await asyncio.gather(*(c.post(url + "/v1/completions", json=b) for b in bodies))
    for r in rs:
        assert r.status_code == 200, r.text
    return [r.json()["choices"][0]["token_ids"] for r in rs]


@dataclass
class LoadPair:
    model: str
    proxy: str
    engines: dict[str, str]
    db: Path
    ref: dict[str, list[list[int]]]


@pytest.fixture(scope="module")
def load_pair(tiny_models, tmp_path_factory) -> Iterator[LoadPair]:
    model = str(tiny_models["tiny-nemotron-h"])
    tmp = tmp_path_factory.mktemp("load")
    cfg = LaunchConfig(model=model, connector="hybrid", engine_args=engine_args_for(model, ()),
                       telemetry_db=str(tmp / "pd" / "telemetry.db"))
    port = free_port()
    with build_reference_supervisor(cfg, tmp / "ref", port) as ref_sup:
        ref_sup.start()
        ref_sup.wait_healthy(600, progress=False)
        url = f"http://127.0.0.1:{port}"
        ref = {"load": asyncio.run(fire(url, [body(model, prompt(i)) for i in range(N_REQUESTS)])),
               "streams": asyncio.run(fire(url, [body(model, stream_prompt(i), STREAM_TOKENS)
                                                 for i in range(N_STREAMS)]))}
    ports = Ports(proxy=free_port(), prefill=free_port(), decode=free_port(),
                  prefill_side_channel=free_port(), decode_side_channel=free_port())
    with build_supervisor(cfg, tmp / "pd", ports) as sup:
        sup.start()
        sup.wait_healthy(600, progress=False)
        host = "http://127.0.0.1"
        yield LoadPair(model, f"{host}:{ports.proxy}",
                       {"prefill": f"{host}:{ports.prefill}", "decode": f"{host}:{ports.decode}"},
                       Path(cfg.telemetry_db), ref)


def wait_idle(pair: LoadPair, bound: float) -> float:
    """Seconds until both engines report 0 KV usage, 0 running and 0 waiting."""
    t0 = time.monotonic()
    with httpx.Client(timeout=10) as c:
        while True:
            got = {k: {n: gauge(c, v, n) for n in IDLE} for k, v in pair.engines.items()}
            if all(x == 0 for g in got.values() for x in g.values()):
                return time.monotonic() - t0
            assert time.monotonic() - t0 < bound, f"not idle after {bound:.0f} s: {got}"
            time.sleep(0.5)


def test_request_d_refuses_after_p_prefilled_frees_p_at_once(load_pair):
    """An output that cannot fit the model at all is refused by the proxy before P runs
    (D's max_model_len, read from D's /v1/models).  A field only D checks (logprobs
    above the engine's max_logprobs; P never gets logprobs): P prefills (max_tokens=1),
    D refuses it (HTTP 400), and P's blocks must be freed at once through vLLM's
    rejected-request path, not when P's lease (120 s) expires.  First in the module, so
    the pair has not handshaken yet: the notification waits for the handshake, after
    which an idle D must still step once more to send it."""
    pair = load_pair
    r = httpx.post(pair.proxy + "/v1/completions", timeout=120,
                   json=body(pair.model, prompt(3), max_tokens=100_000))
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    assert "max_model_len is 4096" in r.json()["error"]["message"], r.text
    r = httpx.post(pair.proxy + "/v1/completions", timeout=120,
                   json={**body(pair.model, prompt(3)), "logprobs": 1000})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith("decode engine: HTTP 400"), r.text
    idle = wait_idle(pair, IDLE_BOUND_S)
    print(f"\nD refused: {r.json()['error']['message'][:200]}; both idle after {idle:.1f} s")


def test_32_concurrent_requests_identical_and_no_leaked_blocks(load_pair):
    pair = load_pair
    prompts = [prompt(i) for i in range(N_REQUESTS)]
    t0 = time.monotonic()
    got = asyncio.run(fire(pair.proxy, [body(pair.model, p) for p in prompts]))
    elapsed = time.monotonic() - t0
    bad = [(len(p), g, r) for p, g, r in zip(prompts, got, pair.ref["load"], strict=True) if g != r]
    assert not bad, f"{len(bad)} of {N_REQUESTS} P/D outputs differ from the single engine: {bad[:3]}"
    print(f"\n{N_REQUESTS} concurrent P/D requests in {elapsed:.1f} s")
    # P frees blocks on D's notification; give the engines' 10 s stats interval time.
    wait_idle(pair, 90)


async def stream_one(c: httpx.AsyncClient, url: str, payload: dict, request_id: str,
                     cancel_after: int | None) -> list[int] | None:
    """The streamed token ids, or None when the client left after ``cancel_after``."""
    tokens: list[int] = []
    async with c.stream("POST", url + "/v1/completions", json={**payload, "stream": True},
                        headers={"X-Request-Id": request_id}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                tokens += json.loads(line[6:])["choices"][0].get("token_ids") or []
                if cancel_after is not None and len(tokens) >= cancel_after:
                    return None  # leaving the block closes the connection mid-stream
    return tokens


def proxy_spans(db: Path, request_ids: list[str], bound: float = 15.0) -> dict[str, dict]:
    """The proxy's request span attributes per request id (spans leave in batches)."""
    t0 = time.monotonic()
    while True:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = con.execute("SELECT request_id, attributes FROM spans WHERE name = ?",
                               (A.SPAN_PROXY_REQUEST,)).fetchall()
        finally:
            con.close()
        found = {rid: json.loads(attrs) for rid, attrs in rows if rid in request_ids}
        if len(found) == len(request_ids) or time.monotonic() - t0 > bound:
            return found
        time.sleep(0.5)


def test_64_streams_a_third_cancelled_mid_stream(load_pair):
    """64 concurrent streams through the proxy; every third client asks for
    CANCELLED_TOKENS and leaves after CANCEL_AFTER.  Every finished stream equals the
    single engine; both engines are idle (0 running, 0 waiting, 0 KV usage) within
    IDLE_BOUND_S of the last stream (so D stopped the cancelled ones); the cancelled
    requests' proxy spans say kv.status=cancelled, the others do not."""
    pair = load_pair
    tag = uuid.uuid4().hex[:6]
    rids = [f"stream-{tag}-{i}" for i in range(N_STREAMS)]
    cancel = {i for i in range(N_STREAMS) if i % 3 == 0}

    async def run() -> list[list[int] | None]:
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=128)) as c:
            return await asyncio.gather(*(
                stream_one(c, pair.proxy,
                           body(pair.model, stream_prompt(i),
                                CANCELLED_TOKENS if i in cancel else STREAM_TOKENS),
                           rids[i], CANCEL_AFTER if i in cancel else None)
                for i in range(N_STREAMS)))

    t0 = time.monotonic()
    got = asyncio.run(run())
    elapsed = time.monotonic() - t0
    assert all(got[i] is None for i in cancel)
    bad = [i for i in range(N_STREAMS) if i not in cancel and got[i] != pair.ref["streams"][i]]
    assert not bad, f"streams {bad} differ from the single engine: {got[bad[0]]} vs {pair.ref['streams'][bad[0]]}"
    idle = wait_idle(pair, IDLE_BOUND_S)
    spans = proxy_spans(pair.db, rids)
    assert len(spans) == N_STREAMS, sorted(set(rids) - set(spans))
    said = {i for i in range(N_STREAMS) if spans[rids[i]].get(A.KV_STATUS) == "cancelled"}
    assert said == cancel, f"cancelled but not said: {cancel - said}; said, not cancelled: {said - cancel}"
    print(f"\n{N_STREAMS} streams ({len(cancel)} cancelled) in {elapsed:.1f} s; both engines "
          f"idle {idle:.1f} s after the last")
