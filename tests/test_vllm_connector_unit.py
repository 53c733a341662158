"""Pure tests of the glue between vLLM's NIXL worker and our planner
(hybrid_pd.connector.vllm_mapping).  Plain data only: no engines. No GPU or NIXL required.

The tiny hybrid used here is the NemotronH pattern ``M*-M-M*`` (cache layers 0 M, 1 *,
3 M, 5 M, 6 *), float32: HMA groups mamba (0, 5), mamba (3,), attention (1, 6) ->
2 shared tensors; vLLM-CPU block 256 = kernel block; page 262,144 B with conv 9,216 B
+ ssm 131,072 B.
"""

from __future__ import annotations

import pytest

from hybrid_pd.connector import vllm_mapping as vm
from hybrid_pd.planner.layout import build_engine_layout
from hybrid_pd.planner.model_spec import HybridModelSpec, LayerKind
from hybrid_pd.planner.plan import dual_view, peer_templates, plan_request

A, M, X = LayerKind.ATTENTION, LayerKind.MAMBA, LayerKind.OTHER


def tiny_spec() -> HybridModelSpec:
    kinds = [M, A, X, M, X, M, A]
    return HybridModelSpec(
        model_type="nemotron_h", cache_layers=tuple(enumerate(kinds)),
        num_attention_heads=8, num_kv_heads=4, head_dim=32, mamba_num_heads=8,
        mamba_head_dim=64, n_groups=2, d_state=64, conv_kernel=4,
        kv_dtype="float32", conv_dtype="float32", ssm_dtype="float32",
    )


def tiny_layout(num_blocks: int = 40):
    return build_engine_layout(tiny_spec(), 1, kernel_block_size=256, block_size=256,
                               num_blocks=num_blocks)


def test_tiny_layout_matches_the_engine_numbers():
    lay = tiny_layout()
    # attention: 2 * 4 heads * 32 * 4 B = 1024 B/token; 256 tokens -> 262,144 B page
    assert (lay.block_size, lay.page_size_bytes, lay.num_regions) == (256, 262144, 2)
    # conv (8*64 + 2*2*64) * 3 * 4 = 9,216; ssm 8*64*64*4 = 131,072
    assert (lay.conv_bytes, lay.ssm_bytes) == (9216, 131072)


def test_cache_layer_index_by_name_and_kind():
    spec = tiny_spec()
    assert vm.cache_layer_index(spec, "model.layers.5.mixer", M) == 5
    assert vm.cache_layer_index(spec, "model.layers.1.mixer", A) == 1
    with pytest.raises(ValueError, match="decoder layer 1 .* no mamba"):
        vm.cache_layer_index(spec, "model.layers.1.mixer", M)
    with pytest.raises(ValueError, match="no decoder layer number|cannot find"):
        vm.cache_layer_index(spec, "lm_head", A)


def test_group_permutation_reorders_and_refuses_differences():
    groups = tiny_layout().hma_groups  # mamba(0,5), mamba(3), attention(1,6)
    engine = [(A, (1, 6)), (M, (0, 5)), (M, (3,))]
    assert vm.group_permutation(groups, engine) == (2, 0, 1)
    assert vm.reorder(("a", "m05", "m3"), (2, 0, 1)) == ("m05", "m3", "a")
    with pytest.raises(ValueError, match=r"vLLM \[attention \[6, 1\]"):
        vm.group_permutation(groups, [(A, (6, 1)), (M, (0, 5)), (M, (3,))])
    with pytest.raises(ValueError, match="differ"):
        vm.group_permutation(groups, [(A, (1, 6)), (M, (0, 5, 3))])


def test_region_bases_from_layer_storage():
    groups = tiny_layout().hma_groups
    t0, t1 = (0x1000, 100), (0x9000, 100)
    # position 0 of every group: layers 0, 3, 1 -> t0; position 1: layers 5, 6 -> t1
    storage = {0: t0, 3: t0, 1: t0, 5: t1, 6: t1}
    assert vm.region_bases(groups, storage) == ((0x1000, 0x9000), (100, 100))
    with pytest.raises(ValueError, match="HMA region 1: cache layer 6"):
        vm.region_bases(groups, {**storage, 6: t0})
    with pytest.raises(ValueError, match="no KV cache tensor .* layer 3"):
        vm.region_bases(groups, {k: v for k, v in storage.items() if k != 3})


def test_check_measured_layout_names_both_values():
    lay = tiny_layout()
    vm.check_measured_layout(lay, {"page_size_bytes": 262144, "conv_bytes": 9216}, "D")
    with pytest.raises(ValueError, match="conv_bytes: engine 4608, planner 9216"):
        vm.check_measured_layout(lay, {"conv_bytes": 4608}, "D")


