"""``hybrid-pd bench``: real NIXL/UCX reads of the planner's plans between P_TP prefill
rank processes and D_TP decode rank processes on loopback, byte-verified, timed side by
side with a raw contiguous READ of the same bytes.

The coordinator (this module) starts the rank processes (:mod:`hybrid_pd.bench.session`
around :mod:`hybrid_pd.bench.worker`), drives requests (:mod:`hybrid_pd.bench.measure`:
the read order and the timing window) and builds the JSON report
(:mod:`hybrid_pd.bench.report`).  Every process derives the same case from the init
message (:mod:`hybrid_pd.bench.case`).

Telemetry (``init['telemetry']`` = ``off`` | ``sqlite`` | ``sqlite+otlp``): every rank
process configures tracing (service ``hybrid-pd-bench``, its role, its rank) into the one
SQLite file ``init['telemetry_db']`` (plus OTLP from the ``OTEL_*`` variables).  Each
request is then read twice, untraced and traced, in the same processes, so the report's
``telemetry`` block compares transfer windows on / off measured side by side.

Integrity digests (``init['integrity']``, :mod:`hybrid_pd.transfer.integrity`): one
policy (``off`` | ``every`` | ``sampled:K``) or several, comma-separated; several run
interleaved request by request in the same processes (same regions, same agents), each
over its own leased request ids, and the report compares them
(:func:`report.integrity_report`).

Several modes in one run: ``init['telemetry']`` may list modes, comma-separated
(``"compare"`` = ``"off,sqlite,sqlite+otlp"``).  Each mode gets its own process group
(tracing is configured once per process), in turn; each on-mode group has its own
side-by-side on / off comparison.  The top-level transfer numbers are the first listed
group's; ``telemetry_modes`` holds one block per on-mode and ``telemetry`` the first of
them.  With ``off`` listed, each block also gets ``ratio_vs_off_group``: its traced
median over the median of the group that never configured tracing - across process
groups, so it includes the exporters' background work but also the box's drift.
"""

from __future__ import annotations

import uuid
from typing import Any

# BenchCase, BenchSession, build_case and make_init are re-exported: callers and tests
# import them from here.
from hybrid_pd.bench.case import BenchCase, build_case, make_init
from hybrid_pd.bench.measure import run_requests
from hybrid_pd.bench.report import (
    header,
    integrity_report,
    off_telemetry,
    results,
    telemetry_report,
)
from hybrid_pd.bench.session import BenchError, BenchSession
from hybrid_pd.settings import DEFAULT_KV_INTEGRITY
from hybrid_pd.transfer.integrity import VIEWS, IntegrityPolicy
from hybrid_pd.transfer.reads import parse_granularity

TELEMETRY_MODES = ("off", "sqlite", "sqlite+otlp")
TELEMETRY_COMPARE = ("off", "sqlite", "sqlite+otlp")  # what "compare" stands for


def parse_telemetry(value: str) -> tuple[str, ...]:
    """The modes of ``--telemetry``, in order, each once: ``"sqlite"`` -> ("sqlite",);
    ``"off,sqlite+otlp"`` -> ("off", "sqlite+otlp"); ``"compare"`` -> all three."""
    names = TELEMETRY_COMPARE if value == "compare" else tuple(
        m.strip() for m in value.split(",") if m.strip())
    bad = [m for m in names if m not in TELEMETRY_MODES]
    if not names or bad:
        raise ValueError(f"telemetry must be one of {TELEMETRY_MODES} (comma-separated for "
                         f"several, or 'compare'), got {value!r}")
    return tuple(dict.fromkeys(names))


