"""Plain-data glue between vLLM's NIXL worker and our planner.

No torch, vLLM or NIXL import: :mod:`.sides` and :mod:`.hybrid_worker` read the
engine objects (kv_caches, KVCacheConfig, NixlAgentMetadata, ReqMeta) into ints, strs
and tuples and calls these functions, which the unit tests call directly.

* :func:`cache_layer_index` / :func:`group_permutation` - vLLM's KV-cache groups (layer
  names in the engine's order) against the planner's :func:`layout.hma_groups`; any
  difference is an error naming both sides, because the planner's region j is "the
  layer at position j of every group".
* :func:`region_bases` - the base address of each planner region, from where vLLM put
  each layer; every layer at position j must sit in the same tensor.
* :func:`check_measured_layout` - the layout measured from the real tensors against
  :func:`layout.build_engine_layout`.
* :func:`remote_region_order` - P's registered regions (named by their first layer) to
  planner regions.
* :func:`align_request` - upstream's block-list conventions (D lists only the blocks
  it did not find in its own prefix cache; Mamba groups hold the state slot(s)) to the
  token-aligned lists :meth:`PairPlan.plan <hybrid_pd.planner.pair.PairPlan.plan>` takes.
* :func:`read_from` - the plan's read from one P rank (None: that rank is only notified).
* :func:`templates_by_rank` / :func:`check_source_ranks` - heterogeneous TP: the P
  ranks the planner reads from must be the ones vLLM's TP mapping handshakes with,
  reads from and notifies.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hybrid_pd.planner.layout import EngineLayout, KVCacheGroup
from hybrid_pd.planner.model_spec import HybridModelSpec, LayerKind
from hybrid_pd.planner.plan import PeerTemplate, ReadPlan, RequestPlan

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def cache_layer_index(spec: HybridModelSpec, layer_name: str, kind: LayerKind) -> int:
    """Index into ``spec.cache_layers`` of vLLM layer ``layer_name`` (e.g.
    ``model.layers.5.mixer``) holding state of ``kind``."""
    m = _LAYER_RE.search(layer_name)
    if m is None:
        raise ValueError(f"cannot find a decoder layer number in vLLM layer name {layer_name!r}")
    decoder = int(m.group(1))
    for i, (d, k) in enumerate(spec.cache_layers):
        if d == decoder and k is kind:
            return i
    raise ValueError(
        f"vLLM layer {layer_name!r} keeps {kind.value} state but decoder layer {decoder} of "
        f"the {spec.model_type} config has no {kind.value} cache layer"
    )


def group_permutation(
    planner: Sequence[KVCacheGroup], engine: Sequence[tuple[LayerKind, tuple[int, ...]]]
) -> tuple[int, ...]:
    """``perm[g]`` = the planner group equal to engine group ``g`` (same kind, same
    layers in the same order).  Raises ``ValueError`` listing both groupings."""
    want = {(g.kind, g.layers): i for i, g in enumerate(planner)}
    perm = []
    for kind, layers in engine:
        i = want.get((kind, tuple(layers)))
        if i is None:
            break
        perm.append(i)
    if len(perm) != len(engine) or len(engine) != len(planner) or len(set(perm)) != len(perm):
        show = lambda gs: "; ".join(f"{k.value} {list(ls)}" for k, ls in gs)  # noqa: E731
        raise ValueError(
            "vLLM's KV-cache groups differ from the planner's HMA groups: vLLM "
            f"[{show(engine)}], planner [{show((g.kind, g.layers) for g in planner)}]"
        )
    return tuple(perm)


def region_bases(
    planner: Sequence[KVCacheGroup],
    layer_storage: Mapping[int, tuple[int, int]],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(bases, lengths)`` per planner region from ``layer_storage`` (cache-layer
    index -> (storage base address, storage bytes)).  Region j is the tensor holding
    position j of every group; layers at one position in different tensors, or one
    tensor at two positions, are errors."""
    num_regions = max(len(g.layers) for g in planner)
    bases: list[tuple[int, int] | None] = [None] * num_regions
    for g in planner:
        for j, layer in enumerate(g.layers):
            if layer not in layer_storage:
                raise ValueError(f"no KV cache tensor registered for cache layer {layer}")
            got = layer_storage[layer]
            if bases[j] is None:
                bases[j] = got
            elif bases[j] != got:
                raise ValueError(
                    f"HMA region {j}: cache layer {layer} lives at {got[0]:#x} (+{got[1]} B) "
                    f"but another layer at position {j} lives at {bases[j][0]:#x} "
                    f"(+{bases[j][1]} B); the planner assumes one shared tensor per position"
                )
    if len({b[0] for b in bases if b is not None}) != num_regions:
        raise ValueError(f"HMA regions do not map to distinct tensors: {bases}")
    return tuple(b[0] for b in bases), tuple(b[1] for b in bases)  # type: ignore[index]


