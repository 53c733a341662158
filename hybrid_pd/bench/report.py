"""The JSON report of one bench process group (what ``hybrid-pd bench --json`` prints).

Transfer numbers: medians of the hybrid and the baseline windows, GB/s, their ratio, the
per-D-rank numbers and the time split inside a rank's window.

Telemetry block (modes other than ``off``): each request was read untraced and traced in
the same processes, so the block compares transfer windows on / off measured side by
side; it also gives spans created / stored / dropped (summed over ranks, checked against
the rows in the database), the span cost (per span and per request; the executor builds
spans only after a request's READs are DONE, so the window holds no span work) and the
span-end lag bound (``kv.completion_lag_ns``: previous poll -> the poll that saw DONE).

Integrity (:func:`integrity_report`): ``integrity`` (the policy string),
``integrity_mismatches`` (differing (layer, view) groups over every policy run; 0 on a
correct run, and for ``off``), the first policy's digest times, and one block per policy
in ``integrity_modes``: requests digested, digest ms on P and on D, and the transfer
window with the digests added (``seconds_with_digest_median``).
"""

from __future__ import annotations

import contextlib
from typing import Any

from hybrid_pd.bench.case import BenchCase
from hybrid_pd.bench.measure import Measurements, median
from hybrid_pd.bench.session import BenchSession

OVERHEAD_GOAL = 1.03  # transfer wall time traced / untraced: telemetry may cost at most 3%


def header(init: dict[str, Any], case: BenchCase, requests: int,
           granularity: str) -> dict[str, Any]:
    """What was run (known before any process starts)."""
    return {
        "model_type": case.spec.model_type,
        "prefill_tp": case.prefill.tp,
        "decode_tp": case.decode.tp,
        "num_tokens": case.num_tokens,
        "requests": requests,
        "granularity": granularity,
        "mode": init["mode"],
        "num_threads": init["num_threads"],
        "block_size": case.decode.block_size,
        "prefill_block_size": case.prefill.block_size,
        "kernel_block_size": case.decode.kernel_block_size,
        "page_size_bytes": case.decode.page_size_bytes,
        "units": "seconds; GB/s = 1e9 bytes/s",
    }


def results(case: BenchCase, m: Measurements, leases: dict[int, dict[str, str]],
            telemetry: dict[str, Any]) -> dict[str, Any]:
    """The measured part of the report, after :func:`header`'s fields."""
    sec_med, base_med = median(m.seconds), median(m.base_seconds)
    gbps = m.bytes_total / sec_med / 1e9 if sec_med else 0.0
    base_gbps = m.bytes_total / base_med / 1e9 if base_med else 0.0
    return {
        "verified": not m.mismatches and not m.failures,
        "bytes_total": m.bytes_total,
        "descriptors_total": sum(p.descriptors for p in case.plans.values()),
        "descriptor_units_total": sum(len(r.local_id_array) for p in case.unmerged_plans.values()
                                      for r in p.reads),
        "nixl_desc_count_rank0": m.nixl_descs,
        "reads_per_request": m.reads_per_request,
        "seconds_median": sec_med,
        "seconds_all": m.seconds,
        "gbps_median": gbps,
        "baseline_seconds_median": base_med,
        "baseline_seconds_all": m.base_seconds,
        "baseline_gbps_median": base_gbps,
        "ratio_to_baseline": gbps / base_gbps if base_gbps else 0.0,
        "ratio_paired_median": median(m.ratios),
        "breakdown_median": {k: median(v) for k, v in m.breakdown.items()},
        "per_rank": _per_rank(case, m),
        "leases": _lease_counts(leases),
        "failures": m.failures,
        "mismatches": m.mismatches,
        "telemetry": telemetry,
    }


def _per_rank(case: BenchCase, m: Measurements) -> list[dict[str, Any]]:
    out = []
    for d, v in sorted(m.per_rank.items()):
        plan, med = case.plans[d], median(v)
        out.append({"decode_rank": d, "bytes": plan.bytes, "descriptors": plan.descriptors,
                    "peers": list(plan.prefill_ranks), "seconds_median": med,
                    "gbps_median": plan.bytes / med / 1e9 if med else 0.0})
    return out


