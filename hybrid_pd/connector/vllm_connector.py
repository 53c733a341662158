"""``HybridNixlConnector``: vLLM's NIXL pull connector with our descriptors and reads.

Load it with ``--kv-transfer-config '{"kv_connector": "HybridNixlConnector",
"kv_connector_module_path": "hybrid_pd.connector.vllm_connector", ...}'`` (or
``hybrid-pd serve --connector hybrid``).  Nothing in site-packages is edited.

What stays upstream's (vLLM 0.32 ``kv_connector/v1/nixl``): the scheduler side
(``NixlPullConnectorScheduler``: N-1 prefill, leases, heartbeats, request
bookkeeping), the side-channel handshake and compatibility hash, memory registration,
notifications, failure handling, and ``NixlKVConnectorStats`` (NIXL telemetry ->
``vllm:nixl_*`` metrics).

What is ours, through these override points of ``NixlBaseConnectorWorker`` /
``NixlPullConnectorWorker`` (each one named after the upstream method it replaces):

* ``register_kv_caches`` (wraps upstream's): before upstream registers, derive our
  :class:`~hybrid_pd.planner.layout.EngineLayout` from the real kv_caches tensors,
  the KV-cache specs and vllm_config, and cross-check it against
  ``layout.build_engine_layout`` (``ValueError`` naming both on any difference).
* ``_build_fa_local`` / ``_build_mamba_local``: the local descriptor list is the FA and
  Mamba sections of our :func:`~hybrid_pd.planner.plan.dual_view` (upstream: one
  descriptor per kernel block per region, and x|B|C|ssm = 4 per Mamba block per
  region, also for equal TP).
* ``_build_fa_remote`` / ``_build_mamba_remote``: the same for each P rank's side, from
  its handshake metadata (P's layout is rebuilt by the planner and checked against the
  advertised sizes; P's regions are matched to ours by their layer names), with the
  template of that (D rank, P rank) pair.
* ``add_remote_agent`` (wraps upstream's): derives P's layout and this D rank's
  per-peer templates (:func:`~hybrid_pd.planner.plan.peer_templates`) before upstream
  builds anything, and with heterogeneous TP preps one local handle per P rank from our
  local dual view for that peer (D's memory seen through that peer's runs).
* ``_build_local_splits_from_plan`` (P_TP > D_TP only, called by upstream's
  ``add_remote_agent``): yields our local dual view per P rank in
  ``TPMapping.all_source_ranks`` order instead of upstream's slices of its own
  descriptor order.  The P ranks the planner reads from must be exactly vLLM's source
  ranks (checked: vLLM handshakes with, reads from and notifies those).
* ``_read_blocks_for_req`` (wraps upstream's): keeps the request's logical block ids,
  D's prefix-cache counts and ``remote_num_tokens`` for ``_read_blocks``, because
  upstream rewrites ``meta.remote.block_ids`` in place.  Upstream calls ``_read_blocks``
  once per P rank in ``all_source_ranks``: one READ per (D rank, P rank) per request.
* ``_read_blocks`` (wraps upstream's): plans the request with
  :func:`~hybrid_pd.planner.plan.plan_request` (FA: only kernel blocks holding
  computed tokens; Mamba: conv + ssm, never the HMA padding), then runs upstream's
  posting code (notif, ``make_prepped_xfer``, failure paths) unchanged; with
  heterogeneous TP it passes our per-peer local handle for that P rank, and a P rank
  the plan reads nothing from is only notified.
* ``_compute_desc_ids``: returns the plan's descriptor ids.  vLLM 0.32's
  ``NixlPullConnectorWorker._read_blocks`` calls it exactly twice, remote side first
  with ``block_size_ratio=None`` and then local side with the (int) ratio; that is how
  the two are told apart.  Called anywhere else it raises (our ids live in our own id
  space, so upstream's arithmetic would address the wrong bytes).

Heterogeneous TP (P_TP != D_TP, either direction) goes through the per-peer views
above.  Not reachable / not done yet (each refused with a message, never silently
wrong): P ranks other than vLLM's source ranks, different kernel block sizes,
DCP/PCP, host-buffer staging and mixed memory types.  The CPU platform chooses the DS conv layout by connector *name* (``platforms/cpu.py`` lists only the
Nixl* names), so engines running this connector need ``VLLM_SSM_CONV_STATE_LAYOUT=DS``
in their environment; upstream's worker refuses SD at start.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import (
    NixlBaseConnector,
    NixlPullConnector,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_scheduler import (
    NixlPullConnectorScheduler,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_worker import (
    NixlPullConnectorWorker,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.tp_mapping import (
    _is_attention_spec,
    _is_ssm_spec,
)
from vllm.v1.kv_cache_interface import AttentionSpec, MambaSpec

from hybrid_pd.connector import vllm_mapping as vm
from hybrid_pd.connector.vllm_tracing import TracedSchedulerMixin, TracedWorkerMixin
from hybrid_pd.planner.layout import EngineLayout, build_engine_layout
from hybrid_pd.planner.model_spec import HybridModelSpec, LayerKind, spec_from_hf_config
from hybrid_pd.planner.plan import (
    PeerTemplate,
    dual_view,
    peer_templates,
    plan_request,
    render_plan,
    to_addr_descs,
)
from hybrid_pd.transfer.executor import parse_granularity, per_layer_for, split_units

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = logging.getLogger("hybrid_pd.connector")

SUPPORTED_VLLM = "0.32"
GRANULARITY_KEY = "hybrid_read_granularity"


def _require_vllm() -> None:
    found = str(getattr(vllm, "__version__", "unknown"))
    if not found.startswith(SUPPORTED_VLLM + "."):
        raise RuntimeError(
            f"HybridNixlConnector overrides private methods of vLLM {SUPPORTED_VLLM}'s NIXL "
            f"worker: requires vllm {SUPPORTED_VLLM}.x, found {found}"
        )


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class _Side:
    """One engine's layout as the planner sees it, plus where its regions live."""

    layout: EngineLayout
    bases: tuple[int, ...]  # per planner region
    lens: tuple[int, ...]
    device_id: int