def check_measured_layout(expected: EngineLayout, measured: Mapping[str, int], who: str) -> None:
    """Every measured field (an :class:`EngineLayout` attribute name -> value read from
    the engine's tensors/specs) must equal the planner's; the error names both."""
    bad = [
        f"{name}: engine {value!r}, planner {getattr(expected, name)!r}"
        for name, value in measured.items()
        if getattr(expected, name) != value
    ]
    if bad:
        raise ValueError(
            f"{who}: the KV-cache layout vLLM built does not match the planner's "
            f"({expected.describe()}): " + "; ".join(bad)
        )


def remote_region_order(
    region_names: Sequence[str] | None, name_to_region: Mapping[str, int], num_regions: int
) -> tuple[int, ...]:
    """``order[r]`` = planner region of P's registered region ``r`` (named by the first
    layer vLLM registered in it)."""
    if not region_names or len(region_names) != num_regions:
        raise ValueError(
            f"remote advertised region names {region_names!r}; expected {num_regions} "
            "(one per shared KV tensor)"
        )
    order = []
    for name in region_names:
        if name not in name_to_region:
            raise ValueError(f"remote region {name!r} is not a KV-cache layer of this model")
        order.append(name_to_region[name])
    if sorted(order) != list(range(num_regions)):
        raise ValueError(f"remote regions {list(region_names)} map to planner regions {order}")
    return tuple(order)


@dataclass(frozen=True)
class AlignedRequest:
    """Block lists (planner group order) and token count for :func:`plan.plan_request`."""

    decode_block_ids: tuple[tuple[int, ...], ...]
    prefill_block_ids: tuple[tuple[int, ...], ...]
    num_tokens: int


