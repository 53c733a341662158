"""Descriptor planner: which bytes one decode (D) rank reads from which prefill (P)
ranks for one request.  Pure (house rule 1): plain data in, frozen tuples out.

A descriptor is ``(offset, length, region)``: ``offset`` bytes into registered region
``region`` (shared HMA tensor ``region`` of that rank, see :mod:`layout`).
:func:`to_addr_descs` turns them into NIXL's ``(addr, len, dev)`` rows.

How a request is planned (generators are the only code that branches on layer kind or
layout, house rule 2):

1. :func:`peer_templates` - the TP mapping.  For every unit the D rank owns (KV head,
   Mamba head for x and SSM, group for B and C) :func:`layout.source_rank` names the P
   rank to read it from; consecutive units from one P rank become one run.  A template
   lists, per P rank, the runs inside one kernel block (FA) and inside one Mamba page.
   Equal TP: one FA run covering the kernel block, Mamba ``conv`` + ``ssm``.  Different
   TP: FA head slices, Mamba ``x``, ``B``, ``C`` (DS conv) + ``ssm`` head slices.
2. :func:`plan_request` - walks the request's blocks.  FA by *kernel* blocks, and only
   the ``ceil(N / kernel_block)`` that hold computed tokens; kernel block i is
   ``ids[i // ratio] * ratio + i % ratio`` with each side's *own* ratio (the remote
   ratio for remote ids).  Mamba by logical blocks (one whole state per block).
3. Adjacent descriptors contiguous on both sides are merged (``merge=True``).
4. Every descriptor is bounds-checked against its region before it is returned.

Dual views (for executors that prep the descriptor lists once per peer, upstream
style): per (D rank, P rank) pair, both sides index the same template:
``FA id = (region * n_fa_runs + run) * N_phys + kernel_block`` (``num_fa =
regions * n_fa_runs * N_phys``), ``Mamba id = (region * n_mamba_runs + run) * N_logical
+ block + num_fa``.  :func:`dual_view` materialises one side; every read carries the
unmerged ids.

Different block sizes: P and D may have different *logical* (HMA) block sizes - that
happens whenever their page sizes differ, e.g. KV heads replicated on one side only -
and they are planned exactly, since kernel block i holds tokens
``[i*kb, (i+1)*kb)`` on both sides.  Different *kernel* block sizes are refused: a
kernel block is head-major (``[heads, kb, K|V]``), so the same token lands at a
different stride per head, and the transfer would need one descriptor per head per
overlapping token run, or a staging permute - neither is a plain READ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hybrid_pd.planner.layout import (
    ConvLayout,
    EngineLayout,
    FaLayout,
    cdiv,
    check_tp,
    natural_peers,
    rank_shard,
    source_rank,
    validate_layout,
)
from hybrid_pd.planner.model_spec import HybridModelSpec, LayerKind

Desc = tuple[int, int, int]  # (offset_in_region, length, region)


@dataclass(frozen=True)
class Run:
    """One contiguous run inside a block-page, the same bytes on both sides."""

    name: str  # "kv", "k", "v", "conv", "ssm", "x", "B", "C" (rendering only)
    local_offset: int
    remote_offset: int
    length: int


@dataclass(frozen=True)
class PeerTemplate:
    """What one D rank reads from one P rank inside one kernel block / Mamba page."""

    prefill_rank: int
    fa_runs: tuple[Run, ...]  # offsets within a kernel block
    mamba_runs: tuple[Run, ...]  # offsets within a page


@dataclass(frozen=True)
class ReadPlan:
    prefill_rank: int
    local: tuple[Desc, ...]
    remote: tuple[Desc, ...]
    # Unmerged transfer units as ids into the dual views (same order on both sides).
    local_ids: tuple[int, ...]
    remote_ids: tuple[int, ...]

    @property
    def bytes(self) -> int:
        return sum(d[1] for d in self.local)

    @property
    def descriptors(self) -> int:
        return len(self.local)


@dataclass(frozen=True)
class RequestPlan:
    decode_rank: int
    decode_tp: int
    prefill_tp: int
    num_tokens: int
    num_kernel_blocks: int  # FA kernel blocks read per attention layer
    reads: tuple[ReadPlan, ...]
    merged: bool

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.reads)

    @property
    def descriptors(self) -> int:
        return sum(r.descriptors for r in self.reads)

    @property
    def prefill_ranks(self) -> tuple[int, ...]:
        return tuple(r.prefill_rank for r in self.reads)


# ---------------------------------------------------------------------------------
# TP mapping -> templates
# ---------------------------------------------------------------------------------


def _runs_by_source(
    total: int,
    d_range: tuple[int, int],
    decode_tp: int,
    prefill_tp: int,
    decode_rank: int,
) -> dict[int, list[tuple[int, int]]]:
    """Split the D rank's unit range into maximal runs read from one P rank each."""
    out: dict[int, list[tuple[int, int]]] = {}
    lo, hi = d_range
    u = lo
    while u < hi:
        src = source_rank(total, decode_tp, prefill_tp, decode_rank, u)
        v = u + 1
        while v < hi and source_rank(total, decode_tp, prefill_tp, decode_rank, v) == src:
            v += 1
        out.setdefault(src, []).append((u, v))
        u = v
    return out


