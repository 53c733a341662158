"""``hybrid-pd bench --telemetry``: the overhead report and the span ledger, end to end.

The real test runs the CLI (rank processes, real NIXL/UCX reads on loopback) with
``--telemetry sqlite+otlp`` against a real OTLP receiver (``rotel``, gRPC), configured
only through the standard ``OTEL_*`` variables, and checks that every span created was
stored in SQLite and received by the collector - the same span ids - and that the JSON
carries the side-by-side overhead numbers.  The rest is plain data (no NIXL required).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import Rotel

from hybrid_pd.bench import measure
from hybrid_pd.bench import runner as bench
from hybrid_pd.bench.runner import parse_telemetry
from hybrid_pd.telemetry import attributes as A

HERE = Path(__file__).parent
TINY_CONFIG = HERE / "data" / "tiny_nemotron_h_config.json"

OVERHEAD_FIELDS = (
    "ratio_on_off", "ratio_on_off_paired_median", "seconds_on_median", "seconds_off_median",
    "us_per_span", "emit_us_per_request_median", "hot_path_spans",
    "ratio_on_off_caller", "seconds_on_caller_median", "seconds_off_caller_median",
)




@pytest.mark.nixl
@pytest.mark.timeout(180)
def test_bench_sqlite_otlp_ledger_and_overhead(rotel: Rotel, tmp_path: Path) -> None:
    pytest.importorskip("nixl")
    db = tmp_path / "spans.db"
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{rotel.grpc_port}",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    requests = 3
    cmd = [sys.executable, "-m", "hybrid_pd.cli", "bench", "--config", str(TINY_CONFIG),
           "--prefill-tp", "1", "--decode-tp", "1", "--num-tokens", "40",
           "--requests", str(requests), "--granularity", "layer",
           "--telemetry", "sqlite+otlp", "--telemetry-db", str(db), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["verified"] is True, report["failures"] + report["mismatches"]
    tel = report["telemetry"]
    assert tel["mode"] == "sqlite+otlp"
    assert report["telemetry_modes"] == {"sqlite+otlp": tel}

    # Ledger: created == ended == stored in SQLite == rows == exported over OTLP; no drops.
    n = tel["spans_created"]
    assert n > 0
    assert tel["spans_ended"] == tel["spans_stored"] == tel["spans_in_db"] == n
    assert tel["spans_dropped"] == 0
    assert tel["sinks"]["otlp-grpc"] == {"exported": n, "dropped": 0, "dropped_queue": 0}
    assert tel["spans_unaccounted"] == {"sqlite": 0, "otlp-grpc": 0}
    # Per traced request on the one D rank: kv.transfer, one request-scope desc_build,
    # 5 per-layer kv.read (tiny: 5 cache layers), 1 notify (several READs to the peer).
    assert tel["hot_path_spans"] == (requests + 1) * (1 + 1 + 5 + 1)

    # The collector received exactly the spans SQLite holds (same ids, names, parents).
    with contextlib.closing(sqlite3.connect(db)) as conn:
        stored = {r[0]: (r[1], r[2]) for r in conn.execute(
            "SELECT span_id, name, parent_span_id FROM spans WHERE engine_id LIKE ?",
            (f"{tel['run_id']}-%",))}
    assert len(stored) == n
    got = rotel.wait_for(set(stored))
    assert set(got) == set(stored), f"rotel got {len(got)}/{n} spans"
    assert all((got[i]["name"], got[i]["parent"]) == v for i, v in stored.items())
    assert {g["service"] for g in got.values()} == {"hybrid-pd-bench"}
    reads = [g for g in got.values() if g["name"] == A.SPAN_KV_READ]
    assert len(reads) == (requests + 1) * 5
    assert all(g["attributes"][A.KV_STATUS] == "done" for g in reads)

    # Overhead, measured side by side in the same processes.
    for key in OVERHEAD_FIELDS:
        assert isinstance(tel[key], (int, float)), key
    assert len(tel["seconds_on_all"]) == len(tel["seconds_off_all"]) == requests
    assert tel["ratio_on_off"] > 0 and tel["us_per_span"] > 0
    assert tel["emit_us_per_request_median"] > 0
    assert tel["span_emission"] == "after_transfer"  # see test_executor_spans
    assert tel["overhead_goal"]["ratio_max"] == 1.03
    assert tel["overhead_goal"]["met"] == (tel["ratio_on_off"] <= 1.03)


# ----------------------------------------------------------------------------------
# Plain data (no NIXL): mode lists and the per-mode report merge
# ----------------------------------------------------------------------------------


def test_parse_telemetry() -> None:
    assert parse_telemetry("off") == ("off",)
    assert parse_telemetry("sqlite") == ("sqlite",)
    assert parse_telemetry("compare") == ("off", "sqlite", "sqlite+otlp")
    assert parse_telemetry("sqlite+otlp, off,sqlite") == ("sqlite+otlp", "off", "sqlite")
    assert parse_telemetry("sqlite,sqlite") == ("sqlite",)
    for bad in ("", "otlp", "sqlite,jaeger", ","):
        with pytest.raises(ValueError, match="telemetry must be one of"):
            parse_telemetry(bad)


def test_several_modes_one_report_per_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []

    def fake(init: dict[str, Any]) -> dict[str, Any]:
        seen.append(init)
        mode = init["telemetry"]
        tel = {"mode": mode} if mode == "off" else {
            "mode": mode, "seconds_on_median": 3.0 * len(seen), "ratio_on_off": 1.0}
        return {"verified": mode != "sqlite+otlp", "mismatches": [],
                "failures": [f"{mode} failed"] * (mode == "sqlite+otlp"),
                "seconds_median": 2.0 * len(seen), "telemetry": tel}

    monkeypatch.setattr(bench, "_run_mode", fake)
    report = bench.run_bench({"telemetry": "compare", "telemetry_db": "x.db"})
    # One process group per mode, in order, each with its own run id; the first group
    # gives the transfer numbers, the first on-mode ``telemetry``; each on-mode has its
    # block, compared with the group that never configured tracing.
    assert [i["telemetry"] for i in seen] == ["off", "sqlite", "sqlite+otlp"]
    assert len({i["run_id"] for i in seen}) == 3
    assert report["seconds_median"] == 2.0  # the off group's
    assert report["telemetry"]["mode"] == "sqlite"
    assert report["telemetry_modes"] == {
        "sqlite": {"mode": "sqlite", "seconds_on_median": 6.0, "ratio_on_off": 1.0,
                   "seconds_off_group_median": 2.0, "ratio_vs_off_group": 3.0},
        "sqlite+otlp": {"mode": "sqlite+otlp", "seconds_on_median": 9.0, "ratio_on_off": 1.0,
                        "seconds_off_group_median": 2.0, "ratio_vs_off_group": 4.5}}
    assert report["verified"] is False
    assert report["failures"] == ["[sqlite+otlp] sqlite+otlp failed"]
    # Without "off" listed there is no cross-group ratio.
    seen.clear()
    report = bench.run_bench({"telemetry": "sqlite,sqlite+otlp", "telemetry_db": "x.db"})
    assert [i["telemetry"] for i in seen] == ["sqlite", "sqlite+otlp"]
    assert all("ratio_vs_off_group" not in t for t in report["telemetry_modes"].values())
    with pytest.raises(ValueError, match="telemetry_db"):
        bench.run_bench({"telemetry": "sqlite"})


@pytest.mark.parametrize(("telemetry_on", "i", "order"), [
    (False, 0, ["baseline", "hybrid", "spacer"]),
    (False, 1, ["hybrid", "spacer", "baseline"]),
    (True, 0, ["baseline", "hybrid", "spacer", "traced", "spacer2"]),
    (True, 1, ["baseline", "traced", "spacer", "hybrid", "spacer2"]),
])
def test_read_order(telemetry_on: bool, i: int, order: list[str]) -> None:
    # Every timed read (baseline, untraced, traced) follows a baseline READ - also across
    # requests - so none inherits a previous hybrid read's after-effects.
    assert measure._read_order(i, telemetry_on) == order
    seq = [k for j in range(4) for k in measure._read_order(j, telemetry_on)]
    for k in range(1, len(seq)):
        if seq[k] in ("baseline", "hybrid", "traced"):
            assert seq[k - 1] in ("baseline", "spacer", "spacer2"), (k, seq)
