"""Several P and D behind the router, on this box: 2P1D and 1P2D.

Four engines (P1, P2, D1, D2: ``serve --role``'s supervisors, one engine each) and two
routers over them: A = (P1, P2) -> D1, B = P1 -> (D1, D2).  Outputs must equal the
single engine (P1's own answer to the plain request), the routers must spread the load
over their pools (counted on their ``/metrics``), and when P2 is killed mid-run under A,
its in-flight request errors or is retried on P1 while the rest go on on P1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from helpers import free_port
from prometheus_client.parser import text_string_to_metric_families

from hybrid_pd.serve.engines import LaunchConfig
from hybrid_pd.serve.supervisor import Ports, Supervisor, build_supervisor
from hybrid_pd.tiny_models import engine_args_for

pytestmark = pytest.mark.e2e

SERVED = "tiny"


def body(p: list[int]) -> dict:
    return {"model": SERVED, "prompt": p, "max_tokens": 6, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}


def prompt(i: int) -> list[int]:
    return [(j * 29 + i * 13) % 500 + 3 for j in range(40 + 37 * (i % 8))]


@dataclass
class Pool:
    engines: dict[str, str]  # name -> base URL
    sups: dict[str, Supervisor]
    routers: dict[str, str]  # "2p1d" / "1p2d" -> base URL
    procs: list[subprocess.Popen]


def _engine(model: Path, role: str, name: str, tmp: Path) -> tuple[Supervisor, str]:
    ports = Ports(proxy=free_port(), prefill=free_port(), decode=free_port(),
                  prefill_side_channel=free_port(), decode_side_channel=free_port())
    cfg = LaunchConfig(model=str(model), connector="hybrid",
                       engine_args=engine_args_for(str(model), ("--served-model-name", SERVED)))
    sup = build_supervisor(cfg, tmp / name, ports, role=role)
    port = ports.prefill if role == "prefill" else ports.decode
    return sup, f"http://127.0.0.1:{port}"


def _router(prefill: list[str], decode: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hybrid_pd.cli", "proxy", "--prefill", *prefill,
                             "--decode", *decode, "--port", str(port), "--health-interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def pool(tiny_models, tmp_path_factory) -> Iterator[Pool]:
    tmp = tmp_path_factory.mktemp("router-pool")
    model = tiny_models["tiny-nemotron-h"]
    sups, urls = {}, {}
    for name, role in (("p1", "prefill"), ("p2", "prefill"), ("d1", "decode"), ("d2", "decode")):
        sups[name], urls[name] = _engine(model, role, name, tmp)
    procs: list[subprocess.Popen] = []
    try:
        for sup in sups.values():
            sup.start()
        for sup in sups.values():
            sup.wait_healthy(900, progress=False)
        routers = {}
        for key, pre, dec in (("2p1d", ["p1", "p2"], ["d1"]), ("1p2d", ["p1"], ["d1", "d2"])):
            proc, url = _router([urls[n] for n in pre], [urls[n] for n in dec])
            procs.append(proc)
            routers[key] = url
        with httpx.Client() as c:
            for url in routers.values():
                t0 = time.monotonic()
                while True:
                    try:
                        if c.get(url + "/health", timeout=2).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    assert time.monotonic() - t0 < 60, f"router {url} not healthy"
                    time.sleep(0.5)
        yield Pool(urls, sups, routers, procs)
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        for sup in sups.values():
            sup.stop()


def backend_series(c: httpx.Client, router: str, name: str) -> dict[str, float]:
    """One per-backend series of the router's /metrics, by backend URL."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(c.get(router + "/metrics").text):
        for s in fam.samples:
            if s.name == name:
                out[s.labels["backend"]] = s.value
    return out


def backend_requests(c: httpx.Client, router: str) -> dict[str, float]:
    return backend_series(c, router, "hybrid_pd_proxy_backend_requests_total")