@dataclass(frozen=True)
class _Snapshot:
    """What ``_read_blocks`` needs from a request before upstream rewrites it."""

    local_ids: tuple[tuple[int, ...], ...]
    remote_ids: tuple[tuple[int, ...], ...]
    local_cached: tuple[int, ...]
    num_tokens: int | None


class _HybridWorkerCore(NixlPullConnectorWorker):
    """Upstream's pull worker with our descriptor lists, id mapping and read planning."""

    def __init__(self, vllm_config: VllmConfig, engine_id: str, kv_cache_config: KVCacheConfig):
        _require_vllm()
        super().__init__(vllm_config, engine_id, kv_cache_config)
        self._hy_spec: HybridModelSpec | None = None
        self._hy_local: _Side | None = None
        self._hy_perm: tuple[int, ...] = ()
        self._hy_kinds: tuple[LayerKind, ...] = ()
        self._hy_name_region: dict[str, int] = {}
        self._hy_local_template: PeerTemplate | None = None
        # (P engine, P rank) -> P's side and what this D rank reads from it
        self._hy_remote: dict[tuple[str, int], tuple[_Side, PeerTemplate]] = {}
        self._hy_remote_templates: dict[str, dict[int, PeerTemplate]] = {}
        # heterogeneous TP: (P engine, P rank) -> local handle prepped from our local
        # dual view for that peer
        self._hy_local_handles: dict[tuple[str, int], int] = {}
        self._hy_adding: tuple[str, int] | None = None
        self._hy_snapshots: dict[str, _Snapshot] = {}
        self._hy_ids: tuple[np.ndarray, np.ndarray] | None = None
        # READ granularity: request (one READ per P rank, upstream's), layer, sampled:K
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
        self._hy_granularity = str(extra.get(GRANULARITY_KEY, "request"))
        parse_granularity(self._hy_granularity)  # a clear ValueError at start
        self._hy_requests = 0
        self._hy_index: dict[str, int] = {}
        self._hy_layer_kinds: dict[int, str] = {}
        # Our planner models Mamba2 hybrids; a model without Mamba state (dense) keeps
        # upstream's descriptors and reads unchanged through this same connector.
        self._hy_active = self._has_mamba
        if not self._hy_active:
            logger.info("hybrid connector: no Mamba layers, using upstream's descriptor path")

    # -- layout ------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        """Upstream ``register_kv_caches``, preceded by our layout derivation."""
        if not self._hy_active:
            return super().register_kv_caches(kv_caches)
        self._hy_derive_local(kv_caches)
        super().register_kv_caches(kv_caches)
        assert self._hy_local is not None
        logger.info("hybrid connector: local layout %s", self._hy_local.layout.describe())

    def _hy_derive_local(self, kv_caches: dict[str, Any]) -> None:
        if self.use_host_buffer or self.dcp_size > 1 or self.pcp_size > 1:
            raise NotImplementedError(
                "HybridNixlConnector supports device-resident KV (kv_buffer_device = the "
                "KV device) without DCP/PCP; use --connector upstream for these"
            )
        specs = self._layer_specs
        kv_dtype = next(_dtype_name(s.dtype) for s in specs.values() if isinstance(s, AttentionSpec))
        mamba = next(s for s in specs.values() if isinstance(s, MambaSpec))
        conv_dtype, ssm_dtype = (_dtype_name(d) for d in mamba.dtypes)
        hf = self.vllm_config.model_config.hf_config
        spec = spec_from_hf_config(
            hf.to_dict(), kv_dtype=kv_dtype, conv_dtype=conv_dtype, ssm_dtype=ssm_dtype
        )
        tp = self.vllm_config.parallel_config.tensor_parallel_size
        ratio = self._physical_blocks_per_logical_kv_block
        layout = build_engine_layout(
            spec, tp,
            kernel_block_size=self.block_size,
            block_size=self.block_size * ratio,
            num_blocks=self._logical_num_blocks,
            conv_layout="DS",
            fa_layout="packed",
        )
        # vLLM's groups, in the engine's order, as cache-layer indices.
        engine_groups = []
        kinds = []
        for group, stype in zip(self.kv_cache_config.transfer_groups, self._group_spec_types,
                                strict=True):
            if _is_attention_spec(stype):
                kind = LayerKind.ATTENTION
            elif _is_ssm_spec(stype):
                kind = LayerKind.MAMBA
            else:
                raise NotImplementedError(f"HybridNixlConnector: no transfer for {stype.__name__}")
            kinds.append(kind)
            engine_groups.append(
                (kind, tuple(vm.cache_layer_index(spec, n, kind) for n in group.layer_names))
            )
        perm = vm.group_permutation(layout.hma_groups, engine_groups)
        storage: dict[int, tuple[int, int]] = {}
        name_region: dict[str, int] = {}
        strides: set[int] = set()
        for group, (kind, layers) in zip(self.kv_cache_config.transfer_groups, engine_groups,
                                         strict=True):
            for pos, (name, layer) in enumerate(zip(group.layer_names, layers, strict=True)):
                cache = kv_caches[name]
                t = cache[0] if isinstance(cache, (list, tuple)) else cache
                # vLLM 0.32 places every shared tensor in one allocation at its own
                # offset: a region is the layer view's start, num_blocks pages long.
                st = t.untyped_storage()
                end = st.data_ptr() + st.nbytes()
                if t.data_ptr() + layout.region_bytes > end:
                    raise ValueError(
                        f"layer {name}: {layout.region_bytes} B from {t.data_ptr():#x} run past "
                        f"its allocation ending at {end:#x} ({layout.describe()})"
                    )
                storage[layer] = (t.data_ptr(), layout.region_bytes)
                name_region[name] = pos
                if kind is LayerKind.ATTENTION and t.ndim > 1:
                    strides.add(t.stride(0) * t.element_size())
        bases, lens = vm.region_bases(layout.hma_groups, storage)
        attn = next(s for s in specs.values() if isinstance(s, AttentionSpec))
        conv_shape, ssm_shape = mamba.shapes
        measured = {
            "page_size_bytes": attn.page_size_bytes,
            "attn_bytes_per_token": attn.page_size_bytes // attn.block_size,
            "conv_bytes": int(np.prod(conv_shape)) * layout.conv_dtype_size,
            "ssm_bytes": int(np.prod(ssm_shape)) * layout.ssm_dtype_size,
            "kv_heads": attn.num_kv_heads,
            "num_regions": len(bases),
        }
        if strides:
            if len(strides) != 1:
                raise ValueError(f"attention views have different block strides {sorted(strides)}")
            measured["kernel_block_bytes"] = strides.pop()
        vm.check_measured_layout(layout, measured, f"engine {self.engine_id} rank {self.tp_rank}")
        if mamba.page_size_bytes != layout.page_size_bytes:
            raise ValueError(
                f"Mamba page {mamba.page_size_bytes} B != attention page "
                f"{layout.page_size_bytes} B: not an HMA shared-tensor layout"
            )
        if min(lens) < layout.region_bytes:
            raise ValueError(f"KV tensors ({lens} B) smaller than the layout's {layout.region_bytes} B")
        self._hy_spec = spec
        self._hy_layer_kinds = {layer: str(g.kind.value) for g in layout.hma_groups
                                for layer in g.layers}
        self._hy_local = _Side(layout, bases, lens, self.device_id)
        self._hy_perm = perm
        self._hy_kinds = tuple(kinds)
        self._hy_name_region = name_region
        # Equal-TP template: known before any peer (P and D share it at equal TP).
        self._hy_local_template = peer_templates(spec, layout, layout, self.tp_rank)[0]

    def _hy_view(self, side: _Side, template: PeerTemplate, which: str) -> tuple[np.ndarray, np.ndarray]:
        view = dual_view(side.layout, template, which)
        n_fa = side.layout.num_regions * len(template.fa_runs) * side.layout.num_phys_blocks
        addrs = np.asarray(to_addr_descs(view, side.bases, side.lens, side.device_id),
                           dtype=np.uint64).reshape(-1, 3)
        return addrs[:n_fa], addrs[n_fa:]

    def _hy_check_local_bases(self, base_addresses: list[int]) -> _Side:
        local = self._hy_local
        assert local is not None and self._hy_local_template is not None
        if set(base_addresses) != set(local.bases):
            raise ValueError(
                f"upstream registered regions {[hex(b) for b in base_addresses]}, the planner "
                f"derived {[hex(b) for b in local.bases]}"
            )
        return local

    # upstream: NixlBaseConnectorWorker._build_fa_local
    def _build_fa_local(self, base_addresses: list[int], block_size_ratio: int) -> np.ndarray:
        if not self._hy_active:
            return super()._build_fa_local(base_addresses, block_size_ratio)
        if block_size_ratio != 1:
            raise NotImplementedError(
                "HybridNixlConnector: P and D kernel block sizes differ; kernel blocks are "
                "head-major, so no plain READ maps one onto the other"
            )
        local = self._hy_check_local_bases(base_addresses)
        return self._hy_view(local, self._hy_local_template, "local")[0]

    # upstream: NixlBaseConnectorWorker._build_mamba_local
    def _build_mamba_local(self, base_addresses: list[int]) -> np.ndarray:
        local = self._hy_check_local_bases(base_addresses)
        return self._hy_view(local, self._hy_local_template, "local")[1]

    def _hy_remote_side(self, meta: Any, remote_tp: int, remote_rank: int) -> tuple[_Side, PeerTemplate]:
        """P rank ``remote_rank`` of engine ``meta.engine_id``: its layout (rebuilt by the
        planner, checked against the handshake), region bases, and what this D rank
        reads from it."""
        key = (meta.engine_id, remote_rank)
        if key in self._hy_remote:
            return self._hy_remote[key]
        assert self._hy_spec is not None and self._hy_local is not None
        local = self._hy_local.layout
        ratio = meta.physical_blocks_per_logical_kv_block
        layout = build_engine_layout(
            self._hy_spec, remote_tp,
            kernel_block_size=meta.block_size,
            block_size=meta.block_size * ratio,
            num_blocks=meta.num_blocks // ratio,
            conv_layout="DS",
            fa_layout="packed",
        )
        order = vm.remote_region_order(meta.region_names, self._hy_name_region, layout.num_regions)
        if tuple(meta.ssm_sizes) != (layout.conv_bytes, layout.ssm_bytes):
            raise ValueError(
                f"remote {meta.engine_id} rank {remote_rank}: advertised conv/ssm sizes "
                f"{tuple(meta.ssm_sizes)}, the planner expects ({layout.conv_bytes}, "
                f"{layout.ssm_bytes}) for {layout.describe()}"
            )
        strides = {s * ratio for s in meta.block_strides}
        if strides != {layout.page_size_bytes}:
            raise ValueError(
                f"remote {meta.engine_id} rank {remote_rank}: advertised block strides "
                f"x{ratio} = {sorted(strides)}, the planner's page is "
                f"{layout.page_size_bytes} B ({layout.describe()})"
            )
        bases = [0] * layout.num_regions
        for r, j in enumerate(order):
            bases[j] = meta.kv_caches_base_addr[r]
        side = _Side(layout, tuple(bases), (layout.region_bytes,) * layout.num_regions,
                     meta.device_id)
        templates = vm.templates_by_rank(peer_templates(self._hy_spec, local, layout, self.tp_rank))
        if remote_rank not in templates:
            raise NotImplementedError(
                f"HybridNixlConnector: D rank {self.tp_rank} handshook with P rank "
                f"{remote_rank}, from which the planner reads nothing (it reads from "
                f"{sorted(templates)})"
            )
        if remote_tp == local.tp and templates[remote_rank] != self._hy_local_template:
            raise ValueError("equal TP but the peer template differs from the local one")
        logger.info("hybrid connector: remote %s rank %d layout %s", meta.engine_id,
                    remote_rank, layout.describe())
        self._hy_remote[key] = (side, templates[remote_rank])
        self._hy_remote_templates[meta.engine_id] = templates
        return self._hy_remote[key]

    # upstream: NixlBaseConnectorWorker.add_remote_agent (wrapped)
    def add_remote_agent(self, nixl_agent_meta: Any, remote_tp_rank: int = 0,
                         remote_tp_size: int = 1, remote_dcp_size: int = 1) -> str:
        """Upstream's, with P's layout derived first (``_build_local_splits_from_plan``
        runs before the remote builders and needs the per-peer templates) and, for
        heterogeneous TP, one local handle per P rank prepped from our local dual view
        for that peer (upstream's local handles use the equal-TP view or its own split
        of it, neither of which our descriptor ids index)."""
        if not self._hy_active:
            return super().add_remote_agent(nixl_agent_meta, remote_tp_rank, remote_tp_size,
                                            remote_dcp_size)
        engine_id = nixl_agent_meta.engine_id
        if (0, remote_tp_rank) in self._remote_agents.get(engine_id, {}):
            return super().add_remote_agent(nixl_agent_meta, remote_tp_rank, remote_tp_size,
                                            remote_dcp_size)
        assert self._hy_local is not None
        _, template = self._hy_remote_side(nixl_agent_meta, remote_tp_size, remote_tp_rank)
        self._hy_adding = (engine_id, remote_tp_rank)
        try:
            name = super().add_remote_agent(nixl_agent_meta, remote_tp_rank, remote_tp_size,
                                            remote_dcp_size)
        finally:
            self._hy_adding = None
        if remote_tp_size != self._hy_local.layout.tp:
            key = (engine_id, remote_tp_rank)
            if key not in self._hy_local_handles:
                fa, mamba = self._hy_view(self._hy_local, template, "local")
                descs = self.nixl_wrapper.get_xfer_descs(np.concatenate([fa, mamba]),
                                                         self.region_mem_types[0])
                self._hy_local_handles[key] = self.nixl_wrapper.prep_xfer_dlist(
                    "NIXL_INIT_AGENT", descs)
        return name

    # upstream: NixlBaseConnectorWorker._cleanup_remote_engine (wrapped)
    def _cleanup_remote_engine(self, engine_id: str, *, log_eviction: bool = True) -> None:
        """Upstream's, plus our per-peer state and local handles for that engine."""
        super()._cleanup_remote_engine(engine_id, log_eviction=log_eviction)
        for key in [k for k in self._hy_local_handles if k[0] == engine_id]:
            self.nixl_wrapper.release_dlist_handle(self._hy_local_handles.pop(key))
        for key in [k for k in self._hy_remote if k[0] == engine_id]:
            del self._hy_remote[key]
        self._hy_remote_templates.pop(engine_id, None)

    def _hy_adding_side(self, meta: Any) -> tuple[_Side, PeerTemplate]:
        if self._hy_adding is None or self._hy_adding[0] != meta.engine_id:
            raise RuntimeError(
                "HybridNixlConnector: remote descriptors built outside add_remote_agent"
            )
        return self._hy_remote[self._hy_adding]

    # upstream: NixlBaseConnectorWorker._build_local_splits_from_plan
    def _build_local_splits_from_plan(self, plan: Any, src_blocks_data: np.ndarray,
                                      num_fa_descs: int, block_size_ratio: int = 1) -> Any:
        """P_TP > D_TP: upstream slices its own local descriptors per source rank; ours
        are the local dual view for each P rank, in ``plan.all_source_ranks`` order (the
        order upstream indexes the handles in)."""
        if not self._hy_active:
            yield from super()._build_local_splits_from_plan(
                plan, src_blocks_data, num_fa_descs, block_size_ratio)
            return
        assert self._hy_adding is not None and self._hy_local is not None
        templates = self._hy_remote_templates[self._hy_adding[0]]
        vm.check_source_ranks(templates, plan.all_source_ranks, self.tp_rank)
        for rank in plan.all_source_ranks:
            fa, mamba = self._hy_view(self._hy_local, templates[rank], "local")
            yield [tuple(int(x) for x in row) for row in np.concatenate([fa, mamba])]

    # upstream: NixlBaseConnectorWorker._build_fa_remote
    def _build_fa_remote(self, plan: Any, nixl_agent_meta: Any, block_size_ratio: int) -> np.ndarray:
        if not self._hy_active:
            return super()._build_fa_remote(plan, nixl_agent_meta, block_size_ratio)
        vm.check_source_ranks(self._hy_remote_templates[nixl_agent_meta.engine_id],
                              plan.all_source_ranks, self.tp_rank)
        side, template = self._hy_adding_side(nixl_agent_meta)
        return self._hy_view(side, template, "remote")[0]

    # upstream: NixlBaseConnectorWorker._build_mamba_remote
    def _build_mamba_remote(self, nixl_agent_meta: Any, tp_ratio: int, transfer_info: Any) -> np.ndarray:
        side, template = self._hy_adding_side(nixl_agent_meta)
        return self._hy_view(side, template, "remote")[1]

    # -- reads -------------------------------------------------------------------------
    # upstream: NixlPullConnectorWorker._read_blocks_for_req
    def _read_blocks_for_req(self, req_id: str, meta: Any) -> None:
        if not self._hy_active:
            return super()._read_blocks_for_req(req_id, meta)
        assert meta.remote is not None
        self._hy_snapshots[req_id] = _Snapshot(
            local_ids=tuple(tuple(g) for g in meta.local_block_ids),
            remote_ids=tuple(tuple(g) for g in meta.remote.block_ids),
            local_cached=tuple(meta.local_num_computed_blocks or ()),
            num_tokens=meta.remote.num_tokens,
        )
        try:
            super()._read_blocks_for_req(req_id, meta)
        finally:
            self._hy_snapshots.pop(req_id, None)
            self._hy_index.pop(req_id, None)

    # upstream: NixlPullConnectorWorker._read_blocks
    def _read_blocks(self, read_spec: Any, dst_engine_id: str, request_id: str, *args: Any,
                     **kwargs: Any) -> bool:
        snap = self._hy_snapshots.get(request_id)
        if not self._hy_active or not any(len(g) > 0 for g in read_spec.local_block_ids):
            return super()._read_blocks(read_spec, dst_engine_id, request_id, *args, **kwargs)
        if snap is None or read_spec.block_ids_by_region:
            raise RuntimeError(f"HybridNixlConnector: unexpected read path for {request_id}")
        rank = read_spec.remote_rank
        local, remote = self._hy_local, self._hy_remote[(dst_engine_id, rank)][0]
        assert local is not None and self._hy_spec is not None
        hetero = remote.layout.tp != local.layout.tp
        t_plan = time.time_ns()
        aligned = vm.align_request(
            kinds=self._hy_kinds,
            decode_block_ids=snap.local_ids,
            prefill_block_ids=snap.remote_ids,
            decode_cached_blocks=snap.local_cached,
            num_tokens=snap.num_tokens,
            block_size=local.layout.block_size,
        )
        decode_ids = vm.reorder(aligned.decode_block_ids, self._hy_perm)
        plan = plan_request(
            spec=self._hy_spec,
            decode=local.layout,
            prefill=remote.layout,
            decode_rank=self.tp_rank,
            decode_block_ids=decode_ids,
            prefill_block_ids=vm.reorder(aligned.prefill_block_ids, self._hy_perm),
            num_tokens=aligned.num_tokens,
            decode_region_lens=local.lens,
            prefill_region_lens={
                r: side.lens for (e, r), (side, _) in self._hy_remote.items() if e == dst_engine_id
            },
            merge=False,
        )
        lids, rids = vm.read_ids(plan, rank)
        rank_bytes = sum(r.bytes for r in plan.reads if r.prefill_rank == rank)
        # for the request-scope desc_build span (vllm_tracing): planning time and size
        self._hy_last_plan = (t_plan, time.time_ns(), rank_bytes, len(lids))
        logger.info(
            "hybrid connector: req %s P rank %d -> D rank %d: %d of %d B in %d of %d "
            "descriptors (%d tokens, P TP%d D TP%d)\n%s",
            request_id, rank, self.tp_rank, rank_bytes,
            plan.bytes, len(lids), plan.descriptors, aligned.num_tokens, remote.layout.tp,
            local.layout.tp, render_plan(plan, 4),
        )
        if not lids:
            # upstream's mapping lists this P rank, the plan reads nothing from it: only
            # notify it (upstream's full-hit path), so it frees the request's blocks.
            empty = dataclasses.replace(read_spec,
                                        local_block_ids=[[] for _ in read_spec.local_block_ids])
            return super()._read_blocks(empty, dst_engine_id, request_id, *args, **kwargs)
        if hetero:
            if args or "local_xfer_side_handle" not in kwargs:
                raise RuntimeError("HybridNixlConnector: unexpected _read_blocks call shape")
            kwargs["local_xfer_side_handle"] = self._hy_local_handles[(dst_engine_id, rank)]
        # requests numbered when first read (a call deferred for a handshake reads nothing)
        if request_id not in self._hy_index:
            self._hy_index[request_id] = self._hy_requests
            self._hy_requests += 1
        if per_layer_for(self._hy_granularity, self._hy_index[request_id]):
            read = next(r for r in plan.reads if r.prefill_rank == rank)
            parts = split_units(read, local.layout, decode_ids, True)
            return self._hy_read_layers(read, parts, dst_engine_id, request_id, rank, kwargs)
        self._hy_ids = (np.asarray(rids, dtype=np.int64), np.asarray(lids, dtype=np.int64))
        try:
            return super()._read_blocks(read_spec, dst_engine_id, request_id, *args, **kwargs)
        finally:
            self._hy_ids = None

    def _hy_read_layers(self, read: Any, parts: list[tuple[int | None, list[int]]],
                        dst_engine_id: str, request_id: str, rank: int,
                        kw: dict[str, Any]) -> bool:
        """One READ per cache layer (``hybrid_read_granularity`` layer / sampled:K), the
        way upstream's ``_read_blocks_mixed`` posts several handles for one request: all
        handles made first, P's notification deferred to ``_pending_recv_notifs`` (upstream
        sends it once every handle is DONE, and drops it on failure so P's lease frees the
        blocks), then each handle started.  Failure paths are upstream's."""
        if kw.get("local_dram_handle") is not None or self._mixed_mem_types:
            raise NotImplementedError("per-layer reads with mixed memory types")
        local_h, remote_h = kw["local_xfer_side_handle"], kw["remote_xfer_side_handle"]
        notif_id = f"{kw['remote_request_id']}:{kw['expected_consumers']}".encode()
        agent = self._remote_agents[dst_engine_id][(0, rank)]
        lids = np.asarray(read.local_ids, dtype=np.int64)
        rids = np.asarray(read.remote_ids, dtype=np.int64)
        kinds = self._hy_layer_kinds
        handles: list[int] = []
        try:
            try:
                for _, idx in parts:
                    handles.append(self.nixl_wrapper.make_prepped_xfer(
                        "READ", local_h, lids[idx], remote_h, rids[idx]))
            except Exception:
                for h in handles:
                    if not self._try_release_xfer_handle(request_id, h):
                        self._recving_transfers[request_id].append(h)
                raise
            # for the per-layer read spans (vllm_tracing), in post order
            self._hy_last_layers = [
                (layer, kinds.get(layer, ""), sum(read.local[i][1] for i in idx), len(idx))
                for layer, idx in parts
            ]
            self._pending_recv_notifs.setdefault(request_id, []).append((agent, notif_id))
            for i, h in enumerate(handles):
                try:
                    self.nixl_wrapper.transfer(h)
                except Exception:
                    for unstarted in handles[i:]:
                        if not self._try_release_xfer_handle(request_id, unstarted):
                            self._recving_transfers[request_id].append(unstarted)
                    raise
                self._recving_transfers[request_id].append(h)
            return True
        except Exception as e:
            self._log_failure(failure_type="transfer_setup_failed", req_id=request_id,
                              msg="per-layer READ could not be posted", error=e,
                              dst_engine_id=dst_engine_id, remote_rank=rank)
            self._handle_failed_transfer(request_id, None, self._recv_failures)
            return False

    # upstream: NixlBaseConnectorWorker._compute_desc_ids
    def _compute_desc_ids(self, block_ids: Any, dst_num_blocks: int,
                          block_size_ratio: float | None, *args: Any, **kwargs: Any) -> np.ndarray:
        if not self._hy_active:
            return super()._compute_desc_ids(block_ids, dst_num_blocks, block_size_ratio,
                                             *args, **kwargs)
        if self._hy_ids is None:
            raise RuntimeError(
                "HybridNixlConnector: _compute_desc_ids called outside _read_blocks; our "
                "descriptor ids are not upstream's"
            )
        remote_ids, local_ids = self._hy_ids
        return remote_ids if block_size_ratio is None else local_ids


