"""Layout-independent integrity units: the same logical KV content on every TP size and
layout, so P and D can digest a request's state each from ITS OWN layout (pure).

Integrity digests must catch planner bugs, so nothing here reads a READ plan or a
template: units come from :mod:`layout` alone (:class:`~layout.EngineLayout`,
:class:`~layout.RankShard`).

A unit is keyed ``(layer, view, index)``: ``layer`` a cache-layer index (as in
:attr:`KVCacheGroup.layers`), ``view`` one of :data:`VIEWS`, ``index`` model-global:

==========  =============================  ==========================================
view        index                          canonical bytes (in this order)
==========  =============================  ==========================================
K, V        KV head                        tokens ``0..N-1``, ``head_dim`` each
x           Mamba head                     its ``head_dim`` conv channels, each
                                           channel's ``kernel-1`` steps (channel-major)
B, C        group (original ``n_groups``)  its ``d_state`` channels, likewise
SSM         Mamba head                     ``[head_dim, d_state]`` as vLLM stores it
==========  =============================  ==========================================

Where the bytes are (module doc of :mod:`layout`): token ``t`` of an attention group
is in kernel block ``ids[t // block] * ratio + (t % block) // kernel``, row
``t % kernel``.  PACKED keeps per head ``[K rows | V rows]`` of one kernel block
(``cpu_attn.py`` views ``[heads, kb, 2*hd]`` as ``[heads, 2*kb, hd]`` and chunks K
then V); SPLIT ``[K|V, heads, kb, hd]``.  Conv element (channel ``c``, step ``t``) is
at ``(c*(kernel-1) + t) * dsz`` in DS and ``(t*conv_dim + c) * dsz`` in SD (rank-local
``[x | B | C]`` channels), so DS gives one run per conv unit and SD one run per element.
Only tokens ``[0, N)`` count (the tail of the last kernel block is not content).  Mamba
units cover every block of their group's list, in list order: the planner pairs slot
``j`` of D's list with slot ``j`` of P's, and with vLLM's default
``mamba_cache_mode='none'`` the list is the one state block.  Pass each side the lists
the planner got (after :func:`connector.vllm_mapping.align_request`).

Holders and the compare rule: a rank holds the units of its shard; a replicated unit
(KV heads when TP > KV heads, B/C groups when ``n_groups == 1 < TP``) is held by
several ranks (:func:`key_holders`).  Every holder digests its copy; each D holder's
digest must equal the digest of at least one P holder (replicas are computed
identically, and which replica D read from is the planner's choice, not checked
here).  :func:`compare_units` applies the rule.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from hybrid_pd.planner.layout import (
    ConvLayout,
    EngineLayout,
    FaLayout,
    RankShard,
    cdiv,
    rank_shard,
    unit_holders,
)
from hybrid_pd.planner.model_spec import HybridModelSpec, LayerKind

VIEWS = ("K", "V", "x", "B", "C", "SSM")
_ORDER = {v: i for i, v in enumerate(VIEWS)}
_WHAT = {"K": "head", "V": "head", "x": "head", "SSM": "head", "B": "group", "C": "group"}


class UnitKey(NamedTuple):
    layer: int  # cache-layer index (spec.cache_layers)
    view: str  # one of VIEWS
    index: int  # global KV head, Mamba head or group

    def __str__(self) -> str:
        return f"layer {self.layer} {self.view} {_WHAT[self.view]} {self.index}"


class BlockKey(NamedTuple):
    """A unit of one request cut at logical blocks (:func:`request_units`): K and V
    units per attention block (``block``: its position in the request, block 0 holding
    tokens ``[0, block_size)``), Mamba units whole (``block`` -1)."""

    layer: int
    view: str
    index: int
    block: int

    def __str__(self) -> str:
        unit = str(UnitKey(self.layer, self.view, self.index))
        return unit if self.block < 0 else f"{unit} block {self.block}"


class Unit(NamedTuple):
    """One unit on one rank: ``runs`` is an ``(n, 3)`` int64 array of planner
    descriptors ``(offset, length, region)`` in canonical byte order (so
    :func:`views.to_addr_descs` turns them into address rows); read-only."""

    key: UnitKey
    runs: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.runs[:, 1].sum())


@dataclass(frozen=True)
class UnitMismatch:
    """A D rank's copy of ``key`` equals no P holder's copy (``prefill_ranks``: the P
    holders that digested it; empty when none did)."""

    key: UnitKey
    decode_rank: int
    prefill_ranks: tuple[int, ...]

    def __str__(self) -> str:
        if not self.prefill_ranks:
            return f"{self.key}: D rank {self.decode_rank} has it, no P holder digested it"
        return (f"{self.key}: D rank {self.decode_rank} differs from P rank(s) "
                f"{', '.join(map(str, self.prefill_ranks))}")


# --------------------------------------------------------------------------------- API
def units_for(
    layout: EngineLayout,
    shard: RankShard,
    block_ids: Sequence[Sequence[int]],
    num_tokens: int,
) -> list[Unit]:
    """Every unit rank ``shard.rank`` holds for one request, sorted by ``(layer, view
    order, index)``.  ``block_ids``: one list per HMA group in ``layout.hma_groups``
    order (attention: the blocks holding tokens ``0..N-1``; Mamba: the state slots)."""
    _check_shard(layout, shard)
    ids = _check_ids(layout, block_ids, num_tokens)
    region_of = layout.region_of()
    by_layer: dict[int, list[Unit]] = {}
    for group, gids in zip(layout.hma_groups, ids, strict=True):
        if group.kind is LayerKind.ATTENTION:
            keys, off, length, starts = _attention(layout, shard, gids, num_tokens)
        else:
            keys, off, length, starts = _mamba(layout, shard, gids)
        for layer in group.layers:
            by_layer[layer] = _units(layer, region_of[layer], keys, off, length, starts)
    return [u for layer in sorted(by_layer) for u in by_layer[layer]]


def rank_units(spec: HybridModelSpec, layout: EngineLayout, rank: int,
               block_ids: Sequence[Sequence[int]], num_tokens: int) -> list[Unit]:
    """:func:`units_for` with the shard of ``rank`` (:func:`layout.rank_shard`)."""
    return units_for(layout, rank_shard(spec, layout.tp, rank), block_ids, num_tokens)


def request_units(spec: HybridModelSpec, layout: EngineLayout, rank: int,
                  block_ids: Sequence[Sequence[int]], num_tokens: int, *,
                  first_block: int = 0) -> list[Unit]:
    """:func:`rank_units` cut per logical block, keyed by :class:`BlockKey`: what P and D
    compare inside a pair, where D may hold the first blocks of a prompt in its own prefix
    cache and read only the rest.  The attention lists start at the request's logical
    block ``first_block`` and hold ``num_tokens`` tokens from there; Mamba lists as in
    :func:`units_for`.  P digests with ``first_block=0`` (all it computed), D with the
    number of blocks its prefix cache held (``align_request``'s ``k``): the keys of the
    blocks both have are equal whatever each side's kernel block size.  Both sides must
    use the same logical block size.  Sorted by block, then as :func:`units_for`::

        block 256, first_block=1, 300 tokens: K/V of blocks 1 (256 tokens) and 2 (44),
        then the Mamba units (block -1)
    """
    if not isinstance(first_block, int) or first_block < 0:
        raise ValueError(f"first_block must be an int >= 0, got {first_block!r}")
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens <= 0:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    bs = layout.block_size
    blocks = cdiv(num_tokens, bs)
    attention = [g.kind is LayerKind.ATTENTION for g in layout.hma_groups]
    if len(block_ids) != len(attention):
        raise ValueError(f"block ids for {len(block_ids)} KV cache groups, the layout has "
                         f"{len(attention)}")
    for gi, (is_att, ids) in enumerate(zip(attention, block_ids, strict=True)):
        if is_att and len(ids) < blocks:
            raise ValueError(f"attention group {gi} has {len(ids)} blocks, {num_tokens} tokens "
                             f"need {blocks} of {bs}")
    kv: list[Unit] = []
    mamba: list[Unit] = []
    for i in range(blocks):
        ids_i = [[ids[i]] if is_att else ids for is_att, ids in zip(attention, block_ids,
                                                                     strict=True)]
        for u in rank_units(spec, layout, rank, ids_i, min(bs, num_tokens - i * bs)):
            k = u.key
            if k.view in ("K", "V"):
                kv.append(Unit(BlockKey(k.layer, k.view, k.index, first_block + i), u.runs))
            elif i == 0:
                mamba.append(Unit(BlockKey(k.layer, k.view, k.index, -1), u.runs))
    return kv + mamba


def key_holders(spec: HybridModelSpec, tp: int, key: UnitKey) -> tuple[int, ...]:
    """Ranks of a TP=``tp`` engine that hold ``key`` (several when replicated)."""
    total = {"K": spec.num_kv_heads, "V": spec.num_kv_heads, "x": spec.mamba_num_heads,
             "SSM": spec.mamba_num_heads, "B": spec.n_groups, "C": spec.n_groups}[key.view]
    return unit_holders(total, tp, key.index)


def gather(runs: np.ndarray, regions: Sequence[np.ndarray | bytes | bytearray]) -> np.ndarray:
    """The bytes of ``runs`` (``(offset, length, region)`` rows) back to back, read from
    one side's regions (1-D uint8 arrays or bytes-like); ``ValueError`` when a run
    leaves its region."""
    runs = np.asarray(runs, np.int64).reshape(-1, 3)
    if not len(runs):
        return np.empty(0, np.uint8)
    off, length, reg = runs[:, 0], runs[:, 1], runs[:, 2]
    bufs = [r if isinstance(r, np.ndarray) else np.frombuffer(r, np.uint8) for r in regions]
    if reg.min() < 0 or reg.max() >= len(bufs):
        raise ValueError(f"a run names region {int(reg.max())} of {len(bufs)}")
    limit = np.asarray([b.size for b in bufs], np.int64)[reg]
    bad = (off < 0) | (length <= 0) | (off + length > limit)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"run {tuple(runs[i].tolist())} is outside region {int(reg[i])} "
                         f"of {int(limit[i])} bytes")
    total = int(length.sum())
    idx = np.repeat(off - (np.cumsum(length) - length), length) + np.arange(total)
    if (reg == reg[0]).all():  # the usual case: a unit lies in its layer's region
        return bufs[int(reg[0])][idx]
    out = np.empty(total, np.uint8)
    per_byte = np.repeat(reg, length)
    for r in np.unique(reg):
        sel = per_byte == r
        out[sel] = bufs[int(r)][idx[sel]]
    return out


def compare_units(
    prefill: Mapping[int, Mapping[UnitKey, Hashable]],
    decode: Mapping[int, Mapping[UnitKey, Hashable]],
) -> list[UnitMismatch]:
    """Apply the rule of the module doc to digests ``{rank: {key: digest}}``: every D
    rank's unit must equal some P rank's digest of the same key."""
    out = []
    for d_rank in sorted(decode):
        for key, value in decode[d_rank].items():
            have = [(r, p[key]) for r, p in sorted(prefill.items()) if key in p]
            if not any(v == value for _, v in have):
                out.append(UnitMismatch(key, d_rank, tuple(r for r, _ in have)))
    out.sort(key=lambda m: (_sort_key(m.key), m.decode_rank))
    return out


def render_units(units: Sequence[Unit], limit: int = 20) -> str:
    """One line per unit (the first ``limit``): key, bytes, runs, first run."""
    lines = [f"{len(units)} units, {sum(u.nbytes for u in units)} B"]
    for u in units[:limit]:
        first = tuple(u.runs[0].tolist()) if len(u.runs) else ()
        lines.append(f"  {u.key}: {u.nbytes} B in {len(u.runs)} runs, first {first}")
    if len(units) > limit:
        lines.append(f"  ... {len(units) - limit} more")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- checks
def _sort_key(key: UnitKey) -> tuple[int, int, int]:
    return key.layer, _ORDER[key.view], key.index


def _check_shard(layout: EngineLayout, shard: RankShard) -> None:
    spans = {"KV heads": (shard.kv_heads, layout.kv_heads),
             "Mamba heads": (shard.mamba_heads, layout.mamba_heads),
             "groups": (shard.groups, layout.groups)}
    if shard.tp != layout.tp:
        raise ValueError(f"shard is for TP={shard.tp}, the layout for TP={layout.tp}")
    for what, ((lo, hi), per_rank) in spans.items():
        if hi - lo != per_rank:
            raise ValueError(f"rank {shard.rank} holds {what} [{lo}, {hi}) but the layout "
                             f"has {per_rank} per rank")


def _check_ids(layout: EngineLayout, block_ids: Sequence[Sequence[int]],
               num_tokens: int) -> list[np.ndarray]:
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens <= 0:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    if len(block_ids) != len(layout.hma_groups):
        raise ValueError(f"block ids for {len(block_ids)} KV cache groups, the layout has "
                         f"{len(layout.hma_groups)}")
    out = []
    need = cdiv(num_tokens, layout.block_size)
    for gi, (group, ids) in enumerate(zip(layout.hma_groups, block_ids, strict=True)):
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError(f"group {gi}: block ids are not a flat list of ints: {ids!r}")
        arr = arr.astype(np.int64)
        if group.kind is LayerKind.ATTENTION:
            if arr.size < need:
                raise ValueError(f"attention group {gi} has {arr.size} blocks, {num_tokens} "
                                 f"tokens need {need} of {layout.block_size}")
            arr = arr[:need]
        elif not arr.size:
            raise ValueError(f"Mamba group {gi} has no state block")
        if arr.size and (arr.min() < 0 or arr.max() >= layout.num_blocks):
            raise ValueError(f"group {gi}: block id out of range [0, {layout.num_blocks}): "
                             f"{arr.tolist()}")
        out.append(arr)
    return out


# ------------------------------------------------------------------------ generators
# Each returns (keys (view, index), offsets, lengths, unit row bounds) for one HMA group;
# only the region differs between the group's layers.
Rows = tuple[tuple[tuple[str, int], ...], np.ndarray, np.ndarray, np.ndarray]


def _attention(layout: EngineLayout, shard: RankShard, ids: np.ndarray, n: int) -> Rows:
    kb, ratio, heads = layout.kernel_block_size, layout.ratio, layout.kv_heads
    hd = layout.head_dim * layout.kv_dtype_size  # bytes per token and head
    i = np.arange(cdiv(n, kb), dtype=np.int64)
    phys = ids[i // ratio] * ratio + i % ratio
    valid = np.minimum(kb, n - i * kb) * hd  # the last kernel block: valid tokens only
    h = np.arange(heads, dtype=np.int64)
    if layout.fa_layout is FaLayout.PACKED:  # per head [K kb rows | V kb rows]
        head_off, v_off = h * 2 * kb * hd, kb * hd
    else:  # [K|V, heads, kb, hd]
        head_off, v_off = h * kb * hd, heads * kb * hd
    off = (phys * layout.kernel_block_bytes)[None, None, :] \
        + (np.array([0, v_off], np.int64)[:, None] + head_off)[:, :, None]  # (2, heads, kbs)
    length = np.broadcast_to(valid, off.shape)
    h0 = shard.kv_heads[0]
    keys = tuple((v, h0 + j) for v in ("K", "V") for j in range(heads))
    return keys, off.ravel(), length.ravel(), np.arange(len(keys) + 1) * len(i)


def _mamba(layout: EngineLayout, shard: RankShard, ids: np.ndarray) -> Rows:
    keys, off, length, unit_of = _mamba_template(layout, shard)
    page = layout.page_size_bytes
    bounds = np.searchsorted(unit_of, np.arange(len(keys) + 1))
    if len(ids) == 1:
        return keys, off + int(ids[0]) * page, length, bounds
    # Several slots: per unit, slot by slot in list order.
    full = (ids[:, None] * page + off[None, :]).ravel()
    order = np.argsort(np.broadcast_to(unit_of, (len(ids), len(off))).ravel(), kind="stable")
    return keys, full[order], np.tile(length, len(ids))[order], bounds * len(ids)


@lru_cache(maxsize=64)
def _mamba_template(layout: EngineLayout, shard: RankShard) -> tuple[
        tuple[tuple[str, int], ...], np.ndarray, np.ndarray, np.ndarray]:
    """Units of one Mamba page at block 0: keys, run offsets, lengths, unit of each run."""
    dsz, steps, chans = layout.conv_dtype_size, layout.conv_rows, layout.conv_channels
    # byte stride of a channel and of a time step
    cs, ts = (steps * dsz, dsz) if layout.conv_layout is ConvLayout.DS else (dsz, chans * dsz)
    hd, ds, x_ch, bc = layout.mamba_head_dim, layout.d_state, layout.x_channels, layout.bc_channels
    m0, g0 = shard.mamba_heads[0], shard.groups[0]
    keys = [("x", m0 + j) for j in range(layout.mamba_heads)]
    first = [j * hd for j in range(layout.mamba_heads)]
    width = [hd] * layout.mamba_heads
    for view, base in (("B", x_ch), ("C", x_ch + bc)):
        keys += [(view, g0 + j) for j in range(layout.groups)]
        first += [base + j * ds for j in range(layout.groups)]
        width += [ds] * layout.groups
    # channel-major then time, element by element; contiguous neighbours merge below
    unit = np.repeat(np.arange(len(keys)), np.asarray(width) * steps)
    chan = np.repeat(np.asarray(first), width) + _ramps(np.asarray(width))
    elem = (chan[:, None] * cs + np.arange(steps) * ts).ravel()
    off, length, unit = _merge(elem, np.full(elem.size, dsz, np.int64), unit)
    ssm = np.arange(layout.mamba_heads, dtype=np.int64)
    n_conv = len(keys)
    keys += [("SSM", m0 + j) for j in range(layout.mamba_heads)]
    off = np.concatenate([off, layout.ssm_offset + ssm * layout.ssm_head_bytes])
    length = np.concatenate([length, np.full(ssm.size, layout.ssm_head_bytes, np.int64)])
    unit = np.concatenate([unit, n_conv + ssm])
    for arr in (off, length, unit):
        arr.setflags(write=False)  # cached: shared by every call
    return tuple(keys), off, length, unit


def _ramps(width: np.ndarray) -> np.ndarray:
    """``0..w-1`` for every ``w`` in ``width``, back to back."""
    total = int(width.sum())
    return np.arange(total) - np.repeat(np.cumsum(width) - width, width)


def _merge(off: np.ndarray, length: np.ndarray, unit: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Join runs contiguous in memory and in canonical order, never across units."""
    joins = (off[:-1] + length[:-1] == off[1:]) & (unit[:-1] == unit[1:])
    starts = np.flatnonzero(np.concatenate(([True], ~joins)))
    return off[starts], np.add.reduceat(length, starts), unit[starts]


def _units(layer: int, region: int, keys: Sequence[tuple[str, int]], off: np.ndarray,
           length: np.ndarray, bounds: np.ndarray) -> list[Unit]:
    rows = np.empty((len(off), 3), np.int64)
    rows[:, 0], rows[:, 1], rows[:, 2] = off, length, region
    rows.setflags(write=False)
    b = bounds.tolist()
    return [Unit(UnitKey(layer, v, idx), rows[b[k]:b[k + 1]])
            for k, (v, idx) in enumerate(keys)]


__all__ = ["VIEWS", "BlockKey", "Unit", "UnitKey", "UnitMismatch", "compare_units", "gather",
           "key_holders", "rank_units", "render_units", "request_units", "units_for"]