def _unit_runs(
    name: str,
    total: int,
    unit_bytes: int,
    local_base: int,
    remote_base: int,
    spec_tp: tuple[int, int, int],
    ranges: tuple[tuple[int, int], dict[int, tuple[int, int]]],
    into: dict[int, list[Run]],
) -> None:
    """Runs for one unit-sharded part (heads or groups) of a page or kernel block."""
    decode_tp, prefill_tp, decode_rank = spec_tp
    d_range, p_ranges = ranges
    for src, spans in _runs_by_source(total, d_range, decode_tp, prefill_tp, decode_rank).items():
        p_lo = p_ranges[src][0]
        for a, b in spans:
            into.setdefault(src, []).append(
                Run(
                    name,
                    local_base + (a - d_range[0]) * unit_bytes,
                    remote_base + (a - p_lo) * unit_bytes,
                    (b - a) * unit_bytes,
                )
            )


def peer_templates(
    spec: HybridModelSpec, decode: EngineLayout, prefill: EngineLayout, decode_rank: int
) -> tuple[PeerTemplate, ...]:
    """The TP mapping for one D rank: per P rank, the runs it supplies."""
    if decode.conv_layout is not prefill.conv_layout:
        raise ValueError(
            f"conv state layouts differ (D {decode.conv_layout.value}, P "
            f"{prefill.conv_layout.value}); set VLLM_SSM_CONV_STATE_LAYOUT=DS on both"
        )
    if decode.fa_layout is not prefill.fa_layout:
        raise ValueError(
            f"attention KV layouts differ (D {decode.fa_layout.value}, P {prefill.fa_layout.value})"
        )
    d_tp, p_tp = decode.tp, prefill.tp
    if d_tp != p_tp and decode.conv_layout is ConvLayout.SD:
        raise ValueError(
            f"prefill TP={p_tp} and decode TP={d_tp} differ but the conv state layout is SD, "
            "where a rank's x/B/C slice is strided; set VLLM_SSM_CONV_STATE_LAYOUT=DS on "
            "both engines"
        )
    natural_peers(d_tp, p_tp, decode_rank)  # validates divisibility
    fa: dict[int, list[Run]] = {}
    mamba: dict[int, list[Run]] = {}
    if d_tp == p_tp:
        # Same sharding: the whole kernel block and the whole conv | ssm state.
        fa[decode_rank] = [Run("kv", 0, 0, decode.kernel_block_bytes)]
        mamba[decode_rank] = [
            Run("conv", 0, 0, decode.conv_bytes),
            Run("ssm", decode.ssm_offset, prefill.ssm_offset, decode.ssm_bytes),
        ]
    else:
        tps = (d_tp, p_tp, decode_rank)
        d_shard = rank_shard(spec, d_tp, decode_rank)
        p_shards = {r: rank_shard(spec, p_tp, r) for r in range(p_tp)}
        kv = (d_shard.kv_heads, {r: s.kv_heads for r, s in p_shards.items()})
        heads = (d_shard.mamba_heads, {r: s.mamba_heads for r, s in p_shards.items()})
        groups = (d_shard.groups, {r: s.groups for r, s in p_shards.items()})
        for (name, d_off), (_, p_off) in zip(decode.fa_parts, prefill.fa_parts, strict=True):
            _unit_runs(name, spec.num_kv_heads, decode.fa_head_run_bytes, d_off, p_off,
                       tps, kv, fa)
        d_conv, p_conv = decode.conv_part_offsets(), prefill.conv_part_offsets()
        for (name, d_off, unit), (_, p_off, _) in zip(d_conv, p_conv, strict=True):
            if name == "x":
                _unit_runs(name, spec.mamba_num_heads, unit, d_off, p_off, tps, heads, mamba)
            else:
                _unit_runs(name, spec.n_groups, unit, d_off, p_off, tps, groups, mamba)
        _unit_runs("ssm", spec.mamba_num_heads, decode.ssm_head_bytes, decode.ssm_offset,
                   prefill.ssm_offset, tps, heads, mamba)
    ranks = sorted(set(fa) | set(mamba))
    return tuple(
        PeerTemplate(r, tuple(fa.get(r, ())), tuple(mamba.get(r, ()))) for r in ranks
    )


