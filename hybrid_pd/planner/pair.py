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

import numpy as np

from hybrid_pd.planner.descs import (
    PeerTemplate,
    ReadPlan,
    RequestPlan,
    Run,
    check_desc,
    check_desc_array,
    merge_arrays,
)
from hybrid_pd.planner.layout import EngineLayout, KVCacheGroup, cdiv, check_tp, validate_layout
from hybrid_pd.planner.model_spec import HybridModelSpec, LayerKind
from hybrid_pd.planner.templates import peer_templates

BlockIds = tuple[np.ndarray, ...]  # one int64 array per HMA group


def _as_ids(ids: Sequence[int] | np.ndarray, who: str, gi: int, kind: str,
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
                f"{who}: group {gi} ({kind}) block id {b} out of range [0, {num_blocks})")
    raise ValueError(f"{who}: group {gi} block ids are not a flat list of ints")


def _check_block_ids(
    layout: EngineLayout, block_ids: Sequence[Sequence[int]], who: str, num_tokens: int
) -> BlockIds:
    groups = layout.hma_groups
    if len(block_ids) != len(groups):
        raise ValueError(
            f"{who}: got block ids for {len(block_ids)} KV cache groups, the model has "
            f"{len(groups)} ({', '.join(g.kind.value for g in groups)})"
        )
    out = []
    for gi, (group, ids) in enumerate(zip(groups, block_ids, strict=True)):
        arr = _as_ids(ids, who, gi, group.kind.value, layout.num_blocks)
        bad = (arr < 0) | (arr >= layout.num_blocks)
        if bad.any():
            raise ValueError(
                f"{who}: group {gi} ({group.kind.value}) block id {int(arr[bad][0])} out of "
                f"range [0, {layout.num_blocks})"
            )
        if group.kind is LayerKind.ATTENTION:
            need = cdiv(num_tokens, layout.block_size)
            if len(arr) < need:
                raise ValueError(
                    f"{who}: attention group {gi} has {len(arr)} blocks but {num_tokens} "
                    f"tokens need {need} blocks of {layout.block_size}"
                )
        elif not len(arr):
            raise ValueError(f"{who}: Mamba group {gi} has no block for the request's state")
        out.append(arr)
    _check_unique(out, who)
    return tuple(out)


def _check_unique(ids: list[np.ndarray], who: str) -> None:
    """HMA groups share one block pool: a block id may appear once over all groups."""
    flat = np.concatenate(ids) if ids else np.empty(0, np.int64)
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


