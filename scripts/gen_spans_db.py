#!/usr/bin/env python
"""Generate a large synthetic spans database and time the dashboard's queries.

    python scripts/gen_spans_db.py /tmp/spans_1m.db --spans 1000000 --bench
    python scripts/gen_spans_db.py /tmp/spans_1m.db --reuse --bench-queries

Shapes follow a real ``hybrid-pd bench --granularity layer`` run (Nemotron-H-like, TP
P=1 -> D=2): per request and D rank one ``kv.transfer`` span with a ``desc_build
scope=request`` child, one ``kv.read`` per layer (attention/mamba interleaved, µs-ms
durations, NIXL timings in the attributes), one ``kv.notify``; a handshake per D rank
every 500 requests, and ~0.5 % failed transfers with a stall + abort.  Every KV span
carries ``hybrid_pd.connector``; with ``--upstream-every N`` every Nth request goes
through ``upstream`` instead, shaped like upstream's connector inside vLLM (one READ per
D rank for all layers, layer kind ``mixed``; synthetic descriptor and byte counts), so
the Descriptors page has both connectors to compare.  Per request the proxy's side is
written too (service ``hybrid-pd-proxy``): a ``proxy.request`` span and its twelve
``hybrid_pd.ttft.<phase>`` children, tiling the request's time to first token exactly (its
``hybrid_pd.ttft_ms`` is their sum), the READ phases over the transfer span; prompt lengths
from ~50 to ~100k tokens (3 % unknown), a cold handshake on the first request after each
handshake span (``handover=False``: none of it).  The schema comes from
``hybrid_pd.telemetry.schema`` (the one MetaData, all its indexes); rows go in with Core
executemany in one transaction per 50k rows.  ``--bench`` then times
``timeline_queries.request_timeline`` for random requests through a fresh *read-only*
engine, as the dashboard runs it; ``--bench-queries`` times every query function each page
calls, for the range "all" (the pages' default) and "last 1 min", and sums them per page.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert

from hybrid_pd.telemetry import attributes as A
from hybrid_pd.telemetry.schema import (
    SCHEMA_VERSION,
    metadata_obj,
    schema_version_table,
    spans_table,
)

LAYERS = 52  # Nemotron-H-8B-like depth
ATTN_EVERY = 7  # one attention layer per 7 (the rest Mamba)
D_RANKS = 2
BATCH = 50_000


def _row(rng: random.Random, trace: str, parent: str | None, name: str, start: int, dur: int,
         attrs: dict[str, Any], engine: str | None, status: str = "UNSET",
         service: str = "hybrid-pd-decode", role: str = "decode") -> dict[str, Any]:
    return {
        "trace_id": trace,
        "span_id": f"{rng.getrandbits(64):016x}",
        "parent_span_id": parent,
        "name": name,
        "kind": "INTERNAL",
        "start_ns": start,
        "end_ns": start + dur,
        "duration_ns": dur,
        "status": status,
        "status_message": attrs.get(A.KV_FAILURE_REASON),
        "service": service,
        "role": role,
        "engine_id": engine,
        "pid": 4242,
        "request_id": attrs.get(A.REQUEST_ID),
        "layer": attrs.get(A.KV_LAYER),
        "layer_kind": attrs.get(A.KV_LAYER_KIND),
        "bytes": attrs.get(A.KV_BYTES),
        "descriptors": attrs.get(A.KV_DESCRIPTORS),
        "rank": attrs.get(A.KV_RANK),
        "peer_rank": attrs.get(A.KV_PEER_RANK),
        "attributes": json.dumps(attrs, separators=(",", ":")),
        "events": None,
    }


# Upstream's whole-request READ (per D rank): synthetic counts, more descriptors (one per
# layer, block and region: no merging across Mamba's conv/SSM views) and padded bytes.
UPSTREAM_DESCRIPTORS = 1_352
UPSTREAM_BYTES = 4_300_000


def request_spans(rng: random.Random, i: int, t: int, fail_rate: float = 0.005,
                  connector: str = "hybrid", handover: bool = True,
                  cold: bool = False) -> list[dict[str, Any]]:
    """All decode-side spans of request ``i`` starting at ``t`` ns (both D ranks) and,
    with ``handover``, the proxy's request span and TTFT phases (:func:`handover_spans`)."""
    rid = f"cmpl-{i:08d}"
    out: list[dict[str, Any]] = []
    failed = rng.random() < fail_rate
    upstream = connector == "upstream"
    for rank in range(D_RANKS):
        engine = f"decode-{rank}"
        trace = f"{rng.getrandbits(128):032x}"
        tid = f"{rng.getrandbits(64):016x}"
        base = {A.REQUEST_ID: rid, A.KV_RANK: rank, A.KV_PEER_RANK: 0, A.KV_PEER_ENGINE_ID: "prefill-0",
                A.CONNECTOR: connector}
        cursor = t + rng.randint(0, 200_000)
        out.append(_row(rng, trace, tid, A.SPAN_KV_DESC_BUILD, cursor, rng.randint(20_000, 60_000),
                        {**base, A.KV_DESC_SCOPE: "request", A.KV_VIEW: "all",
                         A.KV_DESCRIPTORS: UPSTREAM_DESCRIPTORS if upstream else 800,
                         A.KV_BYTES: UPSTREAM_BYTES if upstream else 4_000_000}, engine))
        end = cursor
        if upstream:
            start = cursor + 50_000
            dur = int(rng.lognormvariate(15.2, 0.4))  # ~4 ms: all layers in one READ
            bad = failed
            out.append(_row(rng, trace, tid, A.SPAN_KV_READ, start, dur, {
                **base, A.KV_LAYER_KIND: "mixed", A.KV_BYTES: UPSTREAM_BYTES,
                A.KV_DESCRIPTORS: UPSTREAM_DESCRIPTORS, A.KV_BACKEND: "UCX",
                A.KV_STATUS: "failed" if bad else "done",
                A.KV_NIXL_POST_US: round(rng.uniform(200, 900), 1),
                A.KV_NIXL_XFER_US: round(dur / 1e3 * rng.uniform(0.7, 0.98), 1),
                A.KV_NIXL_DESC_COUNT: UPSTREAM_DESCRIPTORS,
                A.KV_COMPLETION_LAG_NS: rng.randint(2_000, 300_000),
            }, engine, "ERROR" if bad else "UNSET"))
            end = start + dur
        for layer in range(0 if upstream else LAYERS):
            kind = "attention" if layer % ATTN_EVERY == 3 else "mamba"
            nbytes = 77_824 if kind == "attention" else 67_840
            start = cursor + 50_000 + layer * rng.randint(20_000, 60_000)
            dur = int(rng.lognormvariate(13.5, 0.5))  # ~0.7 ms median, long tail
            xfer_us = dur / 1e3 * rng.uniform(0.7, 0.98)
            out.append(_row(rng, trace, tid, A.SPAN_KV_READ, start, dur, {
                **base, A.KV_LAYER: layer, A.KV_LAYER_KIND: kind, A.KV_BYTES: nbytes,
                A.KV_DESCRIPTORS: 19 if kind == "attention" else 4, A.KV_BACKEND: "UCX",
                A.KV_STATUS: "failed" if failed and layer == LAYERS - 1 else "done",
                A.KV_GROUP: 0 if kind == "attention" else 1,
                A.KV_NIXL_POST_US: round(rng.uniform(20, 130), 1), A.KV_NIXL_XFER_US: round(xfer_us, 1),
                A.KV_NIXL_DESC_COUNT: 19 if kind == "attention" else 4,
                A.KV_COMPLETION_LAG_NS: rng.randint(2_000, 300_000),
            }, engine, "ERROR" if failed and layer == LAYERS - 1 else "UNSET"))
            end = max(end, start + dur)
        if failed:
            reason = "stall timeout"
            out.append(_row(rng, trace, tid, A.SPAN_KV_STALL, end, 1_000,
                            {**base, A.KV_WAITED_MS: 5000.0}, engine))
            out.append(_row(rng, trace, tid, A.SPAN_KV_ABORT, end + 1_000, 5_000,
                            {**base, A.KV_STATUS: "aborted", A.KV_FAILURE_REASON: reason,
                             A.KV_READS: 1}, engine, "ERROR"))
        else:
            out.append(_row(rng, trace, tid, A.SPAN_KV_NOTIFY, end + 10_000, 60_000,
                            {**base, A.KV_STATUS: "done"}, engine))
        tr = _row(rng, trace, None, A.SPAN_KV_TRANSFER, cursor - 30_000, end - cursor + 100_000, {
            A.REQUEST_ID: rid, A.KV_RANK: rank, A.KV_TP_SIZE: D_RANKS, A.KV_PEER_ENGINE_ID: "prefill-0",
            A.KV_BYTES: UPSTREAM_BYTES if upstream else 4_000_000,
            A.KV_DESCRIPTORS: UPSTREAM_DESCRIPTORS if upstream else 800,
            A.KV_READS: 1 if upstream else LAYERS, A.KV_BACKEND: "UCX",
            A.KV_STATUS: "failed" if failed else "done", A.CONNECTOR: connector,
        }, engine, "ERROR" if failed else "UNSET")
        tr["span_id"] = tid
        out.append(tr)
    if handover:
        transfers = [r for r in out if r["name"] == A.SPAN_KV_TRANSFER]
        out += handover_spans(rng, rid, min(r["start_ns"] for r in transfers),
                              max(r["end_ns"] for r in transfers), cold)
    return out


