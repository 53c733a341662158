"""One rank process of ``hybrid-pd bench``: ``python -m hybrid_pd.bench.worker
HOST PORT ROLE RANK``.

It connects to the coordinator, builds its real HMA-layout regions (only the blocks the
bench's request uses, plus the null block and a spare), fills them from the seeded
reference state, registers them with NIXL and answers commands:

* P (prefill) rank: regions = noise, then its shard of the request's pages written in
  (so a read of a wrong block or of another rank's bytes shows up as noise); it tracks
  leases and reports which were freed by D's notifications.
* D (decode) rank: regions = sentinel; after each READ every byte of every region is
  compared with the expected image (the reference shard inside the transferable bytes,
  sentinel everywhere else - so padding and unowned bytes must stay untouched).

Both also hold a contiguous baseline buffer for the raw READ of the same byte count.

Integrity digests (``--integrity``, :mod:`hybrid_pd.transfer.integrity`): each rank
decides from the request id alone whether a request is digested.  P digests the source
side of every READ it serves (op ``digest``) and the coordinator relays the digests to
D; D digests its destination right after the READ is DONE and compares, per (layer,
view).  The test-only ``flip`` plants a corruption on P after its digest was taken
(op ``restore`` undoes it).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import time
import traceback
from typing import Any

import numpy as np
from opentelemetry.trace import NoOpTracer, Tracer

from hybrid_pd.bench.case import BenchCase, build_case
from hybrid_pd.planner.reshard import make_full_state, shard_rank
from hybrid_pd.planner.views import to_addr_descs
from hybrid_pd.settings import DEFAULT_KV_INTEGRITY
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.transfer import handshake as hs
from hybrid_pd.transfer import integrity as ig
from hybrid_pd.transfer import wire
from hybrid_pd.transfer.agent import make_agent
from hybrid_pd.transfer.executor import NixlExecutor, RequestResult
from hybrid_pd.transfer.leases import LeaseTable

SERVICE_NAME = "hybrid-pd-bench"

SENTINEL = 0xC3  # D bytes nobody may write
NOISE_SEED = 99


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: if the coordinator dies, so do we (no orphaned NIXL agents)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)
    except OSError:
        pass


def _page_images(case: BenchCase, role: str, rank: int) -> dict[tuple[int, int], Any]:
    state = make_full_state(case.spec, case.num_tokens, seed=case.seed)
    layout = case.prefill if role == "prefill" else case.decode
    ids = case.prefill_ids if role == "prefill" else case.decode_ids
    return shard_rank(case.spec, layout, rank, state, ids, case.num_tokens)


class Rank:
    """One rank: a NIXL agent kept for the process's life, and the current case's
    regions / executor (rebuilt by ``configure`` so tests reuse the process)."""

    def __init__(self, role: str, rank: int, init: dict[str, Any],
                 tracer: Tracer | None = None) -> None:
        self.role, self.rank = role, rank
        self.telemetry: Any = None  # setup.Telemetry when this process configured tracing
        if tracer is None and init.get("telemetry", "off") != "off":
            from hybrid_pd.telemetry import setup

            # One database file for every rank process (WAL + busy timeout make the
            # concurrent writers safe); OTLP only when asked, then from OTEL_* variables.
            self.telemetry = setup.configure_tracing(
                SERVICE_NAME, role, db_url=init["telemetry_db"],
                otlp="otlp" in init["telemetry"],
                engine_id=f"{init.get('run_id', 'bench')}-{role}{rank}",
                resource_attributes={A.KV_RANK: rank}, set_global=False,
            )
            tracer = self.telemetry.tracer()
        # "on" tracer and the no-op one the bench swaps in for telemetry-off requests.
        self.tracer_on: Tracer = tracer or NoOpTracer()
        affinity = os.sched_getaffinity(0)
        self.agent = make_agent(f"{init['run_id']}-{role}{rank}",
                                num_threads=int(init["num_threads"]))
        if os.sched_getaffinity(0) != affinity:  # NIXL may pin us to the last core
            os.sched_setaffinity(0, affinity)
        self.ex: NixlExecutor | None = None
        self.configure(init)

    def configure(self, init: dict[str, Any]) -> None:
        cost = self.ex.span_cost if self.ex is not None else None  # keep across reconfigures
        if self.ex is not None:
            self.ex.close()
            self.ex = None
        role, rank = self.role, self.rank
        self.case = build_case(init, role)
        self.timeout_s = float(init["timeout_s"])
        layout = self.case.prefill if role == "prefill" else self.case.decode
        self.layout = layout
        self.regions = [np.empty(layout.region_bytes, dtype=np.uint8)
                        for _ in range(layout.num_regions)]
        pages = _page_images(self.case, role, rank)
        page = layout.page_size_bytes
        self.padding = pages.padding
        if role == "prefill":
            rng = np.random.default_rng(NOISE_SEED + rank)
            for r in self.regions:
                r[:] = np.frombuffer(rng.bytes(r.size), dtype=np.uint8)
            for (region, block), buf in pages.pages.items():
                self.regions[region][block * page:(block + 1) * page] = buf
            self.expected: list[np.ndarray] = []
        else:
            self.expected = [np.full(layout.region_bytes, SENTINEL, dtype=np.uint8)
                             for _ in range(layout.num_regions)]
            for (region, block), buf in pages.pages.items():
                base = block * page
                for lo, hi in pages.allowed[(region, block)]:
                    self.expected[region][base + lo:base + hi] = buf[lo:hi]
            self._reset()
        # Baseline: P serves the largest per-peer byte count any D reads from it; D
        # holds one slot per peer it reads from.
        self.baseline_slots: dict[int, tuple[int, int]] = {}
        if role == "prefill":
            need = max([r.bytes for p in self.case.plans.values() for r in p.reads
                        if r.prefill_rank == rank] or [1])
            self.baseline = np.full(need, 0x11, dtype=np.uint8)  # touched: resident pages
        else:
            off = 0
            for r in self.case.plans[rank].reads:
                self.baseline_slots[r.prefill_rank] = (off, r.bytes)
                off += r.bytes
            self.baseline = np.zeros(max(off, 1), dtype=np.uint8)
        self.ex = NixlExecutor(self.agent_name, self.regions, mode=init["mode"],
                               agent=self.agent, tracer=self.tracer_on)
        if cost is not None:
            self.ex.span_cost = cost
        self.baseline_addr, _ = self.ex.register_extra(self.baseline)
        self.meta = self.ex.metadata(
            engine_id=role, spec=self.case.spec, layout=layout, rank=rank
        )
        self.leases = LeaseTable()
        self.remote_baseline: dict[int, int] = {}
        self._integrity: dict[int, tuple[Any, np.ndarray, ig.Labels]] | None = None
        self._flipped: tuple[int, int, int] | None = None  # (region, offset, old byte)

    @property
    def agent_name(self) -> str:
        return str(self.agent.name)

    def setup_reply(self) -> dict[str, Any]:
        return {"ok": True, "handshake": hs.encode(self.meta),
                "baseline": [self.baseline_addr, int(self.baseline.nbytes)]}

    def _reset(self) -> None:
        for r in self.regions:
            r.fill(SENTINEL)

    # -- commands -------------------------------------------------------------------
    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg["op"]
        if op == "setup":
            self.configure(msg)
            return self.setup_reply()
        if op == "peers":
            return self.peers(msg)
        if op == "read":
            return self.read(msg)
        if op == "lease":
            for rid in msg["request_ids"]:
                self.leases.add(rid, int(msg["readers"]), float(msg["lease_s"]))
            return {"ok": True}
        if op == "leases":
            deadline = time.monotonic() + float(msg.get("wait_s", 5.0))
            while True:
                self.leases.poll(self.ex.agent)
                if not self.leases.held() or time.monotonic() > deadline:
                    break
                time.sleep(0.005)
            return {"ok": True, "leases": {r: lease.freed for r, lease in
                                           self.leases.leases.items()}}
        if op == "telemetry":
            return self.telemetry_report()
        if op == "digest":
            return self.digest_sources(msg)
        if op == "restore":
            return {"ok": True, "restored": self.restore()}
        raise ValueError(f"unknown op {op!r}")

    def peers(self, msg: dict[str, Any]) -> dict[str, Any]:
        wanted = {r.prefill_rank for r in self.case.plans[self.rank].reads}
        for blob in msg["handshakes"]:
            remote = hs.decode(blob, who="prefill peer")
            if remote.layout.rank in wanted:
                self.ex.add_peer(remote)
        self.remote_baseline = {int(k): int(v) for k, v in msg["baselines"].items()}
        return {"ok": True}

    def read(self, msg: dict[str, Any]) -> dict[str, Any]:
        rid = msg["request_id"]
        timeout = float(msg.get("timeout_s", self.timeout_s))
        if msg["kind"] == "baseline":
            # Written just before, like the hybrid regions (reset to the sentinel), so
            # both READs land in equally freshly-dirtied destination memory.
            self.baseline.fill(0)
            spans = {
                ("prefill", p): ((self.baseline_addr + off, n), (self.remote_baseline[p], n))
                for p, (off, n) in self.baseline_slots.items()
            }
            res = self.ex.read_contiguous(rid, spans, timeout_s=timeout)
            return {"ok": True, "result": _result_dict(res)}
        self._reset()  # outside the timed window
        # Telemetry on / off per request, so one run interleaves both in one process.
        self.ex.tracer = self.tracer_on if msg.get("telemetry", True) else NoOpTracer()
        plan = self.case.unmerged_plans[self.rank]
        res = self.ex.read_request(
            rid, plan, engine_id="prefill", decode_block_ids=self.case.decode_ids,
            per_layer=bool(msg["per_layer"]), timeout_s=timeout,
        )
        out = {"ok": True, "result": _result_dict(res)}
        if res.status == "ok":
            policy = ig.IntegrityPolicy.parse(msg.get("integrity", DEFAULT_KV_INTEGRITY))
            if policy.selects(rid):  # before verify: right after the READ, as D would
                out["integrity"] = self.digest_destination(msg.get("integrity_src") or {})
            out["verify"] = self.verify()
        return out

    # -- integrity digests ------------------------------------------------------------
    def _reads(self) -> dict[int, tuple[Any, np.ndarray, ig.Labels]]:
        """Per peer (D rank on P, P rank on D): the read, this side's ``(addr, len, dev)``
        rows of its unit descriptors and their labels; built on first use."""
        if self._integrity is None:
            case, out = self.case, {}
            d_ranks = range(case.decode.tp) if self.role == "prefill" else (self.rank,)
            for d in d_ranks:
                plan = case.unmerged_plans[d]
                labels = ig.plan_labels(spec=case.spec, decode=case.decode,
                                        prefill=case.prefill, plan=plan,
                                        decode_block_ids=case.decode_ids)
                for read in plan.reads:
                    if self.role == "prefill" and read.prefill_rank == self.rank:
                        descs, peer = read.remote_array, d
                    elif self.role == "decode":
                        descs, peer = read.local_array, read.prefill_rank
                    else:
                        continue
                    rows = to_addr_descs(descs, self.ex.region_bases, self.ex.region_lens)
                    out[peer] = (read, rows, labels[read.prefill_rank])
            self._integrity = out
        return self._integrity

    def digest_sources(self, msg: dict[str, Any]) -> dict[str, Any]:
        """P: digests of every READ's source side for the selected request (none when
        the policy does not select it), then the planted flip if asked."""
        self.restore()
        policy = ig.IntegrityPolicy.parse(msg["integrity"])
        if not policy.selects(msg["request_id"]):
            return {"ok": True, "digests": {}, "ns": 0, "bytes": 0, "flipped": ""}
        reads = self._reads()  # labels and rows once per case, outside the timing
        t0 = time.perf_counter_ns()
        digests, nbytes = {}, 0
        for d, (_, rows, _) in reads.items():
            dg = ig.digest_descs(rows, side="src", rank=self.rank, peer=d)
            digests[str(d)] = dg.encode()
            nbytes += dg.nbytes
        ns = time.perf_counter_ns() - t0
        flipped = self.flip(msg["flip"]) if msg.get("flip") else ""
        return {"ok": True, "digests": digests, "ns": ns, "bytes": nbytes, "flipped": flipped}

    def flip(self, where: str) -> str:
        """Test only: flip one byte of the first source descriptor labelled ``LAYER:VIEW``
        (after the digest was taken); '' when this rank serves none."""
        layer_s, _, view = where.partition(":")
        for d, (read, _, labels) in sorted(self._reads().items()):
            for j in range(len(labels)):
                if labels.at(j) == (int(layer_s), view):
                    off, n, region = read.remote[j]
                    at = off + n // 2
                    buf = self.regions[region]
                    self._flipped = (region, at, int(buf[at]))
                    buf[at] ^= 0xFF
                    return (f"P rank {self.rank}: flipped the byte at region {region} offset "
                            f"{at} (layer {layer_s} view {view}, descriptor {j} read by D rank "
                            f"{d})")
        return ""

    def restore(self) -> bool:
        if self._flipped is None:
            return False
        region, at, old = self._flipped
        self.regions[region][at] = old
        self._flipped = None
        return True

    def digest_destination(self, src: dict[str, dict[str, bytes]]) -> dict[str, Any]:
        """D: digest every READ's destination and compare with P's digests (``src``: P
        rank -> D rank -> encoded :class:`~hybrid_pd.transfer.integrity.KVDigest`)."""
        reads = self._reads()
        t0 = time.perf_counter_ns()
        mismatches: list[ig.Mismatch] = []
        errors: list[str] = []
        nbytes = ndesc = 0
        for p, (_, rows, labels) in reads.items():
            dst = ig.digest_descs(rows, side="dst", rank=self.rank, peer=p)
            nbytes, ndesc = nbytes + dst.nbytes, ndesc + dst.descriptors
            blob = src.get(str(p), {}).get(str(self.rank))
            if blob is None:
                errors.append(f"integrity: D rank {self.rank}: no digest from P rank {p} "
                              "(P and D selected different requests?)")
                continue
            mismatches += ig.compare(ig.KVDigest.decode(blob), dst, labels)
        return {"ns": time.perf_counter_ns() - t0, "bytes": nbytes, "descriptors": ndesc,
                "mismatches": len(mismatches), "details": ig.describe(mismatches),
                "errors": errors}

    def verify(self) -> str:
        """'' when every byte of every region equals the expected image, else where not."""
        page = self.layout.page_size_bytes
        for region, (got, want) in enumerate(zip(self.regions, self.expected, strict=True)):
            if np.array_equal(got, want):
                continue
            bad = np.flatnonzero(got != want)
            off = int(bad[0])
            block, lo = divmod(off, page)
            pad = self.padding.get((region, block))
            where = ("padding" if pad and pad[0] <= lo < pad[1] else
                     "a byte outside the transfer" if want[off] == SENTINEL else
                     "transferred state")
            return (f"D rank {self.rank}: region {region}: {bad.size} bytes differ; first at "
                    f"block {block} offset {lo} ({where}): got {got[off]:#04x}, expected "
                    f"{want[off]:#04x}")
        return ""

    def telemetry_report(self) -> dict[str, Any]:
        """Flush and close this process's tracing; span counts and hot-path span cost."""
        assert self.ex is not None
        stats = self.telemetry.shutdown() if self.telemetry is not None else None
        cost = self.ex.span_cost
        return {"ok": True, "stats": stats,
                "span_cost": {"spans": cost.spans, "ns": cost.ns}}

    def close(self) -> None:
        if self.ex is not None:
            self.ex.close()
        if self.telemetry is not None:
            self.telemetry.shutdown()  # idempotent; flushes when the bench did not ask


