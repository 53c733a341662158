"""Layout-independent integrity units.  No GPU or NIXL required.

Two oracles:

* Content oracle: random logical content (K/V per token and head, conv channels x
  steps, SSM per head) is scattered into a rank's regions by code written here from
  the module doc of :mod:`layout` (numpy views, not the unit runs); every unit gathered
  from those regions must be exactly its logical bytes, and the units of a rank must
  cover exactly the scattered bytes, each once.  Any TP, FA / conv layout, kernel and
  logical block size, Mamba slots.
* Transfer: P's regions random, D's regions other random bytes, the REAL planner's
  descriptors replayed as memcpy; each side digests its own units from its own layout
  and :func:`compare_units` must find nothing -- then with a planted planner bug it must
  name exactly the damaged (layer, view, index), D rank and P rank.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from hybrid_pd.planner import pair as pair_mod
from hybrid_pd.planner.descs import PeerTemplate, Run
from hybrid_pd.planner.integrity_units import (
    VIEWS,
    UnitKey,
    compare_units,
    gather,
    key_holders,
    rank_units,
    render_units,
    units_for,
)
from hybrid_pd.planner.layout import (
    ConvLayout,
    EngineLayout,
    FaLayout,
    build_engine_layout,
    cdiv,
    rank_shard,
)
from hybrid_pd.planner.model_spec import HybridModelSpec, LayerKind, spec_from_hf_config
from hybrid_pd.planner.plan import plan_request

DATA = Path(__file__).parent / "data"
TINY = spec_from_hf_config(json.loads((DATA / "tiny_nemotron_h_config.json").read_text()))
TINY_G2 = replace(TINY, n_groups=2)  # B/C sharded at TP2 (TINY's n_groups=1 replicates them)
SPEC_8B = spec_from_hf_config(json.loads((DATA / "nemotron-h-8b.config.json").read_text()))
TPS = (1, 2, 4, 8)
SIZES = (1, 15, 16, 17, 271, 272, 273, 600)


def allowed_tps(spec: HybridModelSpec) -> list[int]:
    out = []
    for tp in TPS:
        try:
            build_engine_layout(spec, tp, num_blocks=1)
        except ValueError:
            continue
        out.append(tp)
    return out


def make_layout(spec, tp, n, *, start=1, slots=1, shuffle=None, kernel=16, block=None,
                conv=ConvLayout.DS, fa=FaLayout.PACKED) -> tuple[EngineLayout, tuple]:
    """Layout sized for one request: attention blocks from ``start`` (in shuffled order
    when ``shuffle`` is a seed), then ``slots`` blocks per Mamba group."""
    lay = build_engine_layout(spec, tp, kernel_block_size=kernel, block_size=block,
                              num_blocks=1, conv_layout=conv, fa_layout=fa)
    ids, nxt = [], start
    for g in lay.hma_groups:
        k = cdiv(n, lay.block_size) if g.kind is LayerKind.ATTENTION else slots
        blocks = list(range(nxt, nxt + k))
        if shuffle is not None and g.kind is LayerKind.ATTENTION:
            np.random.RandomState(shuffle).shuffle(blocks)
        ids.append(tuple(blocks))
        nxt += k
    return replace(lay, num_blocks=nxt + 1), tuple(ids)


def all_keys(spec: HybridModelSpec) -> set[UnitKey]:
    per_view = {"K": spec.num_kv_heads, "V": spec.num_kv_heads, "x": spec.mamba_num_heads,
                "B": spec.n_groups, "C": spec.n_groups, "SSM": spec.mamba_num_heads}
    out = set()
    for layer, (_, kind) in enumerate(spec.cache_layers):
        views = {LayerKind.ATTENTION: "KV", LayerKind.MAMBA: ("x", "B", "C", "SSM")}.get(kind, ())
        out |= {UnitKey(layer, v, i) for v in views for i in range(per_view[v])}
    return out


# ----------------------------------------------------------------------------------
# Content oracle
# ----------------------------------------------------------------------------------
@dataclass
class Content:
    k: dict[int, np.ndarray]  # layer -> (tokens, kv heads, head_dim bytes)
    v: dict[int, np.ndarray]
    conv: dict[int, np.ndarray]  # layer -> (slots, conv_dim, steps, dsz) global [x|B|C]
    ssm: dict[int, np.ndarray]  # layer -> (slots, heads, head_dim*d_state*dsz)

    def expected(self, spec: HybridModelSpec, key: UnitKey) -> bytes:
        layer, view, i = key
        if view in "KV":
            return (self.k if view == "K" else self.v)[layer][:, i].tobytes()
        if view == "SSM":
            return self.ssm[layer][:, i].tobytes()
        hd, ds, inter = spec.mamba_head_dim, spec.d_state, spec.intermediate_size
        lo = {"x": i * hd, "B": inter + i * ds, "C": inter + (spec.n_groups + i) * ds}[view]
        return self.conv[layer][:, lo:lo + (hd if view == "x" else ds)].tobytes()


def make_content(spec: HybridModelSpec, n: int, slots: int, seed: int) -> Content:
    rng = np.random.default_rng(seed)

    def rnd(*shape):
        return rng.integers(0, 256, shape, dtype=np.uint8)

    hd = spec.head_dim * spec.kv_dtype_size
    ssm = spec.mamba_head_dim * spec.d_state * spec.ssm_dtype_size
    return Content(
        k={la: rnd(n, spec.num_kv_heads, hd) for la in spec.attention_layers},
        v={la: rnd(n, spec.num_kv_heads, hd) for la in spec.attention_layers},
        conv={la: rnd(slots, spec.conv_dim, spec.conv_kernel - 1, spec.conv_dtype_size)
              for la in spec.mamba_layers},
        ssm={la: rnd(slots, spec.mamba_num_heads, ssm) for la in spec.mamba_layers},
    )


def _owned(total: int, tp: int, rank: int) -> list[int]:
    """Global units of a rank, written independently of layout.shard_units."""
    if tp <= total:
        return list(range(rank * total // tp, (rank + 1) * total // tp))
    return [rank * total // tp]


def scatter(spec, lay: EngineLayout, rank: int, content: Content, ids, n: int, seed: int):
    """One rank's regions: noise, then the content where vLLM keeps it; also a mask
    of the bytes written (the same placement run on boolean buffers)."""
    rng = np.random.default_rng(seed)
    regions = [rng.integers(0, 256, lay.region_bytes, dtype=np.uint8)
               for _ in range(lay.num_regions)]
    masks = [np.zeros(lay.region_bytes, bool) for _ in range(lay.num_regions)]
    for group, gids in zip(lay.hma_groups, ids, strict=True):
        place = _place_attention if group.kind is LayerKind.ATTENTION else _place_mamba
        for pos, layer in enumerate(group.layers):
            place(spec, lay, rank, content, layer, np.asarray(gids), n, regions[pos], False)
            place(spec, lay, rank, content, layer, np.asarray(gids), n, masks[pos], True)
    return regions, masks


def _place_attention(spec, lay, rank, content, layer, gids, n, buf, mask) -> None:
    kv = _owned(spec.num_kv_heads, lay.tp, rank)
    kb, hd = lay.kernel_block_size, spec.head_dim * spec.kv_dtype_size
    t = np.arange(n)
    phys = (gids[t // lay.block_size] * lay.ratio + (t % lay.block_size) // kb)[:, None]
    row, hl = (t % kb)[:, None], np.arange(len(kv))[None, :]
    for half, src in enumerate((content.k[layer], content.v[layer])):
        val = True if mask else src[:, kv]  # (tokens, heads, hd)
        if lay.fa_layout is FaLayout.PACKED:  # [heads, K|V, kb, hd] per kernel block
            buf.reshape(-1, len(kv), 2, kb, hd)[phys, hl, half, row] = val
        else:  # [K|V, heads, kb, hd]
            buf.reshape(-1, 2, len(kv), kb, hd)[phys, half, hl, row] = val


def _place_mamba(spec, lay, rank, content, layer, gids, n, buf, mask) -> None:
    heads = _owned(spec.mamba_num_heads, lay.tp, rank)
    groups = _owned(spec.n_groups, lay.tp, rank)
    hd, ds, inter = spec.mamba_head_dim, spec.d_state, spec.intermediate_size
    chans = [h * hd + c for h in heads for c in range(hd)]  # rank-local [x | B | C]
    chans += [inter + g * ds + s for g in groups for s in range(ds)]
    chans += [inter + (spec.n_groups + g) * ds + s for g in groups for s in range(ds)]
    for slot, blk in enumerate(gids.tolist()):
        page = buf[blk * lay.page_size_bytes:(blk + 1) * lay.page_size_bytes]
        conv = content.conv[layer][slot][chans]  # (channels, steps, dsz)
        if lay.conv_layout is ConvLayout.SD:
            conv = conv.transpose(1, 0, 2)
        page[:lay.conv_bytes] = True if mask else conv.ravel()
        page[lay.conv_bytes:lay.mamba_state_bytes] = (
            True if mask else content.ssm[layer][slot][heads].ravel())


def covered(units, lay: EngineLayout) -> list[np.ndarray]:
    counts = [np.zeros(lay.region_bytes, np.int64) for _ in range(lay.num_regions)]
    for u in units:
        for off, length, region in u.runs.tolist():
            counts[region][off:off + length] += 1
    return counts


def check_content(spec, lay, n, content, ids, seed=0) -> None:
    for rank in range(lay.tp):
        regions, masks = scatter(spec, lay, rank, content, ids, n, seed + rank)
        units = rank_units(spec, lay, rank, ids, n)
        for u in units:
            got = gather(u.runs, regions).tobytes()
            assert got == content.expected(spec, u.key), f"{u.key} {lay.describe()}"
        for count, mask in zip(covered(units, lay), masks, strict=True):
            assert count.max() <= 1, f"units overlap ({lay.describe()})"
            assert np.array_equal(count == 1, mask), f"coverage != content ({lay.describe()})"


@pytest.mark.parametrize("spec", [TINY, TINY_G2], ids=["g1", "g2"])
@pytest.mark.parametrize("fa", list(FaLayout))
@pytest.mark.parametrize("conv", list(ConvLayout))
@pytest.mark.parametrize(("kernel", "block"), [(16, None), (32, None), (16, 544)])
def test_units_gather_logical_content(spec, fa, conv, kernel, block) -> None:
    for n, slots in ((1, 1), (17, 2), (273, 1), (600, 1)):
        content = make_content(spec, n, slots, seed=n)
        for tp in allowed_tps(spec):
            lay, ids = make_layout(spec, tp, n, start=2, slots=slots, shuffle=n, kernel=kernel,
                                   block=block, conv=conv, fa=fa)
            check_content(spec, lay, n, content, ids, seed=tp)


@pytest.mark.parametrize("tp", allowed_tps(TINY))
def test_every_token_count_around_block_edges(tp: int) -> None:
    for n in SIZES:
        lay, ids = make_layout(TINY, tp, n, start=1)
        check_content(TINY, lay, n, make_content(TINY, n, 1, seed=n), ids)


def test_same_content_digests_equal_across_layouts() -> None:
    # One content, two very different engines: TP1 DS PACKED kernel 16 vs TP2 SD SPLIT
    # kernel 32 with --block-size 544 and other block ids; every common key is equal.
    n = 600
    content = make_content(TINY, n, 1, seed=7)
    sides = {}
    for name, kw in (("a", dict(tp=1, start=1)),
                     ("b", dict(tp=2, start=5, shuffle=3, kernel=32, block=544,
                                conv=ConvLayout.SD, fa=FaLayout.SPLIT))):
        tp = kw.pop("tp")
        lay, ids = make_layout(TINY, tp, n, **kw)
        sides[name] = {r: _digests(rank_units(TINY, lay, r, ids, n),
                                   scatter(TINY, lay, r, content, ids, n, seed=r)[0])
                       for r in range(tp)}
    assert compare_units(sides["a"], sides["b"]) == []
    assert compare_units(sides["b"], sides["a"]) == []


# ----------------------------------------------------------------------------------
# Hand arithmetic: runs and canonical order
# ----------------------------------------------------------------------------------
def test_attention_runs_and_valid_token_cut() -> None:
    # TINY TP1, kernel 16: block 272 (ratio 17), page 139,264 B, kernel block 8,192 B
    # = 4 heads * [K 16 rows | V 16 rows] * 64 B (head_dim 32 * bf16).  N = 17 in
    # attention block 5: kernel blocks 85 (16 tokens) and 86 (1 token).
    ids = ((1,), (2,), (5,))
    lay = build_engine_layout(TINY, 1, num_blocks=8)
    units = {u.key: u for u in rank_units(TINY, lay, 0, ids, 17)}
    k1 = units[UnitKey(3, "K", 1)].runs.tolist()
    # head 1 at 2 * 16 * 64 = 2048 in its kernel block; layer 3 is region 0
    assert k1 == [[85 * 8192 + 2048, 16 * 64, 0], [86 * 8192 + 2048, 64, 0]]
    v1 = units[UnitKey(6, "V", 1)].runs.tolist()  # layer 6: region 1; V rows at +16*64
    assert v1 == [[85 * 8192 + 2048 + 1024, 1024, 1], [86 * 8192 + 2048 + 1024, 64, 1]]
    split = build_engine_layout(TINY, 1, num_blocks=8, fa_layout=FaLayout.SPLIT)
    sk = {u.key: u for u in rank_units(TINY, split, 0, ids, 17)}
    # SPLIT: K half [4 heads, 16, 64 B] then V half at 4*16*64 = 4096; head 1 at 1024
    assert sk[UnitKey(3, "K", 1)].runs.tolist()[1] == [86 * 8192 + 1024, 64, 0]
    assert sk[UnitKey(3, "V", 1)].runs.tolist()[0] == [85 * 8192 + 4096 + 1024, 1024, 0]


def test_valid_token_cut_ignores_the_tail_of_the_last_kernel_block() -> None:
    # Bytes after token N-1 in the last kernel block are not content: changing them
    # leaves every digest alone; changing token N-1 changes exactly its head's K unit.
    lay = build_engine_layout(TINY, 1, num_blocks=8)
    ids, n = ((1,), (2,), (5,)), 17
    regions = [np.random.default_rng(r).integers(0, 256, lay.region_bytes, dtype=np.uint8)
               for r in range(2)]
    units = rank_units(TINY, lay, 0, ids, n)
    before = _digests(units, regions)
    tail = 86 * 8192 + 2048 + 64  # head 1 K, kernel block 86, row 1 (token 17)
    regions[0][tail:tail + 15 * 64] ^= 0xFF
    assert _digests(units, regions) == before
    regions[0][tail - 1] ^= 0xFF  # last byte of token 16, head 1 K, layer 3
    after = _digests(units, regions)
    assert [k for k in before if before[k] != after[k]] == [UnitKey(3, "K", 1)]


def test_conv_runs_ds_and_sd_and_canonical_order() -> None:
    # TINY TP1: conv_dim 512 + 2*64 = 640 channels, 3 steps, bf16.  DS: channel c at
    # c*6 B -> x head 0 = one run (0, 64*6 = 384); B at 512*6 = 3072, C at 3456; SSM
    # head 3 at conv 3840 + 3 * 64*64*4 = 52,992.  Mamba group 0 = layers (0, 5) in
    # block 1, regions 0 and 1.
    ids = ((1,), (2,), (5,))
    page = 139264
    ds = build_engine_layout(TINY, 1, num_blocks=8)
    u = {x.key: x.runs.tolist() for x in rank_units(TINY, ds, 0, ids, 17)}
    assert u[UnitKey(0, "x", 0)] == [[page, 384, 0]]
    assert u[UnitKey(0, "B", 0)] == [[page + 3072, 384, 0]]
    assert u[UnitKey(0, "C", 0)] == [[page + 3456, 384, 0]]
    assert u[UnitKey(5, "SSM", 3)] == [[page + 3840 + 3 * 16384, 16384, 1]]
    # SD: element (step t, channel c) at (t*640 + c)*2: channel-major, one run each
    sd = build_engine_layout(TINY, 1, num_blocks=8, conv_layout=ConvLayout.SD)
    x0 = {x.key: x.runs for x in rank_units(TINY, sd, 0, ids, 17)}[UnitKey(0, "x", 0)]
    assert x0.shape == (64 * 3, 3) and set(x0[:, 1].tolist()) == {2}
    assert x0[:4, 0].tolist() == [page, page + 1280, page + 2560, page + 2]
    # Order: layers ascending; Mamba x, B, C, SSM; attention K then V; index ascending.
    keys = [x.key for x in rank_units(TINY, ds, 0, ids, 17)]
    assert keys[:18] == ([UnitKey(0, "x", i) for i in range(8)] + [UnitKey(0, "B", 0),
                         UnitKey(0, "C", 0)] + [UnitKey(0, "SSM", i) for i in range(8)])
    assert keys[36:44] == [UnitKey(3, v, i) for v in "KV" for i in range(4)]
    assert [k.layer for k in keys] == sorted(k.layer for k in keys)
    assert "layer 0 x head 0: 384 B in 1 runs" in render_units(rank_units(TINY, ds, 0, ids, 17))


@pytest.mark.parametrize("spec", [TINY, TINY_G2, SPEC_8B], ids=["g1", "g2", "8b"])
def test_units_cover_the_model_and_match_key_holders(spec) -> None:
    everything = all_keys(spec)
    for tp in allowed_tps(spec):
        lay, ids = make_layout(spec, tp, 40)
        seen: set[UnitKey] = set()
        for rank in range(tp):
            keys = {u.key for u in rank_units(spec, lay, rank, ids, 40)}
            assert keys == {k for k in everything if rank in key_holders(spec, tp, k)}
            seen |= keys
        assert seen == everything


def test_input_errors() -> None:
    lay = build_engine_layout(TINY, 2, num_blocks=8)
    ids = ((1,), (2,), (5, 6))
    with pytest.raises(ValueError, match="shard is for TP=1"):
        units_for(lay, rank_shard(TINY, 1, 0), ids, 17)
    with pytest.raises(ValueError, match="positive int"):
        rank_units(TINY, lay, 0, ids, 0)
    with pytest.raises(ValueError, match="attention group 2 has 2 blocks"):
        rank_units(TINY, lay, 0, ids, 3 * lay.block_size)
    with pytest.raises(ValueError, match="Mamba group 1 has no state block"):
        rank_units(TINY, lay, 0, ((1,), (), (5,)), 17)
    with pytest.raises(ValueError, match=r"out of range \[0, 8\)"):
        rank_units(TINY, lay, 0, ((1,), (8,), (5,)), 17)
    with pytest.raises(ValueError, match="for 2 KV cache groups"):
        rank_units(TINY, lay, 0, ids[:2], 17)
    with pytest.raises(ValueError, match="outside region 0"):
        gather(np.array([[10, 8, 0]]), [np.zeros(16, np.uint8)])


def test_compare_rule_replicas() -> None:
    key = UnitKey(3, "K", 0)
    p = {0: {key: b"a"}, 1: {key: b"b"}}  # two P replicas (random fill: they differ)
    assert compare_units(p, {0: {key: b"b"}}) == []  # any P holder will do
    (bad,) = compare_units(p, {1: {key: b"c"}})
    assert (bad.key, bad.decode_rank, bad.prefill_ranks) == (key, 1, (0, 1))
    assert str(bad) == "layer 3 K head 0: D rank 1 differs from P rank(s) 0, 1"
    (lost,) = compare_units({0: {}}, {0: {key: b"a"}})
    assert lost.prefill_ranks == () and "no P holder digested it" in str(lost)


# ----------------------------------------------------------------------------------
# Transfer through the real planner
# ----------------------------------------------------------------------------------
def _digests(units, regions) -> dict[UnitKey, bytes]:
    return {u.key: hashlib.blake2b(gather(u.runs, regions).tobytes(), digest_size=16).digest()
            for u in units}


def transfer_and_compare(spec, p_tp, d_tp, n, *, slots=1, p_block=None, d_block=None, **kw):
    """Random P, the plan replayed into random D, both sides digested from their own
    layout; returns ``compare_units``' mismatches."""
    p, p_ids = make_layout(spec, p_tp, n, start=1, slots=slots, block=p_block, **kw)
    d, d_ids = make_layout(spec, d_tp, n, start=3, slots=slots, shuffle=n, block=d_block, **kw)
    rng = np.random.default_rng(n)

    def noise(lay):
        return [rng.integers(0, 256, lay.region_bytes, dtype=np.uint8)
                for _ in range(lay.num_regions)]

    p_regions = {r: noise(p) for r in range(p_tp)}
    d_regions = {r: noise(d) for r in range(d_tp)}
    for rank in range(d_tp):
        plan = plan_request(spec=spec, decode=d, prefill=p, decode_rank=rank,
                            decode_block_ids=d_ids, prefill_block_ids=p_ids, num_tokens=n)
        for read in plan.reads:
            src = p_regions[read.prefill_rank]
            for (lo, ln, lr), (ro, _, rr) in zip(read.local_array.tolist(),
                                                 read.remote_array.tolist(), strict=True):
                d_regions[rank][lr][lo:lo + ln] = src[rr][ro:ro + ln]
    p_dig = {r: _digests(rank_units(spec, p, r, p_ids, n), p_regions[r]) for r in range(p_tp)}
    d_dig = {r: _digests(rank_units(spec, d, r, d_ids, n), d_regions[r]) for r in range(d_tp)}
    assert set().union(*d_dig.values()) == set().union(*p_dig.values()) == all_keys(spec)
    return compare_units(p_dig, d_dig)


