"""Fuzzing both handshake paths that take a peer's metadata from the network.

(i)   raw bytes into :func:`handshake.decode`;
(ii)  valid bench-handshake metadata with several fields mutated at once (on the wire,
      or as Structs where the wire cannot carry the value: bool, float, None, 2**64);
(iii) upstream's NixlAgentMetadata (a stand-in namespace) into ``sides.derive_remote``.

The only outcomes are a refusal (``HandshakeError`` / ``ValueError``) or an accepted
peer whose prepped descriptors stay inside the TRUE regions: lengths from the layout
built before mutating, never recomputed from the mutated metadata.  Each call is timed:
a refusal must come in bounded time, before anything sized by the claim is built.

One thing D cannot tell apart from an honest peer: a block count raised within the cap
together with region lengths that cover it (in the vLLM path the block count is the
only length claim).  Then the peer claims memory it does not have; D still stays inside
the claimed regions, and the peer's NIXL refuses reads outside what it registered.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import msgspec
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hybrid_pd.connector.sides import LocalSide, Side, derive_remote
from hybrid_pd.planner.layout import EngineLayout, build_engine_layout
from hybrid_pd.planner.model_spec import spec_from_hf_config
from hybrid_pd.planner.pair import PairPlan
from hybrid_pd.planner.views import dual_view, to_addr_descs
from hybrid_pd.transfer import handshake as hs

HERE = Path(__file__).parent
TINY = spec_from_hf_config(json.loads((HERE / "data" / "tiny_nemotron_h_config.json").read_text()))
LOCAL_BLOCKS = 8
CAP = max(hs.MAX_BLOCKS_FACTOR * LOCAL_BLOCKS, hs.MIN_BLOCKS_CAP)
BUDGET_S = 0.5
EXTREMES = (0, -1, 1, 2**31, 2**63 - 1, 2**64)
ODD = (True, False, None, 1.5, "8", [8])
FUZZ = settings(max_examples=500, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def _timed(fn, *args, **kw):
    t0 = time.perf_counter()
    try:
        return fn(*args, **kw)
    finally:
        took = time.perf_counter() - t0
        assert took < BUDGET_S, f"{fn.__name__} took {took:.3f} s"


def _regions(layout: EngineLayout) -> list[tuple[int, int]]:
    # Gaps under one page: a region cannot grow by a block without overlapping the next.
    n = layout.region_bytes
    return [(4096 + i * (n + 4096), n) for i in range(layout.num_regions)]


def _meta(tp: int, rank: int, blocks: int, engine: str) -> tuple[hs.HandshakeMetadata, EngineLayout]:
    lay = build_engine_layout(TINY, tp, num_blocks=blocks)
    m = hs.build_metadata(engine_id=engine, agent_name=f"{engine}-{rank}", agent_metadata=b"x",
                          spec=TINY, layout=lay, rank=rank, regions=_regions(lay))
    return m, lay


LOCAL, LOCAL_LAYOUT = _meta(1, 0, LOCAL_BLOCKS, "d0")


def _inside_true(descs, true_lens, lied: bool, claimed_lens) -> None:
    """Every (offset, length, region) inside the true region, or - for the one lie D
    cannot see (more blocks, lengths to match) - inside the claimed one."""
    lens = claimed_lens if lied else true_lens
    for off, length, region in descs:
        assert off >= 0 and length > 0 and off + length <= lens[region], (off, length, region)


# -- (i) raw wire bytes ------------------------------------------------------------------
@FUZZ
@given(blob=st.one_of(
    st.binary(max_size=2048),
    st.builds(lambda cut, junk: hs.encode(LOCAL)[:cut] + junk,
              st.integers(0, 600), st.binary(max_size=64)),
))
def test_wire_bytes_decode_or_refuse(blob: bytes) -> None:
    try:
        got = _timed(hs.decode, blob)
    except hs.HandshakeError as exc:
        assert str(exc)
        return
    assert isinstance(got, hs.HandshakeMetadata)


# -- (ii) bench handshake, several fields mutated ----------------------------------------
LAYOUT_FIELDS = ("num_blocks", "block_size", "kernel_block_size", "tp", "rank",
                 "page_size_bytes")


@st.composite
def _mutations(draw, true_blocks: int, nregions: int):
    near = (true_blocks - 1, true_blocks + 1, 2 * true_blocks, CAP, CAP + 1)
    value = st.sampled_from(EXTREMES + ODD + near)
    field = st.one_of(
        st.tuples(st.just("layout"), st.sampled_from(LAYOUT_FIELDS)),
        st.tuples(st.sampled_from(["base", "length"]), st.integers(0, nregions - 1)),
        st.tuples(st.just("regions"), st.sampled_from(["drop", "dup", "all_length"])),
        st.tuples(st.just("mem_type"), st.just("")),
    )
    return draw(st.lists(st.tuples(field, value), min_size=1, max_size=6))


def _apply(m: hs.HandshakeMetadata, muts, rehash: bool) -> hs.HandshakeMetadata:
    layout = dict(msgspec.structs.asdict(m.layout))
    regions = [[r.base, r.length] for r in m.regions]
    mem_type = m.mem_type
    for (kind, key), value in muts:
        if kind == "layout":
            layout[key] = value
        elif kind in ("base", "length"):
            if key < len(regions):
                regions[key][kind == "length"] = value
        elif kind == "mem_type":
            mem_type = value if isinstance(value, str) else "GPU"
        elif key == "drop":
            regions = regions[:-1]
        elif key == "dup":
            regions = regions + [list(regions[-1])] if regions else regions
        else:
            regions = [[b, value] for b, _ in regions]
    lay = hs.LayoutInfo(**layout)
    out = msgspec.structs.replace(m, layout=lay, mem_type=mem_type,
                                  regions=tuple(hs.RegionInfo(b, n) for b, n in regions))
    if rehash:  # a peer that recomputes its hash: only the caps can refuse it
        try:
            out = msgspec.structs.replace(out, compat_hash=hs.compat_hash(out.version, out.model, lay))
        except (TypeError, OverflowError, msgspec.EncodeError):
            pass
    return out


def _via_wire(m: hs.HandshakeMetadata) -> hs.HandshakeMetadata:
    """Through encode/decode when the value can travel; else the Struct as is."""
    try:
        blob = msgspec.msgpack.encode(m)
    except (TypeError, OverflowError, msgspec.EncodeError):
        return m
    return _timed(hs.decode, blob)


@FUZZ
@given(tp=st.sampled_from([1, 2, 4]), blocks=st.sampled_from([8, 12]), data=st.data(),
       rehash=st.booleans())
def test_mutated_metadata_compatible_or_refused(tp, blocks, data, rehash) -> None:
    true, true_layout = _meta(tp, tp - 1, blocks, "p0")
    true_lens = [n for _, n in _regions(true_layout)]
    muts = data.draw(_mutations(blocks, true_layout.num_regions))
    try:
        remote = _via_wire(_apply(true, muts, rehash))
        _timed(hs.check_compatible, LOCAL, remote)
        _, layout = _timed(hs.engine_layout, remote, caps=hs.local_caps(LOCAL))
    except hs.HandshakeError as exc:
        assert str(exc)
        event("refused")
        return
    event("accepted")
    # What the executor preps for this peer (its _prep_views).
    lens = [r.length for r in remote.regions]
    pair = PairPlan.build(spec=TINY, decode=LOCAL_LAYOUT, prefill=layout, decode_rank=0,
                          decode_region_lens=[n for _, n in _regions(LOCAL_LAYOUT)],
                          prefill_region_lens={remote.layout.rank: lens})
    t = pair.template(remote.layout.rank)
    if t is None:
        return
    descs = dual_view(layout, t, "remote")
    to_addr_descs(descs, [r.base for r in remote.regions], lens)
    lied = layout.num_blocks > true_layout.num_blocks
    if lied:
        event("consistent block-count lie (undetectable on D)")
    _inside_true(descs, true_lens, lied, lens)


# -- (iii) vLLM path: NixlAgentMetadata into derive_remote -------------------------------
def _local_side() -> LocalSide:
    names = {f"model.layers.{i}.mixer": i for i in range(LOCAL_LAYOUT.num_regions)}
    regions = _regions(LOCAL_LAYOUT)
    side = Side(LOCAL_LAYOUT, tuple(b for b, _ in regions), tuple(n for _, n in regions), 0)
    return LocalSide(spec=TINY, side=side, perm=(), kinds=(), name_region=names, layer_kinds={})


LOCAL_SIDE = _local_side()
NIXL_FIELDS = ("num_blocks", "block_size", "physical_blocks_per_logical_kv_block",
               "device_id", "ssm_sizes", "block_strides", "kv_caches_base_addr",
               "region_names", "base", "stride")


def _nixl_meta(layout: EngineLayout) -> SimpleNamespace:
    """What upstream advertises for ``layout``: kernel blocks, kernel block size."""
    names = list(LOCAL_SIDE.name_region)
    return SimpleNamespace(
        engine_id="p0", num_blocks=layout.num_phys_blocks, block_size=layout.kernel_block_size,
        physical_blocks_per_logical_kv_block=layout.ratio, device_id=0,
        ssm_sizes=(layout.conv_bytes, layout.ssm_bytes),
        block_strides=[layout.kernel_block_bytes] * layout.num_regions,
        kv_caches_base_addr=[b for b, _ in _regions(layout)], region_names=names,
    )


def _nixl_value(draw, field: str, meta: SimpleNamespace, layout: EngineLayout):
    if field in ("ssm_sizes", "block_strides", "kv_caches_base_addr", "region_names"):
        cur = list(getattr(_nixl_meta(layout), field))  # the true list: no compounding
        return draw(st.sampled_from([None, [], cur[:-1], cur + cur[-1:], cur * 1000, "x",
                                     [None] * len(cur), cur[::-1]]))
    near = (layout.num_phys_blocks - layout.ratio, layout.num_phys_blocks + 1,
            (CAP + 1) * layout.ratio)
    return draw(st.sampled_from(EXTREMES + ODD + near))


@FUZZ
@given(tp=st.sampled_from([1, 2, 4]), blocks=st.sampled_from([8, 12]), data=st.data(),
       fields=st.lists(st.sampled_from(NIXL_FIELDS), min_size=1, max_size=5))
def test_mutated_nixl_metadata_side_or_refused(tp, blocks, data, fields) -> None:
    true_layout = build_engine_layout(TINY, tp, num_blocks=blocks)
    true_lens = [n for _, n in _regions(true_layout)]
    meta = _nixl_meta(true_layout)
    for field in fields:
        value = _nixl_value(data.draw, field, meta, true_layout)
        if field in ("base", "stride"):
            name = "kv_caches_base_addr" if field == "base" else "block_strides"
            cur = getattr(meta, name)
            if isinstance(cur, list) and cur:
                cur = list(cur)
                cur[data.draw(st.integers(0, len(cur) - 1))] = value
                setattr(meta, name, cur)
        else:
            setattr(meta, field, value)
    try:
        side = _timed(derive_remote, LOCAL_SIDE, meta, tp, tp - 1)
    except ValueError as exc:
        assert str(exc)
        event("refused")
        return
    event("accepted")
    pair = PairPlan.build(spec=TINY, decode=LOCAL_LAYOUT, prefill=side.layout, decode_rank=0,
                          decode_region_lens=LOCAL_SIDE.side.lens,
                          prefill_region_lens={tp - 1: side.lens})
    t = pair.template(tp - 1)
    if t is None:
        return
    side.view(t, "remote")  # the NIXL rows: checked against the side's regions
    lied = side.layout.num_blocks > true_layout.num_blocks
    if lied:
        event("consistent block-count lie (undetectable on D)")
    _inside_true(dual_view(side.layout, t, "remote"), true_lens, lied, side.lens)
