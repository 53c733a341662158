"""Dual views and the NIXL address conversion, for executors that prep the descriptor
lists once per peer (upstream style).

Per (D rank, P rank) pair both sides index the same template:
``FA id = (region * n_fa_runs + run) * N_phys + kernel_block`` (``num_fa =
regions * n_fa_runs * N_phys``), ``Mamba id = (region * n_mamba_runs + run) * N_logical
+ block + num_fa``.  :func:`dual_view` materialises one side; every
:class:`~descs.ReadPlan` carries the unmerged ids into them.
"""

from __future__ import annotations

from collections.abc import Sequence

from hybrid_pd.planner.descs import Desc, PeerTemplate, check_desc
from hybrid_pd.planner.layout import EngineLayout


def dual_view(
    layout: EngineLayout, template: PeerTemplate, side: str
) -> tuple[Desc, ...]:
    """All descriptors of one side's dual view for one (D rank, P rank) pair, in id
    order (FA section, then Mamba).  ``side`` is ``"local"`` (D) or ``"remote"`` (P).
    Sized ``regions * runs * blocks``: meant for prepping once per peer."""
    if side not in ("local", "remote"):
        raise ValueError(f"side must be 'local' or 'remote', got {side!r}")
    out: list[Desc] = []
    for region in range(layout.num_regions):
        for run in template.fa_runs:
            off = run.local_offset if side == "local" else run.remote_offset
            for p in range(layout.num_phys_blocks):
                out.append((p * layout.kernel_block_bytes + off, run.length, region))
    for region in range(layout.num_regions):
        for run in template.mamba_runs:
            off = run.local_offset if side == "local" else run.remote_offset
            for b in range(layout.num_blocks):
                out.append((b * layout.page_size_bytes + off, run.length, region))
    return tuple(out)


def to_addr_descs(
    descs: Sequence[Desc], region_bases: Sequence[int], region_lens: Sequence[int], dev: int = 0
) -> tuple[tuple[int, int, int], ...]:
    """``(offset, len, region)`` -> NIXL ``(addr, len, dev)``, checked against the
    registered regions (bases must be non-negative and regions must not overlap)."""
    if len(region_bases) != len(region_lens):
        raise ValueError(
            f"{len(region_bases)} region bases but {len(region_lens)} region lengths"
        )
    spans = sorted(zip(region_bases, region_lens, strict=True))
    for (b0, n0), (b1, _) in zip(spans, spans[1:], strict=False):
        if b0 < 0 or b0 + n0 > b1:
            raise ValueError(f"registered regions overlap or have a negative base: {spans}")
    if spans and spans[0][0] < 0:
        raise ValueError(f"negative region base {spans[0][0]}")
    lens = tuple(region_lens)
    out = []
    for d in descs:
        check_desc(d, lens, "to_addr_descs", "executor")
        out.append((region_bases[d[2]] + d[0], d[1], dev))
    return tuple(out)


__all__ = ["dual_view", "to_addr_descs"]
