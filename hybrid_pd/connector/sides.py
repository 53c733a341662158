"""Each engine's layout as the planner sees it, derived from what vLLM has: the local
side from the real kv_caches tensors and KV-cache specs (cross-checked against
:func:`~hybrid_pd.planner.layout.build_engine_layout`), a remote side from its
handshake metadata (P's layout rebuilt by the planner and checked against the
advertised sizes; P's regions matched to ours by their layer names)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hybrid_pd.connector import vllm_mapping as vm
from hybrid_pd.planner.layout import EngineLayout, build_engine_layout
from hybrid_pd.planner.model_spec import HybridModelSpec, LayerKind, spec_from_hf_config
from hybrid_pd.planner.plan import PeerTemplate, dual_view, to_addr_descs
from hybrid_pd.transfer import handshake as hs


@dataclass(frozen=True)
class Side:
    """One engine's layout as the planner sees it, plus where its regions live."""

    layout: EngineLayout
    bases: tuple[int, ...]  # per planner region
    lens: tuple[int, ...]
    device_id: int

    def view(self, template: PeerTemplate, which: str) -> tuple[np.ndarray, np.ndarray]:
        """This side's dual view for a pair as NIXL rows: (FA section, Mamba section)."""
        view = dual_view(self.layout, template, which)
        n_fa = self.layout.num_regions * len(template.fa_runs) * self.layout.num_phys_blocks
        addrs = np.asarray(to_addr_descs(view, self.bases, self.lens, self.device_id),
                           dtype=np.uint64).reshape(-1, 3)
        return addrs[:n_fa], addrs[n_fa:]


@dataclass(frozen=True)
class LocalSide:
    """The local engine: spec, side, and how vLLM's groups map onto the planner's."""

    spec: HybridModelSpec
    side: Side
    perm: tuple[int, ...]  # vLLM group order -> planner HMA group order
    kinds: tuple[LayerKind, ...]  # vLLM transfer groups' kinds
    name_region: dict[str, int]  # layer name -> region position
    layer_kinds: dict[int, str]


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _engine_groups(w: Any, spec: HybridModelSpec) -> list[tuple[LayerKind, tuple[int, ...]]]:
    """vLLM's transfer groups, in the engine's order, as (kind, cache-layer indices)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.tp_mapping import (
        _is_attention_spec,
        _is_ssm_spec,
    )

    out = []
    for group, stype in zip(w.kv_cache_config.transfer_groups, w._group_spec_types, strict=True):
        if _is_attention_spec(stype):
            kind = LayerKind.ATTENTION
        elif _is_ssm_spec(stype):
            kind = LayerKind.MAMBA
        else:
            raise NotImplementedError(f"HybridNixlConnector: no transfer for {stype.__name__}")
        out.append((kind, tuple(vm.cache_layer_index(spec, n, kind) for n in group.layer_names)))
    return out


def _regions(w: Any, kv_caches: dict[str, Any], layout: EngineLayout,
             engine_groups: list[tuple[LayerKind, tuple[int, ...]]]):
    """(bases, lens, layer name -> region position, attention block strides)."""
    storage: dict[int, tuple[int, int]] = {}
    name_region: dict[str, int] = {}
    strides: set[int] = set()
    for group, (kind, layers) in zip(w.kv_cache_config.transfer_groups, engine_groups,
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
    return bases, lens, name_region, strides


def derive_local(w: Any, kv_caches: dict[str, Any]) -> LocalSide:
    """The local layout from the worker's real tensors, checked against the planner's."""
    from vllm.v1.kv_cache_interface import AttentionSpec, MambaSpec

    specs = w._layer_specs
    attn = next(s for s in specs.values() if isinstance(s, AttentionSpec))
    mamba = next(s for s in specs.values() if isinstance(s, MambaSpec))
    conv_dtype, ssm_dtype = (_dtype_name(d) for d in mamba.dtypes)
    spec = spec_from_hf_config(w.vllm_config.model_config.hf_config.to_dict(),
                               kv_dtype=_dtype_name(attn.dtype), conv_dtype=conv_dtype,
                               ssm_dtype=ssm_dtype)
    ratio = w._physical_blocks_per_logical_kv_block
    layout = build_engine_layout(
        spec, w.vllm_config.parallel_config.tensor_parallel_size,
        kernel_block_size=w.block_size, block_size=w.block_size * ratio,
        num_blocks=w._logical_num_blocks, conv_layout="DS", fa_layout="packed",
    )
    engine_groups = _engine_groups(w, spec)
    perm = vm.group_permutation(layout.hma_groups, engine_groups)
    bases, lens, name_region, strides = _regions(w, kv_caches, layout, engine_groups)
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
    vm.check_measured_layout(layout, measured, f"engine {w.engine_id} rank {w.tp_rank}")
    if mamba.page_size_bytes != layout.page_size_bytes:
        raise ValueError(f"Mamba page {mamba.page_size_bytes} B != attention page "
                         f"{layout.page_size_bytes} B: not an HMA shared-tensor layout")
    if min(lens) < layout.region_bytes:
        raise ValueError(f"KV tensors ({lens} B) smaller than the layout's {layout.region_bytes} B")
    return LocalSide(
        spec=spec, side=Side(layout, bases, lens, w.device_id), perm=perm,
        kinds=tuple(k for k, _ in engine_groups), name_region=name_region,
        layer_kinds={layer: str(g.kind.value) for g in layout.hma_groups for layer in g.layers},
    )


def _listed(field: str, value: Any, most: int, who: str) -> tuple[Any, ...]:
    """A list field of the peer's metadata, its length bounded before it is used."""
    if not isinstance(value, (list, tuple)) or len(value) > most:
        shown = f"{len(value)} entries" if isinstance(value, (list, tuple)) else repr(value)
        raise ValueError(f"{who}: {field} ({shown}) refused: must be a list of at most {most}")
    return tuple(value)


