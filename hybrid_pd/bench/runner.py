"""``hybrid-pd bench``: real NIXL/UCX reads of the planner's plans between P_TP prefill
rank processes and D_TP decode rank processes on loopback, byte-verified, timed side by
side with a raw contiguous READ of the same bytes.

The coordinator (this module) starts the rank processes (:mod:`hybrid_pd.bench.worker`), relays
their handshake metadata (msgspec msgpack over a local socket, never pickle) and drives
requests.  For every request it runs, on every D rank at once, a baseline READ (one
contiguous descriptor per peer, same bytes per peer) and the hybrid READ(s), in
alternating order so neither always runs on a warmer cache.  A request's time is the
transfer window across D ranks: earliest handle creation -> last READ seen DONE (all
clocks are CLOCK_MONOTONIC, shared by the processes).  Setup, region reset and
verification happen outside the window.

Telemetry (``init['telemetry']`` = ``off`` | ``sqlite`` | ``sqlite+otlp``): every rank
process configures tracing (service ``hybrid-pd-bench``, its role, its rank) into the one
SQLite file ``init['telemetry_db']`` (plus OTLP from the ``OTEL_*`` variables).  Each
request is then read twice, untraced and traced, in the same processes, so the report's
``telemetry`` block compares transfer windows on / off measured side by side; it also
gives spans created / stored / dropped (summed over ranks, checked against the rows in
the database), the span cost (per span and per request; the executor builds spans only
after a request's READs are DONE, so the window holds no span work) and the span-end lag
bound (``kv.completion_lag_ns``: previous poll -> the poll that saw DONE).

Order of the reads: every timed read follows a baseline READ.  Telemetry off: ``baseline,
hybrid, spacer`` / ``hybrid, spacer, baseline`` on alternate requests; telemetry on:
``baseline, untraced, spacer, traced, spacer`` (odd requests: traced first); a spacer is
an untimed baseline READ.  What precedes a read matters on a small box: a read that
directly follows a per-layer hybrid read (whose ``done`` goes to P as a separate
notification) was measured ~3 ms slower for tiny transfers (~0.3 ms), a carry-over that a
plain rotation of the kinds gave the traced read 2 times in 3, the untraced one 1 time
in 3 and the baseline always (1 time in 2 with telemetry off).

Several modes in one run: ``init['telemetry']`` may list modes, comma-separated
(``"compare"`` = ``"off,sqlite,sqlite+otlp"``).  Each mode gets its own process group
(tracing is configured once per process), in turn; each on-mode group has its own
side-by-side on / off comparison.  The top-level transfer numbers are the first listed
group's; ``telemetry_modes`` holds one block per on-mode and ``telemetry`` the first of
them.  With ``off`` listed, each block also gets ``ratio_vs_off_group``: its traced
median over the median of the group that never configured tracing - across process
groups, so it includes the exporters' background work but also the box's drift.

:class:`BenchSession` keeps the processes up so tests can run several requests, fault
injections and granularities against one process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from hybrid_pd.planner.layout import ConvLayout, EngineLayout, build_engine_layout, cdiv
from hybrid_pd.planner.model_spec import HybridModelSpec, LayerKind, spec_from_hf_config
from hybrid_pd.planner.plan import RequestPlan, plan_request
from hybrid_pd.transfer import wire
from hybrid_pd.transfer.reads import parse_granularity, per_layer_for

TELEMETRY_MODES = ("off", "sqlite", "sqlite+otlp")
TELEMETRY_COMPARE = ("off", "sqlite", "sqlite+otlp")  # what "compare" stands for
OVERHEAD_GOAL = 1.03  # transfer wall time traced / untraced (BRIEF: telemetry costs <= 3%)
STARTUP_TIMEOUT_S = 180.0  # process start + torch/NIXL import + fill, on a loaded 2-core box


def parse_telemetry(value: str) -> tuple[str, ...]:
    """The modes of ``--telemetry``, in order, each once: ``"sqlite"`` -> ("sqlite",);
    ``"off,sqlite+otlp"`` -> ("off", "sqlite+otlp"); ``"compare"`` -> all three."""
    names = TELEMETRY_COMPARE if value == "compare" else tuple(
        m.strip() for m in value.split(",") if m.strip())
    bad = [m for m in names if m not in TELEMETRY_MODES]
    if not names or bad:
        raise ValueError(f"telemetry must be one of {TELEMETRY_MODES} (comma-separated for "
                         f"several, or 'compare'), got {value!r}")
    return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------------------------
# The case every process derives identically from the init message
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchCase:
    spec: HybridModelSpec
    num_tokens: int
    seed: int
    prefill: EngineLayout
    decode: EngineLayout
    prefill_ids: tuple[tuple[int, ...], ...]
    decode_ids: tuple[tuple[int, ...], ...]
    plans: dict[int, RequestPlan]  # D rank -> merged plan (what `hybrid-pd plan` reports)
    unmerged_plans: dict[int, RequestPlan]  # D rank -> ids 1:1 with descriptors


def _block_ids(layout: EngineLayout, num_tokens: int, start: int) -> tuple[tuple[int, ...], ...]:
    """Attention blocks start.., then one block per Mamba group (block 0 stays null)."""
    nxt, out = start, []
    for g in layout.hma_groups:
        n = cdiv(num_tokens, layout.block_size) if g.kind is LayerKind.ATTENTION else 1
        out.append(tuple(range(nxt, nxt + n)))
        nxt += n
    return tuple(out)


def _layout(spec: HybridModelSpec, tp: int, init: dict[str, Any], start: int, n: int):
    conv = ConvLayout(init.get("conv_layout", "DS"))
    probe = build_engine_layout(spec, tp, kernel_block_size=init["kernel_block_size"],
                                block_size=init.get("block_size"), num_blocks=1,
                                conv_layout=conv)
    ids = _block_ids(probe, n, start)
    # +1: a spare block after the request's, so a write past them is caught.
    num_blocks = max(b for g in ids for b in g) + 2
    return replace(probe, num_blocks=num_blocks), ids


def build_case(init: dict[str, Any], role: str | None = None) -> BenchCase:
    """``role``'s view (its dtype / layout overrides applied, for handshake tests)."""
    over = dict(init.get("overrides", {}).get(role or "", {}))
    spec = spec_from_hf_config(init["config"], kv_dtype=over.get("kv_dtype"),
                               conv_dtype=over.get("conv_dtype"),
                               ssm_dtype=over.get("ssm_dtype"))
    n = int(init["num_tokens"])
    init = {**init, **{k: v for k, v in over.items() if k == "conv_layout"}}
    # P blocks from 1, D blocks from 2: ids differ per side, so a side mix-up shows.
    prefill, p_ids = _layout(spec, int(init["prefill_tp"]), init, 1, n)
    decode, d_ids = _layout(spec, int(init["decode_tp"]), init, 2, n)
    plans, unmerged = {}, {}
    for d in range(decode.tp):
        kw = dict(spec=spec, decode=decode, prefill=prefill, decode_rank=d,
                  decode_block_ids=d_ids, prefill_block_ids=p_ids, num_tokens=n)
        plans[d] = plan_request(**kw, merge=True)
        unmerged[d] = plan_request(**kw, merge=False)
    return BenchCase(spec, n, int(init.get("seed", 1234)), prefill, decode, p_ids, d_ids,
                     plans, unmerged)


