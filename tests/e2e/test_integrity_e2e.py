"""End to end, KV integrity digests inside one real `hybrid-pd serve --kv-integrity every`
(tiny Nemotron-H, our connector, one P + one D on this box):

* (a) prompts crossing block edges (9, 385, 1100 tokens; 1100 again, which D reads with
  a hit in its own prefix cache, so only the blocks after it are compared): every
  request checked on D against P's digests with 0 mismatches (one OK
  ``hybrid_pd.kv.integrity`` span per request on each side, no ``unchecked``), the
  repeated prompt answers the same, and D's ``hybrid_pd_kv_integrity_*`` counters agree;
* (b) a byte flipped on P *after* P digested the request (the test hook
  ``HYBRID_PD_TEST_INTEGRITY_FLIP``, only for proxy ids containing
  ``integrity-flip``): the request fails (kv_load_failure_policy ``fail``) with an
  ERROR span naming exactly that layer and view, P rank 0 and D rank 0;
* (c) a planted planner bug (``HYBRID_PD_TEST_INTEGRITY_PLANT``, proxy ids containing
  ``integrity-plant``): D reads the request through a local view whose conv run (at
  equal TP the x|B|C state is one run) lands one channel row late: the request fails,
  the spans name the Mamba layers and their x / B / C views.

The same server keeps serving after both failures.  The P/D pair with different TP
sizes is checked with digests on in tests/e2e/test_hybrid_connector.py.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import serve_command, serving

from e2e.test_pd_e2e import body, pd_ports, token_prompt
from hybrid_pd.connector.integrity import FLIP_MARKER, PLANT_MARKER
from hybrid_pd.planner.model_spec import spec_from_hf_config
from hybrid_pd.settings import ENV_TEST_INTEGRITY_FLIP, ENV_TEST_INTEGRITY_PLANT, INTEGRITY_ROUTE
from hybrid_pd.telemetry import attributes as A

pytestmark = pytest.mark.e2e

LENGTHS = (9, 385, 1100, 1100)  # the last: D's own prefix cache holds its first blocks
SPANS_BOUND_S = 30.0


@dataclass(frozen=True)
class Served:
    proxy: str
    prefill: str
    decode: str
    model: Path
    db: Path
    flip: tuple[int, str]
    mamba_layers: tuple[int, ...]


@pytest.fixture(scope="module")
def served(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Served]:
    model = tiny_models["tiny-nemotron-h"]
    spec = spec_from_hf_config(json.loads((model / "config.json").read_text()))
    flip = (spec.attention_layers[0], "V")
    tmp = tmp_path_factory.mktemp("integrity")
    db = tmp / "telemetry.db"
    ports = pd_ports()
    env = {**os.environ, ENV_TEST_INTEGRITY_FLIP: f"{flip[0]}:{flip[1]}",
           ENV_TEST_INTEGRITY_PLANT: "1"}
    cmd = serve_command(model, ports, tmp / "serve", "--telemetry-db", str(db),
                        "--kv-integrity", "every", "--health-timeout", "500")
    with serving(cmd, env):
        yield Served(f"http://127.0.0.1:{ports.proxy}", f"http://127.0.0.1:{ports.prefill}",
                     f"http://127.0.0.1:{ports.decode}", model, db, flip,
                     tuple(spec.mamba_layers))


# ------------------------------------------------------------------------------ helpers


def other_prompt(n: int, seed: int) -> list[int]:
    """Tokens no other prompt here starts with (the hooks corrupt cached KV on purpose)."""
    return [(i * 53 + seed * 101) % 487 + 5 for i in range(n)]


def ask(c: httpx.Client, s: Served, prompt: list[int], rid: str) -> httpx.Response:
    return c.post(s.proxy + "/v1/completions", json=body(s.model, prompt),
                  headers={"X-Request-Id": rid}, timeout=300)


def counters(c: httpx.Client, base: str) -> dict[str, float]:
    """The engine's hybrid_pd_kv_integrity_* counters (summed over label sets)."""
    out = {"failures": 0.0, "checks": 0.0, "skips": 0.0}
    for line in c.get(base + "/metrics").text.splitlines():
        m = re.match(r"hybrid_pd_kv_integrity_(failures|checks|skips)_total(\{[^}]*\})? (\S+)",
                     line)
        if m:
            out[m.group(1)] += float(m.group(3))
    return out


def wait_counters(c: httpx.Client, base: str, want: dict[str, float]) -> dict[str, float]:
    deadline = time.monotonic() + SPANS_BOUND_S  # stats reach /metrics with an engine step
    while True:
        got = counters(c, base)
        if all(got[k] >= v for k, v in want.items()) or time.monotonic() > deadline:
            return got
        time.sleep(0.25)


def integrity_spans(db: Path, request_id: str, want: int) -> list[dict[str, Any]]:
    """The request's ``hybrid_pd.kv.integrity`` spans (P's and D's), once ``want`` are in
    the database (the engines' batches leave every 0.5 s), attributes parsed."""
    deadline = time.monotonic() + SPANS_BOUND_S
    while True:
        rows: list[dict[str, Any]] = []
        if db.exists():
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)
            con.row_factory = sqlite3.Row
            try:
                rows = [dict(r) for r in con.execute(
                    "SELECT * FROM spans WHERE name = ? AND request_id = ?",
                    (A.SPAN_KV_INTEGRITY, request_id))]
            except sqlite3.OperationalError:
                rows = []
            finally:
                con.close()
        if len(rows) >= want or time.monotonic() > deadline:
            for r in rows:
                r["attrs"] = json.loads(r["attributes"])
            return rows
        time.sleep(0.25)


def by_role(rows: list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["role"] == role]