def _prompt_tokens(rng: random.Random) -> int | None:
    """~50 to ~100k tokens, median ~2k; 3 % unknown (no usage attribute)."""
    if rng.random() < 0.03:
        return None
    return max(16, min(131_072, int(rng.lognormvariate(7.6, 1.3))))


def handover_spans(rng: random.Random, rid: str, xfer_start: int, xfer_end: int,
                   cold: bool = False) -> list[dict[str, Any]]:
    """The proxy's ``proxy.request`` span of ``rid`` and its twelve TTFT phase spans.

    The phases tile [request start, first token sent]: each starts where the previous
    ended, the READ phases (read_post + read_in_flight) cover the transfer span
    [xfer_start, xfer_end], the handshake (``cold``: 50-200 ms, else 0) just before it,
    and P's prefill grows with the prompt.
    """
    tokens = _prompt_tokens(rng)
    n = tokens or 2_000
    us = 1_000
    dur = {
        "router_receive": rng.randint(50, 300) * us,
        "p_queue": rng.randint(300, 3_000) * us,
        "p_prefill": int(n * rng.uniform(0.02, 0.04) * 1e6),
        "p_answer": rng.randint(200, 2_000) * us,
        "router_to_d": rng.randint(300, 3_000) * us,
        "d_queue": rng.randint(100, 2_000) * us,
        "handshake": rng.randint(50, 200) * 1_000 * us if cold else 0,
        "read_post": 0,
        "read_in_flight": 0,
        "completion_noticed": rng.randint(50, 2_000) * us,
        "d_first_step": rng.randint(5_000, 30_000) * us,
        "first_token_sent": rng.randint(100, 1_000) * us,
    }
    xfer = max(xfer_end - xfer_start, 2)
    dur["read_post"] = max(1, min(xfer // 4, rng.randint(30, 300) * us))
    dur["read_in_flight"] = xfer - dur["read_post"]
    phases = A.TTFT_PHASES
    before = sum(dur[p] for p in phases[:phases.index("handshake") + 1])
    start = xfer_start - before
    ttft_ns = sum(dur.values())
    trace = f"{rng.getrandbits(128):032x}"
    root = f"{rng.getrandbits(64):016x}"
    base: dict[str, Any] = {A.REQUEST_ID: rid, A.TTFT_MS: ttft_ns / 1e6, A.TTFT_COLD: cold,
                            A.GEN_AI_USAGE_INPUT_TOKENS: tokens}
    base = {k: v for k, v in base.items() if v is not None}
    proxy = {"engine": None, "service": "hybrid-pd-proxy", "role": "proxy"}
    req = _row(rng, trace, None, A.SPAN_PROXY_REQUEST, start,
               ttft_ns + rng.randint(20, 400) * 1_000 * us, base, **proxy)
    req["span_id"], req["kind"] = root, "SERVER"
    out = [req]
    t = start
    for index, phase in enumerate(phases):
        out.append(_row(rng, trace, root, f"hybrid_pd.ttft.{phase}", t, dur[phase], {
            **base, A.TTFT_PHASE: phase, A.TTFT_INDEX: index, A.TTFT_SKEW_NS: 0}, **proxy))
        t += dur[phase]
    return out


def handshake_spans(rng: random.Random, t: int) -> list[dict[str, Any]]:
    return [
        _row(rng, f"{rng.getrandbits(128):032x}", None, A.SPAN_KV_HANDSHAKE, t, rng.randint(50, 200) * 1_000_000,
             {A.KV_RANK: rank, A.KV_TP_SIZE: D_RANKS, A.KV_PEER_RANK: 0, A.KV_PEER_TP_SIZE: 1,
              A.KV_PEER_ENGINE_ID: "prefill-0", A.KV_BACKEND: "UCX"}, f"decode-{rank}")
        for rank in range(D_RANKS)
    ]


def generate(path: Path, n_spans: int, seed: int = 1234, fail_rate: float = 0.005,
             upstream_every: int = 0, handover: bool = True) -> int:
    """Write ~``n_spans`` spans to a fresh SQLite file at ``path``; returns the row count.

    ``upstream_every`` > 0: request ``i`` goes through ``upstream`` when
    ``i % upstream_every == upstream_every - 1`` (the others through ``hybrid``).
    ``handover``: also the proxy's request and TTFT phase spans of every request.
    """
    rng = random.Random(seed)
    path.unlink(missing_ok=True)
    engine = create_engine(f"sqlite:///{path}")
    metadata_obj.create_all(engine)
    written, i = 0, 0
    t = 1_790_000_000_000_000_000  # late 2026, like a real run
    with engine.begin() as conn:
        conn.execute(insert(schema_version_table),
                     [{"version": SCHEMA_VERSION, "applied_ns": t, "writer": "gen_spans_db.py"}])
    while written < n_spans:
        batch: list[dict[str, Any]] = []
        while len(batch) < BATCH and written + len(batch) < n_spans:
            if i % 500 == 0:
                batch += handshake_spans(rng, t)
                t += 200_000_000
            up = upstream_every > 0 and i % upstream_every == upstream_every - 1
            batch += request_spans(rng, i, t, fail_rate, "upstream" if up else "hybrid",
                                   handover, cold=i % 500 == 0)
            t += rng.randint(2_000_000, 40_000_000)  # 25-500 requests/s
            i += 1
        with engine.begin() as conn:
            conn.execute(insert(spans_table), batch)
        written += len(batch)
    engine.dispose()
    return written


def bench(path: Path, samples: int = 20, seed: int = 7) -> dict[str, float]:
    """Time ``request_timeline`` for random requests via the dashboard's read-only engine."""
    from hybrid_pd.dashboard import queries, timeline_queries

    engine = queries.open_engine(str(path))
    ids = timeline_queries.request_list(engine, "latest", limit=100_000)["request_id"].tolist()
    rng = random.Random(seed)
    times: list[float] = []
    rows = 0
    for rid in rng.sample(ids, min(samples, len(ids))):
        t0 = time.perf_counter()
        df = timeline_queries.request_timeline(engine, rid)
        times.append((time.perf_counter() - t0) * 1e3)
        rows = len(df)
    return {"requests": float(len(ids)), "samples": float(len(times)), "rows_per_request": float(rows),
            "median_ms": statistics.median(times), "max_ms": max(times), "first_ms": times[0]}


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(first call, median of ``repeats`` calls) in ms."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times[0], statistics.median(times)


# Page -> the query functions it calls (through common.py's caches), in page order.
PAGE_QUERIES: dict[str, tuple[str, ...]] = {
    "Overview": ("check_db", "time_bounds", "transfer_stats(total)", "failure_counts",
                 "transfer_buckets", "transfer_stats(per rank)", "read_stats"),
    "Request timeline": ("check_db", "request_list(latest)", "request_timeline"),
    "Layers": ("check_db", "time_bounds", "reads"),
    "Descriptors": ("check_db", "time_bounds", "desc_build_stats", "connectors", "connector_reads"),
    "Failures": ("check_db", "time_bounds", "failure_counts", "failures"),
    "Handover": ("check_db", "time_bounds", "handover_tables", "request_phases"),
}


def _handover_tables(hq: Any, phases: Any) -> list[Any]:
    """What the Handover page derives from its load: requests, percentiles, buckets."""
    return [hq.requests(phases), hq.phase_percentiles(phases),
            hq.phase_percentiles(phases, by_size=False), hq.phase_buckets(phases)]


def bench_queries(path: Path, repeats: int = 5) -> list[tuple[str, str, float, float, int]]:
    """Time every query function the pages call on ``path`` (read-only engine).

    Returns (range, function, first ms, median ms, rows) for the ranges "all" and
    "last 1 min"; rows is the length of the result (a dict's: its number of keys).
    """
    from hybrid_pd.dashboard import connector_queries as cq
    from hybrid_pd.dashboard import handover_queries as hq
    from hybrid_pd.dashboard import queries
    from hybrid_pd.dashboard import timeline_queries as tq
    from hybrid_pd.dashboard import transfer_queries as xq

    engine = queries.open_engine(str(path))
    lo, hi = queries.time_bounds(engine)
    assert lo is not None and hi is not None, f"{path} has no spans"
    rid = tq.request_list(engine, "latest", limit=1)["request_id"].iloc[0]
    out = []
    for label, (s, e) in {"all": (None, None), "last 1 min": (max(lo, hi - 60 * 10**9), hi)}.items():
        calls: dict[str, Callable[[], Any]] = {
            "check_db": lambda: queries.check_db(str(path), engine),
            "time_bounds": lambda: queries.time_bounds(engine),
            "transfer_stats(total)": lambda s=s, e=e: xq.transfer_stats(engine, s, e, ()),
            "transfer_stats(per rank)": lambda s=s, e=e: xq.transfer_stats(engine, s, e),
            "transfer_buckets": lambda s=s, e=e: xq.transfer_buckets(
                engine, lo if s is None else s, hi if e is None else e),
            "failure_counts": lambda s=s, e=e: xq.failure_counts(engine, s, e),
            "failures": lambda s=s, e=e: xq.failures(engine, s, e),
            "read_stats": lambda s=s, e=e: xq.read_stats(engine, s, e),
            "reads": lambda s=s, e=e: xq.reads(engine, s, e),
            "desc_build_stats": lambda s=s, e=e: cq.desc_build_stats(engine, s, e),
            "connectors": lambda s=s, e=e: cq.connectors(engine, s, e),
            "connector_reads": lambda s=s, e=e: cq.connector_reads(engine, s, e),
            "request_list(latest)": lambda: tq.request_list(engine, "latest"),
            "request_timeline": lambda: tq.request_timeline(engine, rid),
            # the page's one load, then what it derives from it (pandas)
            "phase_spans": lambda s=s, e=e: hq.phase_spans(engine, s, e),
            "handover_tables": lambda s=s, e=e: _handover_tables(hq, hq.phase_spans(engine, s, e)),
            "request_phases": lambda: hq.request_phases(engine, rid),
        }
        for name, fn in calls.items():
            first, med = _timed(fn, repeats)
            res = fn()
            rows = len(res) if hasattr(res, "__len__") else 1
            out.append((label, name, first, med, rows))
    engine.dispose()
    return out


def print_bench_queries(results: list[tuple[str, str, float, float, int]]) -> None:
    print(f"{'range':<11} {'query':<26} {'first ms':>9} {'median ms':>10} {'rows':>7}")
    for label, name, first, med, rows in results:
        print(f"{label:<11} {name:<26} {first:>9.1f} {med:>10.1f} {rows:>7}")
    med = {(label, name): m for label, name, _, m, _ in results}
    for label in dict.fromkeys(r[0] for r in results):
        for page, names in PAGE_QUERIES.items():
            total = sum(med[(label, n)] for n in names)
            print(f"page {page:<17} range {label:<11} queries total (sum of medians) {total:7.1f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("db", type=Path)
    ap.add_argument("--spans", type=int, default=1_000_000)
    ap.add_argument("--bench", action="store_true", help="time one request's timeline query")
    ap.add_argument("--bench-queries", action="store_true",
                    help="time every query function the dashboard pages call")
    ap.add_argument("--upstream-every", type=int, default=0, metavar="N",
                    help="every Nth request through the upstream connector (0: none)")
    ap.add_argument("--reuse", action="store_true", help="skip generation when the file exists")
    args = ap.parse_args()
    if not (args.reuse and args.db.exists()):
        t0 = time.perf_counter()
        n = generate(args.db, args.spans, upstream_every=args.upstream_every)
        print(f"wrote {n:,} spans to {args.db} in {time.perf_counter() - t0:.1f} s "
              f"({args.db.stat().st_size / 1e6:.0f} MB)")
    if args.bench:
        r = bench(args.db)
        print(f"request_timeline over {int(r['requests']):,} requests, {int(r['samples'])} samples, "
              f"{int(r['rows_per_request'])} spans each: median {r['median_ms']:.1f} ms, "
              f"max {r['max_ms']:.1f} ms, first (cold) {r['first_ms']:.1f} ms")
    if args.bench_queries:
        print_bench_queries(bench_queries(args.db))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
