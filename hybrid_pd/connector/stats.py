"""Our connector's numbers on each engine's ``/metrics``, beside vLLM's ``vllm:nixl_*``.

vLLM's seam for connector metrics: the workers' (and the scheduler's) stats object
travels each engine step to the API server process (``KVConnectorStats.to_dict`` ->
msgspec -> ``build_kv_connector_stats``), where the connector's
``KVConnectorPromMetrics.observe`` turns it into Prometheus metrics.
:class:`HybridKVConnectorStats` is upstream's NIXL stats (so ``vllm:nixl_*`` stay) with
our rows added; :class:`HybridPromMetrics` is upstream's metrics plus ours:

* ``hybrid_pd_kv_read_seconds`` / ``hybrid_pd_kv_read_bytes`` {layer_kind}: one
  observation per READ handle (the ``hybrid_pd.kv.read`` span's duration and bytes);
* ``hybrid_pd_kv_bytes_moved_total`` / ``hybrid_pd_kv_bytes_optimal_total``: bytes read
  and the least whole-block bytes D needed for the same requests (moved / optimal);
* ``hybrid_pd_handover_phase_seconds`` {phase}: the handover phases measured inside this
  engine (D: d_queue .. d_first_step; P: p_prefill);
* ``hybrid_pd_kv_stalls_total``, ``hybrid_pd_kv_aborts_total``,
  ``hybrid_pd_kv_integrity_failures_total``, ``hybrid_pd_kv_integrity_checks_total``,
  ``hybrid_pd_kv_integrity_skips_total``;
* ``hybrid_pd_engine_spans_dropped_total`` {sink,reason} /
  ``hybrid_pd_engine_spans_exported_total`` {sink}: the engine process's span sinks (its
  own registry is not the API server's).

The API server also keeps each D request's handover instants for the proxy
(:data:`HANDOVERS`) and, with ``--kv-integrity``, each P request's digests for D
(:data:`INTEGRITY`); :mod:`.handover_route` serves both.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.nixl.stats import (
    NixlKVConnectorStats,
    NixlPromMetrics,
)
from vllm.v1.metrics.utils import create_metric_per_engine

from hybrid_pd.connector.handover import D_SCHED_KEY, D_WORKER_KEY
from hybrid_pd.telemetry import counters

# Row lists we add to upstream's stats (all msgspec-serializable).
READS_KEY = "hy_reads"  # [layer_kind, seconds, bytes]
MOVED_KEY = "hy_moved"  # [bytes_moved, bytes_optimal]
P_SCHED_KEY = "hy_handover_p"  # [p_sched_ns, p_done_ns]
EVENTS_KEY = "hy_events"  # [kind, n], kind one of EVENTS
SPANS_KEY = "hy_spans"  # [sink, reason ("" = exported), n]
# P's integrity digests (connector.integrity): [p_request_id, rank, tp, block_size, keys, digests]
INTEGRITY_KEY = "hy_integrity"
HY_KEYS = (READS_KEY, MOVED_KEY, P_SCHED_KEY, EVENTS_KEY, SPANS_KEY, D_SCHED_KEY, D_WORKER_KEY,
           INTEGRITY_KEY)

# D phases computed from a request's rows (start index, end index into handover_instants).
D_PHASES = ("d_queue", "handshake", "read_post", "read_in_flight", "completion_noticed",
            "d_first_step")
EVENTS = {
    "stall": "READs given up by the stall guard (no progress within the read timeout).",
    "abort": "Transfers given up (stall, dead peer, bad handshake); the request failed "
    "through kv_load_failure_policy.",
    "integrity_failure": "Requests (per D rank) whose KV, digested after the READs, differed "
    "from P's digests of the same units; the request failed through kv_load_failure_policy.",
    "integrity_check": "Requests (per D rank) whose KV was compared with P's digests "
    "(--kv-integrity), whatever the outcome.",
    "integrity_skip": "Requests (per D rank) selected for an integrity check that ran "
    "unchecked: P's digests did not arrive in time (or could not be compared).",
}
HANDOVERS_MAX = 8192  # requests whose instants D's API server keeps for the proxy
# P's API server keeps the digests of at most this many requests / characters for D.
INTEGRITY_MAX = 2048
INTEGRITY_MAX_CHARS = 64 << 20


class HybridKVConnectorStats(NixlKVConnectorStats):
    """Upstream's NIXL stats plus our rows (see the module doc)."""

    def reset(self) -> None:
        super().reset()
        for key in HY_KEYS:
            self.data[key] = []

    def is_empty(self) -> bool:
        return super().is_empty() and not any(self.data.get(k) for k in HY_KEYS)

    def aggregate(self, other: Any) -> Any:
        if not other.is_empty():
            for key, rows in other.data.items():
                self.data.setdefault(key, []).extend(rows)
        return self

    def reduce(self) -> dict[str, int | float]:
        if self.num_successful_transfers == 0:
            return {"Num successful transfers": 0}  # upstream's summary needs transfers
        return super().reduce()


