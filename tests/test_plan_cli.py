"""``hybrid-pd plan`` CLI contract (issue 3).  No GPU or NIXL required."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_pd.cli import main

TINY = str(Path(__file__).parent / "data" / "tiny_nemotron_h_config.json")
CFG_8B = str(Path(__file__).parent / "data" / "nemotron-h-8b.config.json")


def run_json(capsys, *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_contract(capsys) -> None:
    out = run_json(capsys, "--config", TINY, "--prefill-tp", "2", "--decode-tp", "4",
                   "--num-tokens", "300")
    for key in ("block_size", "kernel_block_size", "page_size_bytes", "decode_ranks",
                "bytes_total", "bytes_optimal", "bytes_padded", "bytes_upstream",
                "descriptors_total", "descriptors_upstream"):
        assert key in out
    assert [r["rank"] for r in out["decode_ranks"]] == [0, 1, 2, 3]
    for r in out["decode_ranks"]:
        assert r["bytes"] == sum(x["bytes"] for x in r["reads"])
        assert r["descriptors"] == sum(x["descriptors"] for x in r["reads"])
        # P TP2 -> D TP4: each D rank reads from one P rank (rank // 2)
        assert [x["prefill_rank"] for x in r["reads"]] == [r["rank"] // 2]
    assert out["bytes_total"] == out["bytes_optimal"] <= out["bytes_upstream"] <= out["bytes_padded"]
    assert out["descriptors_total"] <= out["descriptors_upstream"]


def test_8b_numbers(capsys) -> None:
    out = run_json(capsys, "--config", CFG_8B, "--prefill-tp", "1", "--decode-tp", "1",
                   "--num-tokens", "1000")
    # FA: 63 kernel blocks * 65,536 B * 4 layers; Mamba: 24 * 4,255,744 B
    assert out["bytes_total"] == out["bytes_optimal"] == 118652928
    assert out["block_size"] == 1040 and out["page_size_bytes"] == 4259840
    # merged: 1 run per attention layer + 1 (conv|ssm) per Mamba layer; upstream
    # 65 kernel blocks * 4 layers + 2 * 24
    assert (out["descriptors_total"], out["descriptors_upstream"]) == (28, 308)
    no_merge = run_json(capsys, "--config", CFG_8B, "--prefill-tp", "1", "--decode-tp", "1",
                        "--num-tokens", "1000", "--no-merge")
    assert no_merge["descriptors_total"] == 63 * 4 + 2 * 24


def test_errors_exit_2(capsys) -> None:
    assert main(["plan", "--config", TINY, "--prefill-tp", "2", "--decode-tp", "1",
                 "--num-tokens", "10", "--conv-layout", "SD", "--json"]) == 2
    err = capsys.readouterr().err
    assert "VLLM_SSM_CONV_STATE_LAYOUT=DS" in err and err.count("\n") == 1
    assert main(["plan", "--config", "/nonexistent.json", "--prefill-tp", "1", "--decode-tp",
                 "1", "--num-tokens", "10"]) == 2
    assert main(["plan", "--config", TINY, "--prefill-tp", "3", "--decode-tp", "1",
                 "--num-tokens", "10"]) == 2
    assert "TP=3" in capsys.readouterr().err


def test_human_output(capsys) -> None:
    assert main(["plan", "--config", TINY, "--prefill-tp", "1", "--decode-tp", "2",
                 "--num-tokens", "40"]) == 0
    text = capsys.readouterr().out
    assert "RequestPlan D rank 1/2" in text and "upstream" in text


def test_module_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hybrid_pd.cli", "plan", "--config", TINY, "--prefill-tp", "1",
         "--decode-tp", "1", "--num-tokens", "5", "--json"],
        capture_output=True, text=True, check=False, cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["bytes_total"] > 0


@pytest.mark.parametrize("name", ["tiny-nemotron-h", "tiny-nemotron-h-g1"])
@pytest.mark.parametrize(("p_tp", "d_tp"), [(1, 1), (1, 2), (2, 1)])
def test_plan_for_the_built_tiny_models(capsys, tiny_models, name, p_tp, d_tp) -> None:
    """The configs vLLM actually serves (written by transformers, `layers_block_type`)."""
    cfg = str(tiny_models[name] / "config.json")
    for n in (1, 127, 128, 129, 700):
        out = run_json(capsys, "--config", cfg, "--prefill-tp", str(p_tp), "--decode-tp", str(d_tp),
                       "--num-tokens", str(n))
        assert out["bytes_total"] == out["bytes_optimal"], (name, p_tp, d_tp, n)
        assert out["descriptors_total"] <= out["descriptors_upstream"]