# ---------------------------------------------------------------------------------
# Process group
# ---------------------------------------------------------------------------------


class BenchError(RuntimeError):
    pass


@dataclass
class _Proc:
    role: str
    rank: int
    popen: subprocess.Popen[bytes]
    sock: socket.socket | None = None
    handshake: bytes = b""
    baseline: tuple[int, int] = (0, 0)

    @property
    def who(self) -> str:
        return f"{self.role} rank {self.rank} (pid {self.popen.pid})"


@dataclass
class BenchSession:
    """P_TP + D_TP rank processes with exchanged handshakes.  Use as a context manager:
    the processes are stopped, then killed, on exit - also on errors."""

    init: dict[str, Any]
    procs: list[_Proc] = field(default_factory=list)
    refused: str = ""  # handshake refusal message, if a D rank refused a peer

    def __enter__(self) -> BenchSession:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def prefill(self) -> list[_Proc]:
        return [p for p in self.procs if p.role == "prefill"]

    @property
    def decode(self) -> list[_Proc]:
        return [p for p in self.procs if p.role == "decode"]

    def _start(self) -> None:
        self.init.setdefault("run_id", uuid.uuid4().hex[:8])
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        host, port = srv.getsockname()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.init.get("env", {})}
        env.setdefault("NIXL_LOG_LEVEL", "WARN")
        log = None if self.init.get("verbose") else subprocess.DEVNULL
        try:
            for role, tp in (("prefill", self.init["prefill_tp"]), ("decode", self.init["decode_tp"])):
                for rank in range(int(tp)):
                    cmd = [sys.executable, "-m", "hybrid_pd.bench.worker",
                           host, str(port), role, str(rank)]
                    popen = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
                    self.procs.append(_Proc(role, rank, popen))
            by_key = {(p.role, p.rank): p for p in self.procs}
            srv.settimeout(5.0)
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            pending = len(self.procs)
            while pending:
                if time.monotonic() > deadline:
                    raise BenchError(f"rank processes did not connect within {STARTUP_TIMEOUT_S} s")
                for p in self.procs:
                    if p.sock is None and p.popen.poll() is not None:
                        raise BenchError(f"{p.who} exited with {p.popen.returncode} at start")
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    continue
                hello = wire.recv(conn, 30, "rank process")
                p = by_key[(hello["hello"], int(hello["rank"]))]
                p.sock = conn
                pending -= 1
        finally:
            srv.close()
        for p in self.procs:
            assert p.sock is not None
            wire.send(p.sock, self.init)
        self._exchange()

    def reconfigure(self, **changes: Any) -> None:
        """New model / N / layout in the same processes (agents kept, regions rebuilt,
        handshakes redone): process start is the expensive part on 2 cores."""
        self.init.update(changes)
        for p in self.procs:
            assert p.sock is not None
            wire.send(p.sock, {**self.init, "op": "setup"})
        self._exchange()

    def _exchange(self) -> None:
        for p in self.procs:
            reply = self._recv(p, STARTUP_TIMEOUT_S)
            p.handshake = reply["handshake"]
            p.baseline = (int(reply["baseline"][0]), int(reply["baseline"][1]))
        msg = {
            "op": "peers",
            "handshakes": [p.handshake for p in self.prefill],
            "baselines": {str(p.rank): p.baseline[0] for p in self.prefill},
        }
        replies = self.broadcast(self.decode, msg, check=False)
        self.refused = "\n".join(r["error"] for r in replies if not r.get("ok"))

    def _recv(self, p: _Proc, timeout: float, check: bool = True) -> dict[str, Any]:
        assert p.sock is not None
        try:
            reply = wire.recv(p.sock, timeout, p.who)
        except wire.WireError as exc:
            raise BenchError(str(exc)) from exc
        if check and not reply.get("ok"):
            raise BenchError(f"{reply.get('error')}\n{reply.get('trace', '')}")
        return reply

    def broadcast(self, procs: list[_Proc], msg: dict[str, Any], timeout: float = 120.0,
                  check: bool = True) -> list[dict[str, Any]]:
        """Send to all first, then collect: the ranks work concurrently."""
        for p in procs:
            assert p.sock is not None
            wire.send(p.sock, msg)
        return [self._recv(p, timeout, check) for p in procs]

    # -- requests -------------------------------------------------------------------
    def read(self, request_id: str, kind: str, *, per_layer: bool = False,
             timeout_s: float | None = None, telemetry: bool = True) -> list[dict[str, Any]]:
        msg: dict[str, Any] = {"op": "read", "request_id": request_id, "kind": kind,
                               "per_layer": per_layer, "telemetry": telemetry}
        if timeout_s is not None:
            msg["timeout_s"] = timeout_s
        wait = (timeout_s or float(self.init["timeout_s"])) + 60.0
        return self.broadcast(self.decode, msg, timeout=wait)

    def lease(self, request_ids: list[str], lease_s: float) -> None:
        case = build_case(self.init)
        for p in self.prefill:
            readers = sum(1 for plan in case.plans.values()
                          if p.rank in plan.prefill_ranks)
            self.broadcast([p], {"op": "lease", "request_ids": request_ids,
                                 "readers": readers, "lease_s": lease_s})

    def leases(self, wait_s: float = 5.0) -> dict[int, dict[str, str]]:
        replies = self.broadcast(self.prefill, {"op": "leases", "wait_s": wait_s},
                                 timeout=wait_s + 30)
        return {p.rank: r["leases"] for p, r in zip(self.prefill, replies, strict=True)}

    def kill(self, role: str, rank: int, sig: int = signal.SIGKILL) -> None:
        for p in self.procs:
            if p.role == role and p.rank == rank:
                p.popen.send_signal(sig)

    def close(self) -> None:
        """Ask each process to stop, then kill what is left (only our own children)."""
        for p in self.procs:
            if p.sock is not None and p.popen.poll() is None:
                try:
                    wire.send(p.sock, {"op": "stop"})
                except OSError:
                    pass
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(timeout=10)
            if p.sock is not None:
                p.sock.close()
                p.sock = None