# ---------------------------------------------------------------------------------
# Request planning
# ---------------------------------------------------------------------------------


def _check_block_ids(
    layout: EngineLayout, block_ids: Sequence[Sequence[int]], who: str, num_tokens: int
) -> tuple[tuple[int, ...], ...]:
    groups = layout.hma_groups
    if len(block_ids) != len(groups):
        raise ValueError(
            f"{who}: got block ids for {len(block_ids)} KV cache groups, the model has "
            f"{len(groups)} ({', '.join(g.kind.value for g in groups)})"
        )
    seen: dict[int, int] = {}
    out = []
    for gi, (group, ids) in enumerate(zip(groups, block_ids, strict=True)):
        ids = tuple(ids)
        for b in ids:
            if not isinstance(b, int) or isinstance(b, bool):
                raise ValueError(f"{who}: group {gi} block id {b!r} is not an int")
            if not 0 <= b < layout.num_blocks:
                raise ValueError(
                    f"{who}: group {gi} ({group.kind.value}) block id {b} out of range "
                    f"[0, {layout.num_blocks})"
                )
            if b in seen:
                raise ValueError(
                    f"{who}: block id {b} appears twice (groups {seen[b]} and {gi}); HMA "
                    "groups share one block pool, so a block belongs to one group"
                )
            seen[b] = gi
        if group.kind is LayerKind.ATTENTION:
            need = cdiv(num_tokens, layout.block_size)
            if len(ids) < need:
                raise ValueError(
                    f"{who}: attention group {gi} has {len(ids)} blocks but {num_tokens} "
                    f"tokens need {need} blocks of {layout.block_size}"
                )
        elif not ids:
            raise ValueError(f"{who}: Mamba group {gi} has no block for the request's state")
        out.append(ids)
    return tuple(out)


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


def _check_desc(d: Desc, lens: tuple[int, ...], who: str, what: str) -> None:
    off, length, region = d
    if not 0 <= region < len(lens):
        raise ValueError(f"{who}: descriptor {d} for {what} names region {region} of {len(lens)}")
    if off < 0 or length <= 0 or off + length > lens[region]:
        raise ValueError(
            f"{who}: descriptor (offset={off}, length={length}, region={region}) for {what} "
            f"is outside region {region} of {lens[region]} bytes"
        )


def merge_descs(
    local: Sequence[Desc], remote: Sequence[Desc]
) -> tuple[tuple[Desc, ...], tuple[Desc, ...]]:
    """Merge neighbours that are contiguous on both sides (same region, end == start)."""
    out_l: list[Desc] = []
    out_r: list[Desc] = []
    for dl, dr in zip(local, remote, strict=True):
        if out_l:
            pl, pr = out_l[-1], out_r[-1]
            if (
                pl[2] == dl[2]
                and pr[2] == dr[2]
                and pl[0] + pl[1] == dl[0]
                and pr[0] + pr[1] == dr[0]
            ):
                out_l[-1] = (pl[0], pl[1] + dl[1], pl[2])
                out_r[-1] = (pr[0], pr[1] + dr[1], pr[2])
                continue
        out_l.append(dl)
        out_r.append(dr)
    return tuple(out_l), tuple(out_r)


