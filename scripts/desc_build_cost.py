"""In-engine per-request descriptor work: the request-scope ``hybrid_pd.kv.desc_build``
span of D (our planner in the hybrid connector; upstream's ``_compute_desc_ids`` in
vLLM's own, traced by our patch), side by side in one run on the tiny model.

    .venv/bin/python scripts/desc_build_cost.py [--tokens N] [--requests R]

Starts P + D + proxy once per connector (one after the other: 2 cores), sends R
prompts of N tokens, prints one JSON object per connector: median / p90 of the span's
duration in ms and the descriptor counts it reported.
"""

from __future__ import annotations

import argparse
import json
import socket
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from hybrid_pd.serve.engines import LaunchConfig
from hybrid_pd.serve.supervisor import Ports, build_supervisor
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.tiny_models import engine_args_for, model_path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_connector(model: Path, connector: str, tokens: int, requests: int, tmp: Path) -> dict:
    db = tmp / f"{connector}.db"
    cfg = LaunchConfig(model=str(model), connector=connector, telemetry_db=str(db),
                       engine_args=engine_args_for(str(model), ()))
    ports = Ports(proxy=_port(), prefill=_port(), decode=_port(),
                  prefill_side_channel=_port(), decode_side_channel=_port())
    with build_supervisor(cfg, tmp / connector, ports) as sup:
        sup.start()
        sup.wait_healthy(600, progress=False)
        with httpx.Client(timeout=300) as c:
            for i in range(requests + 1):  # the first runs the handshake: not counted
                prompt = [(j * 37 + i * 11) % 500 + 3 for j in range(tokens)]
                r = c.post(f"http://127.0.0.1:{ports.proxy}/v1/completions", json={
                    "model": str(model), "prompt": prompt, "max_tokens": 2,
                    "temperature": 0.0, "ignore_eos": True})
                r.raise_for_status()
        time.sleep(2.0)  # span batches leave every 0.5 s
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT end_ns - start_ns, descriptors, attributes FROM spans "
                           "WHERE name = ? AND role = 'decode' ORDER BY start_ns",
                           (A.SPAN_KV_DESC_BUILD,)).fetchall()
    req = [(d / 1e6, n) for d, n, a in rows
           if json.loads(a).get(A.KV_DESC_SCOPE) == "request"][1:]
    ms = sorted(d for d, _ in req)
    return {"connector": connector, "tokens": tokens, "requests": len(req),
            "desc_build_ms_median": round(statistics.median(ms), 3),
            "desc_build_ms_p90": round(ms[int(0.9 * (len(ms) - 1))], 3),
            "descriptors": sorted({n for _, n in req})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--requests", type=int, default=20)
    args = ap.parse_args()
    model = model_path("tiny-nemotron-h")
    with tempfile.TemporaryDirectory(prefix="desc-build-") as tmp:
        for connector in ("hybrid", "upstream"):
            print(json.dumps(run_connector(model, connector, args.tokens, args.requests,
                                           Path(tmp))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