# ---------------------------------------------------------------------------------
# One bench run -> the JSON report
# ---------------------------------------------------------------------------------


def _window(replies: list[dict[str, Any]]) -> tuple[float, int, list[dict[str, Any]]]:
    res = [r["result"] for r in replies]
    t0 = min(r["t_start_ns"] for r in res)
    t1 = max(r["t_end_ns"] for r in res)
    return (t1 - t0) / 1e9, sum(r["bytes"] for r in res), res


def _caller_window(replies: list[dict[str, Any]]) -> float:
    """Seconds from the first READ's start to the last D rank's return from read_request:
    the transfer plus D's notifications to P plus span emission."""
    res = [r["result"] for r in replies]
    t1 = max(r["t_notified_ns"] + r["emit_ns"] for r in res)
    return (t1 - min(r["t_start_ns"] for r in res)) / 1e9


def _emit_us(replies: list[dict[str, Any]]) -> float:
    """Span building / emission of one request, microseconds (the slowest D rank)."""
    return max(r["result"]["emit_ns"] for r in replies) / 1e3


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def _lag_us(results: list[dict[str, Any]]) -> list[float]:
    return [(x["t_done_ns"] - x["t_prev_poll_ns"]) / 1e3 for r in results for x in r["reads"]
            if x["t_done_ns"] and x.get("t_prev_poll_ns")]