def _result_dict(res: RequestResult) -> dict[str, Any]:
    return {
        "status": res.status,
        "reason": res.reason,
        "t_start_ns": res.t_start_ns,
        "t_end_ns": res.t_end_ns,
        "bytes": res.bytes,
        "descriptors": res.descriptors,
        "notified": res.notified,
        "polls": res.polls,
        "t_notified_ns": res.t_notified_ns,
        "emit_ns": res.emit_ns,
        "reads": [
            {
                "prefill_rank": r.prefill_rank,
                "layer": r.layer,
                "bytes": r.bytes,
                "descriptors": r.descriptors,
                "status": r.status,
                "reason": r.reason,
                "t_make_ns": r.t_make_ns,
                "t_created_ns": r.t_created_ns,
                "t_post_ns": r.t_post_ns,
                "t_done_ns": r.t_done_ns,
                "t_prev_poll_ns": r.t_prev_poll_ns,
                "telemetry": None if r.telemetry is None else {
                    "post_us": r.telemetry.post_us,
                    "xfer_us": r.telemetry.xfer_us,
                    "total_bytes": r.telemetry.total_bytes,
                    "desc_count": r.telemetry.desc_count,
                },
            }
            for r in res.reads
        ],
    }


def main(argv: list[str]) -> int:
    host, port, role, rank_s = argv
    rank = int(rank_s)
    _die_with_parent()
    who = f"{role} rank {rank}"
    sock = socket.create_connection((host, int(port)), timeout=30)
    worker: Rank | None = None
    try:
        wire.send(sock, {"hello": role, "rank": rank, "pid": os.getpid()})
        init = wire.recv(sock, 120, "coordinator")
        try:
            worker = Rank(role, rank, init)
            wire.send(sock, worker.setup_reply())
        except Exception as exc:
            wire.send(sock, {"ok": False, "error": f"{who}: setup failed: {exc}",
                             "trace": traceback.format_exc()})
            return 1
        while True:
            msg = wire.recv(sock, None, "coordinator")
            if msg.get("op") == "stop":
                wire.send(sock, {"ok": True})
                return 0
            try:
                reply = worker.handle(msg)
            except Exception as exc:  # report, keep serving (e.g. a refused handshake)
                reply = {"ok": False, "error": f"{who}: {exc}", "trace": traceback.format_exc()}
            wire.send(sock, reply)
    except wire.WireError:
        return 3  # coordinator went away
    finally:
        if worker is not None:
            worker.close()
        sock.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