TRANSFER_PAIRS = [(1, 1), (1, 2), (2, 1), (2, 4), (4, 1), (8, 2), (1, 8)]


@pytest.mark.parametrize(("p_tp", "d_tp"), TRANSFER_PAIRS)
@pytest.mark.parametrize("fa", list(FaLayout))
def test_real_planner_transfer_has_equal_units(p_tp, d_tp, fa) -> None:
    for n in (1, 17, 300, 545):
        assert transfer_and_compare(TINY, p_tp, d_tp, n, fa=fa) == []


@pytest.mark.parametrize(("p_tp", "d_tp"), list(itertools.product((1, 2), repeat=2)))
def test_real_planner_sharded_groups(p_tp, d_tp) -> None:
    assert transfer_and_compare(TINY_G2, p_tp, d_tp, 300) == []


def test_real_planner_sd_blocks_and_slots() -> None:
    assert transfer_and_compare(TINY, 2, 2, 300, conv=ConvLayout.SD) == []
    assert transfer_and_compare(TINY, 1, 1, 300, conv=ConvLayout.SD, fa=FaLayout.SPLIT) == []
    for p_tp, d_tp in ((1, 2), (2, 1)):  # different logical blocks; two Mamba slots
        assert transfer_and_compare(TINY, p_tp, d_tp, 545, d_block=544) == []
        assert transfer_and_compare(TINY, p_tp, d_tp, 300, slots=2) == []


