"""Handshake metadata between a decode (D) rank and a prefill (P) rank.

One :class:`HandshakeMetadata` per rank, exchanged once per P-D pair before any READ.
It carries what the planner needs to plan reads against the remote rank (model fields,
TP rank and size, block / kernel block / page sizes, conv and FA layouts, dtypes), the
registered region base addresses and lengths, and the NIXL agent metadata blob.

Wire format: msgspec msgpack (never pickle), at most :data:`MAX_HANDSHAKE_BYTES`, every
Struct ``forbid_unknown_fields``.  :class:`ModelInfo` is generated from the fields of
:class:`HybridModelSpec`, so a new spec field travels (and is compared and hashed) without
touching this module.  ``version`` is checked before the rest is
decoded, so a peer on a newer protocol is refused with a version message rather than a
schema error.  ``compat_hash`` covers the fields both sides must agree on (protocol
version, model, dtypes, conv / FA layout, kernel block size); :func:`check_compatible`
compares those fields one by one first so the error names both sides' values, and the
hash only catches what the field list would miss (e.g. a tampered peer).

Plain data only: :func:`check_compatible` works on the Structs, no NIXL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from typing import Any

import msgspec

from hybrid_pd.planner.layout import (
    ConvLayout,
    EngineLayout,
    FaLayout,
    build_engine_layout,
    validate_layout,
)
from hybrid_pd.planner.model_spec import HybridModelSpec

# 2: ModelInfo is derived from HybridModelSpec and so also carries ``dtype_sizes``.
PROTOCOL_VERSION = 2
# Far above any real blob (NIXL agent metadata is KBs); refuses garbage before decoding it.
MAX_HANDSHAKE_BYTES = 16 << 20


class HandshakeError(ValueError):
    """A peer's handshake metadata cannot be used with ours (the message says why)."""


def _wire_struct(cls: type[Any]) -> type[msgspec.Struct]:
    """A frozen, strict Struct with exactly the fields (names and types) of dataclass ``cls``.

    No defaults: a peer must send every field, so an older peer cannot silently fall back
    to our default for a field it does not know.
    """
    hints = typing.get_type_hints(cls)
    return msgspec.defstruct(
        "ModelInfo",
        [(f.name, hints[f.name]) for f in dataclasses.fields(cls)],
        module=__name__,
        frozen=True,
        forbid_unknown_fields=True,
    )


# The HybridModelSpec fields, global (unsharded); enums travel as their values.
ModelInfo = _wire_struct(HybridModelSpec)
_MODEL_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(HybridModelSpec))


class LayoutInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The knobs :func:`build_engine_layout` needs, plus the derived page size (checked)."""

    tp: int
    rank: int
    kernel_block_size: int
    block_size: int  # logical (HMA) block size after alignment
    num_blocks: int
    page_size_bytes: int
    conv_layout: str
    fa_layout: str


class RegionInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    base: int
    length: int


class HandshakeMetadata(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    engine_id: str
    agent_name: str
    agent_metadata: bytes
    mem_type: str  # NIXL memory type of the regions: "DRAM" or "VRAM"
    model: ModelInfo
    layout: LayoutInfo
    regions: tuple[RegionInfo, ...]
    compat_hash: str


class _Envelope(msgspec.Struct):
    """Only the version, decoded first (unknown fields allowed)."""

    version: int


# -- building ---------------------------------------------------------------------


def model_info(spec: HybridModelSpec) -> ModelInfo:
    return ModelInfo(**{name: getattr(spec, name) for name in _MODEL_FIELDS})


def spec_of(info: ModelInfo) -> HybridModelSpec:
    # The spec's __post_init__ validates what the peer sent.
    return HybridModelSpec(**{name: getattr(info, name) for name in _MODEL_FIELDS})


def layout_info(layout: EngineLayout, rank: int) -> LayoutInfo:
    return LayoutInfo(
        tp=layout.tp,
        rank=rank,
        kernel_block_size=layout.kernel_block_size,
        block_size=layout.block_size,
        num_blocks=layout.num_blocks,
        page_size_bytes=layout.page_size_bytes,
        conv_layout=layout.conv_layout.value,
        fa_layout=layout.fa_layout.value,
    )


def _compat_fields(version: int, model: ModelInfo, layout: LayoutInfo) -> dict[str, object]:
    """The fields both sides must agree on, by name (the hash input and the error text)."""
    fields: dict[str, object] = {"protocol version": version}
    # Plain values (enums as their strings), so messages and the hash read the same.
    for name, value in msgspec.to_builtins(model).items():
        fields[f"model.{name}"] = value
    fields["conv_layout"] = layout.conv_layout
    fields["fa_layout"] = layout.fa_layout
    fields["kernel_block_size"] = layout.kernel_block_size
    return fields


def compat_hash(version: int, model: ModelInfo, layout: LayoutInfo) -> str:
    blob = msgspec.json.encode(_compat_fields(version, model, layout), order="sorted")
    return hashlib.sha256(blob).hexdigest()[:16]


def build_metadata(
    *,
    engine_id: str,
    agent_name: str,
    agent_metadata: bytes,
    spec: HybridModelSpec,
    layout: EngineLayout,
    rank: int,
    regions: list[tuple[int, int]] | tuple[tuple[int, int], ...],
    mem_type: str = "DRAM",
    version: int = PROTOCOL_VERSION,
) -> HandshakeMetadata:
    model = model_info(spec)
    lay = layout_info(layout, rank)
    return HandshakeMetadata(
        version=version,
        engine_id=engine_id,
        agent_name=agent_name,
        agent_metadata=agent_metadata,
        mem_type=mem_type,
        model=model,
        layout=lay,
        regions=tuple(RegionInfo(int(b), int(n)) for b, n in regions),
        compat_hash=compat_hash(version, model, lay),
    )


# -- wire ---------------------------------------------------------------------------

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(HandshakeMetadata)
_ENVELOPE = msgspec.msgpack.Decoder(_Envelope)


def encode(meta: HandshakeMetadata) -> bytes:
    return _ENCODER.encode(meta)


def decode(blob: bytes, *, who: str = "peer") -> HandshakeMetadata:
    """Decode and check the version first; ``HandshakeError`` on anything malformed."""
    if len(blob) > MAX_HANDSHAKE_BYTES:
        raise HandshakeError(f"{who}: handshake metadata of {len(blob)} B exceeds {MAX_HANDSHAKE_BYTES} B")
    try:
        version = _ENVELOPE.decode(blob).version
    except msgspec.DecodeError as exc:
        raise HandshakeError(f"{who}: handshake metadata is not valid msgpack ({exc})") from exc
    if version != PROTOCOL_VERSION:
        raise HandshakeError(
            f"{who}: handshake protocol version {version}, ours is {PROTOCOL_VERSION}; "
            "run the same hybrid-pd version on prefill and decode"
        )
    try:
        return _DECODER.decode(blob)
    except msgspec.DecodeError as exc:
        raise HandshakeError(f"{who}: malformed handshake metadata ({exc})") from exc


# -- checking -----------------------------------------------------------------------


def engine_layout(meta: HandshakeMetadata, *, who: str = "peer") -> tuple[HybridModelSpec, EngineLayout]:
    """Rebuild the peer's spec and layout from its metadata, refusing inconsistent ones."""
    lay = meta.layout
    try:
        spec = spec_of(meta.model)
        layout = build_engine_layout(
            spec,
            lay.tp,
            kernel_block_size=lay.kernel_block_size,
            block_size=lay.block_size,
            num_blocks=lay.num_blocks,
            conv_layout=ConvLayout(lay.conv_layout),
            fa_layout=FaLayout(lay.fa_layout),
        )
        validate_layout(spec, layout, who)
    except ValueError as exc:
        raise HandshakeError(f"{who}: layout does not follow from its model ({exc})") from exc
    if layout.block_size != lay.block_size or layout.page_size_bytes != lay.page_size_bytes:
        raise HandshakeError(
            f"{who}: declares block {lay.block_size} / page {lay.page_size_bytes} B but its "
            f"model at TP={lay.tp} gives block {layout.block_size} / page "
            f"{layout.page_size_bytes} B"
        )
    if not 0 <= lay.rank < lay.tp:
        raise HandshakeError(f"{who}: rank {lay.rank} out of range for TP={lay.tp}")
    if len(meta.regions) != layout.num_regions:
        raise HandshakeError(
            f"{who}: {len(meta.regions)} registered regions, its layout has {layout.num_regions}"
        )
    for i, r in enumerate(meta.regions):
        if r.base < 0 or r.length < layout.region_bytes:
            raise HandshakeError(
                f"{who}: region {i} (base {r.base}, {r.length} B) is smaller than "
                f"num_blocks * page = {layout.region_bytes} B"
            )
    return spec, layout


def check_compatible(local: HandshakeMetadata, remote: HandshakeMetadata) -> None:
    """Refuse a peer whose model, dtypes, layouts, kernel block or protocol differ.

    The message names each differing field with both sides' values, e.g.
    ``model.kv_dtype: local (decode engine d0 rank 0) 'bfloat16' != remote (prefill
    engine p0 rank 1) 'float16'``.
    """
    me = f"local ({local.engine_id} rank {local.layout.rank})"
    them = f"remote ({remote.engine_id} rank {remote.layout.rank}, agent {remote.agent_name})"
    ours = _compat_fields(local.version, local.model, local.layout)
    theirs = _compat_fields(remote.version, remote.model, remote.layout)
    diffs = [
        f"{name}: {me} {ours[name]!r} != {them} {theirs[name]!r}"
        for name in ours
        if ours[name] != theirs[name]
    ]
    if diffs:
        raise HandshakeError(
            "handshake refused, the engines are not compatible:\n  "
            + "\n  ".join(diffs)
            + "\nstart both engines with the same model, cache dtypes, conv state layout "
            "(VLLM_SSM_CONV_STATE_LAYOUT) and attention backend"
        )
    # Field-equal but hash-different: the peer computed its hash over other values.
    expect = compat_hash(remote.version, remote.model, remote.layout)
    if remote.compat_hash != expect or local.compat_hash != remote.compat_hash:
        raise HandshakeError(
            f"handshake refused: compatibility hash {me} {local.compat_hash!r} vs {them} "
            f"{remote.compat_hash!r} (recomputed {expect!r}); the peer's metadata is corrupted"
        )
    engine_layout(remote, who=them)


__all__ = [
    "MAX_HANDSHAKE_BYTES",
    "PROTOCOL_VERSION",
    "HandshakeError",
    "HandshakeMetadata",
    "LayoutInfo",
    "ModelInfo",
    "RegionInfo",
    "build_metadata",
    "check_compatible",
    "compat_hash",
    "decode",
    "encode",
    "engine_layout",
    "layout_info",
    "model_info",
    "spec_of",
]
