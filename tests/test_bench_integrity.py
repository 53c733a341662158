"""``hybrid-pd bench --integrity``: digests of P's sources and D's destinations per (layer,
view) on the requests the policy selects, through the real CLI (rank processes, real
NIXL/UCX READs on loopback, tiny Nemotron-H config, a few hundred tokens).

The ``nixl`` tests: a correct run has no mismatch; a byte flipped on P after its digest
(the hidden ``--integrity-flip LAYER:VIEW``) is found and named by layer, view, P rank
and D rank; ``sampled:K`` digests the requests whose id hashes to 0 mod K, and no other.
The rest is plain data (no NIXL required).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hybrid_pd.bench import measure
from hybrid_pd.bench import runner as bench
from hybrid_pd.bench.report import integrity_report
from hybrid_pd.transfer.integrity import IntegrityPolicy

HERE = Path(__file__).parent
TINY_CONFIG = HERE / "data" / "tiny_nemotron_h_config.json"


def run_cli(*args: str, rc: int = 0) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "hybrid_pd.cli", "bench", "--config", str(TINY_CONFIG),
           *args, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert out.returncode == rc, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.nixl
@pytest.mark.timeout(300)
def test_every_request_digested_no_mismatch() -> None:
    pytest.importorskip("nixl")
    r = run_cli("--prefill-tp", "1", "--decode-tp", "2", "--num-tokens", "300",
                "--requests", "3", "--integrity", "every")
    assert r["verified"] is True, r["failures"] + r["mismatches"]
    assert r["integrity"] == "every"
    assert r["integrity_mismatches"] == 0 and r["integrity_errors"] == []
    blk = r["integrity_modes"]["every"]
    assert blk["digested"] == blk["requests"] == 4  # 3 timed + the warm-up
    assert blk["digested_ids"] == ["r0", "r1", "r2", "r3"]
    assert blk["mismatch_details"] == []
    assert blk["bytes_per_request"] == r["bytes_total"]  # every byte read was digested
    assert blk["src_digest_ms_median"] > 0 and blk["dst_digest_ms_median"] > 0
    assert r["integrity_digest_ms_median"] == blk["digest_ms_median"] > 0
    assert blk["seconds_with_digest_median"] > blk["seconds_median"] == r["seconds_median"]


@pytest.mark.nixl
@pytest.mark.timeout(300)
def test_planted_flip_found_and_named() -> None:
    # P TP2 -> D TP1: attention layer 6's KV heads come from both P ranks, so each P rank
    # flips one byte of its first layer-6 KV descriptor after its digest of the first
    # request (r0); D's digests differ there and only there (the flip is undone after it).
    pytest.importorskip("nixl")
    r = run_cli("--prefill-tp", "2", "--decode-tp", "1", "--num-tokens", "300",
                "--requests", "2", "--integrity", "every", "--integrity-flip", "6:KV", rc=1)
    assert r["integrity_mismatches"] == 2, r["integrity_modes"]
    blk = r["integrity_modes"]["every"]
    assert len(blk["flipped"]) == 2 and all("layer 6 view KV" in f for f in blk["flipped"])
    details = blk["mismatch_details"]
    assert len(details) == 2, details
    for p_rank, line in enumerate(sorted(details)):
        assert line.startswith("r0: integrity: layer 6 view KV: "), line
        assert f"P rank {p_rank} -> D rank 0" in line, line
        assert "1 of 19 descriptors differ" in line, line  # cdiv(300, 16) kernel blocks
    # The existing byte check sees the same request's corruption, and nothing later.
    assert r["verified"] is False and len(r["mismatches"]) == 1, r["mismatches"]
    assert "transferred state" in r["mismatches"][0]


@pytest.mark.nixl
@pytest.mark.timeout(300)
def test_sampled_digests_the_selected_requests_only() -> None:
    # off and sampled:4 in the same processes; 24 timed requests + warm-up per policy.
    pytest.importorskip("nixl")
    n = 24
    r = run_cli("--prefill-tp", "1", "--decode-tp", "1", "--num-tokens", "40",
                "--requests", str(n), "--integrity", "off,sampled:4")
    assert r["verified"] is True, r["failures"] + r["mismatches"]
    assert r["integrity"] == "off,sampled:4" and r["integrity_mismatches"] == 0
    off, sampled = r["integrity_modes"]["off"], r["integrity_modes"]["sampled:4"]
    assert off["digested"] == 0 and off["mismatches"] == 0 and off["digest_ms_per_request"] == 0
    assert r["integrity_digested"] == 0  # the top-level numbers are the first policy's
    # The second policy's leased ids are i1-r0..; P and D each chose these from the id.
    ids = [f"i1-r{i}" for i in range(n + 1)]
    want = [rid for rid in ids if IntegrityPolicy.parse("sampled:4").selects(rid)]
    assert sampled["digested_ids"] == want
    assert 0 < len(want) < len(ids) // 2  # about 1 in 4 (the exact rate: test_integrity)
    assert sampled["errors"] == [] and sampled["mismatches"] == 0
    assert 0 < sampled["digest_ms_per_request"] < sampled["digest_ms_median"]
    assert sampled["ratio_vs_off"] > 0 and off["ratio_vs_off"] == 1.0


# ----------------------------------------------------------------------------------
# Plain data (no NIXL)
# ----------------------------------------------------------------------------------


def test_parse_integrity_and_flip() -> None:
    assert bench.parse_integrity("off") == ("off",)
    assert bench.parse_integrity("every, sampled:16,off,every") == ("every", "sampled:16", "off")
    for bad in ("", ",", "on", "sampled:0", "every,sampled"):
        with pytest.raises(ValueError, match="integrity"):
            bench.parse_integrity(bad)
    assert bench.parse_flip("6:KV") == (6, "KV")
    for bad in ("", "6", "KV:6", "6:kv", "x:SSM"):
        with pytest.raises(ValueError, match="LAYER:VIEW"):
            bench.parse_flip(bad)


def test_cli_default_off_and_bad_value(capsys: pytest.CaptureFixture[str]) -> None:
    from hybrid_pd.cli import build_parser

    base = ["bench", "--config", str(TINY_CONFIG), "--prefill-tp", "1", "--decode-tp", "1",
            "--num-tokens", "5"]
    args = build_parser().parse_args(base)
    assert args.integrity == "off" and args.integrity_flip is None
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--integrity", "sampled:0"])
    err = capsys.readouterr().err
    assert "'sampled:0'" in err and "'sampled:K'" in err
    assert "--integrity-flip" not in build_parser().format_help()


def _measured(policy: str, seconds: list[float], timed: list[tuple[bool, float, float]],
              mismatches: int = 0) -> measure.Measurements:
    m = measure.Measurements(seconds=seconds, bytes_total=10**6)
    m.integrity = measure.IntegrityRun(policy, timed=timed, mismatches=mismatches,
                                       digested=[f"r{i}" for i, t in enumerate(timed) if t[0]],
                                       bytes_per_request=10**6)
    return m


def test_integrity_report_arithmetic() -> None:
    off = _measured("off", [0.010, 0.010, 0.012], [(False, 0, 0)] * 3)
    every = _measured("every", [0.010, 0.011, 0.010], [(True, 1.0, 2.0)] * 3)
    # sampled: one of three digested -> 3 ms once, 1 ms per request on average
    sampled = _measured("sampled:3", [0.010, 0.010, 0.010],
                        [(False, 0, 0), (True, 1.0, 2.0), (False, 0, 0)], mismatches=2)
    rep = integrity_report([off, every, sampled], requests=3)
    assert rep["integrity"] == "off,every,sampled:3"
    assert rep["integrity_mismatches"] == 2
    assert rep["integrity_digested"] == 0 and rep["integrity_digest_ms_per_request"] == 0
    e, s = rep["integrity_modes"]["every"], rep["integrity_modes"]["sampled:3"]
    assert e["digest_ms_median"] == 3.0 and e["digest_ms_per_request"] == 3.0
    # windows + digests: 13, 14, 13 ms -> median 13 ms; off's median window 10 ms.
    assert e["seconds_with_digest_median"] == pytest.approx(0.013)
    assert e["ratio_vs_off"] == pytest.approx(1.3)
    assert e["window_ratio_vs_off"] == pytest.approx(1.0)  # 10 ms windows on both
    assert e["dst_digest_gbps"] == pytest.approx(10**6 / 2.0 / 1e6)  # 0.5 GB/s
    assert s["digest_ms_per_request"] == pytest.approx(1.0) and s["digested"] == 1
    assert s["digest_ms_all"] == [0, 3.0, 0]
    assert rep["integrity_modes"]["off"]["ratio_vs_off"] == 1.0


def test_cli_fails_on_integrity_mismatch(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from hybrid_pd.cli import main

    line = "r0: integrity: layer 6 view KV: P rank 1 -> D rank 0: 1 of 19 descriptors differ"

    def fake(init: dict[str, Any]) -> dict[str, Any]:
        assert init["integrity"] == "every" and init["integrity_flip"] == ""
        return {"verified": True, "mismatches": [], "failures": [], "integrity_mismatches": 1,
                "integrity_errors": [],
                "integrity_modes": {"every": {"mismatch_details": [line]}}}

    monkeypatch.setattr(bench, "run_bench", fake)
    rc = main(["bench", "--config", str(TINY_CONFIG), "--prefill-tp", "1", "--decode-tp", "1",
               "--num-tokens", "5", "--integrity", "every", "--json"])
    assert rc == 1
    assert "layer 6 view KV: P rank 1 -> D rank 0" in capsys.readouterr().err