def _patch_templates(monkeypatch, edit) -> None:
    real = pair_mod.peer_templates

    def planted(spec, decode, prefill, decode_rank):
        return tuple(edit(t, decode, prefill) for t in real(spec, decode, prefill, decode_rank))

    monkeypatch.setattr(pair_mod, "peer_templates", planted)


def _shift(runs, name, delta):
    return tuple(replace(r, remote_offset=r.remote_offset + delta) if r.name == name else r
                 for r in runs)


def test_planted_b_offset_is_named(monkeypatch) -> None:
    # P TP1 -> D TP2, n_groups 1: both D ranks read B group 0 from P rank 0; reading it
    # one channel row (3 steps * 2 B) late damages B group 0 of every Mamba layer.
    _patch_templates(monkeypatch, lambda t, d, p: replace(
        t, mamba_runs=_shift(t.mamba_runs, "B", 6)))
    bad = transfer_and_compare(TINY, 1, 2, 300)
    got = {(m.key, m.decode_rank, m.prefill_ranks) for m in bad}
    assert got == {(UnitKey(la, "B", 0), r, (0,)) for la in TINY.mamba_layers for r in (0, 1)}
    assert "layer 0 B group 0: D rank 0 differs from P rank(s) 0" in [str(m) for m in bad]


def test_planted_b_offset_on_one_p_rank(monkeypatch) -> None:
    # TINY_G2, P TP2 -> D TP1: group 1 comes from P rank 1; only that read is shifted.
    _patch_templates(monkeypatch, lambda t, d, p: replace(
        t, mamba_runs=_shift(t.mamba_runs, "B", 6)) if t.prefill_rank == 1 else t)
    bad = transfer_and_compare(TINY_G2, 2, 1, 300)
    assert {(m.key, m.decode_rank, m.prefill_ranks) for m in bad} == {
        (UnitKey(la, "B", 1), 0, (1,)) for la in TINY_G2.mamba_layers}