def _lease_counts(leases: dict[int, dict[str, str]]) -> dict[str, int]:
    """P's leases by how they ended ("" = still held)."""
    freed = [v for rank in leases.values() for v in rank.values()]
    return {"freed_done": sum(1 for v in freed if v == "done"),
            "freed_other": sum(1 for v in freed if v and v != "done"),
            "held": sum(1 for v in freed if not v)}


# ---------------------------------------------------------------------------------
# Integrity block
# ---------------------------------------------------------------------------------


def integrity_block(m: Measurements, requests: int) -> dict[str, Any]:
    """One policy's run: what was digested, what differed, and what it cost.  Times are
    per timed request: P's digest (slowest P rank) + D's digest and compare (slowest D
    rank), both outside the transfer window; ``with_digest`` adds them to the window."""
    it = m.integrity
    dig = [(p, d) for on, p, d in it.timed if on]
    both = [p + d for p, d in dig]
    per_req = [p + d for _, p, d in it.timed]
    with_dig = [sec + ms / 1e3 for sec, ms in zip(m.seconds, per_req, strict=True)]
    sec_med, wd_med = median(m.seconds), median(with_dig)
    dst_med = median([d for _, d in dig])
    return {
        "policy": it.policy,
        "requests": requests + 1,  # with the warm-up
        "digested": len(it.digested),
        "digested_ids": it.digested,
        "mismatches": it.mismatches,
        "mismatch_details": it.details[:50],
        "errors": it.errors,
        **({"flipped": it.flipped} if it.flipped else {}),
        "bytes_per_request": it.bytes_per_request,
        "src_digest_ms_median": median([p for p, _ in dig]),
        "dst_digest_ms_median": dst_med,
        "digest_ms_median": median(both),
        "digest_ms_per_request": sum(per_req) / len(per_req) if per_req else 0.0,
        "digest_ms_all": per_req,  # per timed request, P + D (0: not digested)
        "dst_digest_gbps": it.bytes_per_request / dst_med / 1e6 if dst_med else 0.0,
        "seconds_median": sec_med,
        "gbps_median": m.bytes_total / sec_med / 1e9 if sec_med else 0.0,
        "seconds_with_digest_median": wd_med,
        "gbps_with_digest_median": m.bytes_total / wd_med / 1e9 if wd_med else 0.0,
        "verified": not m.mismatches and not m.failures,
    }


def integrity_report(runs: list[Measurements], requests: int) -> dict[str, Any]:
    """The report's integrity fields for one or more policies run in the same
    processes (the first gives the top-level numbers); with ``off`` among them each
    block gets ``ratio_vs_off``: its window with digests over off's window (and
``window_ratio_vs_off``: the transfer windows alone)."""
    blocks = {r.integrity.policy: integrity_block(r, requests) for r in runs}
    first = next(iter(blocks.values()))
    off = blocks.get("off")
    for b in blocks.values():
        if off is not None and off["seconds_median"]:
            b["ratio_vs_off"] = b["seconds_with_digest_median"] / off["seconds_median"]
            b["window_ratio_vs_off"] = b["seconds_median"] / off["seconds_median"]
    return {
        "integrity": ",".join(blocks),
        "integrity_mismatches": sum(b["mismatches"] for b in blocks.values()),
        "integrity_digested": first["digested"],
        "integrity_digest_ms_median": first["digest_ms_median"],
        "integrity_digest_ms_per_request": first["digest_ms_per_request"],
        "integrity_errors": [e for b in blocks.values() for e in b["errors"]],
        "integrity_modes": blocks,
    }


# ---------------------------------------------------------------------------------
# Telemetry block
# ---------------------------------------------------------------------------------


def off_telemetry(lags: list[float]) -> dict[str, Any]:
    """Telemetry off: only the executor's poll bound, which holds with spans or not."""
    lag_sorted = sorted(lags)
    return {"mode": "off", "span_end_lag_us": {
        "median": median(lag_sorted), "max": lag_sorted[-1] if lag_sorted else 0.0,
        "reads": len(lag_sorted)}}


