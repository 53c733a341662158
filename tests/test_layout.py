"""Layout math: shards, HMA unification, groups.  No GPU or NIXL required.

Exhaustive small grids against brute force, hand arithmetic in comments.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_pd.planner.layout import (
    build_engine_layout,
    hma_block_size,
    hma_groups,
    natural_peers,
    rank_shard,
    shard_units,
    source_rank,
    unit_holders,
    vllm_cpu_block_sizes,
)
from hybrid_pd.planner.model_spec import spec_from_hf_config

TINY = spec_from_hf_config(
    json.loads((Path(__file__).parent / "data" / "tiny_nemotron_h_config.json").read_text())
)


@pytest.mark.parametrize(("total", "tp"), [(t, p) for t in (1, 2, 4, 8) for p in (1, 2, 4, 8)])
def test_shards_cover_every_unit_evenly(total: int, tp: int) -> None:
    # Brute force: every unit is held by exactly max(1, tp // total) ranks, the ranges
    # have size max(1, total // tp), and unit_holders agrees with shard_units.
    held = {u: [] for u in range(total)}
    for r in range(tp):
        lo, hi = shard_units(total, tp, r)
        assert hi - lo == max(1, total // tp)
        for u in range(lo, hi):
            held[u].append(r)
    for u, ranks in held.items():
        assert len(ranks) == max(1, tp // total)
        assert tuple(ranks) == unit_holders(total, tp, u)


def test_shard_table() -> None:
    # total=4, tp=2: rank0 [0,2) rank1 [2,4); total=2, tp=8: ranks 0..3 [0,1), 4..7 [1,2)
    assert [shard_units(4, 2, r) for r in range(2)] == [(0, 2), (2, 4)]
    assert [shard_units(2, 8, r) for r in range(8)] == [(0, 1)] * 4 + [(1, 2)] * 4
    with pytest.raises(ValueError, match="not divisible"):
        shard_units(6, 4, 0)


@pytest.mark.parametrize(("p_tp", "d_tp"), list(itertools.product((1, 2, 4, 8), repeat=2)))
def test_source_rank_holds_the_unit(p_tp: int, d_tp: int) -> None:
    for total, d in itertools.product((1, 2, 4, 8, 16), range(d_tp)):
        for u in range(*shard_units(total, d_tp, d)):  # the units this D rank owns
            src = source_rank(total, d_tp, p_tp, d, u)
            assert src in unit_holders(total, p_tp, u)
            if p_tp <= total and d_tp <= total:  # fully sharded: upstream's pairing
                assert src in natural_peers(d_tp, p_tp, d)


def test_hma_block_size_matches_vllm_formula() -> None:
    # Nemotron-H-8B TP1: 16 * cdiv(4,255,744, 16 * 4096) = 16 * 65 = 1040
    assert hma_block_size(attn_page_size_1_token=4096, mamba_page_size=4255744,
                          kernel_block_size=16, block_size=16) == 1040
    # user block 128 (alignment max(16, 128)): 128 * cdiv(4,255,744, 128*4096) = 128 * 9
    assert hma_block_size(attn_page_size_1_token=4096, mamba_page_size=4255744,
                          kernel_block_size=16, block_size=128) == 1152
    # already large enough: kept
    assert hma_block_size(attn_page_size_1_token=4096, mamba_page_size=4255744,
                          kernel_block_size=16, block_size=2048) == 2048


def test_cpu_platform_block_size() -> None:
    # vLLM-CPU: block 128 and kernel MultipleOf(32): tiny TP1 attn 512 B/token, Mamba
    # 134,912 B -> 128 * cdiv(134,912, 65,536) = 384; the kernel block is the same.
    assert vllm_cpu_block_sizes(TINY, 1) == 384
    lay = build_engine_layout(TINY, 1, kernel_block_size=384, block_size=384)
    assert lay.ratio == 1 and lay.page_size_bytes == 384 * 512


def test_tiny_shards_per_tp() -> None:
    # TP8: KV heads 4 -> 1 per rank, replicated on 2 ranks; groups 1 -> replicated.
    s = rank_shard(TINY, 8, 5)
    assert s.kv_heads == (2, 3) and s.mamba_heads == (5, 6) and s.groups == (0, 1)
    lay = build_engine_layout(TINY, 8)
    # conv (64 + 2*64) * 3 * 2 = 1152, ssm 1*64*64*4 = 16384; attn 2*1*32*2 = 128 B/token
    assert (lay.conv_bytes, lay.ssm_bytes, lay.attn_bytes_per_token) == (1152, 16384, 128)
    assert lay.block_size == 16 * -(-(1152 + 16384) // (16 * 128)) == 144


def test_groups_nemotron_8b_style() -> None:
    cfg = {"model_type": "nemotron_h", "num_attention_heads": 4, "head_dim": 8,
           "hybrid_override_pattern": "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
           "mamba_num_heads": 8, "mamba_head_dim": 4, "n_groups": 1, "ssm_state_size": 4,
           "conv_kernel": 4}
    groups = hma_groups(spec_from_hf_config(cfg))
    # 24 Mamba / 4 attention: group_size 4; Mamba groups layers[i::6]; 7 groups.
    assert len(groups) == 7 and all(len(g.layers) == 4 for g in groups)


def test_refusals() -> None:
    with pytest.raises(ValueError, match="Mamba heads"):
        build_engine_layout(TINY, 16)
    with pytest.raises(ValueError, match="n_groups=2 is not divisible by TP=4"):
        build_engine_layout(TINY.__class__(**{**TINY.__dict__, "n_groups": 2}), 4)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(attn=st.integers(1, 1 << 14), mamba=st.integers(1, 1 << 24),
       kernel=st.sampled_from([1, 2, 16, 32, 64]), pre=st.sampled_from([None, 16, 64, 128, 1000]))
def test_hma_page_covers_mamba(attn: int, mamba: int, kernel: int, pre: int | None) -> None:
    # FA page >= Mamba state, a multiple of the kernel block, and minimal in kernel steps.
    pre = pre or kernel
    block = hma_block_size(attn_page_size_1_token=attn, mamba_page_size=mamba,
                           kernel_block_size=kernel, block_size=pre)
    assert block * attn >= mamba and block >= pre
    if pre <= kernel:
        assert block % kernel == 0 and (block - kernel) * attn < mamba or block == pre
