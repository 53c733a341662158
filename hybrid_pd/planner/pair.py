"""Planning for one (D rank, prefill engine) pair.

:meth:`PairPlan.build` does everything that depends only on the pair - both layouts
against the model, TP, kernel block sizes, conv / FA layouts, registered region
lengths and the per-P-rank templates (:func:`templates.peer_templates`) - once, at
handshake time.  :meth:`PairPlan.plan` then does only what depends on the request:
block-id checks, the block-id mapping, bounds checks and merging.

Per request (generators are the only code that branches on layer kind):
FA by *kernel* blocks, and only the ``ceil(N / kernel_block)`` that hold computed
tokens; kernel block i is ``ids[i // ratio] * ratio + i % ratio`` with each side's
*own* ratio (the remote ratio for remote ids).  Mamba by logical blocks (one whole
state per block).  Every unit descriptor is bounds-checked before merging (so the
message names the layer) and every merged one again before it is returned.

Cost: numpy array arithmetic, one Python-level step per (P rank, HMA group) - never
per token, block or layer.  Within a group only the region differs between layers, so
offsets, bounds and merges are worked out once per group and only the (cheap) ids and
output rows are per layer (``hybrid-pd plan --bench`` measures it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from itertools import accumulate, chain
from typing import NamedTuple

import numpy as np

from hybrid_pd.planner.descs import PeerTemplate, ReadPlan, RequestPlan, Run
from hybrid_pd.planner.layout import EngineLayout, KVCacheGroup, cdiv, check_tp, validate_layout
from hybrid_pd.planner.model_spec import HybridModelSpec, LayerKind
from hybrid_pd.planner.segments import Recipe, Segment, Stack, merge_across
from hybrid_pd.planner.templates import peer_templates


def _as_ids(ids: Sequence[int] | np.ndarray, who: str, gi: int, kind: LayerKind,
            num_blocks: int) -> np.ndarray:
    """One group's block ids as int64, refusing anything that is not an int in range
    (values beyond int64 are checked in Python: numpy would not hold them)."""
    try:
        arr = np.asarray(ids)
    except (ValueError, TypeError):
        arr = np.asarray(list(ids), dtype=object)
    if arr.ndim == 1 and arr.dtype.kind in "iu" and arr.dtype.itemsize <= 8 \
            and (arr.dtype.kind == "i" or arr.size == 0 or int(arr.max()) < 2**63):
        return arr.astype(np.int64, copy=False)
    if arr.ndim == 1 and arr.size == 0:
        return np.empty(0, np.int64)
    for b in (ids if arr.ndim == 1 else [ids]):
        if not isinstance(b, (int, np.integer)) or isinstance(b, (bool, np.bool_)):
            raise ValueError(f"{who}: group {gi} block id {b!r} is not an int")
        if not 0 <= b < num_blocks:
            raise ValueError(
                f"{who}: group {gi} ({kind.value}) block id {b} out of range [0, {num_blocks})")
    raise ValueError(f"{who}: group {gi} block ids are not a flat list of ints")


class BlockIds(NamedTuple):
    """One request side's block ids: every group's ids back to back in ``flat`` (int64),
    ``groups[g]`` a view of group ``g`` starting at ``starts[g]``."""

    groups: tuple[np.ndarray, ...]
    flat: np.ndarray
    starts: tuple[int, ...]

    def stacked(self, gis: Sequence[int]) -> np.ndarray:
        """Consecutive groups of equal length as one ``(G, n)`` view (no copy)."""
        at, n = self.starts[gis[0]], len(self.groups[gis[0]])
        return self.flat[at:at + n * len(gis)].reshape(len(gis), n)


def _flat_ids(block_ids: Sequence[Sequence[int]]) -> np.ndarray | None:
    """Every group's ids in one int64 array through one conversion; None when any id is
    not a plain int (the per-group path then says which)."""
    try:
        arr = np.asarray(list(chain.from_iterable(block_ids)))
    except (ValueError, TypeError):
        return None
    if arr.ndim == 1 and arr.dtype.kind == "i" and arr.dtype.itemsize <= 8:
        return arr.astype(np.int64, copy=False)
    return np.empty(0, np.int64) if arr.ndim == 1 and arr.size == 0 else None


def _check_block_ids(
    layout: EngineLayout, block_ids: Sequence[Sequence[int]], who: str, num_tokens: int
) -> BlockIds:
    groups = layout.hma_groups
    if len(block_ids) != len(groups):
        raise ValueError(
            f"{who}: got block ids for {len(block_ids)} KV cache groups, the model has "
            f"{len(groups)} ({', '.join(g.kind.value for g in groups)})"
        )
    try:
        lens = [len(ids) for ids in block_ids]
        flat = _flat_ids(block_ids)
    except TypeError:  # a group without a length: the per-group path names it
        flat = None
    if flat is None:
        per_group = [_as_ids(ids, who, gi, g.kind, layout.num_blocks)
                     for gi, (g, ids) in enumerate(zip(groups, block_ids, strict=True))]
        lens = [len(ids) for ids in per_group]
        flat = np.concatenate(per_group) if per_group else np.empty(0, np.int64)
    starts = (0, *accumulate(lens))
    out = tuple(flat[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True))
    need = -(-num_tokens // layout.block_size)  # attention blocks holding the tokens
    for gi, (group, n) in enumerate(zip(groups, lens, strict=True)):
        if group.kind is LayerKind.ATTENTION:
            if n < need:
                raise ValueError(
                    f"{who}: attention group {gi} has {n} blocks but {num_tokens} "
                    f"tokens need {need} blocks of {layout.block_size}"
                )
        elif not n:
            raise ValueError(f"{who}: Mamba group {gi} has no block for the request's state")
    _check_pool(layout, out, flat, who)
    return BlockIds(out, flat, starts[:-1])


def _check_pool(layout: EngineLayout, ids: Sequence[np.ndarray], flat: np.ndarray,
                who: str) -> None:
    """Every id inside the pool, and (HMA groups share one block pool) each id at most
    once over all groups: checked on all groups at once."""
    if len(flat) and (np.minimum.reduce(flat) < 0 or np.maximum.reduce(flat) >= layout.num_blocks):
        for gi, (arr, group) in enumerate(zip(ids, layout.hma_groups, strict=True)):
            bad = (arr < 0) | (arr >= layout.num_blocks)
            if bad.any():
                raise ValueError(
                    f"{who}: group {gi} ({group.kind.value}) block id {int(arr[bad][0])} out "
                    f"of range [0, {layout.num_blocks})"
                )
    order = np.sort(flat)
    dup = order[1:][order[1:] == order[:-1]]
    if len(dup):
        b = int(dup[0])
        where = [gi for gi, g in enumerate(ids) for x in g.tolist() if x == b]
        raise ValueError(
            f"{who}: block id {b} appears twice (groups {where[0]} and {where[1]}); HMA "
            "groups share one block pool, so a block belongs to one group"
        )


def _check_regions(
    layout: EngineLayout, region_lens: Sequence[int] | None, who: str
) -> tuple[int, ...]:
    if region_lens is None:
        return (layout.region_bytes,) * layout.num_regions
    lens = tuple(region_lens)
    if len(lens) != layout.num_regions:
        raise ValueError(
            f"{who}: {len(lens)} registered regions, the layout has {layout.num_regions}"
        )
    for i, n in enumerate(lens):
        if not isinstance(n, int) or n < layout.region_bytes:
            raise ValueError(
                f"{who}: region {i} is {n!r} bytes, smaller than num_blocks * page = "
                f"{layout.num_blocks} * {layout.page_size_bytes} = {layout.region_bytes}"
            )
    return lens


def _stacks(groups: Sequence[KVCacheGroup], same: Sequence[bool],
            region_of: Mapping[int, int]) -> tuple[Stack, ...]:
    """Runs of consecutive groups of one kind whose layers and block lists have equal
    lengths (``same[gi]``: group ``gi`` has as many blocks as ``gi - 1``): each run is
    planned as one stacked segment."""
    out: list[list[int]] = []
    for gi, g in enumerate(groups):
        if out:
            h = groups[out[-1][0]]
            if h.kind is g.kind and len(h.layers) == len(g.layers) and same[gi]:
                out[-1].append(gi)
                continue
        out.append([gi])
    return tuple(Stack(tuple(st), groups[st[0]].kind is LayerKind.ATTENTION,
                       tuple(groups[gi].layers for gi in st),
                       np.asarray([[region_of[x] for x in groups[gi].layers] for gi in st],
                                  np.int64)) for st in out)


class PairPlan:
    """Planner state for one D rank and one prefill engine, validated once.

    Build with :meth:`build`; the constructor trusts its arguments.  The only mutable
    state is the per-P-rank registered region lengths, filled in as P ranks handshake
    (:meth:`set_prefill_regions`); a P rank without them is planned against the
    layout's ``num_blocks * page``.
    """

    __slots__ = ("spec", "decode", "prefill", "decode_rank", "templates",
                 "decode_region_lens", "_by_rank", "_prefill_lens", "_region_of",
                 "_stack_cache", "_recipes", "_aranges")

    def __init__(
        self,
        *,
        spec: HybridModelSpec,
        decode: EngineLayout,
        prefill: EngineLayout,
        decode_rank: int,
        templates: tuple[PeerTemplate, ...],
        decode_region_lens: tuple[int, ...],
    ) -> None:
        self.spec = spec
        self.decode = decode
        self.prefill = prefill
        self.decode_rank = decode_rank
        self.templates = templates
        self.decode_region_lens = decode_region_lens
        self._by_rank = {t.prefill_rank: t for t in templates}
        self._prefill_lens: dict[int, tuple[int, ...]] = {}
        self._region_of = decode.region_of()
        self._stack_cache: dict[tuple[bool, ...], tuple[Stack, ...]] = {}
        self._recipes: dict[tuple[int, tuple[int, ...]], Recipe | None] = {}
        self._aranges: dict[int, np.ndarray] = {}  # the two sides' kernel blocks per block

    @classmethod
    def build(
        cls,
        *,
        spec: HybridModelSpec,
        decode: EngineLayout,
        prefill: EngineLayout,
        decode_rank: int,
        decode_region_lens: Sequence[int] | None = None,
        prefill_region_lens: Mapping[int, Sequence[int]] | None = None,
    ) -> PairPlan:
        """Validate the pair and build its templates.

        ``*_region_lens``: registered region sizes (from the handshake for P); default
        the layout's ``num_blocks * page``.  Lengths given for a P rank this D rank
        reads nothing from are ignored, unchecked, as they never bound a descriptor.
        """
        check_tp(spec, decode.tp)
        check_tp(spec, prefill.tp)
        validate_layout(spec, decode, "decode layout")
        validate_layout(spec, prefill, "prefill layout")
        if not 0 <= decode_rank < decode.tp:
            raise ValueError(f"decode rank {decode_rank} out of range for TP={decode.tp}")
        if decode.kernel_block_size != prefill.kernel_block_size:
            raise ValueError(
                f"kernel block sizes differ (P {prefill.kernel_block_size}, D "
                f"{decode.kernel_block_size}): kernel blocks are head-major, so a token sits "
                "at a different per-head stride and no set of plain READs maps one onto the "
                "other; run both engines with the same attention backend / kernel block size"
            )
        d_lens = _check_regions(decode, decode_region_lens, f"decode rank {decode_rank}")
        pair = cls(
            spec=spec,
            decode=decode,
            prefill=prefill,
            decode_rank=decode_rank,
            templates=peer_templates(spec, decode, prefill, decode_rank),
            decode_region_lens=d_lens,
        )
        if prefill_region_lens is not None:
            for t in pair.templates:
                lens = prefill_region_lens.get(t.prefill_rank)
                if lens is not None:
                    pair.set_prefill_regions(t.prefill_rank, lens)
        return pair

    def template(self, prefill_rank: int) -> PeerTemplate | None:
        """What this D rank reads from ``prefill_rank``; None when it reads nothing."""
        return self._by_rank.get(prefill_rank)

    def set_prefill_regions(self, prefill_rank: int, lens: Sequence[int]) -> None:
        """Record P rank ``prefill_rank``'s registered region lengths (from its
        handshake); ``ValueError`` when they cannot hold the layout."""
        if not isinstance(prefill_rank, int) or not 0 <= prefill_rank < self.prefill.tp:
            raise ValueError(
                f"prefill rank {prefill_rank!r} out of range for TP={self.prefill.tp}"
            )
        self._prefill_lens[prefill_rank] = _check_regions(
            self.prefill, lens, f"prefill rank {prefill_rank}"
        )
        self._recipes.clear()  # their bounds hold the old lengths

    def prefill_lens(self, prefill_rank: int) -> tuple[int, ...]:
        """The region lengths descriptors read from ``prefill_rank`` are checked against."""
        lens = self._prefill_lens.get(prefill_rank)
        if lens is None:
            return (self.prefill.region_bytes,) * self.prefill.num_regions
        return lens

    def plan(
        self,
        decode_block_ids: Sequence[Sequence[int]],
        prefill_block_ids: Sequence[Sequence[int]],
        num_tokens: int,
        *,
        merge: bool = True,
    ) -> RequestPlan:
        """Plan one request's reads.

        ``*_block_ids``: one list per HMA group, in ``layout.hma_groups`` order.
        Attention groups: the logical blocks holding tokens ``0..N-1`` in order.  Mamba
        groups: the block(s) holding the state (vLLM's default
        ``mamba_cache_mode='none'`` keeps one); paired one to one between P and D.
        ``num_tokens``: tokens whose state P computed.
        """
        if not isinstance(num_tokens, int) or num_tokens <= 0:
            raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
        d_ids = _check_block_ids(self.decode, decode_block_ids, "decode", num_tokens)
        p_ids = _check_block_ids(self.prefill, prefill_block_ids, "prefill", num_tokens)
        for gi, g in enumerate(self.decode.hma_groups):
            if g.kind is LayerKind.MAMBA and len(d_ids.groups[gi]) != len(p_ids.groups[gi]):
                raise ValueError(
                    f"Mamba group {gi}: {len(d_ids.groups[gi])} decode blocks but "
                    f"{len(p_ids.groups[gi])} "
                    "prefill blocks; states are paired one to one"
                )
        n_kb = cdiv(num_tokens, self.decode.kernel_block_size)
        reads = []
        for t in self.templates:
            read = self._read(t, d_ids, p_ids, n_kb, merge)
            if read is not None:
                reads.append(read)
        return RequestPlan(
            decode_rank=self.decode_rank,
            decode_tp=self.decode.tp,
            prefill_tp=self.prefill.tp,
            num_tokens=num_tokens,
            num_kernel_blocks=n_kb,
            reads=tuple(reads),
            merged=merge,
        )

    def __repr__(self) -> str:
        return (
            f"PairPlan(D rank {self.decode_rank}/{self.decode.tp} <- P TP {self.prefill.tp}, "
            f"reads P ranks {sorted(self._by_rank)}, regions given for "
            f"{sorted(self._prefill_lens)})"
        )

    # -- per request --------------------------------------------------------------------
    def _stacks_for(self, d_ids: BlockIds) -> tuple[Stack, ...]:
        g = d_ids.groups
        same = tuple(gi > 0 and len(g[gi]) == len(g[gi - 1]) for gi in range(len(g)))
        stacks = self._stack_cache.get(same)  # at most 2**groups keys
        if stacks is None:
            stacks = _stacks(self.decode.hma_groups, same, self._region_of)
            self._stack_cache[same] = stacks
        return stacks

    def _recipe(self, t: PeerTemplate, stack: Stack) -> Recipe | None:
        key = (t.prefill_rank, stack.groups)
        if key not in self._recipes:
            d, p = self.decode, self.prefill
            lens = (self.decode_region_lens, self.prefill_lens(t.prefill_rank))
            if stack.attention:
                recipe = Recipe(stack, t.fa_runs, (d.kernel_block_bytes, p.kernel_block_bytes),
                                (d.num_phys_blocks, p.num_phys_blocks), (0, 0), lens) \
                    if t.fa_runs else None
            else:
                n_fa = len(t.fa_runs)
                recipe = Recipe(stack, t.mamba_runs, (d.page_size_bytes, p.page_size_bytes),
                                (d.num_blocks, p.num_blocks),
                                (d.num_regions * n_fa * d.num_phys_blocks,
                                 p.num_regions * n_fa * p.num_phys_blocks), lens) \
                    if t.mamba_runs else None
            self._recipes[key] = recipe
        return self._recipes[key]

    def _read(
        self, t: PeerTemplate, d_ids: BlockIds, p_ids: BlockIds, n_kb: int, merge: bool
    ) -> ReadPlan | None:
        who = (f"decode rank {self.decode_rank}", f"prefill rank {t.prefill_rank}")
        lens = (self.decode_region_lens, self.prefill_lens(t.prefill_rank))
        segs = []
        for stack in self._stacks_for(d_ids):
            recipe = self._recipe(t, stack)
            if recipe is None:
                continue
            gis = stack.groups
            d_blocks, p_blocks = d_ids.stacked(gis), p_ids.stacked(gis)
            if stack.attention:
                if not n_kb:
                    continue
                d_pos, p_pos = self._kernel_blocks(d_blocks, p_blocks, n_kb)
                name = _fa_name(stack.layers, recipe.runs)
            else:
                if not d_blocks.shape[1]:
                    continue
                d_pos, p_pos = d_blocks, p_blocks
                name = _mamba_name(stack.layers, recipe.runs, d_blocks, p_blocks)
            segs.append(recipe.segment(d_pos, p_pos, name, lens, who))
        if not segs:
            return None
        sizes = [seg.size for seg in segs]
        total = sum(sizes)
        lids, rids = np.empty(total, np.int64), np.empty(total, np.int64)
        at, nbytes = 0, 0
        for seg, n in zip(segs, sizes, strict=True):
            seg.ids_into(lids[at:at + n], rids[at:at + n])
            at, nbytes = at + n, nbytes + seg.bytes
        return ReadPlan(t.prefill_rank, lids, rids, nbytes,
                        partial(_merged if merge else _units, segs))

    def _kernel_blocks(self, d_blocks: np.ndarray, p_blocks: np.ndarray, n_kb: int
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Kernel block ``i`` of a side is ``ids[i // ratio] * ratio + i % ratio``, with
        each side's own ratio, for the ``n_kb`` kernel blocks that hold tokens."""
        return (_kernel_positions(d_blocks, self._kb_offsets(self.decode.ratio), n_kb),
                _kernel_positions(p_blocks, self._kb_offsets(self.prefill.ratio), n_kb))

    def _kb_offsets(self, ratio: int) -> np.ndarray:
        got = self._aranges.get(ratio)
        if got is None:
            got = self._aranges[ratio] = np.arange(ratio, dtype=np.int64)
        return got


