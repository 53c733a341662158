"""Checks on the span database of a real P/D run, in plain SQL on the public ``spans``
table (what a user querying it would write)."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from hybrid_pd.telemetry import attributes as A


@dataclass(frozen=True)
class RequestTrace:
    trace_id: str
    request_id: str
    read_bytes: int
    read_descriptors: int
    reads: int
    names: frozenset[str]


def _rows(db: Path, sql: str, *args: object) -> list[sqlite3.Row]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def _connector(row: sqlite3.Row) -> str | None:
    return json.loads(row["attributes"]).get(A.CONNECTOR)


def request_traces(db: Path, connector: str, n: int, prefill_tp: int = 1,
                   decode_tp: int = 1, tolerated_failures: int = 0,
                   per_layer: tuple[int, ...] = ()) -> list[RequestTrace]:
    """The ``n`` request traces whose KV moved through ``connector``, oldest first, each
    checked to hold the proxy's spans, P's hold span (one per P rank) and D's transfer
    (one per D rank), mapping and READ spans (one per (D rank, P rank) read) under one
    trace id and one request id.  Requests at the ``per_layer`` positions were read layer
    by layer: one READ per cache layer, each naming its layer and kind."""
    transfers = [r for r in _rows(db, "SELECT * FROM spans WHERE name = ? AND rank = 0 "
                                  "ORDER BY start_ns", A.SPAN_KV_TRANSFER)
                 if _connector(r) == connector]
    failed = [r for r in transfers if r["status"] == "ERROR"]
    assert len(failed) <= tolerated_failures, [dict(r) for r in failed]
    transfers = [r for r in transfers if r["status"] != "ERROR"]
    assert len(transfers) == n, (
        f"{len(transfers)} {connector} transfer spans, expected {n}: "
        f"{[dict(r) for r in transfers]}")
    out = []
    for pos, t in enumerate(transfers):
        assert t["role"] == "decode", dict(t)
        spans = _rows(db, "SELECT * FROM spans WHERE trace_id = ?", t["trace_id"])
        by_name: dict[str, list[sqlite3.Row]] = {}
        for s in spans:
            by_name.setdefault(s["name"], []).append(s)
        (root,) = by_name.get(A.SPAN_PROXY_REQUEST, [None])
        assert root is not None and root["parent_span_id"] is None, by_name.keys()
        rid = root["request_id"]
        for name, role in ((A.SPAN_PROXY_PREFILL, "proxy"), (A.SPAN_PROXY_DECODE, "proxy"),
                           (A.SPAN_KV_NOTIFY, "prefill"), (A.SPAN_KV_TRANSFER, "decode"),
                           (A.SPAN_KV_READ, "decode"), (A.SPAN_KV_DESC_BUILD, "decode")):
            got = by_name.get(name, [])
            assert got, f"trace {t['trace_id']} has no {name}: {sorted(by_name)}"
            assert all(s["role"] == role and s["request_id"] == rid for s in got), \
                [dict(s) for s in got]
        notifies = by_name[A.SPAN_KV_NOTIFY]
        assert sorted(s["rank"] for s in notifies) == list(range(prefill_tp)), \
            [dict(s) for s in notifies]
        # D's notification, not the lease expiry
        assert all(s["status"] != "ERROR" for s in notifies), [dict(s) for s in notifies]
        assert sorted(s["rank"] for s in by_name[A.SPAN_KV_TRANSFER]) == list(range(decode_tp))
        # P's hold spans hang under the proxy's prefill call, D's spans under its decode call
        (p_call,), (d_call,) = by_name[A.SPAN_PROXY_PREFILL], by_name[A.SPAN_PROXY_DECODE]
        assert all(s["parent_span_id"] == p_call["span_id"] for s in notifies)
        assert all(s["parent_span_id"] == d_call["span_id"] for s in by_name[A.SPAN_KV_TRANSFER])
        reads = by_name[A.SPAN_KV_READ]
        if pos in per_layer:
            layers = [(r["layer"], r["layer_kind"]) for r in reads]
            assert len(set(layers)) == len(layers) and all(
                lay is not None and kind in ("attention", "mamba") for lay, kind in layers), layers
        else:
            assert len(reads) == max(prefill_tp, decode_tp), [dict(r) for r in reads]
            assert all(r["layer"] is None and r["layer_kind"] == "mixed" for r in reads)
        assert all(r["status"] != "ERROR" and r["bytes"] > 0 and r["end_ns"] >= r["start_ns"]
                   for r in reads), [dict(r) for r in reads]
        mapping = [s for s in by_name[A.SPAN_KV_DESC_BUILD]
                   if json.loads(s["attributes"])[A.KV_DESC_SCOPE] == "request"]
        # one block-id -> descriptor-id mapping per (D rank, P rank) read
        assert len(mapping) == max(prefill_tp, decode_tp), [dict(s) for s in mapping]
        out.append(RequestTrace(
            t["trace_id"], rid, sum(r["bytes"] for r in reads),
            sum(r["descriptors"] for r in reads), len(reads), frozenset(by_name)))
    assert len({t.trace_id for t in out}) == n, "requests share a trace"
    return out


def assert_descriptor_builds(db: Path, connector: str) -> None:
    """Local (registration) and remote (handshake) descriptor builds on D, with counts."""
    builds = [r for r in _rows(db, "SELECT * FROM spans WHERE name = ?", A.SPAN_KV_DESC_BUILD)
              if _connector(r) == connector]
    scopes = {(json.loads(r["attributes"])[A.KV_DESC_SCOPE], r["role"]) for r in builds}
    for want in (("local", "prefill"), ("local", "decode"), ("remote", "decode")):
        assert want in scopes, (want, scopes)
    assert all(r["descriptors"] > 0 and r["bytes"] > 0 for r in builds
               if json.loads(r["attributes"])[A.KV_DESC_SCOPE] != "request"), \
        [dict(r) for r in builds]
    handshakes = [r for r in _rows(db, "SELECT * FROM spans WHERE name = ?", A.SPAN_KV_HANDSHAKE)
                  if _connector(r) == connector]
    assert handshakes and all(h["role"] == "decode" and h["status"] != "ERROR" for h in handshakes)


def wait_failed_spans(db: Path, name: str, request_part: str | None,
                      bound: float = 15.0) -> list[dict]:
    """ERROR spans called ``name`` whose request id contains ``request_part`` (None: spans
    of no request, e.g. handshakes); the engines' span batches leave every 0.5 s, so poll
    up to ``bound`` seconds."""
    t0 = time.monotonic()
    where = "request_id IS NULL" if request_part is None else "request_id LIKE ?"
    args = () if request_part is None else (f"%{request_part}%",)
    while True:
        rows = []
        if db.exists():
            rows = [dict(r) for r in _rows(
                db, f"SELECT * FROM spans WHERE name = ? AND status = 'ERROR' AND {where}",
                name, *args)]
        if rows or time.monotonic() - t0 > bound:
            return rows
        time.sleep(0.5)


def integrity_outcomes(db: Path) -> list[dict]:
    """Every ``hybrid_pd.kv.integrity`` span (P's digests, D's checks): role, rank,
    peer_rank, request_id, status and its ``kv.status`` / ``kv.view`` / ``kv.layer``."""
    out = []
    for r in _rows(db, "SELECT * FROM spans WHERE name = ? ORDER BY start_ns",
                   A.SPAN_KV_INTEGRITY):
        attrs = json.loads(r["attributes"])
        out.append({k: r[k] for k in ("role", "rank", "peer_rank", "request_id", "status")}
                   | {k: attrs.get(k) for k in (A.KV_STATUS, A.KV_VIEW, A.KV_LAYER)})
    return out