def align_request(
    *,
    kinds: Sequence[LayerKind],
    decode_block_ids: Sequence[Sequence[int]],
    prefill_block_ids: Sequence[Sequence[int]],
    decode_cached_blocks: Sequence[int],
    num_tokens: int | None,
    block_size: int,
) -> AlignedRequest:
    """Token-align one request's lists (all in the same group order, logical ids).

    vLLM's conventions (vLLM 0.32 pull scheduler): D's attention list holds only the
    blocks not found in D's prefix cache (``decode_cached_blocks[g]`` blocks precede
    it); P's list covers the whole prompt; ``num_tokens`` is the number of tokens P
    computed (``remote_num_tokens``, None on old peers: P's blocks are then read
    whole).  Attention: P's blocks from ``k = cached`` on, paired with D's in order,
    and ``num_tokens - k * block_size`` tokens left to read.  Mamba: state slots pair
    one to one; a longer P list keeps its tail (D already has the earlier positions),
    a longer D list its head (upstream ``_apply_prefix_caching``)::

        k=1, bs=256, N=700: P [4, 5, 6] D [9, 10] -> P [5, 6] D [9, 10], 444 tokens
    """
    if not (len(kinds) == len(decode_block_ids) == len(prefill_block_ids)):
        raise ValueError(
            f"{len(kinds)} groups but {len(decode_block_ids)} decode and "
            f"{len(prefill_block_ids)} prefill block lists"
        )
    cached = [decode_cached_blocks[g] if g < len(decode_cached_blocks) else 0
              for g in range(len(kinds))]
    fa_cached = {cached[g] for g, k in enumerate(kinds) if k is LayerKind.ATTENTION}
    if len(fa_cached) > 1:
        raise ValueError(f"attention groups disagree on D's prefix-cache hit: {cached}")
    k = fa_cached.pop() if fa_cached else 0
    if num_tokens is None:
        fa_lens = {len(p) for p, kd in zip(prefill_block_ids, kinds, strict=True)
                   if kd is LayerKind.ATTENTION}
        num_tokens = max(fa_lens or {1}) * block_size
    tokens = num_tokens - k * block_size
    if tokens <= 0:
        raise ValueError(
            f"D's prefix cache holds {k} blocks of {block_size} tokens, P computed only "
            f"{num_tokens}: nothing to read (vLLM treats this as a full local hit)"
        )
    d_out: list[tuple[int, ...]] = []
    p_out: list[tuple[int, ...]] = []
    for g, kind in enumerate(kinds):
        d, p = tuple(decode_block_ids[g]), tuple(prefill_block_ids[g])
        if kind is LayerKind.ATTENTION:
            p = p[k:]
            if len(d) < len(p):
                p = p[: len(d)]
            d = d[: len(p)]
        elif kind is LayerKind.MAMBA:
            if len(p) > len(d):
                p = p[len(p) - len(d):]
            elif len(d) > len(p):
                if len(d) - len(p) > 1:
                    raise ValueError(
                        f"group {g}: unpairable Mamba state slots, D {list(d)} P {list(p)}"
                    )
                d = d[: len(p)]
        else:
            raise ValueError(f"group {g}: no transfer for {kind.value} layers")
        d_out.append(d)
        p_out.append(p)
    return AlignedRequest(tuple(d_out), tuple(p_out), tokens)


def reorder(items: Sequence, perm: Sequence[int]) -> tuple:
    """Engine group order -> planner group order (``perm[engine g] = planner g``)."""
    out: list = [None] * len(perm)
    for g, target in enumerate(perm):
        out[target] = items[g]
    return tuple(out)


def read_from(plan: RequestPlan, prefill_rank: int) -> ReadPlan | None:
    """The plan's read from one P rank (ids index the pair's dual views); None when the
    plan reads nothing from it (upstream still lists it: it only gets notified)."""
    return next((r for r in plan.reads if r.prefill_rank == prefill_rank), None)


def templates_by_rank(templates: Sequence[PeerTemplate]) -> dict[int, PeerTemplate]:
    """``{P rank: template}`` for one D rank (what :func:`plan.peer_templates` gives)."""
    out = {t.prefill_rank: t for t in templates}
    if len(out) != len(templates):
        raise ValueError(f"two templates for one P rank: {[t.prefill_rank for t in templates]}")
    return out


def check_source_ranks(
    templates: Mapping[int, PeerTemplate], upstream_sources: Sequence[int], decode_rank: int
) -> None:
    """vLLM's TP mapping (``TPMapping.all_source_ranks``) decides which P ranks D
    handshakes with, reads from (one ``_read_blocks`` per rank) and notifies; the
    planner's templates must name the same P ranks, or a P rank would be read without
    a prepared view, or never notified (P would hold the request's blocks until its
    lease expires)."""
    if sorted(templates) != sorted(upstream_sources):
        raise NotImplementedError(
            f"HybridNixlConnector: D rank {decode_rank}: vLLM's TP mapping reads from P "
            f"ranks {sorted(upstream_sources)}, the planner from {sorted(templates)}"
        )


__all__ = [
    "AlignedRequest",
    "align_request",
    "cache_layer_index",
    "check_measured_layout",
    "check_source_ranks",
    "group_permutation",
    "read_from",
    "region_bases",
    "remote_region_order",
    "reorder",
    "templates_by_rank",
]