# -------------------------------------------------------------------------------- tests


def test_every_request_is_checked_and_matches(served: Served) -> None:
    s = served
    with httpx.Client(timeout=300) as c:
        before = counters(c, s.decode)
        tokens, rids = [], []
        for n in LENGTHS:
            rid = f"ok-{n}-{uuid.uuid4().hex[:8]}"
            r = ask(c, s, token_prompt(n), rid)
            assert r.status_code == 200, r.text
            tokens.append(r.json()["choices"][0]["token_ids"])
            rids.append(rid)
        assert tokens[2] == tokens[3], "the same prompt answered differently"
        got = wait_counters(c, s.decode, {"checks": before["checks"] + len(LENGTHS)})
        assert got["checks"] - before["checks"] == len(LENGTHS), (before, got)
        assert got["failures"] == before["failures"] and got["skips"] == before["skips"]
        assert c.get(f"{s.prefill}{INTEGRITY_ROUTE}/no-such-request").status_code == 404
    costs = []
    for n, rid in zip(LENGTHS, rids, strict=True):
        rows = integrity_spans(s.db, rid, 2)
        (p_span,), (d_span,) = by_role(rows, "prefill"), by_role(rows, "decode")
        assert p_span["attrs"][A.KV_STATUS] == "digested" and p_span["status"] != "ERROR"
        assert d_span["attrs"][A.KV_STATUS] == "done" and d_span["status"] != "ERROR", d_span
        assert d_span["attrs"][A.KV_MISMATCHES] == 0 and d_span["rank"] == 0
        # D compares what it read: all P's units, or those after its prefix-cache hit
        assert 0 < d_span["attrs"][A.KV_UNITS] <= p_span["attrs"][A.KV_UNITS]
        costs.append((n, p_span["attrs"][A.KV_UNITS], d_span["attrs"][A.KV_UNITS],
                      p_span["attrs"][A.KV_DIGEST_US] / 1e3,
                      d_span["attrs"][A.KV_DIGEST_US] / 1e3,
                      d_span["attrs"][A.KV_WAITED_MS],
                      (d_span["end_ns"] - d_span["start_ns"]) / 1e6))
    # the repeated prompt: D's cache held its first blocks, fewer units to compare
    assert costs[3][2] < costs[2][2], costs
    print("\ntokens  P units  D units  P digest ms  D digest+compare ms  D waited ms  D check ms")
    for row in costs:
        print("{:>6} {:>8} {:>8} {:>12.2f} {:>20.2f} {:>12.2f} {:>11.2f}".format(*row))


def test_bytes_flipped_on_p_after_its_digest_fail_the_request(served: Served) -> None:
    s = served
    with httpx.Client(timeout=300) as c:
        before = counters(c, s.decode)
        # P flips the byte in the engine step after the prefill, D reads once the proxy
        # passed P's answer on: measured 10-24 ms later here.  A D that read first would
        # rightly find nothing wrong (it has the bytes P digested), so one more try.
        for attempt in range(2):
            rid = f"{FLIP_MARKER}-{uuid.uuid4().hex[:8]}"
            r = ask(c, s, other_prompt(300, 1 + attempt), rid)
            if r.status_code >= 400:
                break
        failed_once_then_serves(c, s, r, before, token_prompt(9), "after-flip")
    rows = integrity_spans(s.db, rid, 2)
    bad = [r for r in by_role(rows, "decode") if r["status"] == "ERROR"]
    assert bad, rows
    named = {(r["attrs"][A.KV_LAYER], r["attrs"][A.KV_VIEW], r["peer_rank"], r["rank"])
             for r in bad}
    assert named == {(*s.flip, 0, 0)}, named  # exactly the flipped unit's layer and view
    (one,) = bad
    assert one["attrs"][A.KV_STATUS] == "mismatch" and one["attrs"][A.KV_MISMATCHES] == 1
    assert f"layer {s.flip[0]} {s.flip[1]} head" in one["attrs"][A.KV_FAILURE_REASON]


def failed_once_then_serves(c: httpx.Client, s: Served, r: httpx.Response,
                            before: dict[str, float], prompt: list[int], tag: str) -> None:
    """The corrupted request failed, one more integrity failure is counted, and the server
    goes on serving."""
    assert r.status_code >= 400, f"expected an error, got {r.status_code}: {r.text[:500]}"
    got = wait_counters(c, s.decode, {"failures": before["failures"] + 1})
    assert got["failures"] - before["failures"] == 1, (before, got)
    ok = ask(c, s, prompt, f"{tag}-{uuid.uuid4().hex[:8]}")
    assert ok.status_code == 200, ok.text


def test_planted_planner_bug_is_detected_and_named(served: Served) -> None:
    s = served
    rid = f"{PLANT_MARKER}-{uuid.uuid4().hex[:8]}"
    with httpx.Client(timeout=300) as c:
        before = counters(c, s.decode)
        r = ask(c, s, other_prompt(200, 2), rid)
        failed_once_then_serves(c, s, r, before, token_prompt(385), "after-plant")
    rows = integrity_spans(s.db, rid, 2)
    bad = [r for r in by_role(rows, "decode") if r["status"] == "ERROR"]
    views = {r["attrs"][A.KV_VIEW] for r in bad}
    layers = {r["attrs"][A.KV_LAYER] for r in bad}
    # the conv run one row late: every conv view of every Mamba layer, nothing in attention
    assert {"x", "B", "C"} <= views <= {"x", "B", "C", "SSM"}, views
    assert layers == set(s.mamba_layers), layers
    assert all(r["attrs"][A.KV_STATUS] == "mismatch" and r["peer_rank"] == 0 and r["rank"] == 0
               for r in bad)
