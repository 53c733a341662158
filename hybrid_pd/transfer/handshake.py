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
import numbers
import typing
from collections.abc import Sequence
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


# -- caps on a peer's claimed geometry -------------------------------------------------
# A peer's sizes come off the network, and what D builds per peer (dual views: regions x
# runs x blocks descriptors) grows with them, so they are bounded by what the local side
# knows (its model and its own registration) before anything is built from them.
MAX_BLOCKS_FACTOR = 64  # a peer may have at most this many times our (logical) blocks,
# and never fewer than this many whatever ours (a D with a small cache still pairs with a
# P of ordinary size; the bounded-time views are built for this scale)
MIN_BLOCKS_CAP = 1 << 17
MAX_KERNEL_BLOCK_SIZE = 1 << 16  # tokens per kernel block
MAX_BLOCK_RATIO = 1 << 12  # kernel blocks per logical block
MAX_TP = 1 << 12
MAX_DEVICE_ID = 1 << 16
ADDRESS_SPACE = 1 << 64  # a region must end inside a 64-bit address space


@dataclasses.dataclass(frozen=True)
class PeerCaps:
    """Upper bounds on a peer's geometry, derived from the local side."""

    max_blocks: int  # logical blocks
    max_regions: int  # never more shared tensors than the model has cache layers
    local_blocks: int  # for the message
    # Kernel blocks are head-major: no plain READ maps one kernel block size onto another.
    kernel_block_size: int | None = None

    @property
    def why(self) -> str:
        """How ``max_blocks`` was derived (for the refusal message)."""
        return f" ({MAX_BLOCKS_FACTOR} x our {self.local_blocks} blocks, at least {MIN_BLOCKS_CAP})"


def peer_caps(spec: HybridModelSpec, local: EngineLayout | LayoutInfo) -> PeerCaps:
    return PeerCaps(max_blocks=max(MAX_BLOCKS_FACTOR * local.num_blocks, MIN_BLOCKS_CAP),
                    max_regions=len(spec.cache_layers), local_blocks=local.num_blocks,
                    kernel_block_size=local.kernel_block_size)