def _telemetry_report(s: BenchSession, init: dict[str, Any], on: list[float],
                      off: list[float], paired: list[float], lags: list[float],
                      caller: dict[str, list[float]]) -> dict[str, Any]:
    """Flush every rank's tracing and add up the span ledger (see the module docstring)."""
    import sqlite3

    replies = s.broadcast(s.procs, {"op": "telemetry"}, timeout=120.0)
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
    db = init["telemetry_db"]
    with contextlib.closing(sqlite3.connect(db)) as conn:  # plain SQL, as users would
        rows = conn.execute("SELECT count(*) FROM spans WHERE engine_id LIKE ?",
                            (f"{init['run_id']}-%",)).fetchone()[0]
    sq = sinks.get("sqlite", {"exported": 0, "dropped": 0, "dropped_queue": 0})
    on_med, off_med = _median(on), _median(off)
    c_on, c_off = _median(caller["on"]), _median(caller["off"])
    lags_sorted = sorted(lags)
    ratio = on_med / off_med if off_med else 0.0
    return {
        "mode": init["telemetry"],
        "db": str(db),
        "run_id": init["run_id"],  # the rows: engine_id LIKE '<run_id>-%'
        "spans_created": created,
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
        "us_per_span": ns_hot / spans_hot / 1e3 if spans_hot else 0.0,
        "emit_us_per_request_median": _median(caller["emit_us"]),
        "seconds_on_median": on_med,
        "seconds_off_median": off_med,
        "ratio_on_off": ratio,
        "ratio_on_off_paired_median": _median(paired),
        "overhead_goal": {"ratio_max": OVERHEAD_GOAL, "met": 0 < ratio <= OVERHEAD_GOAL},
        # Up to read_request's return (+ notifications to P + span emission).
        "seconds_on_caller_median": c_on,
        "seconds_off_caller_median": c_off,
        "ratio_on_off_caller": c_on / c_off if c_off else 0.0,
        "seconds_on_all": on,
        "seconds_off_all": off,
        "span_end_lag_us": {
            "median": _median(lags_sorted),
            "p99": lags_sorted[int(0.99 * (len(lags_sorted) - 1))] if lags_sorted else 0.0,
            "max": lags_sorted[-1] if lags_sorted else 0.0,
            "reads": len(lags_sorted),
        },
    }


