"""``hybrid-pd bench``: argument parsing and output for :mod:`hybrid_pd.bench.runner`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybrid_pd.planner.cli import add_request_args
from hybrid_pd.settings import DEFAULT_KV_INTEGRITY
from hybrid_pd.transfer.reads import parse_granularity


def _validated(parse: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse ``type`` that keeps the string and turns ``parse``'s ValueError into
    argparse's usage error (the message names the flag and the accepted values)."""

    def check(value: str) -> str:
        try:
            parse(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
        return value

    return check


def _parse_telemetry(value: str) -> object:
    from hybrid_pd.bench.runner import parse_telemetry  # heavy: only when the flag is used

    return parse_telemetry(value)


def _parse_integrity(value: str) -> object:
    from hybrid_pd.bench.runner import parse_integrity

    return parse_integrity(value)


def _parse_flip(value: str) -> object:
    from hybrid_pd.bench.runner import parse_flip

    return parse_flip(value)


_granularity = _validated(parse_granularity)
_telemetry = _validated(_parse_telemetry)
_integrity = _validated(_parse_integrity)
_flip = _validated(_parse_flip)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="move one request's KV/Mamba state with real NIXL reads between rank "
        "processes on loopback, verify every byte, compare with a raw contiguous READ",
        description="Real-transfer benchmark of the hybrid planner + NIXL executor.",
    )
    add_request_args(p)
    p.add_argument("--requests", type=int, default=5, help="timed requests (after 1 warm-up)")
    p.add_argument("--granularity", type=_granularity, default="request",
                   help="request | layer | sampled:K (per-layer READs for 1 request in K)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="stall timeout per request in seconds (READs not done are aborted)")
    p.add_argument("--num-threads", type=int, default=0,
                   help="NIXL UCX worker threads (0: none; more starve a small box)")
    p.add_argument("--mode", choices=("prepped", "dlist"), default="prepped",
                   help="prepped: dual views prepped once per peer, per-request index lists; "
                   "dlist: per-request descriptor lists")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--telemetry", type=_telemetry, default="off",
                   metavar="{off,sqlite,sqlite+otlp}[,...]|compare",
                   help="spans from every rank process into one SQLite file (+ OTLP from "
                   "OTEL_* variables); each request then runs untraced and traced, "
                   "interleaved, and the report gives the on/off ratio.  Several modes "
                   "(comma-separated; 'compare' = off,sqlite,sqlite+otlp) run one after the "
                   "other in their own processes, each on-mode with its own on/off "
                   "comparison (JSON: telemetry_modes; ratio_vs_off_group when off is listed)")
    p.add_argument("--telemetry-db", default=None,
                   help="span database file (default: runs/bench-<time>/spans.db)")
    p.add_argument("--integrity", type=_integrity, default=DEFAULT_KV_INTEGRITY,
                   metavar="{off,every,sampled:K}[,...]",
                   help="KV integrity digests (xxh3_64): on the requests the policy selects "
                   "P digests its source descriptors and D its destination after the READ, "
                   "compared per (layer, view); JSON: integrity, integrity_mismatches, digest "
                   "ms.  Several policies (comma-separated) run interleaved, request by "
                   "request, in the same processes (JSON: integrity_modes, ratio_vs_off when "
                   "off is listed)")
    # Tests only: plant a corruption (one byte flipped on P after its digest, LAYER:VIEW).
    p.add_argument("--integrity-flip", type=_flip, default=None, help=argparse.SUPPRESS)
    p.add_argument("--verbose", action="store_true", help="show the rank processes' logs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _telemetry_db(args: argparse.Namespace) -> str | None:
    """The span database path (made absolute: rank processes may run elsewhere)."""
    from hybrid_pd.bench.runner import parse_telemetry

    modes = parse_telemetry(args.telemetry)
    if modes == ("off",):
        return None
    if "sqlite+otlp" in modes and not (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                                       or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        print("[hybrid-pd bench] sqlite+otlp: no OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT set, "
              "so the OTel SDK's default endpoint is used (drops are counted)", file=sys.stderr)
    path = Path(args.telemetry_db) if args.telemetry_db else (
        Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}" / "spans.db")
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[hybrid-pd bench] spans -> {path}", file=sys.stderr)
    return str(path)


def run(args: argparse.Namespace) -> int:
    from hybrid_pd.bench.runner import BenchError, make_init, run_bench

    try:
        with open(args.config, encoding="utf-8") as f:
            config = json.load(f)
        if args.requests < 1 or args.num_tokens < 1:
            raise ValueError("--requests and --num-tokens must be positive")
        init = make_init(
            config, prefill_tp=args.prefill_tp, decode_tp=args.decode_tp,
            num_tokens=args.num_tokens, requests=args.requests, granularity=args.granularity,
            kernel_block_size=args.kernel_block_size, block_size=args.block_size,
            timeout_s=args.timeout, num_threads=args.num_threads, mode=args.mode,
            seed=args.seed, verbose=args.verbose, telemetry=args.telemetry,
            telemetry_db=_telemetry_db(args),
        )
        init.update(integrity=args.integrity, integrity_flip=args.integrity_flip or "")
        report = run_bench(init)
    except (OSError, ValueError, BenchError) as exc:
        print(f"hybrid-pd bench: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{report['model_type']} P TP={report['prefill_tp']} -> D TP={report['decode_tp']} "
            f"N={report['num_tokens']} ({report['granularity']}, {report['mode']}): "
            f"{report['bytes_total']} B in {report['descriptors_total']} descriptors, "
            f"median {report['seconds_median'] * 1e3:.2f} ms = {report['gbps_median']:.2f} GB/s; "
            f"baseline {report['baseline_gbps_median']:.2f} GB/s; ratio "
            f"{report['ratio_to_baseline']:.2f}; verified={report['verified']}"
        )
        for tel in report.get("telemetry_modes", {}).values():
            print(
                f"telemetry {tel['mode']}: spans created {tel['spans_created']}, stored "
                f"{tel['spans_stored']} ({tel['spans_in_db']} rows), dropped "
                f"{tel['spans_dropped']}; {tel['us_per_span']:.1f} us/span, "
                f"{tel['emit_us_per_request_median']:.0f} us/request after the READs; "
                f"on/off {tel['ratio_on_off']:.3f} (goal <= {tel['overhead_goal']['ratio_max']}"
                f"), with emission {tel['ratio_on_off_caller']:.3f}"
                + "".join(f"; {name} exported {sk['exported']}, dropped "
                          f"{sk['dropped'] + sk['dropped_queue']}"
                          for name, sk in tel["sinks"].items() if name != "sqlite")
                + (f", vs the off group {tel['ratio_vs_off_group']:.3f}"
                   if "ratio_vs_off_group" in tel else "")
                + f"; span-end lag median {tel['span_end_lag_us']['median']:.1f} us -> "
                f"{tel['db']}"
            )
        for blk in report.get("integrity_modes", {}).values():
            if blk["policy"] == "off":
                continue
            print(f"integrity {blk['policy']}: {blk['digested']} of {blk['requests']} requests "
                  f"digested, {blk['mismatches']} mismatches; digest P "
                  f"{blk['src_digest_ms_median']:.2f} + D {blk['dst_digest_ms_median']:.2f} ms "
                  f"median ({blk['digest_ms_per_request']:.2f} ms per request); "
                  f"{blk['gbps_median']:.2f} GB/s, {blk['gbps_with_digest_median']:.2f} GB/s "
                  "with the digests"
                  + (f", x{blk['ratio_vs_off']:.3f} vs off" if "ratio_vs_off" in blk else ""))
        for m in report["mismatches"] + report["failures"] + _integrity_lines(report):
            print(f"  {m}")
    if not report["verified"]:
        print("hybrid-pd bench: verification FAILED: " +
              "; ".join((report["mismatches"] + report["failures"])[:3]), file=sys.stderr)
        return 1
    if report.get("integrity_mismatches") or report.get("integrity_errors"):
        print(f"hybrid-pd bench: integrity FAILED: {report['integrity_mismatches']} mismatches: "
              + "; ".join(_integrity_lines(report)[:3]), file=sys.stderr)
        return 1
    return 0


def _integrity_lines(report: dict[str, Any]) -> list[str]:
    """Integrity errors, then every policy's mismatch lines (layer, view, ranks)."""
    return report.get("integrity_errors", []) + [
        x for b in report.get("integrity_modes", {}).values() for x in b["mismatch_details"]]
