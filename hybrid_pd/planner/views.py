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

import numpy as np

from hybrid_pd.planner.descs import Desc, PeerTemplate, check_desc_array, desc_array
from hybrid_pd.planner.layout import EngineLayout


def dual_view(layout: EngineLayout, template: PeerTemplate, side: str) -> np.ndarray:
    """All descriptors of one side's dual view for one (D rank, P rank) pair, in id
    order (FA section, then Mamba), as an ``(n, 3)`` int64 array of ``(offset, length,
    region)``.  ``side`` is ``"local"`` (D) or ``"remote"`` (P).  Sized ``regions * runs
    * blocks`` (24 bytes a row): built once per peer, by array arithmetic."""
    if side not in ("local", "remote"):
        raise ValueError(f"side must be 'local' or 'remote', got {side!r}")
    regions = np.arange(layout.num_regions, dtype=np.int64)
    sections = ((template.fa_runs, layout.num_phys_blocks, layout.kernel_block_bytes),
                (template.mamba_runs, layout.num_blocks, layout.page_size_bytes))
    total = sum(len(runs) * n for runs, n, _ in sections) * layout.num_regions
    out = np.empty((total, 3), np.int64)
    at = 0
    for runs, n_blocks, stride in sections:
        if not runs:
            continue
        off = [r.local_offset if side == "local" else r.remote_offset for r in runs]
        n = layout.num_regions * len(runs) * n_blocks
        view = out[at:at + n].reshape(layout.num_regions, len(runs), n_blocks, 3)
        view[..., 0] = np.arange(n_blocks, dtype=np.int64) * stride
        view[..., 0] += np.asarray(off, np.int64)[None, :, None]
        view[..., 1] = np.asarray([r.length for r in runs], np.int64)[None, :, None]
        view[..., 2] = regions[:, None, None]
        at += n
    return out


def to_addr_descs(
    descs: Sequence[Desc] | np.ndarray, region_bases: Sequence[int],
    region_lens: Sequence[int], dev: int = 0,
) -> np.ndarray:
    """``(offset, len, region)`` -> NIXL ``(addr, len, dev)`` rows (an ``(n, 3)`` uint64
    array), checked against the registered regions (bases must be non-negative and
    regions must not overlap)."""
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
    arr = desc_array(descs)
    check_desc_array(arr, tuple(region_lens), "to_addr_descs", "executor")
    out = np.empty(arr.shape, np.uint64)
    out[:, 0] = np.asarray(region_bases, np.uint64)[arr[:, 2]] + arr[:, 0].astype(np.uint64)
    out[:, 1] = arr[:, 1]
    out[:, 2] = dev
    return out


__all__ = ["dual_view", "to_addr_descs"]
