"""Our worker core: upstream's pull worker with our descriptor lists and our reads.

Override points of ``NixlBaseConnectorWorker`` / ``NixlPullConnectorWorker`` (each
named after the upstream method it replaces; all listed in :mod:`.contract`):

* ``register_kv_caches`` (wraps): derive our local layout (:func:`.sides.derive_local`)
  before upstream registers the same tensors.
* ``_build_fa_local`` / ``_build_mamba_local``: the FA and Mamba sections of our local
  dual view (upstream: one descriptor per kernel block per region, x|B|C|ssm per Mamba
  block per region even at equal TP).
* ``add_remote_agent`` (wraps): derive P's side from its handshake and build the
  :class:`~hybrid_pd.planner.pair.PairPlan` of (this D rank, P engine) once - every
  pair-level check runs here, not per request; with heterogeneous TP, prep one local
  handle per P rank from our local dual view for that peer.
* ``_build_fa_remote`` / ``_build_mamba_remote``: P's side of the pair's dual view.
* ``_build_local_splits_from_plan`` (P_TP > D_TP): our local dual view per P rank, in
  ``all_source_ranks`` order (the order upstream indexes the handles in).
* ``_read_blocks_for_req`` (wraps): one :class:`_RequestRead` per request, holding the
  block ids before upstream rewrites them in place and the request's plan (made once,
  for every P rank it reads from).
* ``_read_blocks`` (replaces, for requests with something to read): posts the plan's
  READs for one P rank through :func:`hybrid_pd.transfer.reads.post_reads` - the code
  ``hybrid-pd bench`` drives - with upstream's notification and failure conventions;
  a P rank the plan reads nothing from is only notified (upstream's full-hit path).

Not done (refused with a message, never silently wrong): P ranks other than vLLM's
source ranks, different kernel block sizes, DCP/PCP, host-buffer staging, mixed memory
types.  The CPU platform picks the DS conv layout by connector *name*, so engines
running this connector need ``VLLM_SSM_CONV_STATE_LAYOUT=DS``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_worker import (
    NixlPullConnectorWorker,
)

from hybrid_pd.connector import contract
from hybrid_pd.connector import vllm_mapping as vm
from hybrid_pd.connector.handover import record
from hybrid_pd.connector.integrity import policy_from
from hybrid_pd.connector.sides import LocalSide, Side, derive_local, derive_remote
from hybrid_pd.connector.stats import MOVED_KEY, HybridKVConnectorStats
from hybrid_pd.planner.pair import PairPlan
from hybrid_pd.planner.plan import PeerTemplate, RequestPlan, render_plan
from hybrid_pd.planner.render import optimal_bytes
from hybrid_pd.settings import DEFAULT_READ_GRANULARITY, KEY_READ_GRANULARITY
from hybrid_pd.transfer.reads import (
    PostError,
    now_ns,
    parse_granularity,
    per_layer_for,
    plan_parts,
    post_reads,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = logging.getLogger("hybrid_pd.connector")


@dataclass
class _RequestRead:
    """One request's read, from ``_read_blocks_for_req`` to its last ``_read_blocks``."""

    local_ids: tuple[tuple[int, ...], ...]
    remote_ids: tuple[tuple[int, ...], ...]
    local_cached: tuple[int, ...]
    num_tokens: int | None
    plan: RequestPlan | None = None
    decode_ids: tuple[tuple[int, ...], ...] = ()
    index: int = -1  # request number (sampled granularity), given at its first READ


@dataclass
class _Peer:
    """What this D rank knows about one P engine: its ranks' sides and the pair plan."""

    pair: PairPlan
    sides: dict[int, Side]
    local_handles: dict[int, int]  # heterogeneous TP: P rank -> our prepped local view


