"""KV integrity digests inside a real P/D pair (``--kv-integrity off|every|sampled:K``,
``kv_connector_extra_config["hybrid_kv_integrity"]``, off by default).

For a selected request P digests the KV units it holds for D right after the prefill, D
digests its copy once every READ of the request is DONE, and D compares the two before
it reports the request's KV loaded.  A difference fails the request through vLLM's
``kv_load_failure_policy`` (the path a failed READ takes) with an ERROR
``hybrid_pd.kv.integrity`` span per differing (layer, view, P rank) and a counter.

What is compared (:func:`~hybrid_pd.planner.integrity_units.request_units`): canonical
units - a KV head's K or V tokens in one logical block, a Mamba head's x or SSM state, a
group's B or C state - each computed from the side's *own* layout and block lists,
never from the READ plan, so a planner bug (a wrong offset, a swapped head) is caught
as surely as a stray write or a transport fault.  Each unit is hashed in place with
xxHash's XXH3-64 (:func:`~hybrid_pd.transfer.integrity.digest_units`); P and D need not
share TP size, kernel block size or conv layout, only the logical block size (K/V are
cut per logical block so that a D which holds the first blocks of a prompt in its own
prefix cache compares the rest).  A unit held by several ranks (replicated KV heads or
B/C groups) matches when it equals any P holder's copy.

Selection: :meth:`IntegrityPolicy.selects` on the *proxy's* request id (the trace
hand-off in ``kv_transfer_params``), so P and D pick the same requests without talking;
a request sent to the engines without our proxy is never checked.

Who does what, by engine step:

* P's scheduler (:class:`IntegritySchedulerMixin`): a selected request gets a *guard*
  when its blocks are allocated, and when it finishes (``request_finished``) its block
  lists and token count go to the workers in the next step's connector metadata
  (attribute :data:`META_ATTR`) - the blocks vLLM keeps for D, as D will read them.
* P's workers (:class:`IntegrityWorkerMixin`): digest in ``start_load_kv`` of that step.
  While a guarded request is not digested yet its ``finished_sending`` is withheld, so
  D's notification (which may arrive before the digest under async scheduling or a long
  step) cannot free the blocks first.  The digests ride vLLM's connector-stats channel
  to P's API server (:data:`.stats.INTEGRITY`), which serves them at
  ``GET /hybrid_pd/integrity/{P's request id}`` (:mod:`.handover_route`).
* D's workers: the proxy names the P engine that prefilled in D's hand-off
  (``prefill_url``).  When D starts a selected request's READs a background thread
  fetches P's digests (polling until every P rank's are there); when the READs are DONE
  the engine thread digests D's units (D's blocks are untouched until the request is
  reported loaded) and keeps the request pending (no handle, so still "in progress" for
  vLLM) until the fetch ended; then compares and reports it loaded, or failed.

Why P's API server and not NIXL: D's notification goes D -> P only (P never loads D's
agent metadata, so P cannot notify D), and the side-channel handshake runs once per
pair, not per request.  P's answer to the proxy leaves before P's workers could digest
(vLLM calls ``request_finished`` before it hands the workers' step output to the
connector), so the digests cannot ride P's ``kv_transfer_params`` either.  The API
server already receives the workers' stats each step and already serves D's handover
instants the same way.  Cost: one HTTP GET per selected request and D rank, on a thread.

Failure modes, all bounded: P's digests missing (P without ``--kv-integrity``, P's API
server unreachable from D, evicted) -> after :data:`~hybrid_pd.settings.
DEFAULT_INTEGRITY_WAIT_S` past D's last READ the request goes on **unchecked**: a
warning, an ERROR span with ``kv.status=unchecked`` and ``hybrid_pd_kv_integrity_skips``
- never a request failure, only a real mismatch fails one.  P's withheld notification is
released after :data:`WITHHOLD_MAX_S` even without a digest (and that request's digest is
then skipped, not taken over freed blocks).

Cost when off (the default): one attribute test per metadata / transfer result.  The
digests are 64-bit hashes of KV content, served on the engine's (private) API server:
they reveal nothing in clear but allow confirming a guessed prompt, like the KV itself.

Test-only hooks (environment, never set in production): with
``HYBRID_PD_TEST_INTEGRITY_FLIP=LAYER:VIEW`` P flips one byte of its first unit of that
layer and view *after* digesting it, for requests whose proxy id contains
:data:`FLIP_MARKER`; with ``HYBRID_PD_TEST_INTEGRITY_PLANT=1`` D reads those whose id
contains :data:`PLANT_MARKER` through a local view whose B run (conv run at equal TP)
lands one channel row late - a planted planner bug.  Both corrupt KV on purpose.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from hybrid_pd.connector import vllm_mapping as vm
from hybrid_pd.connector.handover import proxy_request_id, record
from hybrid_pd.connector.integrity_wire import (
    CHECK_MAX_S,
    FETCH_MAX_S,
    FLIP_MARKER,
    MAX_MISMATCH_SPANS,
    META_ATTR,
    PLANT_MARKER,
    WITHHOLD_MAX_S,
    DigestsUnavailable,
    fetch_prefill_digests,
    integrity_url,
    mismatch_groups,
    pack_digests,
    parse_flip,
    planted_template,
    policy_from,
    prefill_digests,
    unpack_digests,
)
from hybrid_pd.connector.stats import EVENTS_KEY, INTEGRITY_KEY
from hybrid_pd.planner.integrity_units import (
    BlockKey,
    Unit,
    UnitMismatch,
    compare_units,
    request_units,
)
from hybrid_pd.settings import (
    DEFAULT_INTEGRITY_WAIT_S,
    ENV_API_KEY,
    ENV_TEST_INTEGRITY_FLIP,
    ENV_TEST_INTEGRITY_PLANT,
    TRACE_PARAMS_KEY,
)
from hybrid_pd.telemetry import attributes as A
from hybrid_pd.transfer.integrity import IntegrityPolicy, digest_units
from hybrid_pd.transfer.reads import now_ns

logger = logging.getLogger("hybrid_pd.connector")

def _fetch_timed(url: str, deadline: float, api_key: str | None) -> tuple[dict[str, Any], float]:
    """:func:`fetch_prefill_digests` (looked up at call time) and when it returned."""
    doc = fetch_prefill_digests(url, deadline, api_key=api_key)
    return doc, time.monotonic()


class IntegritySchedulerMixin:
    """P's scheduler side: guards and block lists of selected requests to the workers."""

    def _hy_integrity_sched(self) -> dict[str, Any]:
        st = self.__dict__.get("_hy_integrity_s")
        if st is None:
            w: Any = self
            extra = getattr(w.vllm_config.kv_transfer_config, "kv_connector_extra_config", None)
            st = self.__dict__["_hy_integrity_s"] = {
                "policy": policy_from(extra), "selected": {}, "guard": set(), "unguard": set(),
                "digest": {}}
        return st

    # upstream: NixlPullConnectorScheduler.update_state_after_alloc (extended)
    def update_state_after_alloc(self, request: Any, blocks: Any,
                                 num_external_tokens: int) -> None:
        st = self._hy_integrity_sched()
        params = request.kv_transfer_params or {}
        if st["policy"].enabled and params.get("do_remote_decode") and \
                request.request_id not in st["selected"]:
            rid = proxy_request_id(params)
            if rid is not None and st["policy"].selects(rid):
                st["selected"][request.request_id] = rid
                st["guard"].add(request.request_id)
        super().update_state_after_alloc(request, blocks, num_external_tokens)  # type: ignore[misc]

    # upstream: NixlPullConnectorScheduler.request_finished (wrapped)
    def request_finished(self, request: Any, block_ids: Any) -> Any:
        out = super().request_finished(request, block_ids)  # type: ignore[misc]
        st = self._hy_integrity_sched()
        rid = st["selected"].pop(request.request_id, None)
        if rid is not None:
            held, params = (out if isinstance(out, tuple) and len(out) == 2 else (False, None))
            ids = params.get("remote_block_ids") if isinstance(params, dict) else None
            tokens = params.get("remote_num_tokens") if isinstance(params, dict) else None
            if held and ids is not None and isinstance(tokens, int) and tokens > 0:
                st["digest"][request.request_id] = {
                    "request_id": rid, "block_ids": [list(map(int, g)) for g in ids],
                    "num_tokens": tokens}
            else:
                st["unguard"].add(request.request_id)
        return out

    # upstream: NixlPullConnectorScheduler.build_connector_meta (wrapped)
    def build_connector_meta(self, scheduler_output: Any) -> Any:
        meta = super().build_connector_meta(scheduler_output)  # type: ignore[misc]
        st = self._hy_integrity_sched()
        if st["guard"] or st["digest"] or st["unguard"]:
            setattr(meta, META_ATTR, {"guard": sorted(st["guard"]), "digest": st["digest"],
                                      "unguard": sorted(st["unguard"])})
            st["guard"], st["digest"], st["unguard"] = set(), {}, set()
        return meta


