"""The TP mapping: for one D rank, which P rank supplies each unit it owns, as runs
inside one kernel block (FA) and one Mamba page (a :class:`PeerTemplate` per P rank).

For every unit the D rank owns (KV head, Mamba head for x and SSM, group for B and C)
:func:`layout.source_rank` names the P rank to read it from; consecutive units from one
P rank become one run.  Equal TP: one FA run covering the kernel block, Mamba ``conv`` +
``ssm``.  Different TP: FA head slices, Mamba ``x``, ``B``, ``C`` (DS conv) + ``ssm``
head slices.
"""

from __future__ import annotations

from hybrid_pd.planner.descs import PeerTemplate, Run
from hybrid_pd.planner.layout import (
    ConvLayout,
    EngineLayout,
    natural_peers,
    rank_shard,
    source_rank,
)
from hybrid_pd.planner.model_spec import HybridModelSpec


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


__all__ = ["peer_templates"]