def parse_integrity(value: str) -> tuple[str, ...]:
    """The policies of ``--integrity``, canonical, in order, each once: ``"every"`` ->
    ("every",); ``"off,every,sampled:16"`` -> all three."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise ValueError(f"integrity: no policy in {value!r}; give one of 'off', 'every' "
                         "or 'sampled:K' (comma-separated for several)")
    return tuple(dict.fromkeys(str(IntegrityPolicy.parse(v)) for v in names))


def parse_flip(value: str) -> tuple[int, str]:
    """``"LAYER:VIEW"`` of the test-only planted corruption, e.g. ``"3:KV"``."""
    layer, _, view = value.partition(":")
    if not layer.isdigit() or view not in VIEWS:
        raise ValueError(f"integrity flip must be LAYER:VIEW with VIEW one of {VIEWS}, "
                         f"got {value!r}")
    return int(layer), view


def run_bench(init: dict[str, Any]) -> dict[str, Any]:
    """Run ``init['requests']`` requests (+ one warm-up of each kind) and report; one
    process group per telemetry mode when several are listed (module docstring)."""
    modes = parse_telemetry(init.get("telemetry", "off"))
    if modes != ("off",) and not init.get("telemetry_db"):
        raise ValueError("telemetry on needs init['telemetry_db'] (a file path)")
    if len(modes) == 1:
        init["telemetry"] = modes[0]
        reports = [_run_mode(init)]
    else:
        reports = [_run_mode({**init, "telemetry": m, "run_id": uuid.uuid4().hex[:8]})
                   for m in modes]
    return _merge_modes(reports)


def _merge_modes(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The first group's report, with every on-mode's telemetry block and every group's
    failures and mismatches (tagged with their mode)."""
    report = reports[0]
    on = [r["telemetry"] for r in reports if r["telemetry"]["mode"] != "off"]
    if not on:
        return report
    off = next((r for r in reports if r["telemetry"]["mode"] == "off"), None)
    if off is not None:  # across process groups: background export included, noisier
        for tel in on:
            tel["seconds_off_group_median"] = off["seconds_median"]
            tel["ratio_vs_off_group"] = (tel["seconds_on_median"] / off["seconds_median"]
                                         if off["seconds_median"] else 0.0)
    report["telemetry"] = on[0]
    report["telemetry_modes"] = {tel["mode"]: tel for tel in on}
    for r in reports[1:]:
        mode = r["telemetry"]["mode"]
        report["failures"] += [f"[{mode}] {m}" for m in r["failures"]]
        report["mismatches"] += [f"[{mode}] {m}" for m in r["mismatches"]]
        if "integrity_mismatches" in report:
            report["integrity_mismatches"] += r.get("integrity_mismatches", 0)
    report["verified"] = all(r["verified"] for r in reports)
    return report


def _run_mode(init: dict[str, Any]) -> dict[str, Any]:
    """One process group, one telemetry mode."""
    gran = init.get("granularity", "request")
    telemetry_on = init.get("telemetry", "off") != "off"
    init.setdefault("run_id", uuid.uuid4().hex[:8])
    parse_granularity(gran)
    policies = parse_integrity(init.get("integrity", DEFAULT_KV_INTEGRITY))
    if init.get("integrity_flip"):
        parse_flip(init["integrity_flip"])
    requests = int(init.get("requests", 5))
    case = build_case(init)
    report = header(init, case, requests, gran)
    with BenchSession(init) as s:
        if s.refused:
            raise BenchError(f"handshake refused:\n{s.refused}")
        # One run per integrity policy, interleaved in the same processes.
        runs = run_requests(s, init, requests, gran, telemetry_on, policies)
        m = runs[0]
        leases = s.leases()
        tel = telemetry_report(s, init, m) if telemetry_on else off_telemetry(m.lags)
    report.update(results(case, m, leases, tel))
    report.update(integrity_report(runs, requests))
    for pol, r in zip(policies[1:], runs[1:], strict=True):
        report["failures"] += [f"[integrity {pol}] {x}" for x in r.failures]
        report["mismatches"] += [f"[integrity {pol}] {x}" for x in r.mismatches]
        report["verified"] = report["verified"] and not r.failures and not r.mismatches
    return report


__all__ = ["BenchCase", "BenchError", "BenchSession", "build_case", "make_init",
           "parse_flip", "parse_integrity", "parse_telemetry", "run_bench"]