class _Segment:
    """Consecutive HMA groups of one kind (``G`` of them, equal shapes) for one P rank,
    every layer at once.  Within a group only the region differs between layers, so
    offsets and lengths are kept per group (``(G, m)``, ``m`` units in (position, run)
    order), regions per (group, layer) and ids per (group, layer, unit).  Unit order:
    group, layer, position, run -- the order the dual-view ids are listed in."""

    __slots__ = ("regions", "d_off", "p_off", "length", "d_ids", "p_ids", "name")

    def __init__(self, regions: np.ndarray, d_off: np.ndarray, p_off: np.ndarray,
                 length: np.ndarray, d_ids: np.ndarray, p_ids: np.ndarray,
                 name: Callable[[int, int, int], str]) -> None:
        self.regions = regions  # (G, layers)
        self.d_off, self.p_off, self.length = d_off, p_off, length  # (G, m) each
        self.d_ids, self.p_ids, self.name = d_ids, p_ids, name  # (G, layers, m)

    def _rows(self, off: np.ndarray, length: np.ndarray, src: np.ndarray | None,
              g_out: np.ndarray, l_out: np.ndarray) -> np.ndarray:
        out = np.empty((len(g_out), 3), np.int64)
        out[:, 0] = off if src is None else off[src]
        out[:, 1] = length if src is None else length[src]
        out[:, 2] = self.regions[g_out, l_out]
        return out

    def units(self, side: str) -> np.ndarray:
        """Every unit descriptor of one side, ``(G * layers * m, 3)``."""
        off = self.d_off if side == "local" else self.p_off
        (g, m), nl = off.shape, self.regions.shape[1]
        out = np.empty((g, nl, m, 3), np.int64)
        out[..., 0] = off[:, None, :]
        out[..., 1] = self.length[:, None, :]
        out[..., 2] = self.regions[:, :, None]
        return out.reshape(-1, 3)

    def merged(self) -> tuple[np.ndarray, np.ndarray, bool, np.ndarray]:
        """Units merged where contiguous on both sides (never across groups or layers:
        a layer is its own region), both sides ``(rows, 3)``; the joins are the same for
        every layer of a group, so they are found once per group.  Also: whether
        anything merged, and the rows of each group."""
        (g, m), nl = self.d_off.shape, self.regions.shape[1]
        d, p, n = self.d_off.ravel(), self.p_off.ravel(), self.length.ravel()
        joins = (d[:-1] + n[:-1] == d[1:]) & (p[:-1] + n[:-1] == p[1:])
        joins[m - 1::m] = False  # a group ends
        if not joins.any():  # nothing merges (e.g. head slices): the units themselves
            return (self.units("local"), self.units("remote"), False,
                    np.full(g, nl * m, np.int64))
        starts = np.flatnonzero(np.concatenate(([True], ~joins)))
        lengths = np.add.reduceat(n, starts)
        counts = np.bincount(starts // m, minlength=g)  # merged runs per group
        reps = counts * nl
        g_out = np.repeat(np.arange(g), reps)
        pos = np.arange(int(reps.sum())) - np.repeat(np.cumsum(reps) - reps, reps)
        k = counts[g_out]
        src = (np.cumsum(counts) - counts)[g_out] + pos % k
        l_out = pos // k
        return (self._rows(d[starts], lengths, src, g_out, l_out),
                self._rows(p[starts], lengths, src, g_out, l_out), True, reps)

    def check(self, side: str, lens: tuple[int, ...], who: str) -> None:
        """Every unit inside its region: a group's offsets are the same for all its
        layers, so the extremes are found per group and compared with each layer's
        region length."""
        off = self.d_off if side == "local" else self.p_off
        if not off.size:
            return
        n = self.length
        limit = np.asarray(lens, np.int64)[np.clip(self.regions, 0, len(lens) - 1)]
        ok = ((self.regions >= 0) & (self.regions < len(lens))
              & (off.min(axis=1) >= 0)[:, None] & (n.min(axis=1) > 0)[:, None]
              & ((off + n).max(axis=1)[:, None] <= limit))
        if ok.all():
            return
        gi, li = (int(x) for x in np.argwhere(~ok)[0])
        region = int(self.regions[gi, li])
        top = lens[region] if 0 <= region < len(lens) else -1
        k = int(np.argmax((off[gi] < 0) | (n[gi] <= 0) | (off[gi] + n[gi] > top)))
        check_desc((int(off[gi, k]), int(n[gi, k]), region), lens, who, self.name(gi, li, k))
        raise AssertionError("segment check and check_desc disagree")  # pragma: no cover


def _offsets(pos: np.ndarray, stride: int, runs: Sequence[Run], side: str) -> np.ndarray:
    """``pos * stride + run offset`` for every (group, position, run): ``(G, m)``."""
    off = np.asarray([r.local_offset if side == "local" else r.remote_offset for r in runs],
                     np.int64)
    return ((pos * stride)[:, :, None] + off).reshape(len(pos), -1)


def _ids(regions: np.ndarray, n_runs: int, per_region: int, pos: np.ndarray,
         base: int) -> np.ndarray:
    """Dual-view ids ``[group, layer, position, run] -> (region * n_runs + run) *
    per_region + pos + base``, as ``(G, layers, positions * runs)``."""
    first = (regions[:, :, None] * n_runs + np.arange(n_runs)) * per_region + base
    out = first[:, :, None, :] + pos[:, None, :, None]
    return out.reshape(regions.shape[0], regions.shape[1], -1)


def _merge_across(local: np.ndarray, remote: np.ndarray, group_rows: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Merge across groups, after each segment merged its own units.  Inside a group
    nothing more can join (its rows are maximal runs, and each layer is its own
    region), so only the first row of each group is tested against its predecessor (a
    few); only if one joins is everything merged again."""
    cand = np.cumsum(group_rows)[:-1]
    cand = cand[(cand > 0) & (cand < len(local))]
    if not cand.size or not _joins(local, remote, cand).any():
        return local, remote
    return merge_arrays(local, remote)


def _joins(local: np.ndarray, remote: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Whether row ``i`` continues row ``i - 1`` on both sides, for each ``i`` in rows."""
    a, b, c, d = local[rows - 1], local[rows], remote[rows - 1], remote[rows]
    return ((a[:, 2] == b[:, 2]) & (c[:, 2] == d[:, 2]) & (a[:, 0] + a[:, 1] == b[:, 0])
            & (c[:, 0] + c[:, 1] == d[:, 0]))


def _stacks(groups: Sequence[KVCacheGroup], ids: BlockIds) -> list[list[int]]:
    """Runs of consecutive group indices of one kind whose layers and block lists have
    equal lengths: each run is planned as one stacked segment."""
    out: list[list[int]] = []
    for gi, g in enumerate(groups):
        if out:
            first = out[-1][0]
            h = groups[first]
            if h.kind is g.kind and len(h.layers) == len(g.layers) \
                    and len(ids[first]) == len(ids[gi]):
                out[-1].append(gi)
                continue
        out.append([gi])
    return out


class PairPlan:
    """Planner state for one D rank and one prefill engine, validated once.

    Build with :meth:`build`; the constructor trusts its arguments.  The only mutable
    state is the per-P-rank registered region lengths, filled in as P ranks handshake
    (:meth:`set_prefill_regions`); a P rank without them is planned against the
    layout's ``num_blocks * page``.
    """

    __slots__ = ("spec", "decode", "prefill", "decode_rank", "templates",
                 "decode_region_lens", "_by_rank", "_prefill_lens", "_region_of")

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
            if g.kind is LayerKind.MAMBA and len(d_ids[gi]) != len(p_ids[gi]):
                raise ValueError(
                    f"Mamba group {gi}: {len(d_ids[gi])} decode blocks but {len(p_ids[gi])} "
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
    def _read(
        self, t: PeerTemplate, d_ids: BlockIds, p_ids: BlockIds, n_kb: int, merge: bool
    ) -> ReadPlan | None:
        groups = self.decode.hma_groups
        segs = []
        for stack in _stacks(groups, d_ids):
            layers = [groups[gi].layers for gi in stack]
            regions = np.asarray([[self._region_of[x] for x in ls] for ls in layers], np.int64)
            d_blocks = np.stack([d_ids[gi] for gi in stack])
            p_blocks = np.stack([p_ids[gi] for gi in stack])
            seg = (self._fa_segment(t, layers, regions, d_blocks, p_blocks, n_kb)
                   if groups[stack[0]].kind is LayerKind.ATTENTION else
                   self._mamba_segment(t, layers, regions, d_blocks, p_blocks))
            if seg is not None:
                segs.append(seg)
        if not segs:
            return None
        d_who, p_who = f"decode rank {self.decode_rank}", f"prefill rank {t.prefill_rank}"
        d_lens, p_lens = self.decode_region_lens, self.prefill_lens(t.prefill_rank)
        for seg in segs:
            seg.check("local", d_lens, d_who)
            seg.check("remote", p_lens, p_who)
        if merge:
            parts = [seg.merged() for seg in segs]
            units_l = np.concatenate([part[0] for part in parts])
            units_r = np.concatenate([part[1] for part in parts])
            local, remote = _merge_across(units_l, units_r,
                                          np.concatenate([part[3] for part in parts]))
            if local is not units_l or any(part[2] for part in parts):
                # Re-check what actually leaves the planner (when anything was merged).
                check_desc_array(local, d_lens, d_who, "merged run")
                check_desc_array(remote, p_lens, p_who, "merged run")
        else:
            local = np.concatenate([seg.units("local") for seg in segs])
            remote = np.concatenate([seg.units("remote") for seg in segs])
        lids = np.concatenate([seg.d_ids.ravel() for seg in segs])
        rids = np.concatenate([seg.p_ids.ravel() for seg in segs])
        return ReadPlan(t.prefill_rank, local, remote, lids, rids)

    def _fa_segment(
        self, t: PeerTemplate, layers: Sequence[Sequence[int]], regions: np.ndarray,
        d_blocks: np.ndarray, p_blocks: np.ndarray, n_kb: int,
    ) -> _Segment | None:
        """FA ids: ``(region * n_fa_runs + run) * N_phys + kernel_block``."""
        runs = t.fa_runs
        if not runs or not n_kb:
            return None
        d, p = self.decode, self.prefill
        i = np.arange(n_kb, dtype=np.int64)
        d_phys = d_blocks[:, i // d.ratio] * d.ratio + i % d.ratio
        p_phys = p_blocks[:, i // p.ratio] * p.ratio + i % p.ratio
        n_runs = len(runs)

        def name(g: int, li: int, k: int) -> str:
            kb, ri = divmod(k, n_runs)
            return f"layer {layers[g][li]} {runs[ri].name} kernel block {kb}"

        length = np.tile(np.asarray([r.length for r in runs], np.int64), (len(d_phys), n_kb))
        return _Segment(regions, _offsets(d_phys, d.kernel_block_bytes, runs, "local"),
                        _offsets(p_phys, p.kernel_block_bytes, runs, "remote"), length,
                        _ids(regions, n_runs, d.num_phys_blocks, d_phys, 0),
                        _ids(regions, n_runs, p.num_phys_blocks, p_phys, 0), name)

    def _mamba_segment(
        self, t: PeerTemplate, layers: Sequence[Sequence[int]], regions: np.ndarray,
        d_blocks: np.ndarray, p_blocks: np.ndarray,
    ) -> _Segment | None:
        """Mamba ids: ``(region * n_mamba_runs + run) * N_logical + block + num_fa``."""
        runs = t.mamba_runs
        if not runs or not d_blocks.shape[1]:
            return None
        d, p = self.decode, self.prefill
        n_runs, n_fa = len(runs), len(t.fa_runs)

        def name(g: int, li: int, k: int) -> str:
            j, ri = divmod(k, n_runs)
            return (f"layer {layers[g][li]} {runs[ri].name} block "
                    f"{d_blocks[g, j]}<-{p_blocks[g, j]}")

        length = np.tile(np.asarray([r.length for r in runs], np.int64), d_blocks.shape)
        return _Segment(regions, _offsets(d_blocks, d.page_size_bytes, runs, "local"),
                        _offsets(p_blocks, p.page_size_bytes, runs, "remote"), length,
                        _ids(regions, n_runs, d.num_blocks, d_blocks,
                             d.num_regions * n_fa * d.num_phys_blocks),
                        _ids(regions, n_runs, p.num_blocks, p_blocks,
                             p.num_regions * n_fa * p.num_phys_blocks), name)


__all__ = ["PairPlan"]
