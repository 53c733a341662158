"""Handshake metadata: msgpack round trip, compatibility refusals that name both sides'
values, version and corruption checks.  No GPU or NIXL required (agent metadata is a
fake blob)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path

import msgspec
import pytest

from hybrid_pd.planner.layout import build_engine_layout
from hybrid_pd.planner.model_spec import HybridModelSpec, LayerKind, spec_from_hf_config
from hybrid_pd.transfer import handshake as hs

HERE = Path(__file__).parent
TINY = spec_from_hf_config(json.loads((HERE / "data" / "tiny_nemotron_h_config.json").read_text()))
NEMO = spec_from_hf_config(json.loads((HERE / "data" / "nemotron-h-8b.config.json").read_text()))


def meta(spec=TINY, tp=1, rank=0, *, engine="p0", conv="DS", kernel=16, blocks=8,
         region_len=None, **kw) -> hs.HandshakeMetadata:
    lay = build_engine_layout(spec, tp, kernel_block_size=kernel, num_blocks=blocks,
                              conv_layout=conv)
    n = region_len or lay.region_bytes
    regions = [(4096 + i * (n + 4096), n) for i in range(lay.num_regions)]
    return hs.build_metadata(engine_id=engine, agent_name=f"{engine}-{rank}",
                             agent_metadata=b"\x00fake-agent", spec=spec, layout=lay,
                             rank=rank, regions=regions, **kw)


def test_roundtrip_msgpack_no_pickle() -> None:
    m = meta(NEMO, tp=2, rank=1)
    blob = hs.encode(m)
    assert b"\x80\x04" not in blob[:2]  # not a pickle protocol header
    assert hs.decode(blob) == m
    spec, lay = hs.engine_layout(m)
    assert spec == NEMO and lay.tp == 2 and lay.page_size_bytes == m.layout.page_size_bytes


def test_compatible_across_tp_and_block_counts() -> None:
    # Different TP, rank and block count are the normal case: accepted.
    hs.check_compatible(meta(NEMO, 1, engine="d0"), meta(NEMO, 2, 1, blocks=30))


@pytest.mark.parametrize(
    ("field", "local_kw", "remote_kw", "ours", "theirs"),
    [
        ("model.kv_dtype", {}, {"spec": TINY.with_dtypes(kv_dtype="float16")},
         "'bfloat16'", "'float16'"),
        ("model.ssm_dtype", {}, {"spec": TINY.with_dtypes(ssm_dtype="bfloat16")},
         "'float32'", "'bfloat16'"),
        ("conv_layout", {}, {"conv": "SD"}, "'DS'", "'SD'"),
        ("kernel_block_size", {}, {"kernel": 32}, "16", "32"),
        ("model.num_kv_heads", {}, {"spec": replace(TINY, num_kv_heads=2)}, "4", "2"),
    ],
)
def test_refused_names_both_values(field, local_kw, remote_kw, ours, theirs) -> None:
    local = meta(engine="d0", **local_kw)
    remote = meta(**remote_kw)
    with pytest.raises(hs.HandshakeError) as err:
        hs.check_compatible(local, remote)
    msg = str(err.value)
    line = next(x for x in msg.splitlines() if x.strip().startswith(field + ":"))
    assert f"local (d0 rank 0) {ours}" in line, msg
    assert f"{theirs}" in line.split("!=")[1] and "p0 rank 0" in line, msg


def test_model_mismatch_refused() -> None:
    with pytest.raises(hs.HandshakeError, match=r"model\.mamba_num_heads: local .* 8 != .* 128"):
        hs.check_compatible(meta(TINY, engine="d0"), meta(NEMO))


def test_version_checked_before_schema() -> None:
    raw = msgspec.msgpack.decode(hs.encode(meta()))
    raw["version"] = 99
    raw["new_field_of_v99"] = 1
    with pytest.raises(hs.HandshakeError, match=f"version 99, ours is {hs.PROTOCOL_VERSION}"):
        hs.decode(msgspec.msgpack.encode(raw), who="prefill p0")
    with pytest.raises(hs.HandshakeError, match="not valid msgpack"):
        hs.decode(b"\xc1garbage")
    del raw["new_field_of_v99"]
    raw["version"] = hs.PROTOCOL_VERSION
    raw["regions"] = "nope"
    with pytest.raises(hs.HandshakeError, match="malformed"):
        hs.decode(msgspec.msgpack.encode(raw))


def test_corrupted_hash_refused() -> None:
    remote = msgspec.structs.replace(meta(), compat_hash="0" * 16)
    with pytest.raises(hs.HandshakeError, match="compatibility hash"):
        hs.check_compatible(meta(engine="d0"), remote)


def test_inconsistent_layout_refused() -> None:
    m = meta()
    bad_page = msgspec.structs.replace(
        m, layout=msgspec.structs.replace(m.layout, page_size_bytes=m.layout.page_size_bytes + 2))
    with pytest.raises(hs.HandshakeError, match="page"):
        hs.check_compatible(meta(engine="d0"), bad_page)
    short = meta(region_len=100)
    with pytest.raises(hs.HandshakeError, match=r"region 0 length=100 refused: must be an int in"):
        hs.check_compatible(meta(engine="d0"), short)
    bad_rank = msgspec.structs.replace(m, layout=msgspec.structs.replace(m.layout, rank=3))
    with pytest.raises(hs.HandshakeError, match=r"rank=3 refused: must be an int in \[0, 0\] \(TP=1\)"):
        hs.check_compatible(meta(engine="d0"), bad_rank)


def _other_value(value: object) -> object:
    """A different value of the same type (the hash does not validate, so any will do)."""
    if isinstance(value, bool) or not isinstance(value, int | str | tuple):
        raise AssertionError(f"teach _other_value about {type(value).__name__}")
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "-x"
    return value[:-1]  # cache_layers / dtype_sizes: one entry fewer


def test_every_spec_field_round_trips_and_is_compared_and_hashed() -> None:
    m = meta(NEMO)
    decoded = hs.decode(hs.encode(m))
    assert hs.spec_of(decoded.model) == NEMO
    fields = [f.name for f in dataclasses.fields(HybridModelSpec)]
    assert set(hs.ModelInfo.__struct_fields__) == set(fields)
    assert all(isinstance(k, LayerKind) for _, k in hs.spec_of(decoded.model).cache_layers)
    compared = hs._compat_fields(m.version, m.model, m.layout)
    for name in fields:
        assert f"model.{name}" in compared, name
        changed = msgspec.structs.replace(m.model, **{name: _other_value(getattr(m.model, name))})
        assert hs.compat_hash(m.version, changed, m.layout) != m.compat_hash, name


def test_missing_or_unknown_model_field_is_malformed() -> None:
    raw = msgspec.msgpack.decode(hs.encode(meta()))
    raw["model"]["future_field"] = 1
    with pytest.raises(hs.HandshakeError, match="malformed.*future_field"):
        hs.decode(msgspec.msgpack.encode(raw))
    del raw["model"]["future_field"]
    del raw["model"]["dtype_sizes"]
    with pytest.raises(hs.HandshakeError, match="malformed.*dtype_sizes"):
        hs.decode(msgspec.msgpack.encode(raw))


def test_oversized_blob_refused() -> None:
    with pytest.raises(hs.HandshakeError, match="exceeds"):
        hs.decode(b"\x00" * (hs.MAX_HANDSHAKE_BYTES + 1))


def _with(m: hs.HandshakeMetadata, regions=None, **layout) -> hs.HandshakeMetadata:
    """``m`` with layout fields / regions replaced and its hash recomputed, so only the
    caps (not the hash) can refuse it."""
    lay = msgspec.structs.replace(m.layout, **layout)
    regs = m.regions if regions is None else tuple(hs.RegionInfo(b, n) for b, n in regions)
    return msgspec.structs.replace(m, layout=lay, regions=regs,
                                   compat_hash=hs.compat_hash(m.version, m.model, lay))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_blocks": 1 << 40}, r"num_blocks=1099511627776 refused: .*\[1, 131072\] \(64 x our 8"),
        ({"num_blocks": hs.MIN_BLOCKS_CAP + 1}, rf"num_blocks={hs.MIN_BLOCKS_CAP + 1} refused"),
        ({"num_blocks": 0}, r"num_blocks=0 refused"),
        ({"num_blocks": -1}, r"num_blocks=-1 refused"),
        ({"num_blocks": True}, r"num_blocks=True refused"),
        ({"num_blocks": 8.0}, r"num_blocks=8.0 refused"),
        ({"block_size": 0}, r"block_size=0 refused: must be an int in \[16, "),
        ({"block_size": 16 << 20}, r"block_size=16777216 refused: .*at most 4096"),
        ({"tp": 0}, r"tp=0 refused"),
        ({"page_size_bytes": -5}, r"page_size_bytes=-5 refused"),
    ],
)
def test_geometry_caps_refuse_before_building(change, message) -> None:
    local, remote = meta(engine="d0"), meta(blocks=8)
    with pytest.raises(hs.HandshakeError, match=message):
        hs.check_compatible(local, _with(remote, **change))


def test_block_count_cap_is_relative_to_the_local_engine() -> None:
    # 64x our blocks passes, and never less than MIN_BLOCKS_CAP (a D with a small cache
    # pairs with an ordinary P); the bench executor then preps views of that size.
    floor = hs.MIN_BLOCKS_CAP
    hs.check_compatible(meta(engine="d0", blocks=2), meta(blocks=floor))
    with pytest.raises(hs.HandshakeError, match=rf"\[1, {floor}\] \(64 x our 2 blocks"):
        hs.check_compatible(meta(engine="d0", blocks=2), meta(blocks=floor + 1))
    big = 2 * floor
    hs.check_compatible(meta(engine="d0", blocks=big), meta(blocks=64 * big))
    with pytest.raises(hs.HandshakeError, match=rf"\[1, {64 * big}\] \(64 x our {big} blocks"):
        hs.check_compatible(meta(engine="d0", blocks=big), meta(blocks=64 * big + 1))
    # Without a local engine only the model's bounds apply (engine_layout alone).
    assert hs.engine_layout(meta(blocks=129))[1].num_blocks == 129


def test_region_rules() -> None:
    local, m = meta(engine="d0"), meta()
    (b0, n), (b1, _) = ((r.base, r.length) for r in m.regions)
    cases = [
        ([(b0, n)], "1 registered regions, its layout has 2"),
        ([(b0, n)] * (len(TINY.cache_layers) + 1),
         rf"regions={len(TINY.cache_layers) + 1} refused: .*\[1, {len(TINY.cache_layers)}\] "
         r"\(at most one per cache layer"),
        ([(b0, n)] * 3, "3 registered regions, its layout has 2"),
        ([(b0, n), (b0 + n - 1, n)], "registered regions overlap"),
        ([(-1, n), (b1, n)], r"region 0 base=-1 refused"),
        ([(b0, n), (hs.ADDRESS_SPACE - n + 1, n)], r"region 1 length=\d+ refused"),
        ([(b0, n), (b1, 1 << 64)], r"region 1 length=18446744073709551616 refused"),
    ]
    for regions, message in cases:
        with pytest.raises(hs.HandshakeError, match=message):
            hs.check_compatible(local, _with(m, regions=regions))


def test_unknown_mem_type_refused() -> None:
    with pytest.raises(hs.HandshakeError, match="mem_type='GPU' refused"):
        hs.check_compatible(meta(engine="d0"), meta(mem_type="GPU"))