def _span_ledger(replies: list[dict[str, Any]]) -> dict[str, Any]:
    """Every rank's tracer counts and span cost, summed; per sink exported / dropped."""
    created = ended = spans_hot = ns_hot = 0
    sinks: dict[str, dict[str, int]] = {}
    for r in replies:
        st = r["stats"] or {"created": 0, "ended": 0, "sinks": {}}
        created += st["created"]
        ended += st["ended"]
        for name, sk in st["sinks"].items():
            acc = sinks.setdefault(name, {"exported": 0, "dropped": 0, "dropped_queue": 0})
            for k in acc:
                acc[k] += int(sk.get(k, 0))
        spans_hot += r["span_cost"]["spans"]
        ns_hot += r["span_cost"]["ns"]
    return {"created": created, "ended": ended, "sinks": sinks, "spans_hot": spans_hot,
            "ns_hot": ns_hot}


def _rows_in_db(init: dict[str, Any]) -> int:
    """This run's spans in the database, counted with plain SQL, as users would."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(init["telemetry_db"])) as conn:
        return conn.execute("SELECT count(*) FROM spans WHERE engine_id LIKE ?",
                            (f"{init['run_id']}-%",)).fetchone()[0]


def _lag_summary(lags: list[float]) -> dict[str, Any]:
    lags_sorted = sorted(lags)
    return {
        "median": median(lags_sorted),
        "p99": lags_sorted[int(0.99 * (len(lags_sorted) - 1))] if lags_sorted else 0.0,
        "max": lags_sorted[-1] if lags_sorted else 0.0,
        "reads": len(lags_sorted),
    }


def telemetry_report(s: BenchSession, init: dict[str, Any], m: Measurements) -> dict[str, Any]:
    """Flush every rank's tracing, add up the span ledger and compare on / off."""
    led = _span_ledger(s.broadcast(s.procs, {"op": "telemetry"}, timeout=120.0))
    rows = _rows_in_db(init)
    ended, sinks, spans_hot = led["ended"], led["sinks"], led["spans_hot"]
    sq = sinks.get("sqlite", {"exported": 0, "dropped": 0, "dropped_queue": 0})
    on_med, off_med = median(m.tel_on), median(m.tel_off)
    c_on, c_off = median(m.caller["on"]), median(m.caller["off"])
    ratio = on_med / off_med if off_med else 0.0
    return {
        "mode": init["telemetry"],
        "db": str(init["telemetry_db"]),
        "run_id": init["run_id"],  # the rows: engine_id LIKE '<run_id>-%'
        "spans_created": led["created"],
        "spans_ended": ended,
        "spans_stored": sq["exported"],
        "spans_in_db": rows,
        "spans_dropped": sq["dropped"] + sq["dropped_queue"],
        # per sink: ended - exported - dropped (0 = nothing lost silently)
        "spans_unaccounted": {name: ended - sk["exported"] - sk["dropped"] - sk["dropped_queue"]
                              for name, sk in sinks.items()},
        "sinks": sinks,
        "hot_path_spans": spans_hot,
        # Span cost, all of it spent after a request's READs are DONE and P is notified
        # (the executor builds spans from its stamps then): none inside the timed window.
        "span_emission": "after_transfer",
        "us_per_span": led["ns_hot"] / spans_hot / 1e3 if spans_hot else 0.0,
        "emit_us_per_request_median": median(m.caller["emit_us"]),
        "seconds_on_median": on_med,
        "seconds_off_median": off_med,
        "ratio_on_off": ratio,
        "ratio_on_off_paired_median": median(m.tel_paired),
        "overhead_goal": {"ratio_max": OVERHEAD_GOAL, "met": 0 < ratio <= OVERHEAD_GOAL},
        # Up to read_request's return (+ notifications to P + span emission).
        "seconds_on_caller_median": c_on,
        "seconds_off_caller_median": c_off,
        "ratio_on_off_caller": c_on / c_off if c_off else 0.0,
        "seconds_on_all": m.tel_on,
        "seconds_off_all": m.tel_off,
        "span_end_lag_us": _lag_summary(m.lags),
    }


__all__ = ["OVERHEAD_GOAL", "header", "integrity_block", "integrity_report", "off_telemetry",
           "results", "telemetry_report"]