def run(c: httpx.Client, base: str, prompts: list[list[int]]
        ) -> list[tuple[httpx.Response | Exception, float]]:
    """Each prompt through ``base``, 4 at a time: (answer or error, seconds)."""
    def one(p: list[int]) -> tuple[httpx.Response | Exception, float]:
        t0 = time.monotonic()
        try:
            return c.post(base + "/v1/completions", json=body(p), timeout=180), \
                time.monotonic() - t0
        except httpx.HTTPError as exc:
            return exc, time.monotonic() - t0

    with ThreadPoolExecutor(4) as ex:
        return list(ex.map(one, prompts))


def tokens(r: httpx.Response) -> list[int]:
    return r.json()["choices"][0]["token_ids"]


@pytest.mark.parametrize("topology", ["2p1d", "1p2d"])
def test_pool_outputs_equal_single_engine_and_spread(pool: Pool, topology: str) -> None:
    prompts = [prompt(i) for i in range(8)]
    with httpx.Client(limits=httpx.Limits(max_connections=16)) as c:
        before = backend_requests(c, pool.routers[topology])
        got = [r for r, _ in run(c, pool.routers[topology], prompts)]
        ref = [c.post(pool.engines["p1"] + "/v1/completions", json=body(p), timeout=180)
               for p in prompts]
        for i, (g, r) in enumerate(zip(got, ref, strict=True)):
            assert isinstance(g, httpx.Response) and g.status_code == 200, (i, g)
            assert tokens(g) == tokens(r), f"request {i} differs from the single engine"
        after = backend_requests(c, pool.routers[topology])
    spread = {url: after.get(url, 0) - before.get(url, 0) for url in after}
    print(f"\n{topology}: calls per backend {spread}")
    role_of = {url: name for name, url in pool.engines.items()}
    pool_names = {"2p1d": ("p1", "p2", "d1"), "1p2d": ("p1", "d1", "d2")}[topology]
    for name in pool_names:
        assert spread.get(pool.engines[name], 0) >= 2, (name, spread, role_of)


def test_prefill_killed_mid_run_rest_continue(pool: Pool) -> None:
    """2P1D: P2's engine is SIGKILLed while it has a request in flight.  That request
    errors or is retried on P1 (never hangs); every request after the kill succeeds on
    P1 with the single engine's tokens."""
    router, p2_url = pool.routers["2p1d"], pool.engines["p2"]
    prompts = [prompt(100 + i) * 2 for i in range(12)]  # longer: P2 is busy a while
    p2 = pool.sups["p2"].children[0]
    with httpx.Client(limits=httpx.Limits(max_connections=16)) as c, ThreadPoolExecutor(1) as bg:
        ref = [tokens(c.post(pool.engines["p1"] + "/v1/completions", json=body(p), timeout=180))
               for p in prompts]
        fut = bg.submit(run, c, router, prompts[:8])
        t0 = time.monotonic()
        while backend_series(c, router, "hybrid_pd_proxy_backend_in_flight").get(p2_url, 0) < 1:
            assert time.monotonic() - t0 < 60 and not fut.done(), "P2 never got a request"
            time.sleep(0.02)
        os.killpg(p2.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        first = fut.result(timeout=300)
        later = run(c, router, prompts[8:])  # P2 is out now: all on P1
        took = time.monotonic() - killed
        spread = backend_requests(c, router)
    ok = sum(isinstance(r, httpx.Response) and r.status_code == 200 for r, _ in first)
    print(f"\nP2 killed with a request in flight: {ok}/8 of that batch succeeded "
          f"(seconds: {[round(t, 2) for _, t in first]}); the next 4 "
          f"(seconds: {[round(t, 2) for _, t in later]}) done {took:.1f} s after the kill; "
          f"calls per backend {spread}")
    for i, (r, _) in enumerate(first):
        assert isinstance(r, httpx.Response), f"request {i}: {r!r} (no answer: a hang?)"
        if r.status_code == 200:
            assert tokens(r) == ref[i], i
        else:
            assert r.status_code >= 500, r.text
    for i, (r, _) in enumerate(later):
        assert isinstance(r, httpx.Response) and r.status_code == 200, (i, r)
        assert tokens(r) == ref[8 + i], 8 + i
