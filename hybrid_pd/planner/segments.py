"""Per-request descriptor arithmetic for :class:`~hybrid_pd.planner.pair.PairPlan`.

A *stack* is a run of consecutive HMA groups of one kind with equal shapes (``G``
groups, ``L`` layers each); within a group only the region differs between layers.  A
:class:`Recipe` holds, for one stack read from one P rank, everything that does not
depend on block ids (run offsets and lengths, the dual-view id bases, each layer's
region length), built once per pair.  :meth:`Recipe.segment` then turns the request's
(physical) block positions into a :class:`Segment` with a fixed number of numpy
operations, whatever the prompt length.

Unit order: group, layer, position, run -- the order the dual-view ids are listed in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from hybrid_pd.planner.descs import Run, check_desc, merge_arrays


@dataclass(frozen=True)
class Stack:
    groups: tuple[int, ...]
    attention: bool
    layers: tuple[tuple[int, ...], ...]
    regions: np.ndarray  # (G, L): each layer's region


class Segment:
    """One stack's units for one request, from its :class:`Recipe` and the block
    positions ``(G, k)`` of each side.  Offsets and lengths (``(G, m)``, ``m = k *
    runs``) are built only when descriptors are asked for; the dual-view ids are
    written straight into the caller's arrays (:meth:`ids_into`)."""

    __slots__ = ("recipe", "regions", "d_pos", "p_pos", "name", "_offs")

    def __init__(self, recipe: Recipe, d_pos: np.ndarray, p_pos: np.ndarray,
                 name: Callable[[int, int, int], str]) -> None:
        self.recipe, self.regions = recipe, recipe.stack.regions
        self.d_pos, self.p_pos, self.name = d_pos, p_pos, name
        self._offs: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def size(self) -> int:
        """Units: groups x layers x positions x runs."""
        (g, nl), k = self.regions.shape, self.d_pos.shape[1]
        return g * nl * k * len(self.recipe.runs)

    @property
    def bytes(self) -> int:
        (g, nl), k = self.regions.shape, self.d_pos.shape[1]
        return g * nl * k * self.recipe.run_bytes

    def ids_into(self, local: np.ndarray, remote: np.ndarray) -> None:
        """Dual-view ids ``[group, layer, position, run]`` into the two flat arrays."""
        (g, nl), k = self.regions.shape, self.d_pos.shape[1]
        shape = (g, nl, k, len(self.recipe.runs))
        d_first, p_first = self.recipe.first_4d
        np.add(d_first, self.d_pos[:, None, :, None], out=local.reshape(shape))
        np.add(p_first, self.p_pos[:, None, :, None], out=remote.reshape(shape))

    def _offsets(self) -> tuple[np.ndarray, np.ndarray]:
        if self._offs is None:
            g = len(self.d_pos)
            self._offs = tuple(  # type: ignore[assignment]
                ((pos * s)[:, :, None] + o).reshape(g, -1) for pos, s, o in zip(
                    (self.d_pos, self.p_pos), self.recipe.strides, self.recipe.run_off,
                    strict=True))
        return self._offs  # type: ignore[return-value]

    @property
    def d_off(self) -> np.ndarray:
        return self._offsets()[0]

    @property
    def p_off(self) -> np.ndarray:
        return self._offsets()[1]

    @property
    def length(self) -> np.ndarray:
        g, k = self.d_pos.shape
        return np.broadcast_to(self.recipe.lengths, (g, k, len(self.recipe.runs))).reshape(g, -1)

    def _rows(self, off: np.ndarray, length: np.ndarray, src: np.ndarray | None,
              g_out: np.ndarray, l_out: np.ndarray) -> np.ndarray:
        out = np.empty((len(g_out), 3), np.int64)
        out[:, 0] = off if src is None else off[src]
        out[:, 1] = length if src is None else length[src]
        out[:, 2] = self.regions[g_out, l_out]
        return out

    def units(self, side: str) -> np.ndarray:
        """Every unit descriptor of one side, ``(G * layers * m, 3)``."""
        off = self._offsets()[0 if side == "local" else 1]
        (g, m), nl = off.shape, self.regions.shape[1]
        out = np.empty((g, nl, m, 3), np.int64)
        out[..., 0] = off[:, None, :]
        out[..., 1] = np.tile(self.recipe.lengths, m // len(self.recipe.runs))
        out[..., 2] = self.regions[:, :, None]
        return out.reshape(-1, 3)

    def merged(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Units merged where contiguous on both sides (never across groups or layers:
        a layer is its own region), both sides ``(rows, 3)``; the joins are the same for
        every layer of a group, so they are found once per group.  Also the rows of
        each group."""
        d_off, p_off = self._offsets()
        (g, m), nl = d_off.shape, self.regions.shape[1]
        d, p, n = d_off.ravel(), p_off.ravel(), self.length.ravel()
        joins = (d[:-1] + n[:-1] == d[1:]) & (p[:-1] + n[:-1] == p[1:])
        joins[m - 1::m] = False  # a group ends
        if not joins.any():  # nothing merges (e.g. head slices): the units themselves
            return self.units("local"), self.units("remote"), np.full(g, nl * m, np.int64)
        starts = np.flatnonzero(np.concatenate(([True], ~joins)))
        lengths = np.add.reduceat(n, starts)
        if g == 1:  # one group: every layer repeats the same runs
            k = len(starts)
            g_out, src = np.zeros(nl * k, np.int64), np.tile(np.arange(k), nl)
            l_out = np.repeat(np.arange(nl), k)
            reps = np.array([nl * k])
        else:
            counts = np.bincount(starts // m, minlength=g)  # merged runs per group
            reps = counts * nl
            g_out = np.repeat(np.arange(g), reps)
            pos = np.arange(int(reps.sum())) - np.repeat(np.cumsum(reps) - reps, reps)
            k = counts[g_out]
            src = (np.cumsum(counts) - counts)[g_out] + pos % k
            l_out = pos // k
        return (self._rows(d[starts], lengths, src, g_out, l_out),
                self._rows(p[starts], lengths, src, g_out, l_out), reps)

    def check(self, side: str, lens: tuple[int, ...], who: str) -> None:
        """Every unit inside its region, naming the first that is not (the slow path:
        :meth:`Recipe.segment` runs it only when its quick bound fails)."""
        off = self.d_off if side == "local" else self.p_off
        if not off.size:
            return
        n = self.length
        limit = np.asarray(lens, np.int64)[np.clip(self.regions, 0, len(lens) - 1)]
        ok = ((self.regions >= 0) & (self.regions < len(lens))
              & (off.min(axis=1) >= 0)[:, None] & (n.min(axis=1) > 0)[:, None]
              & ((off + n).max(axis=1)[:, None] <= limit))
        if ok.all():
            return
        gi, li = (int(x) for x in np.argwhere(~ok)[0])
        region = int(self.regions[gi, li])
        top = lens[region] if 0 <= region < len(lens) else -1
        k = int(np.argmax((off[gi] < 0) | (n[gi] <= 0) | (off[gi] + n[gi] > top)))
        check_desc((int(off[gi, k]), int(n[gi, k]), region), lens, who, self.name(gi, li, k))
        raise AssertionError("segment check and check_desc disagree")  # pragma: no cover


class Recipe:
    """One stack read from one P rank: the block-id-independent half of its units.

    ``strides``: bytes per block position on (D, P); ``per_region``: block positions
    per (region, run) on (D, P), so also the dual-view ids per (region, run); ``bases``:
    the first id of this kind on (D, P); ``lens``: each side's region lengths (a unit
    must end inside its layer's region)."""

    __slots__ = ("stack", "runs", "strides", "run_off", "lengths", "first", "run_end",
                 "limits", "simple", "proven", "run_bytes", "first_4d")

    def __init__(self, stack: Stack, runs: Sequence[Run], strides: tuple[int, int],
                 per_region: tuple[int, int], bases: tuple[int, int],
                 lens: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
        self.stack, self.runs, self.strides = stack, tuple(runs), strides
        r = stack.regions
        self.run_off = (np.asarray([x.local_offset for x in runs], np.int64),
                        np.asarray([x.remote_offset for x in runs], np.int64))
        self.lengths = np.asarray([x.length for x in runs], np.int64)
        run_ids = r[:, :, None] * len(runs) + np.arange(len(runs))
        self.first = tuple(run_ids * per_region[s] + bases[s] for s in (0, 1))  # (G, L, n)
        self.run_end = tuple(int((o + self.lengths).max()) for o in self.run_off)
        self.limits = tuple(np.asarray(ln, np.int64)[np.clip(r, 0, len(ln) - 1)]
                            .min(axis=1) for ln in lens)  # (G,): the tightest layer
        # quick bound valid: offsets >= 0 (block positions are), lengths > 0, regions real
        self.simple = bool(all(o.min() >= 0 for o in self.run_off)
                           and self.lengths.min() > 0 and r.min() >= 0
                           and r.max() < min(len(ln) for ln in lens))
        # Block ids are range-checked, so positions stay below ``per_region``: when even
        # the last position's units fit every layer's region (true unless a region is
        # shorter than the layout says), no request needs a bounds check on that side.
        self.proven = tuple(self.simple and (n - 1) * s + end <= int(limit.min())
                            for n, s, end, limit in zip(per_region, strides, self.run_end,
                                                        self.limits, strict=True))
        self.run_bytes = int(self.lengths.sum())
        self.first_4d = tuple(f[:, :, None, :] for f in self.first)  # (G, L, 1, n) views

    def segment(self, d_pos: np.ndarray, p_pos: np.ndarray,
                name: Callable[[int, int, int], str], lens: tuple[tuple[int, ...], ...],
                who: tuple[str, str]) -> Segment:
        """The stack's units at block positions ``(G, k)`` of each side, bounds-checked:
        every unit ends at most at ``max position * stride + the last run's end``, so one
        comparison per group and side proves the whole stack in bounds."""
        seg = Segment(self, d_pos, p_pos, name)
        if self.proven == (True, True):
            return seg
        for side, pos, s, end, limit, ln, w, proven in zip(
                ("local", "remote"), (d_pos, p_pos), self.strides, self.run_end, self.limits,
                lens, who, self.proven, strict=True):
            if proven:
                continue
            if not self.simple or (np.maximum.reduce(pos, axis=1) * s + end > limit).any():
                seg.check(side, ln, w)
        return seg


def merge_across(local: np.ndarray, remote: np.ndarray, group_rows: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Merge across groups, after each segment merged its own units.  Inside a group
    nothing more can join (its rows are maximal runs, and each layer is its own
    region), so only the first row of each group is tested against its predecessor (a
    few); only if one joins is everything merged again."""
    cand = np.cumsum(group_rows)[:-1]
    cand = cand[(cand > 0) & (cand < len(local))]
    if not cand.size:
        return local, remote
    a, b, c, d = local[cand - 1], local[cand], remote[cand - 1], remote[cand]
    if not ((a[:, 2] == b[:, 2]) & (c[:, 2] == d[:, 2]) & (a[:, 0] + a[:, 1] == b[:, 0])
            & (c[:, 0] + c[:, 1] == d[:, 0])).any():
        return local, remote
    return merge_arrays(local, remote)


__all__ = ["Recipe", "Segment", "Stack", "merge_across"]
