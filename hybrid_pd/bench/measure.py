"""The bench's measurement loop: the reads of each request, in which order, and what is
kept of their timestamps.

For every request the coordinator runs, on every D rank at once, a baseline READ (one
contiguous descriptor per peer, same bytes per peer) and the hybrid READ(s).  A request's
time is the transfer window across D ranks: earliest handle creation -> last READ seen
DONE (all clocks are CLOCK_MONOTONIC, shared by the processes).  Setup, region reset and
verification happen outside the window.

Order of the reads: every timed read follows a baseline READ.  Telemetry off: ``baseline,
hybrid, spacer`` / ``hybrid, spacer, baseline`` on alternate requests; telemetry on:
``baseline, untraced, spacer, traced, spacer`` (odd requests: traced first); a spacer is
an untimed baseline READ.  What precedes a read matters on a small box: a read that
directly follows a per-layer hybrid read (whose ``done`` goes to P as a separate
notification) was measured ~3 ms slower for tiny transfers (~0.3 ms), a carry-over that a
plain rotation of the kinds gave the traced read 2 times in 3, the untraced one 1 time
in 3 and the baseline always (1 time in 2 with telemetry off).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from hybrid_pd.bench.session import BenchSession
from hybrid_pd.transfer.reads import per_layer_for

Replies = list[dict[str, Any]]  # one reply per D rank


def _read_order(i: int, telemetry_on: bool) -> list[str]:
    """Kinds read for request ``i`` (see the module docstring): each timed read right
    after a baseline READ ("spacer"s are untimed baseline READs)."""
    if not telemetry_on:
        return ["baseline", "hybrid", "spacer"] if i % 2 == 0 else ["hybrid", "spacer", "baseline"]
    first, second = ("hybrid", "traced") if i % 2 == 0 else ("traced", "hybrid")
    return ["baseline", first, "spacer", second, "spacer2"]


def _request_id(kind: str, i: int, leased: str, telemetry_on: bool) -> str:
    """"hybrid" is untraced; "traced" is the same read with spans on (its id is the
    leased one when telemetry is on: P's lease waits for it)."""
    rid = {"baseline": f"b{i}", "spacer": f"s{i}", "spacer2": f"z{i}",
           "hybrid": leased, "traced": f"t{i}"}[kind]
    if telemetry_on:
        rid = {"hybrid": f"u{i}", "traced": leased}.get(kind, rid)
    return rid


def read_request(s: BenchSession, i: int, leased: str, granularity: str,
                 telemetry_on: bool) -> dict[str, Replies]:
    """All reads of request ``i``, kind -> the D ranks' replies, in the order read."""
    per_layer = per_layer_for(granularity, i)
    out: dict[str, Replies] = {}
    for kind in _read_order(i, telemetry_on):
        out[kind] = s.read(_request_id(kind, i, leased, telemetry_on),
                           "hybrid" if kind in ("hybrid", "traced") else "baseline",
                           per_layer=per_layer, telemetry=kind == "traced")
    return out


def run_requests(s: BenchSession, init: dict[str, Any], requests: int, granularity: str,
                 telemetry_on: bool) -> Measurements:
    """Lease and read ``requests`` timed requests after one warm-up."""
    rids = [f"r{i}" for i in range(requests + 1)]
    s.lease(rids, float(init.get("lease_s", 120.0)))
    m = Measurements()
    for i in range(requests + 1):  # request 0 is the warm-up (UCX connects lazily)
        out = read_request(s, i, rids[i], granularity, telemetry_on)
        m.check(i, out)
        if i > 0:
            m.record(out, telemetry_on)
    return m


# ---------------------------------------------------------------------------------
# Windows and statistics
# ---------------------------------------------------------------------------------


def _window(replies: Replies) -> tuple[float, int, list[dict[str, Any]]]:
    res = [r["result"] for r in replies]
    t0 = min(r["t_start_ns"] for r in res)
    t1 = max(r["t_end_ns"] for r in res)
    return (t1 - t0) / 1e9, sum(r["bytes"] for r in res), res


def _caller_window(replies: Replies) -> float:
    """Seconds from the first READ's start to the last D rank's return from read_request:
    the transfer plus D's notifications to P plus span emission."""
    res = [r["result"] for r in replies]
    t1 = max(r["t_notified_ns"] + r["emit_ns"] for r in res)
    return (t1 - min(r["t_start_ns"] for r in res)) / 1e9


def _emit_us(replies: Replies) -> float:
    """Span building / emission of one request, microseconds (the slowest D rank)."""
    return max(r["result"]["emit_ns"] for r in replies) / 1e3


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def _lag_us(results: list[dict[str, Any]]) -> list[float]:
    return [(x["t_done_ns"] - x["t_prev_poll_ns"]) / 1e3 for r in results for x in r["reads"]
            if x["t_done_ns"] and x.get("t_prev_poll_ns")]


def _breakdown() -> dict[str, list[float]]:
    # Per D rank and request: handle creation (make_prepped_xfer / initialize_xfer),
    # transfer() calls (UCX over CMA copies inside the post), polling after the last post.
    return {"make_handles_s": [], "post_s": [], "wait_s": [],
            "nixl_post_us": [], "nixl_xfer_us_max": []}


@dataclass
class Measurements:
    """What one process group's requests leave; the warm-up only adds failures and
    mismatches, the timed requests everything else."""

    seconds: list[float] = field(default_factory=list)
    base_seconds: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # paired hybrid / baseline GB/s
    failures: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    per_rank: dict[int, list[float]] = field(default_factory=dict)  # D rank -> seconds
    breakdown: dict[str, list[float]] = field(default_factory=_breakdown)
    reads_per_request: int = 0
    nixl_descs: int = 0  # D rank 0's NIXL descriptors per request
    bytes_total: int = 0
    tel_on: list[float] = field(default_factory=list)  # traced windows
    tel_off: list[float] = field(default_factory=list)  # untraced windows, same requests
    tel_paired: list[float] = field(default_factory=list)
    caller: dict[str, list[float]] = field(
        default_factory=lambda: {"on": [], "off": [], "emit_us": []})
    lags: list[float] = field(default_factory=list)  # span-end lag bounds, microseconds

    def check(self, i: int, out: dict[str, Replies]) -> None:
        """Failed reads and byte mismatches of request ``i``, in the order read."""
        for kind, replies in out.items():
            for r in replies:
                if r["result"]["status"] != "ok":
                    self.failures.append(f"{kind} {i}: {r['result']['reason']}")
                if r.get("verify"):
                    self.mismatches.append(r["verify"])

    def record(self, out: dict[str, Replies], telemetry_on: bool) -> None:
        """One timed request's windows, ratios and per-rank breakdown."""
        sec, nbytes, res = _window(out["hybrid"])
        bsec, bbytes, _ = _window(out["baseline"])
        self.lags += _lag_us(res)
        if telemetry_on:
            self._record_traced(out, sec)
        self.bytes_total = nbytes
        self.seconds.append(sec)
        self.base_seconds.append(bsec)
        self.ratios.append((nbytes / sec) / (bbytes / bsec) if sec and bsec else 0.0)
        self.reads_per_request = sum(len(r["reads"]) for r in res)
        self._record_ranks(res)

    def _record_traced(self, out: dict[str, Replies], sec: float) -> None:
        """The traced read against the untraced one (``sec``) of the same request."""
        tsec, _, tres = _window(out["traced"])
        self.tel_on.append(tsec)
        self.tel_off.append(sec)
        self.tel_paired.append(tsec / sec if sec else 0.0)
        self.caller["on"].append(_caller_window(out["traced"]))
        self.caller["off"].append(_caller_window(out["hybrid"]))
        self.caller["emit_us"].append(_emit_us(out["traced"]))
        self.lags += _lag_us(tres)

    def _record_ranks(self, res: list[dict[str, Any]]) -> None:
        """Each D rank's own window and where its time went (see :func:`_breakdown`)."""
        bd = self.breakdown
        for d, r in enumerate(res):
            self.per_rank.setdefault(d, []).append((r["t_end_ns"] - r["t_start_ns"]) / 1e9)
            posted = max(x["t_post_ns"] for x in r["reads"])
            make = sum(x["t_created_ns"] - x["t_make_ns"] for x in r["reads"])
            bd["make_handles_s"].append(make / 1e9)
            bd["post_s"].append((posted - r["t_start_ns"] - make) / 1e9)
            bd["wait_s"].append((r["t_end_ns"] - posted) / 1e9)
            tel = [x["telemetry"] for x in r["reads"] if x["telemetry"]]
            if tel:
                bd["nixl_post_us"].append(sum(t["post_us"] for t in tel))
                bd["nixl_xfer_us_max"].append(max(t["xfer_us"] for t in tel))
                self.nixl_descs = sum(t["desc_count"] for t in tel) if d == 0 else self.nixl_descs


__all__ = ["Measurements", "median", "read_request", "run_requests"]
