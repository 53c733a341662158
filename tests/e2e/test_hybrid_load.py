"""Load through our connector: 32 concurrent P/D requests, outputs and KV usage.

Every output must equal the single engine's, and afterwards both engines' KV cache
usage must be back to idle (P frees a request's blocks when D's read notification
arrives; a leak would keep usage above zero).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from helpers import free_port
from prometheus_client.parser import text_string_to_metric_families

from hybrid_pd.serve.engines import LaunchConfig
from hybrid_pd.serve.supervisor import Ports, build_reference_supervisor, build_supervisor
from hybrid_pd.tiny_models import engine_args_for

pytestmark = pytest.mark.e2e

N_REQUESTS = 32
MAX_TOKENS = 8


def prompt(i: int) -> list[int]:
    n = 5 + (i * 97) % 600  # 5..604 tokens: crosses the 256-token block edge both ways
    return [(j * 31 + i * 7) % 500 + 3 for j in range(n)]


def body(model: str, p: list[int]) -> dict:
    return {"model": model, "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}


def gauge(client: httpx.Client, base: str, name: str) -> float:
    text = client.get(base + "/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


async def fire(url: str, model: str, prompts: list[list[int]]) -> list[list[int]]:
    async with httpx.AsyncClient(timeout=600) as c:
        rs = await asyncio.gather(*(c.post(url + "/v1/completions", json=body(model, p)) for p in prompts))
    for r in rs:
        assert r.status_code == 200, r.text
    return [r.json()["choices"][0]["token_ids"] for r in rs]


def test_32_concurrent_requests_identical_and_no_leaked_blocks(tiny_models, tmp_path):
    model = str(tiny_models["tiny-nemotron-h"])
    cfg = LaunchConfig(model=model, connector="hybrid", engine_args=engine_args_for(model, ()))
    prompts = [prompt(i) for i in range(N_REQUESTS)]

    port = free_port()
    with build_reference_supervisor(cfg, tmp_path / "ref", port) as ref_sup:
        ref_sup.start()
        ref_sup.wait_healthy(600, progress=False)
        ref = asyncio.run(fire(f"http://127.0.0.1:{port}", model, prompts))

    ports = Ports(proxy=free_port(), prefill=free_port(), decode=free_port(),
                  prefill_side_channel=free_port(), decode_side_channel=free_port())
    with build_supervisor(cfg, tmp_path / "pd", ports) as sup:
        sup.start()
        sup.wait_healthy(600, progress=False)
        t0 = time.monotonic()
        got = asyncio.run(fire(f"http://127.0.0.1:{ports.proxy}", model, prompts))
        elapsed = time.monotonic() - t0
        bad = [(len(p), g, r) for p, g, r in zip(prompts, got, ref, strict=True) if g != r]
        assert not bad, f"{len(bad)} of {N_REQUESTS} P/D outputs differ from the single engine: {bad[:3]}"
        print(f"\n{N_REQUESTS} concurrent P/D requests in {elapsed:.1f} s")

        # P frees blocks on D's notification; give the engines' 10 s stats interval time.
        engines = {"prefill": f"http://127.0.0.1:{ports.prefill}", "decode": f"http://127.0.0.1:{ports.decode}"}
        deadline = time.monotonic() + 90
        with httpx.Client(timeout=10) as c:
            while True:
                usage = {k: gauge(c, v, "vllm:kv_cache_usage_perc") for k, v in engines.items()}
                running = {k: gauge(c, v, "vllm:num_requests_running") for k, v in engines.items()}
                if all(u == 0 for u in usage.values()) and all(r == 0 for r in running.values()):
                    break
                assert time.monotonic() < deadline, f"KV blocks still held after 90 s: usage {usage}, running {running}"
                time.sleep(2)