def test_remote_region_order():
    names = {"model.layers.0.mixer": 0, "model.layers.1.mixer": 0, "model.layers.5.mixer": 1}
    assert vm.remote_region_order(["model.layers.5.mixer", "model.layers.0.mixer"], names, 2) == (1, 0)
    with pytest.raises(ValueError, match="expected 2"):
        vm.remote_region_order(["model.layers.0.mixer"], names, 2)
    with pytest.raises(ValueError, match="map to planner regions"):
        vm.remote_region_order(["model.layers.0.mixer", "model.layers.1.mixer"], names, 2)


KINDS = (M, M, A)  # planner order of the tiny model's groups


@pytest.mark.parametrize(
    ("d", "p", "cached", "n", "want_d", "want_p", "want_n"),
    [
        # no local hit, 700 tokens, bs 256: 3 FA blocks on each side, one Mamba slot
        (([7], [8], [1, 2, 3]), ([4], [5], [10, 11, 12]), (0, 0, 0), 700,
         ((7,), (8,), (1, 2, 3)), ((4,), (5,), (10, 11, 12)), 700),
        # N-1 prefill at a block edge: P computed 256 tokens in 1 block, D holds 2
        (([7], [8], [1, 2]), ([4], [5], [10]), (0, 0, 0), 256,
         ((7,), (8,), (1,)), ((4,), (5,), (10,)), 256),
        # D prefix hit of 2 blocks: P's first 2 skipped, 700 - 512 = 188 tokens left
        (([7], [8], [3]), ([4], [5], [10, 11, 12]), (0, 0, 2), 700,
         ((7,), (8,), (3,)), ((4,), (5,), (12,)), 188),
        # longer P Mamba list keeps its tail; longer D list its head
        (([7], [8, 9], [1]), ([3, 4], [5], [10]), (0, 0, 0), 9,
         ((7,), (8,), (1,)), ((4,), (5,), (10,)), 9),
    ],
)
def test_align_request(d, p, cached, n, want_d, want_p, want_n):
    got = vm.align_request(kinds=KINDS, decode_block_ids=d, prefill_block_ids=p,
                           decode_cached_blocks=cached, num_tokens=n, block_size=256)
    assert (got.decode_block_ids, got.prefill_block_ids, got.num_tokens) == (want_d, want_p, want_n)


def test_align_request_refusals():
    with pytest.raises(ValueError, match="nothing to read"):
        vm.align_request(kinds=KINDS, decode_block_ids=([1], [2], []), prefill_block_ids=([3], [4], [5]),
                         decode_cached_blocks=(0, 0, 1), num_tokens=200, block_size=256)
    with pytest.raises(ValueError, match="unpairable"):
        vm.align_request(kinds=KINDS, decode_block_ids=([1, 2, 3], [4], [5]),
                         prefill_block_ids=([6], [7], [8]), decode_cached_blocks=(),
                         num_tokens=9, block_size=256)


def test_unknown_num_tokens_reads_p_blocks_whole():
    got = vm.align_request(kinds=KINDS, decode_block_ids=([7], [8], [1, 2]),
                           prefill_block_ids=([4], [5], [10, 11]), decode_cached_blocks=(),
                           num_tokens=None, block_size=256)
    assert got.num_tokens == 512


def test_read_ids_index_the_dual_views_at_the_planned_bytes():
    """Brute-force oracle: every id, looked up in the dual views the worker registers,
    gives exactly the planner's (offset, length, region) descriptor, both sides."""
    spec, lay = tiny_spec(), tiny_layout()
    (tmpl,) = peer_templates(spec, lay, lay, 0)
    local, remote = (list(map(tuple, dual_view(lay, tmpl, side).tolist()))
                     for side in ("local", "remote"))
    # FA section: 2 regions x 1 run x 40 kernel blocks; Mamba: 2 regions x 2 runs x 40
    assert len(local) == 2 * 40 + 2 * 2 * 40
    aligned = vm.align_request(kinds=KINDS, decode_block_ids=([7], [8], [1, 2, 3]),
                               prefill_block_ids=([4], [5], [10, 11, 12]),
                               decode_cached_blocks=(0, 0, 0), num_tokens=699, block_size=256)
    plan = plan_request(spec=spec, decode=lay, prefill=lay, decode_rank=0,
                        decode_block_ids=aligned.decode_block_ids,
                        prefill_block_ids=aligned.prefill_block_ids,
                        num_tokens=aligned.num_tokens, merge=False)
    read = vm.read_from(plan, 0)
    lids, rids = read.local_ids, read.remote_ids
    assert [local[i] for i in lids] == list(plan.reads[0].local)
    assert [remote[i] for i in rids] == list(plan.reads[0].remote)
    # FA: 2 layers x 3 blocks x 262,144 B; Mamba: 3 layers x (9,216 + 131,072) B, no pad
    assert plan.bytes == 2 * 3 * 262144 + 3 * (9216 + 131072)
    # layers 1 and 6 (regions 0, 1) x 3 blocks + layers 0, 5, 3 x (conv, ssm)
    assert len(lids) == 6 + 6
    assert vm.read_from(plan, 1) is None


