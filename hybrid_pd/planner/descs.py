"""Plain data the planner hands out: descriptors, template runs, per-request plans,
and the descriptor helpers every consumer shares (bounds check, merge).

A descriptor is ``(offset, length, region)``: ``offset`` bytes into registered region
``region`` (shared HMA tensor ``region`` of that rank, see :mod:`layout`).  Plans keep
them as ``(n, 3)`` int64 arrays (what NIXL takes); the tuple views are built on first
use, for readers that want plain Python values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

Desc = tuple[int, int, int]  # (offset_in_region, length, region)


@dataclass(frozen=True)
class Run:
    """One contiguous run inside a block-page, the same bytes on both sides."""

    name: str  # "kv", "k", "v", "conv", "ssm", "x", "B", "C" (rendering only)
    local_offset: int
    remote_offset: int
    length: int


@dataclass(frozen=True)
class PeerTemplate:
    """What one D rank reads from one P rank inside one kernel block / Mamba page."""

    prefill_rank: int
    fa_runs: tuple[Run, ...]  # offsets within a kernel block
    mamba_runs: tuple[Run, ...]  # offsets within a page


def desc_array(descs: Sequence[Desc] | np.ndarray) -> np.ndarray:
    """``descs`` as an ``(n, 3)`` int64 array (no copy when it already is one)."""
    return np.asarray(descs, dtype=np.int64).reshape(-1, 3)


def _rows(arr: np.ndarray) -> tuple[Desc, ...]:
    return tuple(map(tuple, arr.tolist()))


@dataclass(frozen=True, eq=False)
class ReadPlan:
    """One D rank's read from one P rank: the unmerged transfer units as ids into the
    pair's dual views (same order on both sides), their bytes, and descriptors (merged
    or not) on both sides.  The descriptor arrays are built on first use (``descs``):
    a READ through the prepped dual views needs only the ids, so the engine's
    per-request step never builds them.  ``local`` / ``remote`` / ``local_ids`` /
    ``remote_ids`` are tuple views."""

    prefill_rank: int
    local_id_array: np.ndarray  # (units,) int64
    remote_id_array: np.ndarray
    bytes: int
    descs: Callable[[], tuple[np.ndarray, np.ndarray]] = field(repr=False, compare=False)

    @cached_property
    def _desc_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.descs()

    @property
    def local_array(self) -> np.ndarray:
        """(n, 3) int64 descriptors read into."""
        return self._desc_arrays[0]

    @property
    def remote_array(self) -> np.ndarray:
        return self._desc_arrays[1]

    @cached_property
    def local(self) -> tuple[Desc, ...]:
        return _rows(self.local_array)

    @cached_property
    def remote(self) -> tuple[Desc, ...]:
        return _rows(self.remote_array)

    @cached_property
    def local_ids(self) -> tuple[int, ...]:
        return tuple(self.local_id_array.tolist())

    @cached_property
    def remote_ids(self) -> tuple[int, ...]:
        return tuple(self.remote_id_array.tolist())

    @property
    def descriptors(self) -> int:
        return len(self.local_array)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReadPlan):
            return NotImplemented
        return self.prefill_rank == other.prefill_rank and self.bytes == other.bytes and all(
            np.array_equal(a, b) for a, b in zip(
                (self.local_array, self.remote_array, self.local_id_array, self.remote_id_array),
                (other.local_array, other.remote_array, other.local_id_array,
                 other.remote_id_array), strict=True))

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class RequestPlan:
    decode_rank: int
    decode_tp: int
    prefill_tp: int
    num_tokens: int
    num_kernel_blocks: int  # FA kernel blocks read per attention layer
    reads: tuple[ReadPlan, ...]
    merged: bool

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.reads)

    @property
    def descriptors(self) -> int:
        return sum(r.descriptors for r in self.reads)

    @property
    def prefill_ranks(self) -> tuple[int, ...]:
        return tuple(r.prefill_rank for r in self.reads)


def check_desc(d: Desc, lens: tuple[int, ...], who: str, what: str) -> None:
    """``ValueError`` unless ``d`` lies inside one of the regions sized ``lens``."""
    off, length, region = d
    if not 0 <= region < len(lens):
        raise ValueError(f"{who}: descriptor {d} for {what} names region {region} of {len(lens)}")
    if off < 0 or length <= 0 or off + length > lens[region]:
        raise ValueError(
            f"{who}: descriptor (offset={off}, length={length}, region={region}) for {what} "
            f"is outside region {region} of {lens[region]} bytes"
        )


def check_desc_array(descs: np.ndarray, lens: Sequence[int], who: str,
                     what: str | None = None, describe: object = None) -> None:
    """:func:`check_desc` for every row of an ``(n, 3)`` array, vectorized; the message
    names the first bad row (``describe(i)`` says what row ``i`` is, when given)."""
    if not len(descs):
        return
    off, length, region = descs[:, 0], descs[:, 1], descs[:, 2]
    bad = (region < 0) | (region >= len(lens))
    limit = np.asarray(lens, dtype=np.int64)[np.clip(region, 0, max(len(lens) - 1, 0))] \
        if len(lens) else np.zeros_like(off)
    bad |= (off < 0) | (length <= 0) | (off + length > limit)
    if bad.any():
        i = int(np.argmax(bad))
        label = describe(i) if callable(describe) else (what or f"row {i}")
        check_desc(tuple(int(v) for v in descs[i]), tuple(lens), who, label)
        raise AssertionError("check_desc_array and check_desc disagree")  # pragma: no cover


def merge_arrays(local: np.ndarray, remote: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge neighbours that are contiguous on both sides (same region, end == start),
    vectorized: O(n) array work for n units."""
    if len(local) < 2:
        return local, remote
    joins = ((local[1:, 2] == local[:-1, 2]) & (remote[1:, 2] == remote[:-1, 2])
             & (local[:-1, 0] + local[:-1, 1] == local[1:, 0])
             & (remote[:-1, 0] + remote[:-1, 1] == remote[1:, 0]))
    if not joins.any():
        return local, remote
    starts = np.flatnonzero(np.concatenate(([True], ~joins)))
    out_l, out_r = local[starts].copy(), remote[starts].copy()
    out_l[:, 1] = np.add.reduceat(local[:, 1], starts)
    out_r[:, 1] = np.add.reduceat(remote[:, 1], starts)
    return out_l, out_r


def merge_descs(
    local: Sequence[Desc], remote: Sequence[Desc]
) -> tuple[tuple[Desc, ...], tuple[Desc, ...]]:
    """Merge neighbours that are contiguous on both sides (same region, end == start)."""
    if len(local) != len(remote):
        raise ValueError(f"{len(local)} local but {len(remote)} remote descriptors")
    out_l, out_r = merge_arrays(desc_array(local), desc_array(remote))
    return _rows(out_l), _rows(out_r)


__all__ = ["Desc", "PeerTemplate", "ReadPlan", "RequestPlan", "Run", "check_desc", "check_desc_array",
           "desc_array", "merge_arrays", "merge_descs"]