# ---------------------------------------------------------------------------- worker


@dataclass
class _Check:
    """D: one selected request, from its first READ to its comparison."""

    proxy_rid: str
    url: str
    since: float  # monotonic
    p_rid: str = ""
    p_engine: str = ""
    prepared: bool = False  # at its first READ (a handshake may delay that)
    skip: str = ""  # why it cannot be checked (then unchecked, never failed)
    ids: tuple[tuple[int, ...], ...] | None = None  # planner group order, aligned
    first_block: int = 0
    tokens: int = 0
    fetch: Future | None = None
    digests: dict[BlockKey, int] | None = None
    units: int = 0
    nbytes: int = 0
    digest_ns: int = 0
    t_ready: int = 0  # monotonic ns: every READ done, D's digest starts
    ready_mono: float = 0.0
    waited_ms: float = 0.0  # for P's digests after the READs (0: they were there)


@dataclass
class _WorkerState:
    policy: IntegrityPolicy
    flip: tuple[int, str] | None
    plant: bool
    guards: set[str] = field(default_factory=set)  # P: rids to digest before freeing
    withheld: dict[str, float] = field(default_factory=dict)  # P: rid -> since
    given_up: set[str] = field(default_factory=set)  # P: released undigested: skip later
    checks: dict[str, _Check] = field(default_factory=dict)  # D
    proxy_ids: dict[str, str] = field(default_factory=dict)  # D, plant hook: rid -> proxy id
    planted: dict[tuple[str, int], int] = field(default_factory=dict)  # D: planted views
    pool: ThreadPoolExecutor | None = None