# -- heterogeneous TP: one local dual view per (D rank, P rank) -------------------------

# vLLM 0.32's TPMapping.all_source_ranks for the tiny model (4 KV heads): D TP2 <- P TP1
# reads from P rank 0 on both D ranks; D TP1 <- P TP2 from P ranks 0 and 1.
UPSTREAM_SOURCES = {(1, 2): {0: (0,), 1: (0,)}, (2, 1): {0: (0, 1)}}


@pytest.mark.parametrize("n_groups", [2, 1])
@pytest.mark.parametrize(("p_tp", "d_tp"), [(1, 2), (2, 1)])
def test_hetero_tp_per_peer_views_cover_the_d_shard_once(p_tp, d_tp, n_groups):
    """For every D rank: the planner's P ranks are vLLM's source ranks; each P rank's
    ids, looked up in the views the worker preps for that peer (local: D's memory,
    remote: that P rank's), give exactly the planned descriptors; and the local bytes of
    all reads together cover each D block's attention bytes and conv + ssm state exactly
    once (never the HMA padding), whatever n_groups (B/C sharded or replicated)."""
    from dataclasses import replace

    spec = replace(tiny_spec(), n_groups=n_groups)
    dl = build_engine_layout(spec, d_tp, kernel_block_size=256, block_size=256, num_blocks=40)
    pl = build_engine_layout(spec, p_tp, kernel_block_size=256, block_size=256, num_blocks=48)
    aligned = vm.align_request(kinds=KINDS, decode_block_ids=([7], [8], [1, 2, 3]),
                               prefill_block_ids=([4], [5], [10, 11, 12]),
                               decode_cached_blocks=(0, 0, 0), num_tokens=699, block_size=256)
    for d_rank in range(d_tp):
        templates = vm.templates_by_rank(peer_templates(spec, dl, pl, d_rank))
        vm.check_source_ranks(templates, UPSTREAM_SOURCES[(p_tp, d_tp)][d_rank], d_rank)
        plan = plan_request(spec=spec, decode=dl, prefill=pl, decode_rank=d_rank,
                            decode_block_ids=aligned.decode_block_ids,
                            prefill_block_ids=aligned.prefill_block_ids,
                            num_tokens=aligned.num_tokens, merge=False)
        assert set(plan.prefill_ranks) == set(templates)  # one READ per P rank
        covered: list[tuple[int, int, int]] = []
        for p_rank, tmpl in templates.items():
            local = list(map(tuple, dual_view(dl, tmpl, "local").tolist()))
            remote = list(map(tuple, dual_view(pl, tmpl, "remote").tolist()))
            (read,) = [r for r in plan.reads if r.prefill_rank == p_rank]
            assert vm.read_from(plan, p_rank) is read
            lids, rids = read.local_ids, read.remote_ids
            assert [local[i] for i in lids] == list(read.local)
            assert [remote[i] for i in rids] == list(read.remote)
            covered += [local[i] for i in lids]
        # exact cover of the D rank's bytes: 2 FA layers x 3 blocks x kernel block,
        # 3 Mamba layers x (conv + ssm) of this D rank's shard
        by_region: dict[int, list[tuple[int, int]]] = {}
        for off, n, region in covered:
            by_region.setdefault(region, []).append((off, off + n))
        for spans in by_region.values():
            spans.sort()
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), "overlap"
        assert sum(n for _, n, _ in covered) == (
            2 * 3 * dl.kernel_block_bytes + 3 * (dl.conv_bytes + dl.ssm_bytes)
        )
        # Mamba: within each state page, the union is exactly conv + ssm
        def union(spans):
            out: list[list[int]] = []
            for a, b in sorted(spans):
                if out and out[-1][1] == a:
                    out[-1][1] = b
                else:
                    out.append([a, b])
            return out

        want = union([(0, dl.conv_bytes), (dl.ssm_offset, dl.ssm_offset + dl.ssm_bytes)])
        # block 7: layers 0, 5 (regions 0, 1); block 8: layer 3 (region 0)
        for blk, region in ((7, 0), (7, 1), (8, 0)):
            base = blk * dl.page_size_bytes
            page = [(off - base, off - base + n) for off, n, r in covered
                    if r == region and base <= off < base + dl.page_size_bytes]
            assert union(page) == want, (blk, region)


def test_check_source_ranks_refuses_a_different_rank_set():
    spec = tiny_spec()
    d1 = build_engine_layout(spec, 1, kernel_block_size=256, block_size=256, num_blocks=40)
    p2 = build_engine_layout(spec, 2, kernel_block_size=256, block_size=256, num_blocks=40)
    templates = vm.templates_by_rank(peer_templates(spec, d1, p2, 0))
    assert sorted(templates) == [0, 1]
    with pytest.raises(NotImplementedError, match=r"reads from P ranks \[0\], the planner from \[0, 1\]"):
        vm.check_source_ranks(templates, (0,), 0)