def check_int(field: str, value: object, lo: int, hi: int, who: str, why: str = "") -> int:
    """``value`` as an int in ``[lo, hi]``; bools, floats, strings and None are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or \
            not lo <= int(value) <= hi:
        raise HandshakeError(
            f"{who}: {field}={value!r} refused: must be an int in [{lo}, {hi}]{why}")
    return int(value)


def check_peer_geometry(caps: PeerCaps, *, num_blocks: object, kernel_block_size: object,
                        block_size: object, num_regions: int, who: str) -> None:
    """A peer's block count, block sizes and region count against ``caps``: O(1), and
    run before anything proportional to those sizes is built."""
    check_int("num_blocks", num_blocks, 1, caps.max_blocks, who, caps.why)
    kernel = check_int("kernel_block_size", kernel_block_size, 1, MAX_KERNEL_BLOCK_SIZE, who)
    if caps.kernel_block_size is not None and kernel != caps.kernel_block_size:
        raise HandshakeError(f"{who}: kernel_block_size={kernel} refused: must equal ours "
                             f"({caps.kernel_block_size}); kernel blocks are head-major")
    block = check_int("block_size", block_size, kernel, kernel * MAX_BLOCK_RATIO, who,
                      f" (kernel block {kernel} x at most {MAX_BLOCK_RATIO})")
    if block % kernel:
        raise HandshakeError(
            f"{who}: block_size={block} is not a multiple of kernel_block_size={kernel}")
    check_int("regions", num_regions, 1, caps.max_regions, who,
              " (at most one per cache layer of the model)")


def check_peer_regions(bases: Sequence[object], lens: Sequence[object], num_regions: int,
                       min_len: int, who: str) -> None:
    """Registered regions as the peer claims them: one base and one length per layout
    region, each at least ``min_len`` bytes, inside the address space, disjoint.  Call
    after :func:`check_peer_geometry` has bounded ``num_regions``."""
    for field, values in (("base addresses", bases), ("region lengths", lens)):
        if len(values) != num_regions:
            raise HandshakeError(f"{who}: {len(values)} {field}, its layout has "
                                 f"{num_regions} regions")
    spans = []
    for i, (base, length) in enumerate(zip(bases, lens, strict=True)):
        b = check_int(f"region {i} base", base, 0, ADDRESS_SPACE - 1, who)
        n = check_int(f"region {i} length", length, min_len, ADDRESS_SPACE - b, who,
                      f" (num_blocks * page = {min_len} B, ending in a 64-bit space)")
        spans.append((b, n))
    spans.sort()
    for (b0, n0), (b1, _) in zip(spans, spans[1:], strict=False):
        if b0 + n0 > b1:
            raise HandshakeError(f"{who}: registered regions overlap ({b0:#x}+{n0} > {b1:#x})")


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


def engine_layout(meta: HandshakeMetadata, *, who: str = "peer",
                  caps: PeerCaps | None = None) -> tuple[HybridModelSpec, EngineLayout]:
    """Rebuild the peer's spec and layout from its metadata, refusing inconsistent ones.

    ``caps`` (from :func:`peer_caps`) bounds the block count by the local engine's;
    without it only the model's bounds apply (region count, types, address space)."""
    lay = meta.layout
    try:
        spec = spec_of(meta.model)
    except (ValueError, TypeError) as exc:
        raise HandshakeError(f"{who}: invalid model ({exc})") from exc
    if caps is None:
        caps = PeerCaps(max_blocks=ADDRESS_SPACE - 1, max_regions=len(spec.cache_layers),
                        local_blocks=(ADDRESS_SPACE - 1) // MAX_BLOCKS_FACTOR)
    tp = check_int("tp", lay.tp, 1, MAX_TP, who)
    check_int("rank", lay.rank, 0, tp - 1, who, f" (TP={tp})")
    check_peer_geometry(caps, num_blocks=lay.num_blocks, kernel_block_size=lay.kernel_block_size,
                        block_size=lay.block_size, num_regions=len(meta.regions), who=who)
    check_int("page_size_bytes", lay.page_size_bytes, 1, ADDRESS_SPACE - 1, who)
    if meta.mem_type not in ("DRAM", "VRAM"):
        raise HandshakeError(f"{who}: mem_type={meta.mem_type!r} refused: must be DRAM or VRAM")
    try:
        layout = build_engine_layout(
            spec,
            tp,
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
    if len(meta.regions) != layout.num_regions:
        raise HandshakeError(
            f"{who}: {len(meta.regions)} registered regions, its layout has {layout.num_regions}"
        )
    check_peer_regions([r.base for r in meta.regions], [r.length for r in meta.regions],
                       layout.num_regions, layout.region_bytes, who)
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
    engine_layout(remote, who=them, caps=local_caps(local))


def local_caps(local: HandshakeMetadata) -> PeerCaps:
    """Caps on a peer of the engine that sent ``local`` (our own metadata)."""
    return peer_caps(spec_of(local.model), local.layout)


__all__ = [
    "ADDRESS_SPACE",
    "MAX_BLOCKS_FACTOR",
    "MIN_BLOCKS_CAP",
    "MAX_BLOCK_RATIO",
    "MAX_DEVICE_ID",
    "MAX_HANDSHAKE_BYTES",
    "MAX_KERNEL_BLOCK_SIZE",
    "MAX_TP",
    "PROTOCOL_VERSION",
    "HandshakeError",
    "PeerCaps",
    "HandshakeMetadata",
    "LayoutInfo",
    "ModelInfo",
    "RegionInfo",
    "build_metadata",
    "check_compatible",
    "check_int",
    "check_peer_geometry",
    "check_peer_regions",
    "compat_hash",
    "decode",
    "encode",
    "engine_layout",
    "layout_info",
    "local_caps",
    "model_info",
    "peer_caps",
    "spec_of",
]