def derive_remote(local: LocalSide, meta: Any, remote_tp: int, remote_rank: int) -> Side:
    """P rank ``remote_rank`` of engine ``meta.engine_id`` from its handshake metadata:
    its layout rebuilt by the planner and checked against what it advertised.

    Every size comes off the network, so it is bounded (by the model and our own
    registration, the same rules as the bench handshake) before anything is built."""
    who = f"remote {meta.engine_id} rank {remote_rank}"
    caps = hs.peer_caps(local.spec, local.side.layout)
    tp = hs.check_int("remote tp", remote_tp, 1, hs.MAX_TP, who)
    hs.check_int("remote rank", remote_rank, 0, tp - 1, who, f" (TP={tp})")
    kernel = hs.check_int("block_size", meta.block_size, 1, hs.MAX_KERNEL_BLOCK_SIZE, who)
    ratio = hs.check_int("physical_blocks_per_logical_kv_block",
                         meta.physical_blocks_per_logical_kv_block, 1, hs.MAX_BLOCK_RATIO, who)
    # Upstream advertises kernel (physical) blocks: logical blocks x ratio.
    phys = hs.check_int("num_blocks", meta.num_blocks, ratio, caps.max_blocks * ratio, who,
                        caps.why + " x ratio")
    if phys % ratio:
        raise ValueError(f"{who}: num_blocks={phys} is not a multiple of the block ratio {ratio}")
    names = _listed("region_names", meta.region_names, caps.max_regions, who)
    hs.check_peer_geometry(caps, num_blocks=phys // ratio, kernel_block_size=kernel,
                           block_size=kernel * ratio, num_regions=len(names), who=who)
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"{who}: region_names {names!r} refused: must be strings")
    device_id = hs.check_int("device_id", meta.device_id, 0, hs.MAX_DEVICE_ID, who)
    base_addrs = _listed("kv_caches_base_addr", meta.kv_caches_base_addr, caps.max_regions, who)
    ssm_sizes = _listed("ssm_sizes", meta.ssm_sizes, 2, who)
    # Per registered tensor; K and V may be registered apart.
    strides = _listed("block_strides", meta.block_strides, 2 * caps.max_regions, who)
    layout = build_engine_layout(
        local.spec, tp, kernel_block_size=kernel, block_size=kernel * ratio,
        num_blocks=phys // ratio, conv_layout="DS", fa_layout="packed",
    )
    order = vm.remote_region_order(names, local.name_region, layout.num_regions)
    if ssm_sizes != (layout.conv_bytes, layout.ssm_bytes):
        raise ValueError(
            f"{who}: advertised conv/ssm sizes {ssm_sizes}, the planner expects "
            f"({layout.conv_bytes}, {layout.ssm_bytes}) for {layout.describe()}"
        )
    scaled = {hs.check_int("block_strides", s, 1, hs.ADDRESS_SPACE - 1, who) * ratio
              for s in strides}
    if scaled != {layout.page_size_bytes}:
        raise ValueError(
            f"{who}: advertised block strides x{ratio} = {sorted(scaled)}, the planner's "
            f"page is {layout.page_size_bytes} B ({layout.describe()})"
        )
    lens = (layout.region_bytes,) * layout.num_regions
    hs.check_peer_regions(base_addrs, lens, layout.num_regions, layout.region_bytes, who)
    bases = [0] * layout.num_regions
    for r, j in enumerate(order):
        bases[j] = base_addrs[r]
    return Side(layout, tuple(bases), lens, device_id)


__all__ = ["LocalSide", "Side", "derive_local", "derive_remote"]