def _read_order(i: int, telemetry_on: bool) -> list[str]:
    """Kinds read for request ``i`` (see the module docstring): each timed read right
    after a baseline READ ("spacer"s are untimed baseline READs)."""
    if not telemetry_on:
        return ["baseline", "hybrid", "spacer"] if i % 2 == 0 else ["hybrid", "spacer", "baseline"]
    first, second = ("hybrid", "traced") if i % 2 == 0 else ("traced", "hybrid")
    return ["baseline", first, "spacer", second, "spacer2"]


def run_bench(init: dict[str, Any]) -> dict[str, Any]:
    """Run ``init['requests']`` requests (+ one warm-up of each kind) and report; one
    process group per telemetry mode when several are listed (module docstring)."""
    modes = parse_telemetry(init.get("telemetry", "off"))
    if modes != ("off",) and not init.get("telemetry_db"):
        raise ValueError("telemetry on needs init['telemetry_db'] (a file path)")
    if len(modes) == 1:
        init["telemetry"] = modes[0]
        reports = [_run_mode(init)]
    else:
        reports = [_run_mode({**init, "telemetry": m, "run_id": uuid.uuid4().hex[:8]})
                   for m in modes]
    report = reports[0]
    on = [r["telemetry"] for r in reports if r["telemetry"]["mode"] != "off"]
    if not on:
        return report
    off = next((r for r in reports if r["telemetry"]["mode"] == "off"), None)
    if off is not None:  # across process groups: background export included, noisier
        for tel in on:
            tel["seconds_off_group_median"] = off["seconds_median"]
            tel["ratio_vs_off_group"] = (tel["seconds_on_median"] / off["seconds_median"]
                                         if off["seconds_median"] else 0.0)
    report["telemetry"] = on[0]
    report["telemetry_modes"] = {tel["mode"]: tel for tel in on}
    for r in reports[1:]:
        mode = r["telemetry"]["mode"]
        report["failures"] += [f"[{mode}] {m}" for m in r["failures"]]
        report["mismatches"] += [f"[{mode}] {m}" for m in r["mismatches"]]
    report["verified"] = all(r["verified"] for r in reports)
    return report