def plan_request(
    *,
    spec: HybridModelSpec,
    decode: EngineLayout,
    prefill: EngineLayout,
    decode_rank: int,
    decode_block_ids: Sequence[Sequence[int]],
    prefill_block_ids: Sequence[Sequence[int]],
    num_tokens: int,
    decode_region_lens: Sequence[int] | None = None,
    prefill_region_lens: Mapping[int, Sequence[int]] | None = None,
    merge: bool = True,
) -> RequestPlan:
    """Plan one request's reads for one D rank.

    ``*_block_ids``: one list per HMA group, in ``layout.hma_groups`` order.  Attention
    groups: the logical blocks holding tokens ``0..N-1`` in order.  Mamba groups: the
    block(s) holding the state (vLLM's default ``mamba_cache_mode='none'`` keeps one);
    paired one to one between P and D.  ``num_tokens``: tokens whose state P computed.
    ``*_region_lens``: registered region sizes (from the handshake for P); default the
    layout's ``num_blocks * page``.
    """
    check_tp(spec, decode.tp)
    check_tp(spec, prefill.tp)
    validate_layout(spec, decode, "decode layout")
    validate_layout(spec, prefill, "prefill layout")
    if not 0 <= decode_rank < decode.tp:
        raise ValueError(f"decode rank {decode_rank} out of range for TP={decode.tp}")
    if not isinstance(num_tokens, int) or num_tokens <= 0:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    if decode.kernel_block_size != prefill.kernel_block_size:
        raise ValueError(
            f"kernel block sizes differ (P {prefill.kernel_block_size}, D "
            f"{decode.kernel_block_size}): kernel blocks are head-major, so a token sits at "
            "a different per-head stride and no set of plain READs maps one onto the other; "
            "run both engines with the same attention backend / kernel block size"
        )
    d_ids = _check_block_ids(decode, decode_block_ids, "decode", num_tokens)
    p_ids = _check_block_ids(prefill, prefill_block_ids, "prefill", num_tokens)
    for gi, g in enumerate(decode.hma_groups):
        if g.kind is LayerKind.MAMBA and len(d_ids[gi]) != len(p_ids[gi]):
            raise ValueError(
                f"Mamba group {gi}: {len(d_ids[gi])} decode blocks but {len(p_ids[gi])} "
                "prefill blocks; states are paired one to one"
            )
    d_lens = _check_regions(decode, decode_region_lens, f"decode rank {decode_rank}")

    templates = peer_templates(spec, decode, prefill, decode_rank)
    kb = decode.kernel_block_size
    n_kb = cdiv(num_tokens, kb)
    region_of = decode.region_of()
    reads: list[ReadPlan] = []
    for t in templates:
        p_lens = _check_regions(
            prefill,
            None if prefill_region_lens is None else prefill_region_lens.get(t.prefill_rank),
            f"prefill rank {t.prefill_rank}",
        )
        local: list[Desc] = []
        remote: list[Desc] = []
        lids: list[int] = []
        rids: list[int] = []
        what: list[str] = []
        n_fa_runs, n_m_runs = len(t.fa_runs), len(t.mamba_runs)
        d_num_fa = decode.num_regions * n_fa_runs * decode.num_phys_blocks
        p_num_fa = prefill.num_regions * n_fa_runs * prefill.num_phys_blocks
        for gi, group in enumerate(decode.hma_groups):
            for layer in group.layers:
                region = region_of[layer]
                if group.kind is LayerKind.ATTENTION:
                    for i in range(n_kb):
                        d_phys = d_ids[gi][i // decode.ratio] * decode.ratio + i % decode.ratio
                        p_phys = (
                            p_ids[gi][i // prefill.ratio] * prefill.ratio + i % prefill.ratio
                        )
                        for ri, run in enumerate(t.fa_runs):
                            local.append(
                                (d_phys * decode.kernel_block_bytes + run.local_offset,
                                 run.length, region)
                            )
                            remote.append(
                                (p_phys * prefill.kernel_block_bytes + run.remote_offset,
                                 run.length, region)
                            )
                            lids.append((region * n_fa_runs + ri) * decode.num_phys_blocks + d_phys)
                            rids.append(
                                (region * n_fa_runs + ri) * prefill.num_phys_blocks + p_phys
                            )
                            what.append(f"layer {layer} {run.name} kernel block {i}")
                else:
                    for d_blk, p_blk in zip(d_ids[gi], p_ids[gi], strict=True):
                        for ri, run in enumerate(t.mamba_runs):
                            local.append(
                                (d_blk * decode.page_size_bytes + run.local_offset,
                                 run.length, region)
                            )
                            remote.append(
                                (p_blk * prefill.page_size_bytes + run.remote_offset,
                                 run.length, region)
                            )
                            lids.append(
                                (region * n_m_runs + ri) * decode.num_blocks + d_blk + d_num_fa
                            )
                            rids.append(
                                (region * n_m_runs + ri) * prefill.num_blocks + p_blk + p_num_fa
                            )
                            what.append(f"layer {layer} {run.name} block {d_blk}<-{p_blk}")
        # Bounds: every unit descriptor, before merging (so the message names the layer).
        for dl, dr, w in zip(local, remote, what, strict=True):
            _check_desc(dl, d_lens, f"decode rank {decode_rank}", w)
            _check_desc(dr, p_lens, f"prefill rank {t.prefill_rank}", w)
        if merge:
            out_l, out_r = merge_descs(local, remote)
        else:
            out_l, out_r = tuple(local), tuple(remote)
        # Re-check what actually leaves the planner.
        for dl, dr in zip(out_l, out_r, strict=True):
            _check_desc(dl, d_lens, f"decode rank {decode_rank}", "merged run")
            _check_desc(dr, p_lens, f"prefill rank {t.prefill_rank}", "merged run")
        if out_l:
            reads.append(ReadPlan(t.prefill_rank, out_l, out_r, tuple(lids), tuple(rids)))
    return RequestPlan(
        decode_rank=decode_rank,
        decode_tp=decode.tp,
        prefill_tp=prefill.tp,
        num_tokens=num_tokens,
        num_kernel_blocks=n_kb,
        reads=tuple(reads),
        merged=merge,
    )


# ---------------------------------------------------------------------------------
# Dual views and executor helpers
# ---------------------------------------------------------------------------------


def dual_view(
    layout: EngineLayout, template: PeerTemplate, side: str
) -> tuple[Desc, ...]:
    """All descriptors of one side's dual view for one (D rank, P rank) pair, in id
    order (FA section, then Mamba).  ``side`` is ``"local"`` (D) or ``"remote"`` (P).
    Sized ``regions * runs * blocks``: meant for prepping once per peer."""
    if side not in ("local", "remote"):
        raise ValueError(f"side must be 'local' or 'remote', got {side!r}")
    out: list[Desc] = []
    for region in range(layout.num_regions):
        for run in template.fa_runs:
            off = run.local_offset if side == "local" else run.remote_offset
            for p in range(layout.num_phys_blocks):
                out.append((p * layout.kernel_block_bytes + off, run.length, region))
    for region in range(layout.num_regions):
        for run in template.mamba_runs:
            off = run.local_offset if side == "local" else run.remote_offset
            for b in range(layout.num_blocks):
                out.append((b * layout.page_size_bytes + off, run.length, region))
    return tuple(out)


def to_addr_descs(
    descs: Sequence[Desc], region_bases: Sequence[int], region_lens: Sequence[int], dev: int = 0
) -> tuple[tuple[int, int, int], ...]:
    """``(offset, len, region)`` -> NIXL ``(addr, len, dev)``, checked against the
    registered regions (bases must be non-negative and regions must not overlap)."""
    if len(region_bases) != len(region_lens):
        raise ValueError(
            f"{len(region_bases)} region bases but {len(region_lens)} region lengths"
        )
    spans = sorted(zip(region_bases, region_lens, strict=True))
    for (b0, n0), (b1, _) in zip(spans, spans[1:], strict=False):
        if b0 < 0 or b0 + n0 > b1:
            raise ValueError(f"registered regions overlap or have a negative base: {spans}")
    if spans and spans[0][0] < 0:
        raise ValueError(f"negative region base {spans[0][0]}")
    lens = tuple(region_lens)
    out = []
    for d in descs:
        _check_desc(d, lens, "to_addr_descs", "executor")
        out.append((region_bases[d[2]] + d[0], d[1], dev))
    return tuple(out)


# ---------------------------------------------------------------------------------
# Accounting and rendering
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankCosts:
    """Reference byte / descriptor counts for one D rank (see planner.cli for the JSON)."""

    bytes_optimal: int
    bytes_padded: int
    bytes_upstream: int
    descriptors_upstream: int


def rank_costs(
    spec: HybridModelSpec,
    decode: EngineLayout,
    prefill: EngineLayout,
    decode_rank: int,
    num_tokens: int,
    mamba_blocks_per_group: int = 1,
) -> RankCosts:
    """Optimal: FA ``ceil(N/kb)`` kernel blocks x the D rank's heads, Mamba its conv +
    ssm share.  Padded: whole D pages of the same blocks.  Upstream (vLLM 0.32): every
    kernel block of every logical block, per-peer runs unmerged (FA one per head slice,
    two in the split layout; Mamba conv + ssm at equal TP, x/B/C + ssm otherwise)."""
    templates = peer_templates(spec, decode, prefill, decode_rank)
    n_fa = len(spec.attention_layers)
    n_mamba = len(spec.mamba_layers)
    kb = decode.kernel_block_size
    n_kb = cdiv(num_tokens, kb)
    n_logical = cdiv(num_tokens, decode.block_size)
    kb_bytes_owned = decode.kernel_block_bytes  # the rank's heads, K and V
    mamba_bytes = decode.mamba_state_bytes
    fa_runs = sum(len(t.fa_runs) for t in templates)
    m_runs = sum(len(t.mamba_runs) for t in templates)
    return RankCosts(
        bytes_optimal=n_fa * n_kb * kb_bytes_owned + n_mamba * mamba_blocks_per_group * mamba_bytes,
        bytes_padded=(n_fa * n_logical + n_mamba * mamba_blocks_per_group)
        * decode.page_size_bytes,
        bytes_upstream=n_fa * n_logical * decode.ratio * kb_bytes_owned
        + n_mamba * mamba_blocks_per_group * mamba_bytes,
        descriptors_upstream=n_fa * n_logical * decode.ratio * fa_runs
        + n_mamba * mamba_blocks_per_group * m_runs,
    )


def render_plan(plan: RequestPlan, max_descs: int = 8) -> str:
    """Text rendering for logs and assertion messages (house rule 4)."""
    lines = [
        f"RequestPlan D rank {plan.decode_rank}/{plan.decode_tp} <- P TP {plan.prefill_tp}: "
        f"{plan.num_tokens} tokens, {plan.num_kernel_blocks} kernel blocks per attention "
        f"layer, {plan.bytes} B in {plan.descriptors} descriptors"
        f"{' (merged)' if plan.merged else ''}"
    ]
    for r in plan.reads:
        lines.append(
            f"  read P rank {r.prefill_rank}: {r.bytes} B, {r.descriptors} descriptors "
            f"({len(r.local_ids)} unmerged)"
        )
        for dl, dr in list(zip(r.local, r.remote, strict=True))[:max_descs]:
            lines.append(
                f"    D region {dl[2]} +{dl[0]} <- P region {dr[2]} +{dr[0]} len {dl[1]}"
            )
        if r.descriptors > max_descs:
            lines.append(f"    ... {r.descriptors - max_descs} more")
    return "\n".join(lines)


__all__ = [
    "Desc",
    "FaLayout",
    "PeerTemplate",
    "RankCosts",
    "ReadPlan",
    "RequestPlan",
    "Run",
    "dual_view",
    "merge_descs",
    "peer_templates",
    "plan_request",
    "rank_costs",
    "render_plan",
    "to_addr_descs",
]
