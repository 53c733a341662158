"""`hybrid-pd serve --restart on-failure` with an API key: the key guards the proxy and
both engines and is written nowhere in the run directory; a client that leaves a long
non-streaming request stops D's generation within seconds; an engine that dies is named,
restarted, the pair handshakes again and serving resumes with correct outputs.

One real `hybrid-pd serve` (hybrid connector, tiny Nemotron-H, ``VLLM_API_KEY`` in its
environment) on 2 cores: requests without the key are refused by the proxy, P and D;
then D's process group is SIGKILLed mid-run, then P's.  Each time the command must report the dead child
with its log tail, answer a request sent while the child is down with an error (no hang),
come back (new engine id, new NIXL handshake, run by serve's warm-up request) and then
give the single engine's tokens again.  Wall time: ~4 min.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest
from helpers import Output, stop_serve

from e2e.test_hybrid_load import gauge
from e2e.test_pd_e2e import body, generate, pd_ports, reference, token_prompt

PROMPTS = [token_prompt(n) for n in (9, 300)]
RESTART_TIMEOUT_S = 300
KEY = "sk-e2e-7c1f9b2a"


def _engine_group(serve: subprocess.Popen, port: int) -> int:
    for p in psutil.Process(serve.pid).children(recursive=True):
        cmd = p.cmdline()
        if "--port" in cmd and cmd[cmd.index("--port") + 1] == str(port) and "serve" in cmd:
            return os.getpgid(p.pid)
    raise AssertionError(f"no engine on port {port}")


@pytest.mark.e2e
def test_serve_with_api_key_restarts_a_dead_engine_and_serves_correctly_again(tiny_models,
                                                                              tmp_path):
    model = tiny_models["tiny-nemotron-h"]
    ref = reference(model, tmp_path, PROMPTS, ())
    ports = pd_ports()
    cmd = [sys.executable, "-m", "hybrid_pd.cli", "serve", str(model), "--restart", "on-failure",
           "--port", str(ports.proxy), "--prefill-port", str(ports.prefill),
           "--decode-port", str(ports.decode),
           "--prefill-side-channel-port", str(ports.prefill_side_channel),
           "--decode-side-channel-port", str(ports.decode_side_channel),
           "--run-dir", str(tmp_path / "serve")]
    serve = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "VLLM_API_KEY": KEY})
    out = Output(serve)
    proxy = f"http://127.0.0.1:{ports.proxy}"
    try:
        out.wait_for("serving on", 600)
        with httpx.Client(timeout=60) as anon:
            for base in (proxy, f"http://127.0.0.1:{ports.prefill}",
                         f"http://127.0.0.1:{ports.decode}"):
                r = anon.post(base + "/v1/completions", json=body(model, PROMPTS[0]))
                assert r.status_code == 401, (base, r.status_code, r.text)
                bad = anon.post(base + "/v1/completions", json=body(model, PROMPTS[0]),
                                headers={"Authorization": "Bearer sk-wrong"})
                assert bad.status_code == 401, (base, bad.status_code)
        auth = {"Authorization": f"Bearer {KEY}"}
        # a client that leaves a long non-streaming request: D stops generating at once
        # (the proxy closes its call; before, D ran on to max_tokens)
        with httpx.Client(timeout=4, headers=auth) as short, pytest.raises(httpx.ReadTimeout):
            short.post(proxy + "/v1/completions",
                       json=body(model, PROMPTS[0], max_tokens=4000))
        left = time.monotonic()
        with httpx.Client(timeout=10) as m:
            while gauge(m, f"http://127.0.0.1:{ports.decode}", "vllm:num_requests_running") > 0:
                assert time.monotonic() - left < 10, "D still generating 10 s after the client left"
                time.sleep(0.5)
        with httpx.Client(timeout=300, headers=auth) as c:
            assert generate(c, proxy, model, PROMPTS) == ref
            for name, port in (("decode", ports.decode), ("prefill", ports.prefill)):
                os.killpg(_engine_group(serve, port), signal.SIGKILL)
                out.wait_for(f"{name} exited with code", 60)
                # while it is down a request fails at once with an error, never hangs
                t0 = time.monotonic()
                r = c.post(proxy + "/v1/completions", json=body(model, PROMPTS[0]))
                assert r.status_code >= 500 and time.monotonic() - t0 < 30, r.text
                out.wait_for(f"restarting {name}", 30)
                back = out.wait_for(f"{name} back after", RESTART_TIMEOUT_S)
                assert "handshake done (attempt 1)" in back, back
                assert generate(c, proxy, model, PROMPTS) == ref, f"after restarting {name}"
        assert serve.poll() is None, "".join(out.lines[-60:])
    finally:
        stop_serve(serve)
    assert serve.returncode == 0, "".join(out.lines[-60:])
    run_dir = tmp_path / "serve"
    log = (run_dir / "decode.log").read_text(errors="replace")
    assert log.count("$ ") >= 2  # the restarted D appended to the same log
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f"the API key was written to {f}"
    assert KEY not in out.rest()