class SpanTally:
    """This process's span-sink counters since the last call, as stats rows."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], int] = {}

    def rows(self) -> list[list[Any]]:
        snap = counters.snapshot()
        now = {(s, ""): n for s, n in snap["exported"].items()}
        now.update({tuple(k.split("/", 1)): n for k, n in snap["dropped"].items()})  # type: ignore[misc]
        out = [[s, r, n - self._last.get((s, r), 0)] for (s, r), n in now.items()
               if n > self._last.get((s, r), 0)]
        self._last = now
        return out


# ---------------------------------------------------------------- the API server's side

_lock = threading.Lock()
HANDOVERS: OrderedDict[str, dict[str, Any]] = OrderedDict()


def _merge_worker(entry: dict[str, Any], row: list[Any]) -> None:
    _rid, rank, load, begin, posted, done, cold = row
    ranks = entry.setdefault("ranks", [])
    ranks.append(rank)
    # The slowest rank gates the request: each instant is the latest over D's ranks.
    for key, value in (("d_load_ns", load), ("d_read_begin_ns", begin),
                       ("d_posted_ns", posted), ("d_done_ns", done)):
        entry[key] = max(entry.get(key, 0), int(value))
    entry["cold"] = bool(entry.get("cold")) or bool(cold)


def _entry(rid: str) -> dict[str, Any]:
    entry = HANDOVERS.get(rid)
    if entry is None:
        entry = HANDOVERS[rid] = {"request_id": rid}
        while len(HANDOVERS) > HANDOVERS_MAX:
            HANDOVERS.popitem(last=False)
    return entry


def take_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Fold one step's D rows into :data:`HANDOVERS`; the entries completed by it."""
    done: list[dict[str, Any]] = []
    with _lock:
        for row in data.get(D_WORKER_KEY) or ():
            _merge_worker(_entry(str(row[0])), row)
        for rid, arrival, noticed, first in data.get(D_SCHED_KEY) or ():
            entry = _entry(str(rid))
            entry.update(d_arrival_ns=int(arrival), d_noticed_ns=int(noticed),
                         d_first_token_ns=int(first), complete=True)
            done.append(dict(entry))
    return done


def handover(rid: str) -> dict[str, Any] | None:
    """D's instants of the proxy's request ``rid`` once its first token was sampled."""
    with _lock:
        entry = HANDOVERS.get(rid)
        return dict(entry) if entry is not None and entry.get("complete") else None


INTEGRITY: OrderedDict[str, dict[str, Any]] = OrderedDict()
_integrity_chars = 0


def take_integrity(data: dict[str, Any]) -> None:
    """Keep P's digest rows of one step (:data:`INTEGRITY_KEY`) for D, per P request and
    rank; the oldest go first past :data:`INTEGRITY_MAX` entries or
    :data:`INTEGRITY_MAX_CHARS` characters."""
    global _integrity_chars
    rows = data.get(INTEGRITY_KEY)
    if not rows:
        return
    with _lock:
        for rid, rank, tp, block_size, keys, digests in rows:
            entry = INTEGRITY.get(str(rid))
            if entry is None:
                entry = INTEGRITY[str(rid)] = {"request_id": str(rid), "tp": int(tp),
                                               "block_size": int(block_size), "ranks": {}}
            entry["ranks"][str(int(rank))] = {"keys": str(keys), "digests": str(digests)}
            _integrity_chars += len(keys) + len(digests)
        while INTEGRITY and (len(INTEGRITY) > INTEGRITY_MAX
                             or _integrity_chars > INTEGRITY_MAX_CHARS):
            _, old = INTEGRITY.popitem(last=False)
            _integrity_chars -= sum(len(r["keys"]) + len(r["digests"])
                                    for r in old["ranks"].values())


def integrity(rid: str) -> dict[str, Any] | None:
    """P's digests of its request ``rid`` (vLLM's id on P) as far as they arrived: every
    P rank's once ``len(ranks) == tp``."""
    with _lock:
        entry = INTEGRITY.get(rid)
        return None if entry is None else {**entry, "ranks": dict(entry["ranks"])}


