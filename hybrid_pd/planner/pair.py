"""Planning for one (D rank, prefill engine) pair.

:meth:`PairPlan.build` does everything that depends only on the pair - both layouts
against the model, TP, kernel block sizes, conv / FA layouts, registered region
lengths and the per-P-rank templates (:func:`templates.peer_templates`) - once, at
handshake time.  :meth:`PairPlan.plan` then does only what depends on the request:
block-id checks, the block-id mapping, bounds checks and merging.

Per request (generators are the only code that branches on layer kind):
FA by *kernel* blocks, and only the ``ceil(N / kernel_block)`` that hold computed
tokens; kernel block i is ``ids[i // ratio] * ratio + i % ratio`` with each side's
*own* ratio (the remote ratio for remote ids).  Mamba by logical blocks (one whole
state per block).  Every unit descriptor is bounds-checked before merging (so the
message names the layer) and every merged one again before it is returned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hybrid_pd.planner.descs import (
    Desc,
    PeerTemplate,
    ReadPlan,
    RequestPlan,
    check_desc,
    merge_descs,
)
from hybrid_pd.planner.layout import EngineLayout, cdiv, check_tp, validate_layout
from hybrid_pd.planner.model_spec import HybridModelSpec, LayerKind
from hybrid_pd.planner.templates import peer_templates

BlockIds = tuple[tuple[int, ...], ...]


def _check_block_ids(
    layout: EngineLayout, block_ids: Sequence[Sequence[int]], who: str, num_tokens: int
) -> BlockIds:
    groups = layout.hma_groups
    if len(block_ids) != len(groups):
        raise ValueError(
            f"{who}: got block ids for {len(block_ids)} KV cache groups, the model has "
            f"{len(groups)} ({', '.join(g.kind.value for g in groups)})"
        )
    seen: dict[int, int] = {}
    out = []
    for gi, (group, ids) in enumerate(zip(groups, block_ids, strict=True)):
        ids = tuple(ids)
        for b in ids:
            if not isinstance(b, int) or isinstance(b, bool):
                raise ValueError(f"{who}: group {gi} block id {b!r} is not an int")
            if not 0 <= b < layout.num_blocks:
                raise ValueError(
                    f"{who}: group {gi} ({group.kind.value}) block id {b} out of range "
                    f"[0, {layout.num_blocks})"
                )
            if b in seen:
                raise ValueError(
                    f"{who}: block id {b} appears twice (groups {seen[b]} and {gi}); HMA "
                    "groups share one block pool, so a block belongs to one group"
                )
            seen[b] = gi
        if group.kind is LayerKind.ATTENTION:
            need = cdiv(num_tokens, layout.block_size)
            if len(ids) < need:
                raise ValueError(
                    f"{who}: attention group {gi} has {len(ids)} blocks but {num_tokens} "
                    f"tokens need {need} blocks of {layout.block_size}"
                )
        elif not ids:
            raise ValueError(f"{who}: Mamba group {gi} has no block for the request's state")
        out.append(ids)
    return tuple(out)


def _check_regions(
    layout: EngineLayout, region_lens: Sequence[int] | None, who: str
) -> tuple[int, ...]:
    if region_lens is None:
        return (layout.region_bytes,) * layout.num_regions
    lens = tuple(region_lens)
    if len(lens) != layout.num_regions:
        raise ValueError(
            f"{who}: {len(lens)} registered regions, the layout has {layout.num_regions}"
        )
    for i, n in enumerate(lens):
        if not isinstance(n, int) or n < layout.region_bytes:
            raise ValueError(
                f"{who}: region {i} is {n!r} bytes, smaller than num_blocks * page = "
                f"{layout.num_blocks} * {layout.page_size_bytes} = {layout.region_bytes}"
            )
    return lens


class _Units:
    """Unmerged transfer units of one read, both sides in the same order."""

    __slots__ = ("local", "remote", "lids", "rids", "what")

    def __init__(self) -> None:
        self.local: list[Desc] = []
        self.remote: list[Desc] = []
        self.lids: list[int] = []
        self.rids: list[int] = []
        self.what: list[str] = []

    def add(self, local: Desc, remote: Desc, lid: int, rid: int, what: str) -> None:
        self.local.append(local)
        self.remote.append(remote)
        self.lids.append(lid)
        self.rids.append(rid)
        self.what.append(what)


class PairPlan:
    """Planner state for one D rank and one prefill engine, validated once.

    Build with :meth:`build`; the constructor trusts its arguments.  The only mutable
    state is the per-P-rank registered region lengths, filled in as P ranks handshake
    (:meth:`set_prefill_regions`); a P rank without them is planned against the
    layout's ``num_blocks * page``.
    """

    __slots__ = ("spec", "decode", "prefill", "decode_rank", "templates",
                 "decode_region_lens", "_by_rank", "_prefill_lens", "_region_of")

    def __init__(
        self,
        *,
        spec: HybridModelSpec,
        decode: EngineLayout,
        prefill: EngineLayout,
        decode_rank: int,
        templates: tuple[PeerTemplate, ...],
        decode_region_lens: tuple[int, ...],
    ) -> None:
        self.spec = spec
        self.decode = decode
        self.prefill = prefill
        self.decode_rank = decode_rank
        self.templates = templates
        self.decode_region_lens = decode_region_lens
        self._by_rank = {t.prefill_rank: t for t in templates}
        self._prefill_lens: dict[int, tuple[int, ...]] = {}
        self._region_of = decode.region_of()

    @classmethod
    def build(
        cls,
        *,
        spec: HybridModelSpec,
        decode: EngineLayout,
        prefill: EngineLayout,
        decode_rank: int,
        decode_region_lens: Sequence[int] | None = None,
        prefill_region_lens: Mapping[int, Sequence[int]] | None = None,
    ) -> PairPlan:
        """Validate the pair and build its templates.

        ``*_region_lens``: registered region sizes (from the handshake for P); default
        the layout's ``num_blocks * page``.  Lengths given for a P rank this D rank
        reads nothing from are ignored, unchecked, as they never bound a descriptor.
        """
        check_tp(spec, decode.tp)
        check_tp(spec, prefill.tp)
        validate_layout(spec, decode, "decode layout")
        validate_layout(spec, prefill, "prefill layout")
        if not 0 <= decode_rank < decode.tp:
            raise ValueError(f"decode rank {decode_rank} out of range for TP={decode.tp}")
        if decode.kernel_block_size != prefill.kernel_block_size:
            raise ValueError(
                f"kernel block sizes differ (P {prefill.kernel_block_size}, D "
                f"{decode.kernel_block_size}): kernel blocks are head-major, so a token sits "
                "at a different per-head stride and no set of plain READs maps one onto the "
                "other; run both engines with the same attention backend / kernel block size"
            )
        d_lens = _check_regions(decode, decode_region_lens, f"decode rank {decode_rank}")
        pair = cls(
            spec=spec,
            decode=decode,
            prefill=prefill,
            decode_rank=decode_rank,
            templates=peer_templates(spec, decode, prefill, decode_rank),
            decode_region_lens=d_lens,
        )
        if prefill_region_lens is not None:
            for t in pair.templates:
                lens = prefill_region_lens.get(t.prefill_rank)
                if lens is not None:
                    pair.set_prefill_regions(t.prefill_rank, lens)
        return pair

    def template(self, prefill_rank: int) -> PeerTemplate | None:
        """What this D rank reads from ``prefill_rank``; None when it reads nothing."""
        return self._by_rank.get(prefill_rank)

    def set_prefill_regions(self, prefill_rank: int, lens: Sequence[int]) -> None:
        """Record P rank ``prefill_rank``'s registered region lengths (from its
        handshake); ``ValueError`` when they cannot hold the layout."""
        if not isinstance(prefill_rank, int) or not 0 <= prefill_rank < self.prefill.tp:
            raise ValueError(
                f"prefill rank {prefill_rank!r} out of range for TP={self.prefill.tp}"
            )
        self._prefill_lens[prefill_rank] = _check_regions(
            self.prefill, lens, f"prefill rank {prefill_rank}"
        )

    def prefill_lens(self, prefill_rank: int) -> tuple[int, ...]:
        """The region lengths descriptors read from ``prefill_rank`` are checked against."""
        lens = self._prefill_lens.get(prefill_rank)
        if lens is None:
            return (self.prefill.region_bytes,) * self.prefill.num_regions
        return lens

    def plan(
        self,
        decode_block_ids: Sequence[Sequence[int]],
        prefill_block_ids: Sequence[Sequence[int]],
        num_tokens: int,
        *,
        merge: bool = True,
    ) -> RequestPlan:
        """Plan one request's reads.

        ``*_block_ids``: one list per HMA group, in ``layout.hma_groups`` order.
        Attention groups: the logical blocks holding tokens ``0..N-1`` in order.  Mamba
        groups: the block(s) holding the state (vLLM's default
        ``mamba_cache_mode='none'`` keeps one); paired one to one between P and D.
        ``num_tokens``: tokens whose state P computed.
        """
        if not isinstance(num_tokens, int) or num_tokens <= 0:
            raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
        d_ids = _check_block_ids(self.decode, decode_block_ids, "decode", num_tokens)
        p_ids = _check_block_ids(self.prefill, prefill_block_ids, "prefill", num_tokens)
        for gi, g in enumerate(self.decode.hma_groups):
            if g.kind is LayerKind.MAMBA and len(d_ids[gi]) != len(p_ids[gi]):
                raise ValueError(
                    f"Mamba group {gi}: {len(d_ids[gi])} decode blocks but {len(p_ids[gi])} "
                    "prefill blocks; states are paired one to one"
                )
        n_kb = cdiv(num_tokens, self.decode.kernel_block_size)
        reads = []
        for t in self.templates:
            read = self._read(t, d_ids, p_ids, n_kb, merge)
            if read is not None:
                reads.append(read)
        return RequestPlan(
            decode_rank=self.decode_rank,
            decode_tp=self.decode.tp,
            prefill_tp=self.prefill.tp,
            num_tokens=num_tokens,
            num_kernel_blocks=n_kb,
            reads=tuple(reads),
            merged=merge,
        )

    def __repr__(self) -> str:
        return (
            f"PairPlan(D rank {self.decode_rank}/{self.decode.tp} <- P TP {self.prefill.tp}, "
            f"reads P ranks {sorted(self._by_rank)}, regions given for "
            f"{sorted(self._prefill_lens)})"
        )

    # -- per request --------------------------------------------------------------------
    def _read(
        self, t: PeerTemplate, d_ids: BlockIds, p_ids: BlockIds, n_kb: int, merge: bool
    ) -> ReadPlan | None:
        units = _Units()
        for gi, group in enumerate(self.decode.hma_groups):
            for layer in group.layers:
                if group.kind is LayerKind.ATTENTION:
                    self._fa_units(t, layer, d_ids[gi], p_ids[gi], n_kb, units)
                else:
                    self._mamba_units(t, layer, d_ids[gi], p_ids[gi], units)
        d_who, p_who = f"decode rank {self.decode_rank}", f"prefill rank {t.prefill_rank}"
        d_lens, p_lens = self.decode_region_lens, self.prefill_lens(t.prefill_rank)
        for dl, dr, w in zip(units.local, units.remote, units.what, strict=True):
            check_desc(dl, d_lens, d_who, w)
            check_desc(dr, p_lens, p_who, w)
        if merge:
            out_l, out_r = merge_descs(units.local, units.remote)
        else:
            out_l, out_r = tuple(units.local), tuple(units.remote)
        # Re-check what actually leaves the planner.
        for dl, dr in zip(out_l, out_r, strict=True):
            check_desc(dl, d_lens, d_who, "merged run")
            check_desc(dr, p_lens, p_who, "merged run")
        if not out_l:
            return None
        return ReadPlan(t.prefill_rank, out_l, out_r, tuple(units.lids), tuple(units.rids))

    def _fa_units(
        self, t: PeerTemplate, layer: int, d_blocks: tuple[int, ...],
        p_blocks: tuple[int, ...], n_kb: int, units: _Units,
    ) -> None:
        """FA ids: ``(region * n_fa_runs + run) * N_phys + kernel_block``."""
        d, p = self.decode, self.prefill
        region = self._region_of[layer]
        n_runs = len(t.fa_runs)
        for i in range(n_kb):
            d_phys = d_blocks[i // d.ratio] * d.ratio + i % d.ratio
            p_phys = p_blocks[i // p.ratio] * p.ratio + i % p.ratio
            for ri, run in enumerate(t.fa_runs):
                units.add(
                    (d_phys * d.kernel_block_bytes + run.local_offset, run.length, region),
                    (p_phys * p.kernel_block_bytes + run.remote_offset, run.length, region),
                    (region * n_runs + ri) * d.num_phys_blocks + d_phys,
                    (region * n_runs + ri) * p.num_phys_blocks + p_phys,
                    f"layer {layer} {run.name} kernel block {i}",
                )

    def _mamba_units(
        self, t: PeerTemplate, layer: int, d_blocks: tuple[int, ...],
        p_blocks: tuple[int, ...], units: _Units,
    ) -> None:
        """Mamba ids: ``(region * n_mamba_runs + run) * N_logical + block + num_fa``."""
        d, p = self.decode, self.prefill
        region = self._region_of[layer]
        n_runs, n_fa = len(t.mamba_runs), len(t.fa_runs)
        d_num_fa = d.num_regions * n_fa * d.num_phys_blocks
        p_num_fa = p.num_regions * n_fa * p.num_phys_blocks
        for d_blk, p_blk in zip(d_blocks, p_blocks, strict=True):
            for ri, run in enumerate(t.mamba_runs):
                units.add(
                    (d_blk * d.page_size_bytes + run.local_offset, run.length, region),
                    (p_blk * p.page_size_bytes + run.remote_offset, run.length, region),
                    (region * n_runs + ri) * d.num_blocks + d_blk + d_num_fa,
                    (region * n_runs + ri) * p.num_blocks + p_blk + p_num_fa,
                    f"layer {layer} {run.name} block {d_blk}<-{p_blk}",
                )


__all__ = ["PairPlan"]