def _run_mode(init: dict[str, Any]) -> dict[str, Any]:
    """One process group, one telemetry mode."""
    gran = init.get("granularity", "request")
    telemetry = init.get("telemetry", "off")
    init.setdefault("run_id", uuid.uuid4().hex[:8])
    parse_granularity(gran)
    requests = int(init.get("requests", 5))
    case = build_case(init)
    report: dict[str, Any] = {
        "model_type": case.spec.model_type,
        "prefill_tp": case.prefill.tp,
        "decode_tp": case.decode.tp,
        "num_tokens": case.num_tokens,
        "requests": requests,
        "granularity": gran,
        "mode": init["mode"],
        "num_threads": init["num_threads"],
        "block_size": case.decode.block_size,
        "prefill_block_size": case.prefill.block_size,
        "kernel_block_size": case.decode.kernel_block_size,
        "page_size_bytes": case.decode.page_size_bytes,
        "units": "seconds; GB/s = 1e9 bytes/s",
    }
    seconds, base_seconds, ratios = [], [], []
    failures: list[str] = []
    mismatches: list[str] = []
    per_rank: dict[int, list[float]] = {}
    # Per D rank and request: handle creation (make_prepped_xfer / initialize_xfer),
    # transfer() calls (UCX over CMA copies inside the post), polling after the last post.
    breakdown: dict[str, list[float]] = {"make_handles_s": [], "post_s": [], "wait_s": [],
                                         "nixl_post_us": [], "nixl_xfer_us_max": []}
    reads_per_request = nixl_descs = 0
    bytes_total = 0
    tel_on: list[float] = []
    tel_off: list[float] = []
    tel_paired: list[float] = []
    caller: dict[str, list[float]] = {"on": [], "off": [], "emit_us": []}
    lags: list[float] = []
    with BenchSession(init) as s:
        if s.refused:
            raise BenchError(f"handshake refused:\n{s.refused}")
        rids = [f"r{i}" for i in range(requests + 1)]
        s.lease(rids, float(init.get("lease_s", 120.0)))
        for i in range(requests + 1):  # request 0 is the warm-up (UCX connects lazily)
            per_layer = per_layer_for(gran, i)
            order = _read_order(i, telemetry != "off")
            out: dict[str, list[dict[str, Any]]] = {}
            for kind in order:
                # "hybrid" is untraced; "traced" is the same read with spans on (its id
                # is the leased one when telemetry is on: P's lease waits for it).
                rid = {"baseline": f"b{i}", "spacer": f"s{i}", "spacer2": f"z{i}",
                       "hybrid": rids[i], "traced": f"t{i}"}[kind]
                if telemetry != "off":
                    rid = {"hybrid": f"u{i}", "traced": rids[i]}.get(kind, rid)
                out[kind] = s.read(rid, "hybrid" if kind in ("hybrid", "traced") else "baseline",
                                   per_layer=per_layer, telemetry=kind == "traced")
            for kind in order:
                for r in out[kind]:
                    if r["result"]["status"] != "ok":
                        failures.append(f"{kind} {i}: {r['result']['reason']}")
                    if r.get("verify"):
                        mismatches.append(r["verify"])
            if i == 0:
                continue
            sec, nbytes, res = _window(out["hybrid"])
            bsec, bbytes, _ = _window(out["baseline"])
            lags += _lag_us(res)
            if telemetry != "off":
                tsec, _, tres = _window(out["traced"])
                tel_on.append(tsec)
                tel_off.append(sec)
                tel_paired.append(tsec / sec if sec else 0.0)
                caller["on"].append(_caller_window(out["traced"]))
                caller["off"].append(_caller_window(out["hybrid"]))
                caller["emit_us"].append(_emit_us(out["traced"]))
                lags += _lag_us(tres)
            bytes_total = nbytes
            seconds.append(sec)
            base_seconds.append(bsec)
            ratios.append((nbytes / sec) / (bbytes / bsec) if sec and bsec else 0.0)
            reads_per_request = sum(len(r["reads"]) for r in res)
            for d, r in enumerate(res):
                per_rank.setdefault(d, []).append((r["t_end_ns"] - r["t_start_ns"]) / 1e9)
                posted = max(x["t_post_ns"] for x in r["reads"])
                make = sum(x["t_created_ns"] - x["t_make_ns"] for x in r["reads"])
                breakdown["make_handles_s"].append(make / 1e9)
                breakdown["post_s"].append((posted - r["t_start_ns"] - make) / 1e9)
                breakdown["wait_s"].append((r["t_end_ns"] - posted) / 1e9)
                tel = [x["telemetry"] for x in r["reads"] if x["telemetry"]]
                if tel:
                    breakdown["nixl_post_us"].append(sum(t["post_us"] for t in tel))
                    breakdown["nixl_xfer_us_max"].append(max(t["xfer_us"] for t in tel))
                    nixl_descs = sum(t["desc_count"] for t in tel) if d == 0 else nixl_descs
        leases = s.leases()
        tel_report = (_telemetry_report(s, init, tel_on, tel_off, tel_paired, lags, caller)
                      if telemetry != "off" else {"mode": "off"})
        if telemetry == "off":
            lag_sorted = sorted(lags)
            tel_report["span_end_lag_us"] = {  # the executor's poll bound, spans or not
                "median": _median(lag_sorted), "max": lag_sorted[-1] if lag_sorted else 0.0,
                "reads": len(lag_sorted)}
    sec_med, base_med = _median(seconds), _median(base_seconds)
    gbps = bytes_total / sec_med / 1e9 if sec_med else 0.0
    base_gbps = bytes_total / base_med / 1e9 if base_med else 0.0
    freed = [v for rank in leases.values() for v in rank.values()]
    report.update({
        "verified": not mismatches and not failures,
        "bytes_total": bytes_total,
        "descriptors_total": sum(p.descriptors for p in case.plans.values()),
        "descriptor_units_total": sum(len(r.local_ids) for p in case.unmerged_plans.values()
                                      for r in p.reads),
        "nixl_desc_count_rank0": nixl_descs,
        "reads_per_request": reads_per_request,
        "seconds_median": sec_med,
        "seconds_all": seconds,
        "gbps_median": gbps,
        "baseline_seconds_median": base_med,
        "baseline_seconds_all": base_seconds,
        "baseline_gbps_median": base_gbps,
        "ratio_to_baseline": gbps / base_gbps if base_gbps else 0.0,
        "ratio_paired_median": _median(ratios),
        "breakdown_median": {k: _median(v) for k, v in breakdown.items()},
        "per_rank": [
            {"decode_rank": d, "bytes": case.plans[d].bytes,
             "descriptors": case.plans[d].descriptors,
             "peers": list(case.plans[d].prefill_ranks),
             "seconds_median": _median(v),
             "gbps_median": case.plans[d].bytes / _median(v) / 1e9 if _median(v) else 0.0}
            for d, v in sorted(per_rank.items())
        ],
        "leases": {"freed_done": sum(1 for v in freed if v == "done"),
                   "freed_other": sum(1 for v in freed if v and v != "done"),
                   "held": sum(1 for v in freed if not v)},
        "failures": failures,
        "mismatches": mismatches,
        "telemetry": tel_report,
    })
    return report