class HybridNixlWorker(TracedWorkerMixin, _HybridWorkerCore):
    """Our worker with spans on every descriptor build and READ (and the READ stall
    timeout) in front: :mod:`hybrid_pd.connector.vllm_tracing`."""

    HY_CONNECTOR = "hybrid"


class HybridNixlScheduler(TracedSchedulerMixin, NixlPullConnectorScheduler):
    """Upstream's pull scheduler, forwarding each request's trace hand-off to the workers."""


class HybridNixlConnector(NixlPullConnector):
    """Thin facade (house rule 8): upstream's pull scheduler, our worker."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig):
        # Skip NixlPullConnector.__init__, which would build (and start) upstream's worker.
        NixlBaseConnector.__init__(self, vllm_config, role, kv_cache_config)
        if role == KVConnectorRole.SCHEDULER:
            self.connector_scheduler = HybridNixlScheduler(
                vllm_config, self.engine_id, kv_cache_config
            )
            self.connector_worker = None
        elif role == KVConnectorRole.WORKER:
            self.connector_scheduler = None
            self.connector_worker = HybridNixlWorker(vllm_config, self.engine_id, kv_cache_config)
        else:
            raise ValueError(f"unsupported KVConnectorRole: {role}")


__all__ = ["HybridNixlConnector", "HybridNixlScheduler", "HybridNixlWorker"]
