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

Integrity (``--integrity``): for a request its policy selects, every P rank digests the
sources it serves at the start of the request (op ``digest``); the leased hybrid READ
then carries those digests to D, which digests its destination after the READ and
compares.  Both digests happen outside the transfer window; their times are kept per
timed request (:class:`IntegrityRun`) so the report can add them.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from hybrid_pd.bench.session import BenchError, BenchSession
from hybrid_pd.transfer.integrity import IntegrityPolicy
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
                 telemetry_on: bool, integrity: IntegrityRun | None = None) -> dict[str, Replies]:
    """All reads of request ``i``, kind -> the D ranks' replies, in the order read.  With
    ``integrity``, the leased read of a request its policy selects is digested."""
    per_layer = per_layer_for(granularity, i)
    src = integrity.sources(s, leased) if integrity is not None else None
    out: dict[str, Replies] = {}
    for kind in _read_order(i, telemetry_on):
        rid = _request_id(kind, i, leased, telemetry_on)
        # D ranks get the policy, not P's verdict: each decides from the id itself.
        checked = integrity is not None and rid == leased
        out[kind] = s.read(rid, "hybrid" if kind in ("hybrid", "traced") else "baseline",
                           per_layer=per_layer, telemetry=kind == "traced",
                           integrity=integrity.policy if checked else "off",
                           integrity_src=src if checked else None)
        if checked and (src is not None or any("integrity" in r for r in out[kind])):
            integrity.collect(s, i, rid, out[kind], src is not None)
    return out


def run_requests(s: BenchSession, init: dict[str, Any], requests: int, granularity: str,
                 telemetry_on: bool, policies: tuple[str, ...] = ("off",)) -> list[Measurements]:
    """Lease and read ``requests`` timed requests after one warm-up, once per integrity
    policy (one :class:`Measurements` each, in ``policies`` order), digesting the
    requests each policy selects.  Several policies are interleaved: round ``i`` reads
    request ``i`` of every policy, starting one policy later each round, so drift and
    the order inside a round fall on all alike.  Leased ids: ``r<i>`` for the first
    policy, ``i<j>-r<i>`` for policy ``j``; each round's are leased just before it."""
    lease_s = float(init.get("lease_s", 120.0))
    prefixes = ["r" if j == 0 else f"i{j}-r" for j in range(len(policies))]
    flip = init.get("integrity_flip", "")
    ms = [Measurements(integrity=IntegrityRun(pol, flip)) for pol in policies]
    for i in range(requests + 1):  # request 0 is the warm-up (UCX connects lazily)
        s.lease([f"{p}{i}" for p in prefixes], lease_s)
        for k in range(len(policies)):
            j = (i + k) % len(policies)
            m = ms[j]
            run = m.integrity if m.integrity.enabled else None
            out = read_request(s, i, f"{prefixes[j]}{i}", granularity, telemetry_on, run)
            m.check(i, out)
            if i > 0:
                m.record(out, telemetry_on)
                m.integrity.timed.append(m.integrity.per_request.get(i, (False, 0.0, 0.0)))
    return ms


@dataclass
class IntegrityRun:
    """One integrity policy over one run's requests: which were digested, the mismatches
    D found, and each timed request's digest times (ms; slowest P rank, slowest D rank)."""

    policy: str = "off"
    flip: str = ""  # tests only: "LAYER:VIEW" planted once, on the first request digested
    digested: list[str] = field(default_factory=list)  # request ids
    mismatches: int = 0  # (layer, view) groups that differed, over all D ranks and requests
    details: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    flipped: list[str] = field(default_factory=list)
    bytes_per_request: int = 0  # bytes digested on each side of one digested request
    per_request: dict[int, tuple[bool, float, float]] = field(default_factory=dict)
    timed: list[tuple[bool, float, float]] = field(default_factory=list)  # (digested, P, D)
    _src_ms: float = 0.0
    _planted: bool = False  # a flip is in P's memory now

    @property
    def enabled(self) -> bool:
        return IntegrityPolicy.parse(self.policy).enabled

    def sources(self, s: BenchSession, rid: str) -> dict[str, dict[str, bytes]] | None:
        """P's digests for request ``rid`` (P rank -> D rank -> digest), or None when the
        P ranks' policy does not select it."""
        flip = "" if self.flipped else self.flip
        replies = s.source_digests(rid, self.policy, flip)
        src = {str(p.rank): r["digests"] for p, r in zip(s.prefill, replies, strict=True)
               if r["digests"]}
        if not src:
            return None
        self.flipped += [r["flipped"] for r in replies if r["flipped"]]
        self._planted = any(r["flipped"] for r in replies)
        if flip and not self.flipped:
            raise BenchError(f"integrity flip {flip!r}: no P rank serves a descriptor "
                             "labelled so (LAYER:VIEW, e.g. 3:KV or 0:SSM)")
        self._src_ms = max(r["ns"] for r in replies) / 1e6
        return src

    def collect(self, s: BenchSession, i: int, rid: str, replies: Replies,
                p_selected: bool) -> None:
        """D's verdicts on request ``rid`` (P digested it when ``p_selected``; a D rank
        that selected it without P's digests says so itself); undoes a planted flip."""
        got = [r.get("integrity") for r in replies]
        if p_selected and any(g is None and r["result"]["status"] == "ok"
                              for g, r in zip(got, replies, strict=True)):
            self.errors.append(f"integrity: request {rid}: P digested it but a D rank did "
                               "not (P and D selected different requests)")
        got = [g for g in got if g is not None]
        self.digested.append(rid)
        for g in got:
            self.mismatches += g["mismatches"]
            self.details += [f"{rid}: {line}" for line in g["details"]]
            self.errors += g["errors"]
        self.bytes_per_request = sum(g["bytes"] for g in got)
        dst_ms = max((g["ns"] for g in got), default=0) / 1e6
        self.per_request[i] = (True, self._src_ms if p_selected else 0.0, dst_ms)
        if self._planted:
            s.restore_sources()
            self._planted = False


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
    integrity: IntegrityRun = field(default_factory=IntegrityRun)

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


__all__ = ["IntegrityRun", "Measurements", "median", "read_request", "run_requests"]