def d_phase_seconds(entry: dict[str, Any]) -> dict[str, float]:
    """The D phases of a complete entry (seconds, each >= 0)."""
    marks = [entry["d_arrival_ns"], entry.get("d_load_ns", 0), entry.get("d_read_begin_ns", 0),
             entry.get("d_posted_ns", 0), entry.get("d_done_ns", 0), entry["d_noticed_ns"],
             entry["d_first_token_ns"]]
    out: dict[str, float] = {}
    prev = marks[0]
    for phase, mark in zip(D_PHASES, marks[1:], strict=True):
        mark = max(mark, prev)
        out[phase] = (mark - prev) / 1e9
        prev = mark
    return out


# ------------------------------------------------------------------- Prometheus metrics

_SECONDS = [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0, 30.0]
_BYTES = [2 ** (10 + i) for i in range(0, 25, 2)]  # 1 KiB .. 16 GiB


class HybridPromMetrics(NixlPromMetrics):
    """Upstream's ``vllm:nixl_*`` metrics plus ours (see the module doc)."""

    def __init__(self, vllm_config: Any, metric_types: Any, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        hist, counter = self._histogram_cls, self._counter_cls
        self._read_s = hist(name="hybrid_pd_kv_read_seconds", buckets=_SECONDS,
                            documentation="NIXL READ handles of our connector: post to "
                            "completion seen (the hybrid_pd.kv.read span), by layer kind.",
                            labelnames=[*labelnames, "layer_kind"])
        self._read_b = hist(name="hybrid_pd_kv_read_bytes", buckets=_BYTES,
                            documentation="Bytes per READ handle, by layer kind.",
                            labelnames=[*labelnames, "layer_kind"])
        self._phase = hist(name="hybrid_pd_handover_phase_seconds", buckets=_SECONDS,
                           documentation="Handover phases measured inside this engine "
                           "(the hybrid_pd.ttft.* spans of the same name).",
                           labelnames=[*labelnames, "phase"])
        self._moved = self._per_engine(counter(
            name="hybrid_pd_kv_bytes_moved", labelnames=labelnames,
            documentation="Bytes D read for its requests (divide by "
            "hybrid_pd_kv_bytes_optimal_total for the overhead)."))
        self._optimal = self._per_engine(counter(
            name="hybrid_pd_kv_bytes_optimal", labelnames=labelnames,
            documentation="Least whole-block bytes the same requests needed."))
        self._events = {kind: self._per_engine(counter(
            name=f"hybrid_pd_kv_{kind}s", labelnames=labelnames, documentation=doc))
            for kind, doc in EVENTS.items()}
        self._spans_dropped = counter(
            name="hybrid_pd_engine_spans_dropped", labelnames=[*labelnames, "sink", "reason"],
            documentation="Spans the engine's telemetry sinks dropped.")
        self._spans_exported = counter(
            name="hybrid_pd_engine_spans_exported", labelnames=[*labelnames, "sink"],
            documentation="Spans the engine's telemetry sinks delivered.")

    def _per_engine(self, metric: Any) -> dict[int, Any]:
        return create_metric_per_engine(metric, self.per_engine_labelvalues)

    def _labels(self, metric: Any, idx: int, *extra: str) -> Any:
        return metric.labels(*self.per_engine_labelvalues[idx], *extra)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        super().observe(transfer_stats_data, engine_idx)
        data = transfer_stats_data
        for kind, seconds, nbytes in data.get(READS_KEY) or ():
            self._labels(self._read_s, engine_idx, kind).observe(seconds)
            self._labels(self._read_b, engine_idx, kind).observe(nbytes)
        for moved, optimal in data.get(MOVED_KEY) or ():
            self._moved[engine_idx].inc(moved)
            self._optimal[engine_idx].inc(optimal)
        for kind, n in data.get(EVENTS_KEY) or ():
            if kind in self._events:
                self._events[kind][engine_idx].inc(n)
        for sink, reason, n in data.get(SPANS_KEY) or ():
            if reason:
                self._labels(self._spans_dropped, engine_idx, sink, reason).inc(n)
            else:
                self._labels(self._spans_exported, engine_idx, sink).inc(n)
        for sched, done in data.get(P_SCHED_KEY) or ():
            self._labels(self._phase, engine_idx, "p_prefill").observe(max(0, done - sched) / 1e9)
        take_integrity(data)
        for entry in take_rows(data):
            for phase, seconds in d_phase_seconds(entry).items():
                self._labels(self._phase, engine_idx, phase).observe(seconds)