def _kernel_positions(blocks: np.ndarray, offsets: np.ndarray, n_kb: int) -> np.ndarray:
    ratio = len(offsets)
    if ratio == 1:
        return blocks[:, :n_kb]
    # broadcasting, not i // ratio and i % ratio: 5x faster at 8,192 kernel blocks
    first = blocks[:, :-(-n_kb // ratio)] * ratio
    return (first[:, :, None] + offsets).reshape(len(blocks), -1)[:, :n_kb]


def _units(segs: Sequence[Segment]) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([seg.units("local") for seg in segs]),
            np.concatenate([seg.units("remote") for seg in segs]))


def _merged(segs: Sequence[Segment]) -> tuple[np.ndarray, np.ndarray]:
    """Units merged where contiguous on both sides.  No second bounds check: a merge
    joins in-bound units of one region end to start, so the run lies inside it too."""
    parts = [seg.merged() for seg in segs]
    return merge_across(np.concatenate([part[0] for part in parts]),
                        np.concatenate([part[1] for part in parts]),
                        np.concatenate([part[2] for part in parts]))


def _fa_name(layers: Sequence[Sequence[int]], runs: Sequence[Run]) -> Callable[[int, int, int], str]:
    def name(g: int, li: int, k: int) -> str:
        kb, ri = divmod(k, len(runs))
        return f"layer {layers[g][li]} {runs[ri].name} kernel block {kb}"
    return name


def _mamba_name(layers: Sequence[Sequence[int]], runs: Sequence[Run], d_blocks: np.ndarray,
                p_blocks: np.ndarray) -> Callable[[int, int, int], str]:
    def name(g: int, li: int, k: int) -> str:
        j, ri = divmod(k, len(runs))
        return f"layer {layers[g][li]} {runs[ri].name} block {d_blocks[g, j]}<-{p_blocks[g, j]}"
    return name


__all__ = ["PairPlan"]
