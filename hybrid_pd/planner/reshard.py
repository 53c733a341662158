"""Reference resharder: the brute-force oracle for the planner and the NIXL bench.
No GPU or NIXL required.  (Moved here from ``tests/reference_reshard.py`` so that the
bench's rank processes can verify received bytes at runtime; the test module re-exports
it.)

It builds the full, unsharded state of one request (random bytes, seeded), lays it out
the way one TP rank of vLLM 0.32 stores it (HMA pages, head-major kernel blocks, DS/SD
conv, padding) from first principles - global head / group / channel indices, not the
planner's run templates - then replays a plan as plain ``memcpy``s from P pages into D
pages and compares every D byte with D's own sharding of the same full state.

Pages are kept sparse: ``{(region, block): np.ndarray[uint8]}`` for the request's blocks
only; a read that touches any other block fails.  Unowned bytes are filled with the same
constant on both sides, so a whole-page compare is exact; reads are separately checked
to stay inside the transferable bytes (kernel blocks that hold tokens, conv + ssm),
which also proves Mamba padding is never read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hybrid_pd.planner.descs import RequestPlan
from hybrid_pd.planner.layout import ConvLayout, EngineLayout, FaLayout
from hybrid_pd.planner.model_spec import HybridModelSpec, LayerKind
from hybrid_pd.planner.render import render_plan

FILL = 0x5A


@dataclass
class FullState:
    fa: dict[int, np.ndarray]  # layer -> (tokens, kv_heads, 2*head_dim*dsz) K|V bytes
    conv: dict[int, np.ndarray]  # layer -> (conv_dim, rows*dsz) channel rows, [x|B|C]
    ssm: dict[int, np.ndarray]  # layer -> (heads, head_dim*d_state*dsz)


def make_full_state(spec: HybridModelSpec, num_tokens: int, seed: int = 1234) -> FullState:
    rng = np.random.default_rng(seed)

    def rnd(*shape: int) -> np.ndarray:
        return np.frombuffer(rng.bytes(int(np.prod(shape))), dtype=np.uint8).reshape(shape)

    kv = 2 * spec.head_dim * spec.kv_dtype_size
    rows = (spec.conv_kernel - 1) * spec.conv_dtype_size
    ssm = spec.mamba_head_dim * spec.d_state * spec.ssm_dtype_size
    return FullState(
        fa={i: rnd(num_tokens, spec.num_kv_heads, kv) for i in spec.attention_layers},
        conv={i: rnd(spec.conv_dim, rows) for i in spec.mamba_layers},
        ssm={i: rnd(spec.mamba_num_heads, ssm) for i in spec.mamba_layers},
    )


def _owned(total: int, tp: int, rank: int) -> list[int]:
    """Global units a rank holds, written independently of layout.shard_units."""
    if tp <= total:
        per = total // tp
        return list(range(rank * per, rank * per + per))
    return [rank * total // tp]


@dataclass
class RankPages:
    pages: dict[tuple[int, int], np.ndarray]
    # (region, block) -> sorted, merged allowed [lo, hi) intervals (transferable bytes)
    allowed: dict[tuple[int, int], list[tuple[int, int]]]
    padding: dict[tuple[int, int], tuple[int, int]]


def _merge_intervals(iv: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(iv):
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def shard_rank(
    spec: HybridModelSpec,
    layout: EngineLayout,
    rank: int,
    state: FullState,
    block_ids: Sequence[Sequence[int]],
    num_tokens: int,
    fill_only: bool = False,
) -> RankPages:
    """Lay the request's state out as ``rank`` of ``layout`` stores it."""
    page = layout.page_size_bytes
    kb = layout.kernel_block_size
    ratio = layout.block_size // kb
    kbb = page // ratio
    hd_b = spec.head_dim * spec.kv_dtype_size
    kv_heads = _owned(spec.num_kv_heads, layout.tp, rank)
    m_heads = _owned(spec.mamba_num_heads, layout.tp, rank)
    groups = _owned(spec.n_groups, layout.tp, rank)
    assert len(kv_heads) == layout.kv_heads
    pages: dict[tuple[int, int], np.ndarray] = {}
    allowed: dict[tuple[int, int], list[tuple[int, int]]] = {}
    padding: dict[tuple[int, int], tuple[int, int]] = {}
    for group, ids in zip(layout.hma_groups, block_ids, strict=True):
        for pos, layer in enumerate(group.layers):
            if group.kind is LayerKind.ATTENTION:
                n_blocks = -(-num_tokens // layout.block_size)
                for lb in range(n_blocks):
                    key = (pos, ids[lb])
                    buf = np.full(page, FILL, dtype=np.uint8)
                    iv = []
                    for sub in range(ratio):
                        t0 = (lb * ratio + sub) * kb
                        t1 = min(t0 + kb, num_tokens)
                        if t0 >= num_tokens:
                            break
                        iv.append((sub * kbb, (sub + 1) * kbb))
                        if fill_only:
                            continue
                        # (tokens, heads, K|V) -> (heads, tokens, K|V): head-major block.
                        src = state.fa[layer][t0:t1][:, kv_heads, :].transpose(1, 0, 2)
                        kblk = buf[sub * kbb:(sub + 1) * kbb]
                        if layout.fa_layout is FaLayout.PACKED:
                            kblk.reshape(len(kv_heads), kb, 2 * hd_b)[:, : t1 - t0] = src
                        else:
                            halves = kblk.reshape(2, len(kv_heads), kb, hd_b)
                            halves[0, :, : t1 - t0] = src[:, :, :hd_b]
                            halves[1, :, : t1 - t0] = src[:, :, hd_b:]
                    pages[key] = buf
                    allowed[key] = _merge_intervals(iv)
            else:
                for blk in ids:
                    key = (pos, blk)
                    buf = np.full(page, FILL, dtype=np.uint8)
                    inter = spec.intermediate_size
                    ngs = spec.n_groups * spec.d_state
                    chans = [c for h in m_heads for c in range(h * spec.mamba_head_dim,
                                                                (h + 1) * spec.mamba_head_dim)]
                    chans += [inter + g * spec.d_state + s for g in groups
                              for s in range(spec.d_state)]
                    chans += [inter + ngs + g * spec.d_state + s for g in groups
                              for s in range(spec.d_state)]
                    conv = state.conv[layer][chans]  # (local channels, rows*dsz)
                    if layout.conv_layout is ConvLayout.SD:
                        rows = spec.conv_kernel - 1
                        conv = conv.reshape(len(chans), rows, spec.conv_dtype_size)
                        conv = conv.transpose(1, 0, 2)
                    conv = conv.reshape(-1)
                    assert conv.size == layout.conv_bytes
                    ssm = state.ssm[layer][m_heads].reshape(-1)
                    assert ssm.size == layout.ssm_bytes
                    if not fill_only:
                        buf[: conv.size] = conv
                        buf[conv.size: conv.size + ssm.size] = ssm
                    pages[key] = buf
                    allowed[key] = [(0, conv.size + ssm.size)]
                    padding[key] = (conv.size + ssm.size, page)
    return RankPages(pages, allowed, padding)


def _pieces(desc: tuple[int, int, int], page: int):
    """Split (offset, len, region) at page boundaries: (region, block, lo, hi)."""
    off, length, region = desc
    end = off + length
    while off < end:
        blk = off // page
        lo = off - blk * page
        hi = min(page, lo + end - off)
        yield region, blk, lo, hi
        off += hi - lo


def _inside(allowed: list[tuple[int, int]], lo: int, hi: int) -> bool:
    return any(a <= lo and hi <= b for a, b in allowed)


def apply_plan(
    plan: RequestPlan,
    decode_pages: RankPages,
    prefill_pages: dict[int, RankPages],
    decode_layout: EngineLayout,
    prefill_layout: EngineLayout,
) -> None:
    """Replay every read as a memcpy; fail on any byte outside transferable memory."""
    why = render_plan(plan)
    for read in plan.reads:
        src_rank = prefill_pages[read.prefill_rank]
        for dl, dr in zip(read.local, read.remote, strict=True):
            assert dl[1] == dr[1], f"length mismatch {dl} {dr}\n{why}"
            src = bytearray()
            for region, blk, lo, hi in _pieces(dr, prefill_layout.page_size_bytes):
                key = (region, blk)
                assert key in src_rank.pages, (
                    f"read of P rank {read.prefill_rank} region {region} block {blk}, "
                    f"which holds none of the request's state\n{why}"
                )
                assert _inside(src_rank.allowed[key], lo, hi), (
                    f"read [{lo},{hi}) of P rank {read.prefill_rank} page {key} leaves the "
                    f"transferable bytes {src_rank.allowed[key]} (padding "
                    f"{src_rank.padding.get(key)})\n{why}"
                )
                src += src_rank.pages[key][lo:hi].tobytes()
            pos = 0
            for region, blk, lo, hi in _pieces(dl, decode_layout.page_size_bytes):
                key = (region, blk)
                assert key in decode_pages.pages, f"write to D page {key} outside request\n{why}"
                assert _inside(decode_pages.allowed[key], lo, hi), (
                    f"write [{lo},{hi}) to D page {key} outside {decode_pages.allowed[key]}\n{why}"
                )
                decode_pages.pages[key][lo:hi] = np.frombuffer(
                    bytes(src[pos: pos + hi - lo]), dtype=np.uint8
                )
                pos += hi - lo


def compare(actual: RankPages, expected: RankPages, plan: RequestPlan) -> None:
    assert actual.pages.keys() == expected.pages.keys()
    for key, want in expected.pages.items():
        got = actual.pages[key]
        if not np.array_equal(got, want):
            bad = np.flatnonzero(got != want)
            raise AssertionError(
                f"D rank {plan.decode_rank} page {key}: {bad.size} bytes differ, first at "
                f"{bad[0]}\n{render_plan(plan)}"
            )
