"""Plain data the planner hands out: descriptors, template runs, per-request plans,
and the two descriptor helpers every consumer shares (bounds check, merge).

A descriptor is ``(offset, length, region)``: ``offset`` bytes into registered region
``region`` (shared HMA tensor ``region`` of that rank, see :mod:`layout`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ReadPlan:
    prefill_rank: int
    local: tuple[Desc, ...]
    remote: tuple[Desc, ...]
    # Unmerged transfer units as ids into the dual views (same order on both sides).
    local_ids: tuple[int, ...]
    remote_ids: tuple[int, ...]

    @property
    def bytes(self) -> int:
        return sum(d[1] for d in self.local)

    @property
    def descriptors(self) -> int:
        return len(self.local)


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


def merge_descs(
    local: Sequence[Desc], remote: Sequence[Desc]
) -> tuple[tuple[Desc, ...], tuple[Desc, ...]]:
    """Merge neighbours that are contiguous on both sides (same region, end == start)."""
    out_l: list[Desc] = []
    out_r: list[Desc] = []
    for dl, dr in zip(local, remote, strict=True):
        if out_l:
            pl, pr = out_l[-1], out_r[-1]
            if (
                pl[2] == dl[2]
                and pr[2] == dr[2]
                and pl[0] + pl[1] == dl[0]
                and pr[0] + pr[1] == dr[0]
            ):
                out_l[-1] = (pl[0], pl[1] + dl[1], pl[2])
                out_r[-1] = (pr[0], pr[1] + dr[1], pr[2])
                continue
        out_l.append(dl)
        out_r.append(dr)
    return tuple(out_l), tuple(out_r)


__all__ = ["Desc", "PeerTemplate", "ReadPlan", "RequestPlan", "Run", "check_desc", "merge_descs"]