def make_init(
    config: dict[str, Any], *, prefill_tp: int, decode_tp: int, num_tokens: int,
    requests: int = 5, granularity: str = "request", kernel_block_size: int = 16,
    block_size: int | None = None, timeout_s: float = 30.0, num_threads: int = 0,
    mode: str = "prepped", seed: int = 1234, conv_layout: str = "DS",
    overrides: dict[str, dict[str, str]] | None = None, verbose: bool = False,
    env: dict[str, str] | None = None, telemetry: str = "off",
    telemetry_db: str | None = None,
) -> dict[str, Any]:
    """The init message every rank process receives (plain data: msgpack-able)."""
    return {
        "config": config, "prefill_tp": prefill_tp, "decode_tp": decode_tp,
        "num_tokens": num_tokens, "requests": requests, "granularity": granularity,
        "kernel_block_size": kernel_block_size, "block_size": block_size,
        "timeout_s": timeout_s, "num_threads": num_threads, "mode": mode, "seed": seed,
        "conv_layout": conv_layout, "overrides": overrides or {}, "verbose": verbose,
        "env": env or {}, "telemetry": telemetry, "telemetry_db": telemetry_db,
    }


__all__ = ["BenchCase", "BenchError", "BenchSession", "build_case", "make_init",
           "parse_telemetry", "run_bench"]
