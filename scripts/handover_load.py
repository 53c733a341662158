"""Send a mixed load through a running `hybrid-pd serve` with the openai client, then print
the handover breakdown of those requests from the span database (p50/p90/p99 per phase).

    hybrid-pd serve ~/.cache/hybrid-pd/models/tiny-nemotron-h --run-dir /tmp/run &
    .venv/bin/python scripts/handover_load.py --base-url http://127.0.0.1:8000 \\
        --db /tmp/run/telemetry.db --requests 64

Prompt lengths are drawn from --lengths (token ids, so lengths are exact); every other
request is streamed.  The table reads the ``hybrid_pd.ttft.*`` spans of exactly the
requests sent here (their ``X-Request-Id``), once all are in the database.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import sqlite3
import sys
import time
import uuid

import numpy as np
import openai

from hybrid_pd.telemetry import attributes as A

PERCENTILES = (50, 90, 99)


def one(client: openai.OpenAI, model: str, rid: str, n: int, stream: bool) -> float:
    """Client-side TTFT (ms) of one request of ``n`` prompt tokens."""
    prompt = [random.randrange(3, 500) for _ in range(n)]
    t0 = time.perf_counter()
    kw = dict(model=model, prompt=prompt, max_tokens=8, temperature=0.0,
              extra_headers={"X-Request-Id": rid})
    if stream:
        for _ in client.completions.create(stream=True, **kw):
            return (time.perf_counter() - t0) * 1e3
    client.completions.create(**kw)
    return (time.perf_counter() - t0) * 1e3


def phases(db: str, rids: list[str], wait_s: float) -> dict[str, dict[str, float]]:
    """request id -> {phase: ms} for the requests whose 12 phases are stored."""
    deadline = time.monotonic() + wait_s
    while True:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        rows = con.execute("SELECT request_id, name, duration_ns, attributes FROM spans WHERE "
                           "name LIKE 'hybrid_pd.ttft.%'").fetchall()
        con.close()
        out: dict[str, dict[str, float]] = {}
        want = set(rids)
        for rid, name, dur, attrs in rows:
            if rid in want:
                out.setdefault(rid, {})[name.rsplit(".", 1)[1]] = dur / 1e6
                out[rid]["ttft"] = json.loads(attrs)[A.TTFT_MS]
        done = {r: p for r, p in out.items() if len(p) == len(A.TTFT_PHASES) + 1}
        if len(done) == len(rids) or time.monotonic() > deadline:
            return done
        time.sleep(1)


def table(by_req: dict[str, dict[str, float]]) -> str:
    lines = ["| phase | p50 ms | p90 ms | p99 ms | share of TTFT (mean) |", "|---|---:|---:|---:|---:|"]
    ttft = np.array([p["ttft"] for p in by_req.values()])
    for phase in (*A.TTFT_PHASES, "ttft"):
        v = np.array([p[phase] for p in by_req.values()])
        pct = np.percentile(v, PERCENTILES)
        share = float(np.mean(v / ttft)) if phase != "ttft" else 1.0
        lines.append(f"| {phase} | " + " | ".join(f"{x:.2f}" for x in pct) + f" | {share:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--db", required=True, help="the serve's SQLite span database")
    ap.add_argument("--model", default=None, help="default: the first of /v1/models")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--lengths", default="16,128,512,1024,2048,3500")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    random.seed(args.seed)
    client = openai.OpenAI(base_url=args.base_url + "/v1", api_key="none", timeout=600)
    model = args.model or client.models.list().data[0].id
    lengths = [int(x) for x in args.lengths.split(",")]
    tag = uuid.uuid4().hex[:8]
    jobs = [(f"load-{tag}-{i}", random.choice(lengths), i % 2 == 1) for i in range(args.requests)]
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(args.concurrency) as pool:
        client_ms = list(pool.map(lambda j: one(client, model, *j), jobs))
    print(f"{len(jobs)} requests in {time.monotonic() - t0:.1f} s; client TTFT p50 "
          f"{np.percentile(client_ms, 50):.1f} ms, p99 {np.percentile(client_ms, 99):.1f} ms")
    by_req = phases(args.db, [j[0] for j in jobs], wait_s=60)
    print(f"{len(by_req)} of {len(jobs)} requests have all {len(A.TTFT_PHASES)} phases")
    tokens = dict((j[0], j[1]) for j in jobs)
    print(table(by_req))
    for lo, hi in ((0, 1024), (1024, 4097)):
        part = {r: p for r, p in by_req.items() if lo <= tokens[r] < hi}
        if part:
            print(f"\nprompts of {lo}-{hi - 1} tokens ({len(part)} requests):\n{table(part)}")
    worst = max(abs(sum(p[k] for k in A.TTFT_PHASES) - p["ttft"]) for p in by_req.values())
    print(f"\nlargest |sum of phases - TTFT|: {worst:.4f} ms")
    return 0 if len(by_req) == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