class IntegrityWorkerMixin:
    """P's and D's worker side, in front of the read path (see the module doc).  Needs
    :class:`~.hybrid_worker.HybridWorkerCore` behind it (our layout)."""

    def _hy_istate(self) -> _WorkerState:
        st = self.__dict__.get("_hy_integrity_w")
        if st is None:
            w: Any = self
            extra = getattr(w.vllm_config.kv_transfer_config, "kv_connector_extra_config", None)
            policy = policy_from(extra)
            on = policy.enabled
            st = self.__dict__["_hy_integrity_w"] = _WorkerState(
                policy, parse_flip(os.environ.get(ENV_TEST_INTEGRITY_FLIP)) if on else None,
                on and os.environ.get(ENV_TEST_INTEGRITY_PLANT, "") not in ("", "0"))
            if st.flip or st.plant:
                logger.warning("hybrid connector: TEST HOOKS ON (%s / %s): KV of marked "
                               "requests is corrupted on purpose", ENV_TEST_INTEGRITY_FLIP,
                               ENV_TEST_INTEGRITY_PLANT)
        return st

    # hooks of the tracing layer in front (no-op without it)
    def _hy_emit(self, name: str, req_id: str | None, t0: int, t1: int, attrs: Any,
                 fail: str = "") -> None:
        """A finished span (the tracing mixin's; nothing without it)."""

    # -- both sides: requests in -------------------------------------------------------
    # upstream: NixlPullConnectorWorker.start_load_kv (wrapped)
    def start_load_kv(self, metadata: Any) -> None:
        st = self._hy_istate()
        if st.policy.enabled:
            self._hy_integrity_in(st, metadata)
        super().start_load_kv(metadata)  # type: ignore[misc]

    def _hy_integrity_in(self, st: _WorkerState, metadata: Any) -> None:
        ours = getattr(metadata, META_ATTR, None) or {}
        st.guards.update(ours.get("guard", ()))
        for rid in ours.get("unguard", ()):
            st.guards.discard(rid)
            st.given_up.discard(rid)
        for rid, entry in (ours.get("digest") or {}).items():
            st.guards.discard(rid)
            if rid in st.given_up:
                st.given_up.discard(rid)
                logger.warning("hybrid connector: req %s: not digested, its blocks were "
                               "already released", rid)
                continue
            try:
                self._hy_digest_prefill(st, rid, entry)
            except Exception:  # an integrity check must never stop the engine
                logger.exception("hybrid connector: req %s: P's integrity digest failed", rid)
        hand_offs = getattr(metadata, TRACE_PARAMS_KEY, None) or {}
        for rid, meta in (getattr(metadata, "reqs_to_recv", None) or {}).items():
            info = hand_offs.get(rid) or {}
            proxy_rid = info.get("request_id")
            if not proxy_rid or not st.policy.selects(proxy_rid):
                continue
            if st.plant:
                st.proxy_ids[rid] = proxy_rid
            if rid not in st.checks and any(len(g) for g in meta.local_block_ids):
                st.checks[rid] = _Check(proxy_rid, info.get("prefill_url", ""),
                                        time.monotonic())

    # -- P: digest, test flip, guard ----------------------------------------------------
    def _hy_digest_prefill(self, st: _WorkerState, rid: str, entry: Mapping[str, Any]) -> None:
        w: Any = self
        local = w._hy_local
        if local is None:  # a model without Mamba state: upstream's path, no units
            return
        t0 = now_ns()
        ids = vm.reorder([tuple(g) for g in entry["block_ids"]], local.perm)
        lay = local.side.layout
        units = request_units(local.spec, lay, w.tp_rank, ids, int(entry["num_tokens"]))
        values = digest_units([u.runs for u in units], local.side.bases, local.side.lens)
        keys, digests = pack_digests([u.key for u in units], values)
        t1 = now_ns()
        record(w.xfer_stats, INTEGRITY_KEY, [rid, w.tp_rank, lay.tp, lay.block_size, keys,
                                             digests])
        nbytes = sum(u.nbytes for u in units)
        self._hy_emit(A.SPAN_KV_INTEGRITY, rid, t0, t1, lambda: {
            A.KV_STATUS: "digested", A.KV_UNITS: len(units), A.KV_BYTES: nbytes,
            A.KV_DIGEST_US: (t1 - t0) / 1e3})
        if st.flip is not None and FLIP_MARKER in str(entry.get("request_id", "")):
            self._hy_flip(st.flip, rid, units, local.side.bases)

    def _hy_flip(self, flip: tuple[int, str], rid: str, units: Sequence[Unit],
                 bases: Sequence[int]) -> None:
        """TEST ONLY: flip the first byte of the first unit of (layer, view)."""
        for u in units:
            if (u.key.layer, u.key.view) == flip:
                off, _n, reg = (int(x) for x in u.runs[0])
                byte = ctypes.c_ubyte.from_address(bases[reg] + off)
                byte.value ^= 0xFF
                logger.warning("hybrid connector: TEST HOOK: req %s: flipped a byte of %s on "
                               "P after its digest", rid, u.key)
                return
        logger.warning("hybrid connector: TEST HOOK: req %s: no unit of layer %d view %s",
                       rid, *flip)

    # upstream: NixlBaseConnectorWorker.get_transfer_results (wrapped)
    def get_transfer_results(self) -> Any:
        res = super().get_transfer_results()  # type: ignore[misc]
        st = self._hy_istate()
        if st.guards or st.withheld:
            res.finished_sending = self._hy_withhold(st, set(res.finished_sending or ()))
        if st.checks or st.proxy_ids:
            for rid in res.finished_recving or ():
                st.checks.pop(rid, None)
                st.proxy_ids.pop(rid, None)
        return res

    def _hy_withhold(self, st: _WorkerState, sending: set[str]) -> set[str]:
        """P: a guarded request's blocks stay held until this rank digested them."""
        now = time.monotonic()
        for rid in sending & st.guards:
            st.withheld.setdefault(rid, now)
        released: set[str] = set()
        for rid, since in list(st.withheld.items()):
            if rid in st.guards and now - since > WITHHOLD_MAX_S:
                st.guards.discard(rid)
                st.given_up.add(rid)
                logger.warning("hybrid connector: req %s: D is done but P's digest did not "
                               "come within %.0f s; its blocks are released undigested", rid,
                               WITHHOLD_MAX_S)
            if rid not in st.guards:
                del st.withheld[rid]
                released.add(rid)
        return (sending - set(st.withheld)) | released

    # -- D: register, hold, digest, compare ----------------------------------------------
    # upstream: NixlPullConnectorWorker._read_blocks_for_req (wrapped)
    def _read_blocks_for_req(self, req_id: str, meta: Any) -> None:
        st = self._hy_istate()
        c = st.checks.get(req_id)
        if c is not None and not c.prepared:
            c.prepared = True
            self._hy_prepare_check(st, c, meta)
        super()._read_blocks_for_req(req_id, meta)  # type: ignore[misc]

    def _hy_prepare_check(self, st: _WorkerState, c: _Check, meta: Any) -> None:
        w: Any = self
        local = w._hy_local
        remote = meta.remote
        try:
            if local is None or remote is None or remote.num_tokens is None:
                raise ValueError("no layout to check, or P sent no token count")
            lay = local.side.layout
            aligned = vm.align_request(
                kinds=local.kinds, decode_block_ids=meta.local_block_ids,
                prefill_block_ids=remote.block_ids,
                decode_cached_blocks=meta.local_num_computed_blocks or (),
                num_tokens=remote.num_tokens, block_size=lay.block_size)
            c.ids = vm.reorder(aligned.decode_block_ids, local.perm)
            c.tokens = aligned.num_tokens
            c.first_block = (remote.num_tokens - aligned.num_tokens) // lay.block_size
            c.p_rid, c.p_engine = remote.request_id, remote.engine_id
            url = integrity_url(c.url, c.p_rid)
        except ValueError as exc:
            c.skip = str(exc)
            return
        if st.pool is None:
            st.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="hy-integrity")
        c.fetch = st.pool.submit(_fetch_timed, url, c.since + FETCH_MAX_S,
                                 os.environ.get(ENV_API_KEY) or None)

    # upstream: NixlBaseConnectorWorker._pop_done_transfers (the read path's, wrapped)
    def _pop_done_transfers(self, transfers: dict[str, list[int]]) -> tuple[set[str], set[str]]:
        done, failed = super()._pop_done_transfers(transfers)  # type: ignore[misc]
        st = self._hy_istate()
        if not st.checks:
            return done, failed
        now = time.monotonic()
        for rid, c in list(st.checks.items()):
            if rid in failed:  # the READ itself failed: nothing to compare
                del st.checks[rid]
            elif rid in done:
                outcome = self._hy_check_step(c)
                if outcome is None:  # still waiting for P's digests: keep it in flight
                    done.discard(rid)
                    transfers[rid] = []
                    continue
                del st.checks[rid]
                self._hy_check_done(rid, c, *outcome, failed)
            elif now - c.since > CHECK_MAX_S and rid not in transfers:
                del st.checks[rid]
        return done, failed

    def _hy_check_step(self, c: _Check) -> tuple[str, Any] | None:
        """(outcome, detail) once decided, None while waiting: ``done``, ``mismatch``
        (the mismatches) or ``unchecked`` (why)."""
        w: Any = self
        if c.digests is None:
            c.t_ready, c.ready_mono = now_ns(), time.monotonic()
            if c.fetch is None:
                return "unchecked", c.skip or "not prepared at the READ"
            try:
                self._hy_digest_decode(c)
            except Exception as exc:  # never stop the engine over a check
                logger.exception("hybrid connector: D's integrity digest failed")
                return "unchecked", f"D's units: {type(exc).__name__}: {exc}"
        if not c.fetch.done():  # type: ignore[union-attr]
            if time.monotonic() - c.ready_mono > DEFAULT_INTEGRITY_WAIT_S:
                return "unchecked", (f"P's digests not there {DEFAULT_INTEGRITY_WAIT_S:g} s "
                                     "after D's READs")
            return None
        t0 = time.perf_counter_ns()
        try:
            doc, got_at = c.fetch.result()  # type: ignore[union-attr]
            c.waited_ms = max(0.0, got_at - c.ready_mono) * 1e3
            prefill = prefill_digests(doc, w._hy_local.side.layout.block_size)
            bad = compare_units(prefill, {int(w.tp_rank): c.digests or {}})
        except DigestsUnavailable as exc:
            return "unchecked", str(exc)
        except Exception as exc:  # the fetch thread's unexpected errors
            return "unchecked", f"{type(exc).__name__}: {exc}"
        c.digest_ns += time.perf_counter_ns() - t0
        return ("mismatch", bad) if bad else ("done", [])

    def _hy_digest_decode(self, c: _Check) -> None:
        w: Any = self
        local = w._hy_local
        t0 = time.perf_counter_ns()
        units = request_units(local.spec, local.side.layout, w.tp_rank, c.ids, c.tokens,
                              first_block=c.first_block)
        values = digest_units([u.runs for u in units], local.side.bases, local.side.lens)
        c.digests = {u.key: int(v) for u, v in zip(units, values.tolist(), strict=True)}
        c.units, c.nbytes = len(units), sum(u.nbytes for u in units)
        c.digest_ns = time.perf_counter_ns() - t0

    def _hy_check_done(self, rid: str, c: _Check, outcome: str, detail: Any,
                       failed: set[str]) -> None:
        w: Any = self
        t1 = now_ns()
        t0 = c.t_ready or t1
        base = {A.KV_PEER_ENGINE_ID: c.p_engine or None, A.KV_UNITS: c.units,
                A.KV_BYTES: c.nbytes, A.KV_DIGEST_US: c.digest_ns / 1e3,
                A.KV_WAITED_MS: c.waited_ms}
        if outcome == "unchecked":
            record(w.xfer_stats, EVENTS_KEY, ["integrity_skip", 1])
            logger.warning("hybrid connector: req %s (proxy %s): KV integrity unchecked: %s",
                           rid, c.proxy_rid, detail)
            self._hy_emit(A.SPAN_KV_INTEGRITY, rid, t0, t1, lambda: {
                **base, A.KV_STATUS: "unchecked", A.KV_FAILURE_REASON: str(detail)[:200]},
                "integrity unchecked")
            return
        record(w.xfer_stats, EVENTS_KEY, ["integrity_check", 1])
        if outcome == "done":
            self._hy_emit(A.SPAN_KV_INTEGRITY, rid, t0, t1, lambda: {
                **base, A.KV_STATUS: "done", A.KV_MISMATCHES: 0})
            return
        mismatches: list[UnitMismatch] = detail
        record(w.xfer_stats, EVENTS_KEY, ["integrity_failure", 1])
        groups = mismatch_groups(mismatches)
        for (layer, view, p_rank), ms in groups[:MAX_MISMATCH_SPANS]:
            more = f" (+{len(ms) - 1} more units)" if len(ms) > 1 else ""
            reason = f"integrity mismatch: {ms[0]}{more}"[:200]
            self._hy_emit(A.SPAN_KV_INTEGRITY, rid, t0, t1, lambda layer=layer, view=view,
                          p_rank=p_rank, ms=ms, reason=reason: {
                **base, A.KV_STATUS: "mismatch", A.KV_LAYER: layer, A.KV_VIEW: view,
                A.KV_PEER_RANK: p_rank, A.KV_MISMATCHES: len(ms),
                A.KV_FAILURE_REASON: reason}, "integrity mismatch")
        first = f"{mismatches[0]}"
        logger.error("hybrid connector: req %s (proxy %s): KV integrity mismatch in %d units "
                     "(%d (layer, view, P rank) groups), first: %s; the request fails", rid,
                     c.proxy_rid, len(mismatches), len(groups), first)
        w._log_failure(failure_type="integrity_mismatch", req_id=rid,
                       msg=f"{len(mismatches)} units differ from P's, first: {first}")
        w._handle_failed_transfer(rid, None, failed)

    # -- D: the planted planner bug (test only) -------------------------------------------
    def _hy_post(self, request_id: str, dst_engine_id: str, rank: int, parts: list[Any],
                 local_view: int, remote_view: int, notif: bytes) -> bool:
        st = self._hy_istate()
        if st.plant and PLANT_MARKER in st.proxy_ids.get(request_id, ""):
            local_view = self._hy_planted_view(st, dst_engine_id, rank)
            logger.warning("hybrid connector: TEST HOOK: req %s read from P rank %d through "
                           "a planted local view", request_id, rank)
        return super()._hy_post(request_id, dst_engine_id, rank, parts,  # type: ignore[misc]
                                local_view, remote_view, notif)

    def _hy_planted_view(self, st: _WorkerState, engine: str, rank: int) -> int:
        handle = st.planted.get((engine, rank))
        if handle is None:
            w: Any = self
            template = planted_template(w._hy_peers[engine].pair.template(rank),
                                        w._hy_local.side.layout)
            handle = st.planted[(engine, rank)] = w._hy_prep_local_view(template)
        return handle


__all__ = ["FLIP_MARKER", "META_ATTR", "PLANT_MARKER", "DigestsUnavailable",
           "IntegritySchedulerMixin", "IntegrityWorkerMixin", "fetch_prefill_digests",
           "integrity_url", "mismatch_groups", "pack_digests", "parse_flip", "planted_template",
           "policy_from", "prefill_digests", "unpack_digests"]
