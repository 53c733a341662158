#!/usr/bin/env python
"""Generate a large synthetic spans database and time the dashboard's timeline query.

    python scripts/gen_spans_db.py /tmp/spans_1m.db --spans 1000000 --bench

Shapes follow a real ``hybrid-pd bench --granularity layer`` run (Nemotron-H-like, TP
P=1 -> D=2): per request and D rank one ``kv.transfer`` span with a ``desc_build
scope=request`` child, one ``kv.read`` per layer (attention/mamba interleaved, µs-ms
durations, NIXL timings in the attributes), one ``kv.notify``; a handshake per D rank
every 500 requests, and ~0.5 % failed transfers with a stall + abort.  The schema comes
from ``hybrid_pd.telemetry.schema`` (the one MetaData); rows go in with Core executemany
in one transaction per 50k rows.  ``--bench`` then times ``queries.request_timeline`` for
random requests through a fresh *read-only* engine, as the dashboard runs it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
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
         attrs: dict[str, Any], engine: str, status: str = "UNSET") -> dict[str, Any]:
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
        "service": "hybrid-pd-decode",
        "role": "decode",
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


def request_spans(rng: random.Random, i: int, t: int, fail_rate: float = 0.005) -> list[dict[str, Any]]:
    """All decode-side spans of request ``i`` starting at ``t`` ns (both D ranks)."""
    rid = f"cmpl-{i:08d}"
    out: list[dict[str, Any]] = []
    failed = rng.random() < fail_rate
    for rank in range(D_RANKS):
        engine = f"decode-{rank}"
        trace = f"{rng.getrandbits(128):032x}"
        tid = f"{rng.getrandbits(64):016x}"
        base = {A.REQUEST_ID: rid, A.KV_RANK: rank, A.KV_PEER_RANK: 0, A.KV_PEER_ENGINE_ID: "prefill-0"}
        cursor = t + rng.randint(0, 200_000)
        out.append(_row(rng, trace, tid, A.SPAN_KV_DESC_BUILD, cursor, rng.randint(20_000, 60_000),
                        {**base, A.KV_DESC_SCOPE: "request", A.KV_VIEW: "all",
                         A.KV_DESCRIPTORS: 800, A.KV_BYTES: 4_000_000}, engine))
        end = cursor
        for layer in range(LAYERS):
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
            A.KV_BYTES: 4_000_000, A.KV_DESCRIPTORS: 800, A.KV_READS: LAYERS, A.KV_BACKEND: "UCX",
            A.KV_STATUS: "failed" if failed else "done",
        }, engine, "ERROR" if failed else "UNSET")
        tr["span_id"] = tid
        out.append(tr)
    return out


def handshake_spans(rng: random.Random, t: int) -> list[dict[str, Any]]:
    return [
        _row(rng, f"{rng.getrandbits(128):032x}", None, A.SPAN_KV_HANDSHAKE, t, rng.randint(50, 200) * 1_000_000,
             {A.KV_RANK: rank, A.KV_TP_SIZE: D_RANKS, A.KV_PEER_RANK: 0, A.KV_PEER_TP_SIZE: 1,
              A.KV_PEER_ENGINE_ID: "prefill-0", A.KV_BACKEND: "UCX"}, f"decode-{rank}")
        for rank in range(D_RANKS)
    ]


def generate(path: Path, n_spans: int, seed: int = 1234, fail_rate: float = 0.005) -> int:
    """Write ~``n_spans`` spans to a fresh SQLite file at ``path``; returns the row count."""
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
            batch += request_spans(rng, i, t, fail_rate)
            t += rng.randint(2_000_000, 40_000_000)  # 25-500 requests/s
            i += 1
        with engine.begin() as conn:
            conn.execute(insert(spans_table), batch)
        written += len(batch)
    engine.dispose()
    return written


def bench(path: Path, samples: int = 20, seed: int = 7) -> dict[str, float]:
    """Time ``request_timeline`` for random requests via the dashboard's read-only engine."""
    from hybrid_pd.dashboard import queries

    engine = queries.open_engine(str(path))
    ids = queries.request_list(engine, "latest", limit=100_000)["request_id"].tolist()
    rng = random.Random(seed)
    times: list[float] = []
    rows = 0
    for rid in rng.sample(ids, min(samples, len(ids))):
        t0 = time.perf_counter()
        df = queries.request_timeline(engine, rid)
        times.append((time.perf_counter() - t0) * 1e3)
        rows = len(df)
    return {"requests": float(len(ids)), "samples": float(len(times)), "rows_per_request": float(rows),
            "median_ms": statistics.median(times), "max_ms": max(times), "first_ms": times[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("db", type=Path)
    ap.add_argument("--spans", type=int, default=1_000_000)
    ap.add_argument("--bench", action="store_true", help="time one request's timeline query")
    ap.add_argument("--reuse", action="store_true", help="skip generation when the file exists")
    args = ap.parse_args()
    if not (args.reuse and args.db.exists()):
        t0 = time.perf_counter()
        n = generate(args.db, args.spans)
        print(f"wrote {n:,} spans to {args.db} in {time.perf_counter() - t0:.1f} s "
              f"({args.db.stat().st_size / 1e6:.0f} MB)")
    if args.bench:
        r = bench(args.db)
        print(f"request_timeline over {int(r['requests']):,} requests, {int(r['samples'])} samples, "
              f"{int(r['rows_per_request'])} spans each: median {r['median_ms']:.1f} ms, "
              f"max {r['max_ms']:.1f} ms, first (cold) {r['first_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