def test_planted_kv_head_swap_is_named(monkeypatch) -> None:
    # P TP4 -> D TP1: D reads KV head h from P rank h (one head each); swapping where
    # heads 1 and 2 land damages K and V of heads 1 and 2 of both attention layers.
    def swap(t: PeerTemplate, d, p) -> PeerTemplate:
        if t.prefill_rank not in (1, 2):
            return t
        (run,) = t.fa_runs
        other = d.fa_head_run_bytes * (3 - t.prefill_rank)
        return replace(t, fa_runs=(Run(run.name, other, run.remote_offset, run.length),))

    _patch_templates(monkeypatch, swap)
    bad = transfer_and_compare(TINY, 4, 1, 300)
    assert {(m.key, m.prefill_ranks) for m in bad} == {
        (UnitKey(la, v, h), (h,)) for la in TINY.attention_layers for v in "KV" for h in (1, 2)}


def test_planted_dropped_last_kernel_block(monkeypatch) -> None:
    # An off-by-one in the kernel-block count (floor for ceil) loses tokens 288..299 of
    # N=300: every K and V unit, nothing else.  N=288 fills its blocks: nothing lost.
    monkeypatch.setattr(pair_mod, "cdiv", lambda a, b: a // b)
    bad = transfer_and_compare(TINY, 1, 2, 300)
    assert {m.key for m in bad} == {k for k in all_keys(TINY) if k.view in "KV"}
    assert transfer_and_compare(TINY, 1, 2, 288) == []


# ----------------------------------------------------------------------------------
# Cost
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [TINY, SPEC_8B], ids=["tiny", "8b"])
@pytest.mark.parametrize("conv", list(ConvLayout))
def test_units_for_is_fast(spec, conv) -> None:
    # 8B TP1 at 4,096 tokens: 6,592 units (SD: 756,736 runs, one per conv element).
    lay, ids = make_layout(spec, 1, 4096, conv=conv)
    shard = rank_shard(spec, 1, 0)
    best = min(_timed(lambda: units_for(lay, shard, ids, 4096)) for _ in range(3))
    assert best < 0.1, f"{best * 1e3:.1f} ms"
    assert sorted(VIEWS) == sorted({u.key.view for u in units_for(lay, shard, ids, 4096)})


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