class HybridWorkerCore(NixlPullConnectorWorker):
    """Upstream's pull worker with our descriptor lists, pair plans and reads."""

    def __init__(self, vllm_config: VllmConfig, engine_id: str, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config, engine_id, kv_cache_config)
        # Every upstream attribute we read, checked before the first read of one.
        contract.require(worker=self, classes=False)
        # Upstream's stats with our rows: they reach the API server's /metrics (.stats).
        self.xfer_stats = HybridKVConnectorStats()
        self._hy_local: LocalSide | None = None
        self._hy_peers: dict[str, _Peer] = {}
        self._hy_reqs: dict[str, _RequestRead] = {}
        self._hy_adding: tuple[str, int] | None = None
        self._hy_count = 0
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
        self._hy_granularity = str(extra.get(KEY_READ_GRANULARITY, DEFAULT_READ_GRANULARITY))
        parse_granularity(self._hy_granularity)  # a clear ValueError at start
        policy_from(extra)  # --kv-integrity: a clear ValueError at start (.integrity)
        # Our planner models Mamba2 hybrids; a model without Mamba state (dense) keeps
        # upstream's descriptors and reads unchanged through this same connector.
        self._hy_active = self._has_mamba
        if not self._hy_active:
            logger.info("hybrid connector: no Mamba layers, using upstream's descriptor path")

    # -- local side ----------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        if not self._hy_active:
            return super().register_kv_caches(kv_caches)
        if self.use_host_buffer or self.dcp_size > 1 or self.pcp_size > 1:
            raise NotImplementedError(
                "HybridNixlConnector supports device-resident KV (kv_buffer_device = the "
                "KV device) without DCP/PCP; use --connector upstream for these")
        self._hy_local = derive_local(self, kv_caches)
        lay = self._hy_local.side.layout
        # Equal-TP pair with ourselves: the local registration's template (upstream
        # reads equal-TP peers through the handle registered here).
        self._hy_self = PairPlan.build(spec=self._hy_local.spec, decode=lay, prefill=lay,
                                       decode_rank=self.tp_rank).templates[0]
        super().register_kv_caches(kv_caches)
        logger.info("hybrid connector: local layout %s", self._hy_local.side.layout.describe())

    def _hy_local_side(self, base_addresses: list[int]) -> Side:
        assert self._hy_local is not None
        side = self._hy_local.side
        if set(base_addresses) != set(side.bases):
            raise ValueError(f"upstream registered regions {[hex(b) for b in base_addresses]}, "
                             f"the planner derived {[hex(b) for b in side.bases]}")
        return side

    # upstream: NixlBaseConnectorWorker._build_fa_local
    def _build_fa_local(self, base_addresses: list[int], block_size_ratio: int) -> np.ndarray:
        if not self._hy_active:
            return super()._build_fa_local(base_addresses, block_size_ratio)
        if block_size_ratio != 1:
            raise NotImplementedError(
                "HybridNixlConnector: P and D kernel block sizes differ; kernel blocks are "
                "head-major, so no plain READ maps one onto the other")
        side = self._hy_local_side(base_addresses)
        return side.view(self._hy_self, "local")[0]

    # upstream: NixlBaseConnectorWorker._build_mamba_local
    def _build_mamba_local(self, base_addresses: list[int]) -> np.ndarray:
        side = self._hy_local_side(base_addresses)
        return side.view(self._hy_self, "local")[1]

    # -- remote side (once per handshake) ----------------------------------------------------
    def _hy_add_side(self, meta: Any, remote_tp: int, remote_rank: int) -> _Peer:
        assert self._hy_local is not None
        side = derive_remote(self._hy_local, meta, remote_tp, remote_rank)
        peer = self._hy_peers.get(meta.engine_id)
        if peer is None:
            pair = PairPlan.build(spec=self._hy_local.spec, decode=self._hy_local.side.layout,
                                  prefill=side.layout, decode_rank=self.tp_rank,
                                  decode_region_lens=self._hy_local.side.lens)
            peer = self._hy_peers[meta.engine_id] = _Peer(pair, {}, {})
        elif side.layout != peer.pair.prefill:
            raise ValueError(f"remote {meta.engine_id} rank {remote_rank}: layout "
                             f"{side.layout.describe()} differs from its other ranks'")
        if peer.pair.template(remote_rank) is None:
            raise NotImplementedError(
                f"HybridNixlConnector: D rank {self.tp_rank} handshook with P rank "
                f"{remote_rank}, from which the planner reads nothing (it reads from "
                f"{[t.prefill_rank for t in peer.pair.templates]})")
        if remote_tp == self._hy_local.side.layout.tp and \
                peer.pair.template(remote_rank) != self._hy_self:
            raise ValueError("equal TP but the peer template differs from the local one")
        peer.pair.set_prefill_regions(remote_rank, side.lens)
        peer.sides[remote_rank] = side
        logger.info("hybrid connector: remote %s rank %d layout %s", meta.engine_id,
                    remote_rank, side.layout.describe())
        return peer

    # upstream: NixlBaseConnectorWorker.add_remote_agent (wrapped)
    def add_remote_agent(self, nixl_agent_meta: Any, remote_tp_rank: int = 0,
                         remote_tp_size: int = 1, remote_dcp_size: int = 1) -> str:
        engine_id = nixl_agent_meta.engine_id
        if not self._hy_active or (0, remote_tp_rank) in self._remote_agents.get(engine_id, {}):
            return super().add_remote_agent(nixl_agent_meta, remote_tp_rank, remote_tp_size,
                                            remote_dcp_size)
        assert self._hy_local is not None
        peer = self._hy_add_side(nixl_agent_meta, remote_tp_size, remote_tp_rank)
        self._hy_adding = (engine_id, remote_tp_rank)
        try:
            name = super().add_remote_agent(nixl_agent_meta, remote_tp_rank, remote_tp_size,
                                            remote_dcp_size)
        finally:
            self._hy_adding = None
        if remote_tp_size != self._hy_local.side.layout.tp and \
                remote_tp_rank not in peer.local_handles:
            peer.local_handles[remote_tp_rank] = self._hy_prep_local_view(
                peer.pair.template(remote_tp_rank))
        return name

    def _hy_prep_local_view(self, template: PeerTemplate) -> int:
        """Our local dual view for one P rank's template, prepped with NIXL (a handle)."""
        assert self._hy_local is not None
        fa, mamba = self._hy_local.side.view(template, "local")
        descs = self.nixl_wrapper.get_xfer_descs(np.concatenate([fa, mamba]),
                                                 self.region_mem_types[0])
        return self.nixl_wrapper.prep_xfer_dlist("NIXL_INIT_AGENT", descs)

    # upstream: NixlBaseConnectorWorker._cleanup_remote_engine (wrapped)
    def _cleanup_remote_engine(self, engine_id: str, *, log_eviction: bool = True) -> None:
        super()._cleanup_remote_engine(engine_id, log_eviction=log_eviction)
        peer = self._hy_peers.pop(engine_id, None)
        for handle in (peer.local_handles.values() if peer else ()):
            self.nixl_wrapper.release_dlist_handle(handle)

    def _hy_adding_view(self, meta: Any) -> tuple[np.ndarray, np.ndarray]:
        if self._hy_adding is None or self._hy_adding[0] != meta.engine_id:
            raise RuntimeError("HybridNixlConnector: remote descriptors built outside "
                               "add_remote_agent")
        engine, rank = self._hy_adding
        peer = self._hy_peers[engine]
        return peer.sides[rank].view(peer.pair.template(rank), "remote")

    # upstream: NixlBaseConnectorWorker._build_local_splits_from_plan
    def _build_local_splits_from_plan(self, plan: Any, src_blocks_data: np.ndarray,
                                      num_fa_descs: int, block_size_ratio: int = 1) -> Any:
        if not self._hy_active:
            yield from super()._build_local_splits_from_plan(
                plan, src_blocks_data, num_fa_descs, block_size_ratio)
            return
        assert self._hy_adding is not None and self._hy_local is not None
        pair = self._hy_peers[self._hy_adding[0]].pair
        templates = vm.templates_by_rank(pair.templates)
        vm.check_source_ranks(templates, plan.all_source_ranks, self.tp_rank)
        for rank in plan.all_source_ranks:
            fa, mamba = self._hy_local.side.view(templates[rank], "local")
            yield [tuple(int(x) for x in row) for row in np.concatenate([fa, mamba])]

    # upstream: NixlBaseConnectorWorker._build_fa_remote
    def _build_fa_remote(self, plan: Any, nixl_agent_meta: Any, block_size_ratio: int) -> np.ndarray:
        if not self._hy_active:
            return super()._build_fa_remote(plan, nixl_agent_meta, block_size_ratio)
        pair = self._hy_peers[nixl_agent_meta.engine_id].pair
        vm.check_source_ranks(vm.templates_by_rank(pair.templates), plan.all_source_ranks,
                              self.tp_rank)
        return self._hy_adding_view(nixl_agent_meta)[0]

    # upstream: NixlBaseConnectorWorker._build_mamba_remote
    def _build_mamba_remote(self, nixl_agent_meta: Any, tp_ratio: int, transfer_info: Any) -> np.ndarray:
        return self._hy_adding_view(nixl_agent_meta)[1]

    # -- reads -------------------------------------------------------------------------------
    # upstream: NixlPullConnectorWorker._read_blocks_for_req (wrapped)
    def _read_blocks_for_req(self, req_id: str, meta: Any) -> None:
        if not self._hy_active:
            return super()._read_blocks_for_req(req_id, meta)
        assert meta.remote is not None
        self._hy_reqs[req_id] = _RequestRead(
            local_ids=tuple(tuple(g) for g in meta.local_block_ids),
            remote_ids=tuple(tuple(g) for g in meta.remote.block_ids),
            local_cached=tuple(meta.local_num_computed_blocks or ()),
            num_tokens=meta.remote.num_tokens,
        )
        try:
            super()._read_blocks_for_req(req_id, meta)
        finally:
            self._hy_reqs.pop(req_id, None)

    def _hy_plan(self, req: _RequestRead, pair: PairPlan) -> RequestPlan:
        """The request's plan for every P rank, made at its first READ."""
        if req.plan is None:
            assert self._hy_local is not None
            layout = self._hy_local.side.layout
            aligned = vm.align_request(
                kinds=self._hy_local.kinds, decode_block_ids=req.local_ids,
                prefill_block_ids=req.remote_ids, decode_cached_blocks=req.local_cached,
                num_tokens=req.num_tokens, block_size=layout.block_size)
            req.decode_ids = vm.reorder(aligned.decode_block_ids, self._hy_local.perm)
            req.plan = pair.plan(req.decode_ids,
                                 vm.reorder(aligned.prefill_block_ids, self._hy_local.perm),
                                 aligned.num_tokens, merge=False)
            optimal = optimal_bytes(pair.spec, pair.decode, aligned.num_tokens)
            record(self.xfer_stats, MOVED_KEY, [req.plan.bytes, optimal])
        return req.plan

    # upstream: NixlPullConnectorWorker._read_blocks
    def _read_blocks(self, read_spec: Any, dst_engine_id: str, request_id: str,
                     remote_request_id: str, local_xfer_side_handle: int,
                     local_dram_handle: int | None, remote_xfer_side_handle: int,
                     expected_consumers: int, awaiting_kvs: bool) -> bool:
        args = (read_spec, dst_engine_id, request_id, remote_request_id,
                local_xfer_side_handle, local_dram_handle, remote_xfer_side_handle,
                expected_consumers, awaiting_kvs)
        req = self._hy_reqs.get(request_id)
        if not self._hy_active or not any(len(g) > 0 for g in read_spec.local_block_ids):
            return super()._read_blocks(*args)
        if req is None or read_spec.block_ids_by_region:
            raise RuntimeError(f"HybridNixlConnector: unexpected read path for {request_id}")
        if local_dram_handle is not None or self._mixed_mem_types:
            raise NotImplementedError("HybridNixlConnector: mixed memory types")
        rank = read_spec.remote_rank
        peer = self._hy_peers[dst_engine_id]
        t0 = now_ns()
        plan = self._hy_plan(req, peer.pair)
        read = vm.read_from(plan, rank)
        self._hy_mapped(t0, now_ns(), read.bytes if read else 0,
                        len(read.local_id_array) if read else 0)
        self._hy_log_plan(request_id, rank, plan)
        if read is None:
            # upstream's mapping lists this P rank, the plan reads nothing from it: only
            # notify it (upstream's full-hit path), so it frees the request's blocks.
            empty = dataclasses.replace(read_spec,
                                        local_block_ids=[[] for _ in read_spec.local_block_ids])
            return super()._read_blocks(empty, *args[1:])
        if req.index < 0:
            req.index, self._hy_count = self._hy_count, self._hy_count + 1
        assert self._hy_local is not None
        parts = plan_parts(read, self._hy_local.side.layout, req.decode_ids,
                           per_layer_for(self._hy_granularity, req.index))
        local_view = peer.local_handles.get(rank, local_xfer_side_handle)
        notif = f"{remote_request_id}:{expected_consumers}".encode()
        return self._hy_post(request_id, dst_engine_id, rank, parts, local_view,
                             remote_xfer_side_handle, notif)

    def _hy_post(self, request_id: str, dst_engine_id: str, rank: int, parts: list[Any],
                 local_view: int, remote_view: int, notif: bytes) -> bool:
        """Post through the shared read path, with upstream's conventions: one READ
        carries P's notification itself; several defer it until all are DONE (sent by
        upstream, dropped on failure so P's lease frees the blocks)."""
        try:
            started = post_reads(self.nixl_wrapper, local_view, remote_view, parts,
                                 prefill_rank=rank, notif=notif, request_id=request_id,
                                 peer_engine=dst_engine_id)
        except PostError as e:
            self.hy_register_reads(request_id, e.started)
            self._recving_transfers[request_id].extend(
                [h for h, _ in e.started] + list(e.retained))
            self._log_failure(failure_type="transfer_setup_failed", req_id=request_id,
                              msg="READ could not be posted", error=e,
                              dst_engine_id=dst_engine_id, remote_rank=rank)
            self._handle_failed_transfer(request_id, None, self._recv_failures)
            return False
        if len(parts) > 1:
            agent = self._remote_agents[dst_engine_id][(0, rank)]
            self._pending_recv_notifs.setdefault(request_id, []).append((agent, notif))
        self.hy_register_reads(request_id, started)
        self._recving_transfers[request_id].extend(h for h, _ in started)
        return True

    def _hy_log_plan(self, request_id: str, rank: int, plan: RequestPlan) -> None:
        if logger.isEnabledFor(logging.INFO):
            rank_bytes = sum(r.bytes for r in plan.reads if r.prefill_rank == rank)
            logger.info("hybrid connector: req %s P rank %d -> D rank %d: %d of %d B in %d "
                        "descriptors (%d tokens, P TP%d D TP%d)\n%s", request_id, rank,
                        self.tp_rank, rank_bytes, plan.bytes, plan.descriptors,
                        plan.num_tokens, plan.prefill_tp, plan.decode_tp, render_plan(plan, 4))

    # hooks the read path and tracing layers in front define
    def hy_register_reads(self, request_id: str, started: list[Any]) -> None:
        raise NotImplementedError("HybridWorkerCore needs ReadPathWorkerMixin in front")

    def _hy_mapped(self, t0: int, t1: int, nbytes: int, descriptors: int) -> None:
        """Block ids -> descriptor ids done for one P rank (the tracing layer's)."""


__all__ = ["HybridWorkerCore"]
