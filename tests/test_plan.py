"""Planner tests against the reference resharder.  No GPU or NIXL required.

Every case: shard a random full state into P's layout (HMA pages, padding, DS conv),
replay the plan's reads as memcpy into D's layout, compare every D byte with D's own
sharding, check no byte outside the transferable set (so no padding) is read, and
``bytes == bytes_optimal``, descriptors <= upstream.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from reference_reshard import apply_plan, compare, make_full_state, shard_rank

from hybrid_pd.planner import pair as pair_mod
from hybrid_pd.planner import templates as templates_mod
from hybrid_pd.planner.layout import (
    ConvLayout,
    EngineLayout,
    FaLayout,
    build_engine_layout,
    cdiv,
)
from hybrid_pd.planner.model_spec import HybridModelSpec, LayerKind, spec_from_hf_config
from hybrid_pd.planner.pair import PairPlan
from hybrid_pd.planner.plan import (
    dual_view,
    merge_descs,
    peer_templates,
    plan_request,
    rank_costs,
    render_plan,
    to_addr_descs,
)

HERE = Path(__file__).parent
TINY = json.loads((HERE / "data" / "tiny_nemotron_h_config.json").read_text())
# The public Nemotron-H-8B config's layout fields.
NEMOTRON_8B = json.loads((HERE / "data" / "nemotron-h-8b.config.json").read_text())
TPS = (1, 2, 4, 8)


def block_ids(layout: EngineLayout, num_tokens: int, start: int, stride: int = 1):
    """Attention blocks start, start+stride, ...; then one block per Mamba group."""
    nxt = start
    out = []
    for g in layout.hma_groups:
        n = cdiv(num_tokens, layout.block_size) if g.kind is LayerKind.ATTENTION else 1
        out.append(tuple(nxt + i * stride for i in range(n)))
        nxt += n * stride
    return tuple(out), nxt


def layouts_for(spec, p_tp, d_tp, num_tokens, *, kernel=16, block=None, p_block=None,
                conv=ConvLayout.DS, fa=FaLayout.PACKED, stride=1):
    p0 = build_engine_layout(spec, p_tp, kernel_block_size=kernel, block_size=p_block or block,
                             num_blocks=1, conv_layout=conv, fa_layout=fa)
    d0 = build_engine_layout(spec, d_tp, kernel_block_size=kernel, block_size=block,
                             num_blocks=1, conv_layout=conv, fa_layout=fa)
    # P blocks start at 1 (0 is vLLM's null block); D's at 3 so ids differ per side.
    p_ids, p_end = block_ids(p0, num_tokens, 1, stride)
    d_ids, d_end = block_ids(d0, num_tokens, 3, stride)
    return (replace(p0, num_blocks=p_end + 1), replace(d0, num_blocks=d_end + 2), p_ids, d_ids)


def check_case(spec: HybridModelSpec, p_tp: int, d_tp: int, num_tokens: int, state=None,
               cache: dict | None = None, **kw) -> tuple[int, int, int, int]:
    """Full oracle check; returns (bytes, optimal, descriptors, upstream descriptors)."""
    p, d, p_ids, d_ids = layouts_for(spec, p_tp, d_tp, num_tokens, **kw)
    state = state or make_full_state(spec, num_tokens)
    cache = {} if cache is None else cache

    def sharded(layout, ids, rank, fill_only=False):
        key = (layout.tp, layout.block_size, layout.fa_layout, ids, rank, fill_only)
        if key not in cache:
            cache[key] = shard_rank(spec, layout, rank, state, ids, num_tokens, fill_only)
        return cache[key]

    p_pages = {r: sharded(p, p_ids, r) for r in range(p_tp)}
    totals = [0, 0, 0, 0]
    for rank in range(d_tp):
        plan = plan_request(spec=spec, decode=d, prefill=p, decode_rank=rank,
                            decode_block_ids=d_ids, prefill_block_ids=p_ids,
                            num_tokens=num_tokens)
        pair = PairPlan.build(spec=spec, decode=d, prefill=p, decode_rank=rank)
        assert pair.plan(d_ids, p_ids, num_tokens) == plan, render_plan(plan)
        # D starts as fill only (fresh each time: it is written into).
        actual = shard_rank(spec, d, rank, state, d_ids, num_tokens, fill_only=True)
        apply_plan(plan, actual, p_pages, d, p)
        compare(actual, sharded(d, d_ids, rank), plan)
        costs = rank_costs(spec, d, p, rank, num_tokens)
        assert plan.bytes == costs.bytes_optimal, render_plan(plan)
        assert plan.descriptors <= costs.descriptors_upstream, render_plan(plan)
        totals[0] += plan.bytes
        totals[1] += costs.bytes_optimal
        totals[2] += plan.descriptors
        totals[3] += costs.descriptors_upstream
    return tuple(totals)


def permitted(spec: HybridModelSpec) -> list[tuple[int, int]]:
    def ok(tp):
        try:
            build_engine_layout(spec, tp, num_blocks=1)
            return True
        except ValueError:
            return False

    good = [t for t in TPS if ok(t)]
    return list(itertools.product(good, good))


# ----------------------------------------------------------------------------------
# Tiny NemotronH: every permitted (P, D) pair, token counts around block edges.
# Tiny at TP1, kernel 16: attn 1 token = 2*4*32*2 = 512 B; conv (512+2*64)*3*2 = 3840 B;
# ssm 8*64*64*4 = 131072 B; block = 16*cdiv(134912, 16*512) = 16*17 = 272, page
# 272*512 = 139264 B, padding 4352 B.
# ----------------------------------------------------------------------------------
TINY_SPEC = spec_from_hf_config(TINY)


def test_tiny_layout_hand_arithmetic() -> None:
    lay = build_engine_layout(TINY_SPEC, 1)
    assert (lay.conv_bytes, lay.ssm_bytes) == (3840, 131072)
    assert lay.block_size == 272 and lay.page_size_bytes == 139264
    assert lay.padding_bytes == 139264 - 134912 == 4352
    # Mamba layers 0, 2, 5 and attention 3, 6: 3 is not < 1.5*2, so group_size 2:
    # Mamba groups (0, 5), (2,) and attention (3, 6) -> 3 groups over 2 shared regions.
    assert lay.num_regions == 2
    assert [g.layers for g in lay.hma_groups] == [(0, 5), (2,), (3, 6)]


TINY_CASES = [(p, d) for p, d in permitted(TINY_SPEC)]


@pytest.mark.parametrize(("p_tp", "d_tp"), TINY_CASES)
def test_tiny_reshard_exact(p_tp: int, d_tp: int) -> None:
    assert len(TINY_CASES) == 16  # n_groups=1 and 4 KV heads: TP 1..8 all permitted
    for n in (1, 15, 16, 17, 271, 272, 273, 600):
        state = make_full_state(TINY_SPEC, n, seed=n)
        b, opt, descs, up = check_case(TINY_SPEC, p_tp, d_tp, n, state=state)
        assert b == opt and descs <= up


@pytest.mark.parametrize("fa", [FaLayout.PACKED, FaLayout.SPLIT])
@pytest.mark.parametrize("stride", [1, 2])
def test_tiny_split_layout_and_scattered_blocks(fa: FaLayout, stride: int) -> None:
    # Scattered block ids (stride 2) must never merge across blocks.
    for p_tp, d_tp in ((1, 1), (2, 1), (1, 4), (4, 2), (8, 2)):
        check_case(TINY_SPEC, p_tp, d_tp, 550, fa=fa, stride=stride)


def test_sd_equal_tp_is_planned_and_different_tp_refused() -> None:
    check_case(TINY_SPEC, 2, 2, 300, conv=ConvLayout.SD)
    p, d, p_ids, d_ids = layouts_for(TINY_SPEC, 2, 1, 300, conv=ConvLayout.SD)
    with pytest.raises(ValueError, match="VLLM_SSM_CONV_STATE_LAYOUT=DS"):
        plan_request(spec=TINY_SPEC, decode=d, prefill=p, decode_rank=0,
                     decode_block_ids=d_ids, prefill_block_ids=p_ids, num_tokens=300)


def test_different_logical_block_sizes_are_planned() -> None:
    # P keeps the aligned 272, D runs --block-size 544 (2 kernel-16 ratios differ: 17 vs 34).
    for p_tp, d_tp in ((1, 1), (2, 1), (1, 2)):
        for n in (200, 272, 273, 545, 700):
            check_case(TINY_SPEC, p_tp, d_tp, n, block=544, p_block=None)
            check_case(TINY_SPEC, p_tp, d_tp, n, block=None, p_block=544)


def test_different_kernel_block_sizes_refused() -> None:
    p = build_engine_layout(TINY_SPEC, 1, kernel_block_size=16, num_blocks=8)
    d = build_engine_layout(TINY_SPEC, 1, kernel_block_size=32, num_blocks=8)
    ids = ((1, 2), (3,))
    with pytest.raises(ValueError, match="kernel block sizes differ"):
        plan_request(spec=TINY_SPEC, decode=d, prefill=p, decode_rank=0,
                     decode_block_ids=ids, prefill_block_ids=ids, num_tokens=300)


def test_same_tp_merges_to_one_descriptor_per_layer() -> None:
    # TP1->TP1, N=600: attention blocks 3,4,5 (272 tokens each) are consecutive on both
    # sides -> one run per attention layer (2); Mamba conv|ssm adjacent -> 1 per layer (3).
    p, d, p_ids, d_ids = layouts_for(TINY_SPEC, 1, 1, 600)
    plan = plan_request(spec=TINY_SPEC, decode=d, prefill=p, decode_rank=0,
                        decode_block_ids=d_ids, prefill_block_ids=p_ids, num_tokens=600)
    assert plan.descriptors == 5, render_plan(plan)
    # ceil(600/16) = 38 kernel blocks of 16*512 = 8192 B, 2 layers; 3 * 134912 Mamba.
    assert plan.bytes == 2 * 38 * 8192 + 3 * 134912
    unmerged = plan_request(spec=TINY_SPEC, decode=d, prefill=p, decode_rank=0,
                            decode_block_ids=d_ids, prefill_block_ids=p_ids,
                            num_tokens=600, merge=False)
    # 2 layers * 38 kernel blocks + 3 layers * (conv, ssm)
    assert unmerged.descriptors == 2 * 38 + 3 * 2
    assert unmerged.bytes == plan.bytes


def test_three_conv_plus_ssm_descriptors_when_tp_differs() -> None:
    # Tiny P TP1 -> D TP2, 1 token: per Mamba layer x, B, C, ssm = 4 descriptors; B and C
    # of the single group are replicated, both D ranks read group 0 from P rank 0.
    p, d, p_ids, d_ids = layouts_for(TINY_SPEC, 1, 2, 1)
    plan = plan_request(spec=TINY_SPEC, decode=d, prefill=p, decode_rank=1,
                        decode_block_ids=d_ids, prefill_block_ids=p_ids, num_tokens=1,
                        merge=False)
    (read,) = plan.reads
    # 2 attention layers * 1 kernel block (D's 2 heads of P's 4) + 3 Mamba layers * 4
    assert len(read.local) == 2 * 1 + 3 * 4, render_plan(plan)
    names = [r.name for r in peer_templates(TINY_SPEC, d, p, 1)[0].mamba_runs]
    assert names == ["x", "B", "C", "ssm"]
    # x of D rank 1 = heads 4..7 of P: P offset 4 heads * 64 ch * 3 rows * 2 B = 1536,
    # length 1536 too; region 0 holds Mamba layer 0 at P block p_ids[0][0].
    assert (p_ids[0][0] * p.page_size_bytes + 1536, 1536, 0) in read.remote
    # ssm of heads 4..7: P offset conv 3840 + 4 * 64*64*4 = 69376, length 65536.
    assert (p_ids[0][0] * p.page_size_bytes + 69376, 65536, 0) in read.remote


def test_dual_view_ids_match_descriptors() -> None:
    for p_tp, d_tp in ((1, 1), (2, 1), (1, 2), (4, 8)):
        p, d, p_ids, d_ids = layouts_for(TINY_SPEC, p_tp, d_tp, 300)
        for rank in range(d_tp):
            plan = plan_request(spec=TINY_SPEC, decode=d, prefill=p, decode_rank=rank,
                                decode_block_ids=d_ids, prefill_block_ids=p_ids,
                                num_tokens=300, merge=False)
            templates = {t.prefill_rank: t for t in peer_templates(TINY_SPEC, d, p, rank)}
            for read in plan.reads:
                t = templates[read.prefill_rank]
                lv, rv = dual_view(d, t, "local").tolist(), dual_view(p, t, "remote").tolist()
                assert [tuple(lv[i]) for i in read.local_ids] == list(read.local)
                assert [tuple(rv[i]) for i in read.remote_ids] == list(read.remote)


def test_merge_descs_requires_both_sides_contiguous() -> None:
    loc = [(0, 10, 0), (10, 10, 0), (20, 5, 0), (25, 5, 1)]
    rem = [(100, 10, 2), (110, 10, 2), (200, 5, 2), (205, 5, 2)]
    assert merge_descs(loc, rem) == (((0, 20, 0), (20, 5, 0), (25, 5, 1)),
                                     ((100, 20, 2), (200, 5, 2), (205, 5, 2)))


def test_to_addr_descs() -> None:
    out = to_addr_descs([(8, 4, 1)], [1000, 2000], [100, 100], dev=3)
    assert out.dtype == np.uint64 and out.tolist() == [[2008, 4, 3]]
    with pytest.raises(ValueError, match="outside region 1"):
        to_addr_descs([(98, 4, 1)], [1000, 2000], [100, 100])
    with pytest.raises(ValueError, match="overlap"):
        to_addr_descs([(0, 4, 0)], [1000, 1050], [100, 100])


# ----------------------------------------------------------------------------------
# Nemotron-H-8B (its public config).  TP1: attn 2*8*128*2 = 4096 B/token; Mamba
# 61,440 + 4,194,304 = 4,255,744 B -> block 16*cdiv(4,255,744, 65,536) = 1040,
# page 1040*4096 = 4,259,840 B, padding 4,096 B.
# ----------------------------------------------------------------------------------
SPEC_8B = spec_from_hf_config(NEMOTRON_8B)


def test_8b_hand_numbers() -> None:
    lay = build_engine_layout(SPEC_8B, 1)
    assert (lay.conv_bytes, lay.ssm_bytes) == (61440, 4194304)
    assert (lay.block_size, lay.page_size_bytes, lay.padding_bytes) == (1040, 4259840, 4096)
    # 24 Mamba, 4 attention: group_size 4 -> 1 + 6 groups, 4 shared regions.
    assert lay.num_regions == 4 and len(lay.hma_groups) == 7
    p, d, p_ids, d_ids = layouts_for(SPEC_8B, 1, 1, 1000)
    costs = rank_costs(SPEC_8B, d, p, 0, 1000)
    # FA: ceil(1000/16) = 63 kernel blocks * 65,536 B * 4 layers; Mamba 24 * 4,255,744.
    assert costs.bytes_optimal == 63 * 65536 * 4 + 24 * 4255744 == 118652928
    # Upstream: 65 kernel blocks (the whole logical block) per layer.
    assert costs.bytes_upstream == 65 * 65536 * 4 + 24 * 4255744
    assert costs.bytes_padded == (4 + 24) * 4259840


@pytest.mark.slow
def test_8b_reshard_all_tp_pairs() -> None:
    assert len(permitted(SPEC_8B)) == 16
    for n in (1000, 1041):
        state = make_full_state(SPEC_8B, n, seed=n)
        cache: dict = {}
        for p_tp, d_tp in permitted(SPEC_8B):
            b, opt, descs, up = check_case(SPEC_8B, p_tp, d_tp, n, state=state, cache=cache)
            assert b == opt and descs <= up


# ----------------------------------------------------------------------------------
# Random hybrid configs (hypothesis, seeded by the database-less derandomize setting).
# ----------------------------------------------------------------------------------
@st.composite
def random_specs(draw) -> HybridModelSpec:
    kinds = draw(st.lists(st.sampled_from("M*-"), min_size=2, max_size=9))
    assume("M" in kinds and "*" in kinds)
    heads = draw(st.sampled_from([4, 8, 16]))
    n_groups = draw(st.sampled_from([g for g in (1, 2, 4, 8) if heads % g == 0]))
    cfg = {
        "model_type": "nemotron_h",
        "hybrid_override_pattern": "".join(kinds),
        "num_attention_heads": 8,
        "num_key_value_heads": draw(st.sampled_from([1, 2, 4, 8])),
        "head_dim": draw(st.sampled_from([8, 16, 32])),
        "mamba_num_heads": heads,
        "mamba_head_dim": draw(st.sampled_from([2, 4, 8])),
        "n_groups": n_groups,
        "ssm_state_size": draw(st.sampled_from([2, 4, 8])),
        "conv_kernel": draw(st.sampled_from([2, 3, 4])),
    }
    return spec_from_hf_config(
        cfg,
        kv_dtype=draw(st.sampled_from(["bfloat16", "float32", "fp8"])),
        ssm_dtype=draw(st.sampled_from(["float32", "bfloat16"])),
    )


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(spec=random_specs(), kernel=st.sampled_from([2, 4, 16]), data=st.data(),
       fa=st.sampled_from(list(FaLayout)))
def test_random_configs_reshard_exact(spec, kernel, data, fa) -> None:
    pairs = []
    for p_tp, d_tp in itertools.product(TPS, TPS):
        try:
            build_engine_layout(spec, p_tp, kernel_block_size=kernel, num_blocks=1)
            build_engine_layout(spec, d_tp, kernel_block_size=kernel, num_blocks=1)
        except ValueError:
            continue
        pairs.append((p_tp, d_tp))
    assume(pairs)
    block = build_engine_layout(spec, 1, kernel_block_size=kernel, num_blocks=1).block_size
    n = data.draw(st.sampled_from([1, kernel - 1 or 1, kernel, kernel + 1, block - 1 or 1,
                                   block, block + 1, 2 * block + kernel // 2]))
    state = make_full_state(spec, n, seed=n)
    cache: dict = {}
    for p_tp, d_tp in pairs:
        check_case(spec, p_tp, d_tp, n, state=state, cache=cache, kernel=kernel, fa=fa)


# ----------------------------------------------------------------------------------
# Corrupted metadata: a clear ValueError, never an out-of-region descriptor.
# ----------------------------------------------------------------------------------
def _base(p_tp: int = 2, d_tp: int = 1, n: int = 300):
    return layouts_for(TINY_SPEC, p_tp, d_tp, n) + (n,)


CORRUPTIONS = [
    ("prefill num_blocks too small", lambda p, d, pi, di: (replace(p, num_blocks=2), d, pi, di),
     "out of range"),
    ("prefill page size", lambda p, d, pi, di: (replace(p, page_size_bytes=p.page_size_bytes + 8),
                                                d, pi, di), "page_size_bytes"),
    ("prefill block size", lambda p, d, pi, di: (replace(p, block_size=p.block_size * 2),
                                                 d, pi, di), "page_size_bytes|block_size"),
    ("decode conv bytes", lambda p, d, pi, di: (p, replace(d, conv_bytes=d.conv_bytes - 2),
                                                pi, di), "conv_bytes"),
    ("negative block id", lambda p, d, pi, di: (p, d, ((-1,) + pi[0][1:],) + pi[1:], di),
     "out of range"),
    ("too few attention blocks", lambda p, d, pi, di: (p, d, pi, tuple(
        ids[:0] if g.kind is LayerKind.ATTENTION else ids
        for g, ids in zip(d.hma_groups, di, strict=True))), "need"),
    ("duplicate block", lambda p, d, pi, di: (p, d, (pi[0], pi[0]) + pi[2:], di),
     "appears twice"),
    ("missing group", lambda p, d, pi, di: (p, d, pi[:-1], di), "KV cache groups"),
]


@pytest.mark.parametrize(("name", "corrupt", "message"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupted_metadata_raises(name, corrupt, message) -> None:
    p, d, p_ids, d_ids, n = _base()
    p, d, p_ids, d_ids = corrupt(p, d, p_ids, d_ids)
    with pytest.raises(ValueError, match=message):
        plan_request(spec=TINY_SPEC, decode=d, prefill=p, decode_rank=0, decode_block_ids=d_ids,
                     prefill_block_ids=p_ids, num_tokens=n)


def test_short_registered_region_raises() -> None:
    p, d, p_ids, d_ids, n = _base()
    lens = {0: (p.region_bytes,) * p.num_regions, 1: (p.region_bytes - 1, p.region_bytes)}
    with pytest.raises(ValueError, match="prefill rank 1: region 0 is"):
        plan_request(spec=TINY_SPEC, decode=d, prefill=p, decode_rank=0, decode_block_ids=d_ids,
                     prefill_block_ids=p_ids, num_tokens=n, prefill_region_lens=lens)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    p_tp=st.sampled_from(TPS), d_tp=st.sampled_from(TPS), n=st.integers(1, 900),
    field=st.sampled_from(["num_blocks", "page_size_bytes", "block_size", "kernel_block_size",
                           "ssm_bytes", "kv_heads", "region_len", "block_id", "num_tokens",
                           "decode_rank", "none"]),
    delta=st.integers(-5, 5), side=st.sampled_from(["p", "d"]),
)
def test_fuzzed_metadata_never_leaves_regions(p_tp, d_tp, n, field, delta, side) -> None:
    """Any mutation either raises ValueError or yields descriptors inside the TRUE
    regions: lengths from the layouts built before mutating (a region length mutated
    upwards is a claim, not memory, so it never widens what the check allows)."""
    p, d, p_ids, d_ids = layouts_for(TINY_SPEC, p_tp, d_tp, n)
    true_d = (d.region_bytes,) * d.num_regions
    true_p = (p.region_bytes,) * p.num_regions
    lay = p if side == "p" else d
    lens = None
    rank = 0
    if field in ("num_blocks", "page_size_bytes", "block_size", "kernel_block_size",
                 "ssm_bytes", "kv_heads"):
        lay = replace(lay, **{field: getattr(lay, field) + delta})
    elif field == "region_len":
        lens = (lay.region_bytes + delta * 4096,) * lay.num_regions
    elif field == "block_id":
        ids = p_ids if side == "p" else d_ids
        bumped = tuple(tuple(b + delta * lay.num_blocks // 3 for b in g) for g in ids)
        p_ids, d_ids = (bumped, d_ids) if side == "p" else (p_ids, bumped)
    elif field == "num_tokens":
        n = n + delta * 300
    elif field == "decode_rank":
        rank = delta
    p, d = (lay, d) if side == "p" else (p, lay)
    try:
        plan = plan_request(
            spec=TINY_SPEC, decode=d, prefill=p, decode_rank=rank, decode_block_ids=d_ids,
            prefill_block_ids=p_ids, num_tokens=n, decode_region_lens=lens if side == "d" else None,
            prefill_region_lens=None if side == "d" or lens is None else dict.fromkeys(range(p_tp), lens),
        )
    except ValueError as exc:
        assert str(exc), "errors must say what is wrong"
        return
    for read in plan.reads:
        for off, length, region in read.local:
            assert off >= 0 and length > 0 and off + length <= true_d[region], render_plan(plan)
        for off, length, region in read.remote:
            assert off >= 0 and length > 0 and off + length <= true_p[region], render_plan(plan)


# ----------------------------------------------------------------------------------
# PairPlan: pair-level work once at build, per request only block ids.
# ----------------------------------------------------------------------------------
def _tp_pairs(spec: HybridModelSpec, kernel: int) -> list[tuple[int, int]]:
    def ok(tp):
        try:
            build_engine_layout(spec, tp, kernel_block_size=kernel, num_blocks=1)
            return True
        except ValueError:
            return False

    good = [t for t in TPS if ok(t)]
    return list(itertools.product(good, good))


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(spec=random_specs(), kernel=st.sampled_from([2, 4, 16]),
       fa=st.sampled_from(list(FaLayout)))
def test_pair_plan_reused_across_requests_equals_plan_request(spec, kernel, fa) -> None:
    """One PairPlan per (D rank, P TP), many requests: each equals plan_request."""
    pairs = _tp_pairs(spec, kernel)
    assume(pairs)
    block = build_engine_layout(spec, 1, kernel_block_size=kernel, num_blocks=1).block_size
    sizes = (1, kernel + 1, block, 2 * block + kernel // 2)
    for p_tp, d_tp in pairs:
        # Layouts sized for the largest request; smaller ones use a prefix of its blocks.
        p, d, _, _ = layouts_for(spec, p_tp, d_tp, max(sizes), kernel=kernel, fa=fa)
        for rank in range(d_tp):
            pair = PairPlan.build(spec=spec, decode=d, prefill=p, decode_rank=rank)
            assert pair.templates == peer_templates(spec, d, p, rank)
            for n in sizes:
                p_ids, _ = block_ids(p, n, 1)
                d_ids, _ = block_ids(d, n, 3)
                for merge in (True, False):
                    want = plan_request(spec=spec, decode=d, prefill=p, decode_rank=rank,
                                        decode_block_ids=d_ids, prefill_block_ids=p_ids,
                                        num_tokens=n, merge=merge)
                    assert pair.plan(d_ids, p_ids, n, merge=merge) == want, render_plan(want)


def _pair_kw(p_tp: int = 2, d_tp: int = 1, **kw):
    p, d, p_ids, d_ids = layouts_for(TINY_SPEC, p_tp, d_tp, 300, **kw)
    return dict(spec=TINY_SPEC, decode=d, prefill=p, decode_rank=0), p_ids, d_ids


def _kb32(kw):
    d = build_engine_layout(TINY_SPEC, kw["decode"].tp, kernel_block_size=32,
                            num_blocks=kw["decode"].num_blocks)
    return {**kw, "decode": d}


PAIR_ERRORS = [
    ("decode TP not permitted", lambda kw: {**kw, "decode": replace(kw["decode"], tp=3)},
     "KV heads \\(4\\) is not divisible by TP=3"),
    ("prefill layout corrupted",
     lambda kw: {**kw, "prefill": replace(kw["prefill"], page_size_bytes=8)},
     "prefill layout: layout field page_size_bytes"),
    ("decode rank out of range", lambda kw: {**kw, "decode_rank": 1},
     "decode rank 1 out of range for TP=1"),
    ("kernel block sizes differ", _kb32, "kernel block sizes differ"),
    ("conv layouts differ", lambda kw: {**kw, "decode": build_engine_layout(
        TINY_SPEC, 1, num_blocks=kw["decode"].num_blocks, conv_layout=ConvLayout.SD)},
     "conv state layouts differ"),
    ("FA layouts differ", lambda kw: {**kw, "decode": build_engine_layout(
        TINY_SPEC, 1, num_blocks=kw["decode"].num_blocks, fa_layout=FaLayout.SPLIT)},
     "attention KV layouts differ"),
    ("SD conv with different TP", lambda kw: _pair_kw(2, 1, conv=ConvLayout.SD)[0],
     "VLLM_SSM_CONV_STATE_LAYOUT=DS"),
    ("short decode region", lambda kw: {**kw, "decode_region_lens": (
        kw["decode"].region_bytes - 1,) * kw["decode"].num_regions},
     "decode rank 0: region 0 is"),
    ("decode region count", lambda kw: {**kw, "decode_region_lens": (kw["decode"].region_bytes,)},
     "decode rank 0: 1 registered regions, the layout has 2"),
    ("short prefill region", lambda kw: {**kw, "prefill_region_lens": {
        1: (kw["prefill"].region_bytes, 7)}}, "prefill rank 1: region 1 is 7 bytes"),
]


@pytest.mark.parametrize(("name", "corrupt", "message"), PAIR_ERRORS,
                         ids=[c[0] for c in PAIR_ERRORS])
def test_pair_level_errors_raise_at_build(name, corrupt, message) -> None:
    kw, p_ids, d_ids = _pair_kw()
    kw = corrupt(kw)
    with pytest.raises(ValueError, match=message):
        PairPlan.build(**kw)
    # plan_request reports the same text.
    with pytest.raises(ValueError, match=message):
        plan_request(**kw, decode_block_ids=d_ids, prefill_block_ids=p_ids, num_tokens=300)


def test_request_level_errors_raise_at_plan_not_build() -> None:
    kw, p_ids, d_ids = _pair_kw()
    pair = PairPlan.build(**kw)
    with pytest.raises(ValueError, match="num_tokens must be a positive int"):
        pair.plan(d_ids, p_ids, 0)
    with pytest.raises(ValueError, match="appears twice"):
        pair.plan(d_ids, (p_ids[0], p_ids[0]) + p_ids[2:], 300)
    with pytest.raises(ValueError, match="Mamba group 0: 1 decode blocks but 2 prefill"):
        spare = kw["prefill"].num_blocks - 1  # layouts_for leaves the last block free
        pair.plan(d_ids, ((p_ids[0][0], spare),) + p_ids[1:], 300)
    assert pair.plan(d_ids, p_ids, 300).bytes > 0  # the pair is still usable


def test_per_request_plan_skips_pair_level_work(monkeypatch) -> None:
    kw, p_ids, d_ids = _pair_kw(2, 4)
    pairs = [PairPlan.build(**{**kw, "decode_rank": r}) for r in range(4)]
    want = [plan_request(**{**kw, "decode_rank": r}, decode_block_ids=d_ids,
                         prefill_block_ids=p_ids, num_tokens=n)
            for r in range(4) for n in (1, 300)]

    def boom(*_a, **_k):
        raise AssertionError("pair-level work in the per-request path")

    for mod, name in ((pair_mod, "peer_templates"), (pair_mod, "validate_layout"),
                      (pair_mod, "check_tp"), (pair_mod, "_check_regions"),
                      (templates_mod, "peer_templates"), (templates_mod, "rank_shard"),
                      (templates_mod, "source_rank")):
        monkeypatch.setattr(mod, name, boom)
    got = [pair.plan(d_ids, p_ids, n) for pair in pairs for n in (1, 300)]
    assert got == want


def test_prefill_regions_default_until_set() -> None:
    kw, p_ids, d_ids = _pair_kw(2, 1)
    p = kw["prefill"]
    pair = PairPlan.build(**kw)
    assert [t.prefill_rank for t in pair.templates] == [0, 1]
    assert pair.template(1) is pair.templates[1] and pair.template(5) is None
    default = (p.region_bytes,) * p.num_regions
    assert pair.prefill_lens(0) == pair.prefill_lens(1) == default
    before = pair.plan(d_ids, p_ids, 300)
    assert before == plan_request(**kw, decode_block_ids=d_ids, prefill_block_ids=p_ids,
                                  num_tokens=300, prefill_region_lens={0: default})
    bigger = (p.region_bytes + 4096,) * p.num_regions
    pair.set_prefill_regions(1, bigger)
    assert pair.prefill_lens(1) == bigger and pair.prefill_lens(0) == default
    assert pair.plan(d_ids, p_ids, 300) == before
    with pytest.raises(ValueError, match="prefill rank 0: region 0 is"):
        pair.set_prefill_regions(0, (p.region_bytes - 1,) * p.num_regions)
    assert pair.prefill_lens(0) == default  # a refused update leaves the old lengths
    with pytest.raises(ValueError, match="prefill rank 2 out of range for TP=2"):
        pair.set_prefill_regions(2, default)


def test_region_lens_of_a_non_peer_rank_are_ignored_at_build() -> None:
    # P TP2 -> D TP2: D rank 0 reads only P rank 0, as plan_request always did.
    kw, p_ids, d_ids = _pair_kw(2, 2)
    pair = PairPlan.build(**kw, prefill_region_lens={1: (1,)})
    assert [t.prefill_rank for t in pair.templates] == [0]
    assert pair.plan(d_ids, p_ids, 300) == plan_request(
        **kw, decode_block_ids=d_ids, prefill_block_ids=p_ids, num_tokens=300,
        prefill_region_lens={1: (1,)})
