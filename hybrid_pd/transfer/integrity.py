"""KV integrity digests: opt-in, sampled checks that the bytes D holds after a READ are
the bytes P served.

Policy (``off`` | ``every`` | ``sampled:K``, default :data:`settings.DEFAULT_KV_INTEGRITY`):
:meth:`IntegrityPolicy.selects` decides per request from the request key alone
(``xxh3_64(key) % K == 0``), so P and D pick the same requests without talking - as
long as both hash the same key (the request id both know).

For a selected request P digests the source side of each READ (the remote descriptors,
in P's memory) and publishes a :class:`KVDigest`; D digests its destination descriptors
after the READ is DONE and :func:`compare`\\ s the two.  Each descriptor's bytes are
hashed in place with xxHash's XXH3-64 (``xxhash.xxh3_64_intdigest`` over a ctypes
buffer at the descriptor's address: nothing copied); with :class:`Labels` the digests are
also grouped per (layer, view), so a mismatch names the cache layer, the view (``KV``,
``K``, ``V``, ``conv``, ``x``, ``B``, ``C``, ``SSM`` - the planner's run names, see
:data:`VIEW_OF_RUN`), P rank, D rank and the first differing descriptor.

What it checks: that the bytes the READ's descriptors name on P arrived unchanged at
the descriptors it names on D (transport, registration, a stray write on either side in
between).  Both sides digest the *planned* descriptors, so a plan that names the wrong
bytes on both sides is not caught here; the bench's byte-exact verification against the
reference reshard covers the plan.

Descriptor rows are NIXL's ``(addr, len, dev)`` rows of *host* memory (DRAM regions);
``dev`` is not read.  Device memory would need a device-side hash and is refused by
nothing here: callers must only pass host rows.

Wire form: :class:`KVDigest` is a msgspec Struct (``encode`` / ``decode``, msgpack, never
pickle); per-descriptor digests travel packed as little-endian uint64 bytes (8 bytes a
descriptor).  Plain data in, plain data out; no vLLM, NIXL or torch import.  The
plain-data cores (:func:`digest_rows`, :func:`unit_views`, :func:`group_digests`) are
what :func:`digest_descs`, :func:`read_labels` and :func:`compare` wrap.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import numpy as np
import xxhash

from hybrid_pd.planner.descs import PeerTemplate, ReadPlan, RequestPlan
from hybrid_pd.planner.layout import EngineLayout
from hybrid_pd.planner.model_spec import HybridModelSpec
from hybrid_pd.planner.templates import peer_templates
from hybrid_pd.settings import DEFAULT_KV_INTEGRITY
from hybrid_pd.transfer.reads import layer_of_units

# ------------------------------------------------------------------------------ policy

POLICY_FORMS = "'off', 'every' or 'sampled:K' (K an int >= 1: one request in K)"


@dataclass(frozen=True)
class IntegrityPolicy:
    """Which requests get digests: ``off``, ``every`` or ``sampled`` (one in ``k``)."""

    mode: str = DEFAULT_KV_INTEGRITY
    k: int = 0  # sampled only

    @classmethod
    def parse(cls, value: str) -> IntegrityPolicy:
        """``"off"`` / ``"every"`` / ``"sampled:K"``; ``ValueError`` naming the bad value
        and the accepted forms otherwise."""
        if value in ("off", "every"):
            return cls(value, 0)
        if isinstance(value, str) and value.startswith("sampled:"):
            text = value.split(":", 1)[1]
            if text.isascii() and text.isdigit() and int(text) >= 1:
                return cls("sampled", int(text))
        raise ValueError(f"integrity policy must be {POLICY_FORMS}, got {value!r}")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def selects(self, request_key: str | bytes) -> bool:
        """Whether this request is digested: the same answer in every process for the
        same key (XXH3-64 of the key's UTF-8 bytes, not Python's per-process ``hash``)."""
        if self.mode == "off":
            return False
        if self.mode == "every" or self.k == 1:
            return True
        key = request_key.encode() if isinstance(request_key, str) else request_key
        return xxhash.xxh3_64_intdigest(key) % self.k == 0

    def __str__(self) -> str:
        return f"sampled:{self.k}" if self.mode == "sampled" else self.mode


# ------------------------------------------------------------------------------ labels

# The planner's run names (templates.py) -> the view a mismatch names.  "kv" is a packed
# K|V run (vLLM 0.32's FA layout), "conv" the whole conv state (x|B|C) at equal TP.
VIEW_OF_RUN: dict[str, str] = {"kv": "KV", "k": "K", "v": "V", "conv": "conv", "x": "x",
                               "B": "B", "C": "C", "ssm": "SSM"}
VIEWS: tuple[str, ...] = ("KV", "K", "V", "conv", "x", "B", "C", "SSM")


@dataclass(frozen=True, eq=False)
class Labels:
    """Per descriptor (in the read's unit order): its cache layer and its view (an index
    into :data:`VIEWS`)."""

    layers: np.ndarray  # (n,) int64
    views: np.ndarray  # (n,) int64, into VIEWS

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.views):
            raise ValueError(f"{len(self.layers)} layer labels but {len(self.views)} views")

    def __len__(self) -> int:
        return len(self.layers)

    def at(self, i: int) -> tuple[int, str]:
        return int(self.layers[i]), VIEWS[int(self.views[i])]

    def groups(self) -> list[tuple[int, str, np.ndarray]]:
        """(layer, view, descriptor indices) per group, in order of first appearance."""
        keys = self.layers * len(VIEWS) + self.views
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        cuts = np.flatnonzero(np.diff(sk)) + 1
        parts = np.split(order, cuts) if len(order) else []
        parts.sort(key=lambda idx: int(idx[0]))
        return [(int(self.layers[p[0]]), VIEWS[int(self.views[p[0]])], p) for p in parts]


def unit_views(local_ids: np.ndarray, fa_runs: Sequence[str], mamba_runs: Sequence[str], *,
               num_regions: int, num_phys_blocks: int, num_blocks: int) -> np.ndarray:
    """View index (into :data:`VIEWS`) of every dual-view id (see :mod:`planner.views`:
    ``FA id = (region * n_fa + run) * N_phys + kernel_block``, ``Mamba id = (region *
    n_mamba + run) * N_logical + block + num_fa``); runs given by their planner names."""
    ids = np.asarray(local_ids, np.int64)
    names = [*fa_runs, *mamba_runs]
    unknown = [n for n in names if n not in VIEW_OF_RUN]
    if unknown:
        raise ValueError(f"unknown run names {unknown}; known: {sorted(VIEW_OF_RUN)}")
    table = np.asarray([VIEWS.index(VIEW_OF_RUN[n]) for n in names], np.int64)
    n_fa, n_mamba = len(fa_runs), len(mamba_runs)
    num_fa = num_regions * n_fa * num_phys_blocks
    run = np.where(ids < num_fa, (ids // num_phys_blocks) % max(n_fa, 1),
                   n_fa + ((ids - num_fa) // num_blocks) % max(n_mamba, 1))
    return table[run]


def read_labels(read: ReadPlan, template: PeerTemplate, layout: EngineLayout,
                decode_block_ids: Sequence[Sequence[int]]) -> Labels:
    """Labels of an unmerged ``read`` (D rank's ``layout`` and block ids; ``template``
    the same P rank's runs)."""
    if template.prefill_rank != read.prefill_rank:
        raise ValueError(f"template is P rank {template.prefill_rank}'s, read is P rank "
                         f"{read.prefill_rank}'s")
    layers = layer_of_units(read, layout, decode_block_ids)  # refuses merged plans
    views = unit_views(read.local_id_array, [r.name for r in template.fa_runs],
                       [r.name for r in template.mamba_runs], num_regions=layout.num_regions,
                       num_phys_blocks=layout.num_phys_blocks, num_blocks=layout.num_blocks)
    return Labels(layers, views)


def plan_labels(*, spec: HybridModelSpec, decode: EngineLayout, prefill: EngineLayout,
                plan: RequestPlan, decode_block_ids: Sequence[Sequence[int]]) -> dict[int, Labels]:
    """P rank -> :class:`Labels` of every read of an unmerged ``plan`` (D rank
    ``plan.decode_rank``)."""
    templates = {t.prefill_rank: t for t in
                 peer_templates(spec, decode, prefill, plan.decode_rank)}
    return {r.prefill_rank: read_labels(r, templates[r.prefill_rank], decode, decode_block_ids)
            for r in plan.reads}


# ----------------------------------------------------------------------------- digests


class GroupDigest(msgspec.Struct, frozen=True, array_like=True):
    """One (layer, view) group: XXH3-64 over its descriptors' digests, in order."""

    layer: int
    view: str
    first: int  # index of the group's first descriptor
    descriptors: int
    digest: int


class KVDigest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The digests of one side of one (P rank, D rank) read.  ``rank`` is the side's own
    rank (P rank for ``side="src"``, D rank for ``"dst"``), ``peer`` the other's."""

    side: str
    rank: int
    peer: int
    descriptors: int
    nbytes: int
    digests: bytes = b""  # per descriptor: little-endian uint64, descriptor order
    groups: tuple[GroupDigest, ...] = ()
    ns: int = 0  # time spent hashing (and grouping)

    def values(self) -> np.ndarray:
        """Per-descriptor digests as uint64 (empty when only groups were kept)."""
        return np.frombuffer(self.digests, dtype="<u8")

    def encode(self) -> bytes:
        return _ENC.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> KVDigest:
        return _DEC.decode(data)


_ENC = msgspec.msgpack.Encoder()
_DEC = msgspec.msgpack.Decoder(KVDigest)


def digest_rows(rows: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """XXH3-64 of each ``(addr, len, dev)`` row's bytes, read in place (uint64 array).
    The rows must describe readable host memory."""
    arr = np.asarray(rows, dtype=np.uint64).reshape(-1, 3)
    out = np.empty(len(arr), np.uint64)
    h, char = xxhash.xxh3_64_intdigest, ctypes.c_char
    for i, (addr, n) in enumerate(arr[:, :2].tolist()):
        if not addr or not n:
            raise ValueError(f"descriptor {i}: address {addr:#x}, length {n}: nothing to read")
        out[i] = h((char * n).from_address(addr))
    return out


def digest_units(units_runs: Sequence[np.ndarray], bases: Sequence[int],
                 lens: Sequence[int]) -> np.ndarray:
    """XXH3-64 of each unit's bytes: its ``(offset, length, region)`` runs (planner
    descriptors, :class:`~hybrid_pd.planner.integrity_units.Unit` ``runs``) back to back,
    streamed from host memory at ``bases[region] + offset`` (nothing copied).  The digest
    depends on the bytes only, not on where runs break, so two layouts of the same unit
    (P's and D's) give the same digest.  ``ValueError`` when a run leaves its region."""
    out = np.empty(len(units_runs), np.uint64)
    char = ctypes.c_char
    for i, runs in enumerate(units_runs):
        h = xxhash.xxh3_64()
        for off, n, reg in np.asarray(runs, np.int64).reshape(-1, 3).tolist():
            if not 0 <= reg < len(bases) or off < 0 or n <= 0 or off + n > lens[reg]:
                raise ValueError(f"unit {i}: run ({off}, {n}, {reg}) is outside the "
                                 f"{len(bases)} registered regions {list(lens)}")
            h.update((char * n).from_address(bases[reg] + off))
        out[i] = h.intdigest()
    return out


def group_digests(values: np.ndarray, labels: Labels) -> tuple[GroupDigest, ...]:
    """Per (layer, view) group: XXH3-64 over its descriptors' digests in order."""
    if len(values) != len(labels):
        raise ValueError(f"{len(values)} digests but {len(labels)} labels")
    le = np.asarray(values, dtype="<u8")
    return tuple(GroupDigest(layer, view, int(idx[0]), len(idx),
                             xxhash.xxh3_64_intdigest(le[idx].tobytes()))
                 for layer, view, idx in labels.groups())


def digest_descs(rows: np.ndarray | Sequence[Sequence[int]], *, side: str, rank: int,
                 peer: int, labels: Labels | None = None,
                 per_descriptor: bool = True) -> KVDigest:
    """:func:`digest_rows` as a :class:`KVDigest`: per-descriptor digests (unless
    ``per_descriptor=False``) and, with ``labels``, the per-(layer, view) groups."""
    if side not in ("src", "dst"):
        raise ValueError(f"side must be 'src' or 'dst', got {side!r}")
    if not per_descriptor and labels is None:
        raise ValueError("per_descriptor=False keeps only group digests: pass labels")
    t0 = time.perf_counter_ns()
    arr = np.asarray(rows, dtype=np.uint64).reshape(-1, 3)
    values = digest_rows(arr)
    groups = group_digests(values, labels) if labels is not None else ()
    return KVDigest(side, rank, peer, len(arr), int(arr[:, 1].sum()),
                    values.astype("<u8").tobytes() if per_descriptor else b"", groups,
                    time.perf_counter_ns() - t0)


# ----------------------------------------------------------------------------- compare


class Mismatch(msgspec.Struct, frozen=True):
    """One (layer, view) group whose bytes differ between P and D.  ``descriptor`` is the
    first differing descriptor (index in the read's unit order; the group's first one
    when only group digests were compared, and then ``differing`` is 0: unknown)."""

    layer: int
    view: str
    prefill_rank: int
    decode_rank: int
    descriptor: int
    differing: int  # differing descriptors in the group (0: only group digests compared)
    descriptors: int  # descriptors in the group
    src_digest: int
    dst_digest: int

    def __str__(self) -> str:
        which = (f"{self.differing} of {self.descriptors} descriptors differ"
                 if self.differing else f"group of {self.descriptors} descriptors differs")
        return (f"integrity: layer {self.layer} view {self.view}: P rank {self.prefill_rank} "
                f"-> D rank {self.decode_rank}: {which}, first at descriptor {self.descriptor} "
                f"(src {self.src_digest:016x}, dst {self.dst_digest:016x})")


def compare(src: KVDigest, dst: KVDigest, labels: Labels) -> list[Mismatch]:
    """Mismatches between P's source digests and D's destination digests of one read,
    one per differing (layer, view) group, in group order; ``[]`` when equal.  Uses the
    per-descriptor digests when both sides have them, else the group digests."""
    if (src.side, dst.side) != ("src", "dst"):
        raise ValueError(f"compare(src, dst): got sides {src.side!r}, {dst.side!r}")
    if src.peer != dst.rank or dst.peer != src.rank:
        raise ValueError(f"digests of different reads: src P rank {src.rank} for D rank "
                         f"{src.peer}, dst D rank {dst.rank} from P rank {dst.peer}")
    if src.descriptors != dst.descriptors or src.descriptors != len(labels):
        raise ValueError(f"P rank {src.rank} -> D rank {dst.rank}: {src.descriptors} source "
                         f"descriptors, {dst.descriptors} destination, {len(labels)} labels")
    p, d = src.rank, dst.rank
    if src.digests and dst.digests:
        s, t = src.values(), dst.values()
        bad = s != t
        if not bad.any():
            return []
        out = []
        for layer, view, idx in labels.groups():
            b = idx[bad[idx]]
            if len(b):
                i = int(b[0])
                out.append(Mismatch(layer, view, p, d, i, len(b), len(idx), int(s[i]), int(t[i])))
        return out
    sg = {(g.layer, g.view): g for g in (src.groups or group_digests(src.values(), labels))}
    dg = (dst.groups or group_digests(dst.values(), labels))
    if {(g.layer, g.view) for g in dg} != set(sg):
        raise ValueError(f"P rank {p} -> D rank {d}: the two sides' (layer, view) groups differ")
    return [Mismatch(g.layer, g.view, p, d, g.first, 0, g.descriptors,
                     sg[(g.layer, g.view)].digest, g.digest)
            for g in dg if sg[(g.layer, g.view)].digest != g.digest]


def describe(mismatches: Sequence[Mismatch], limit: int = 20) -> list[str]:
    """Text lines for logs and reports (at most ``limit``, then a count)."""
    out = [str(m) for m in mismatches[:limit]]
    if len(mismatches) > limit:
        out.append(f"... and {len(mismatches) - limit} more (layer, view) groups")
    return out


__all__ = ["POLICY_FORMS", "VIEWS", "VIEW_OF_RUN", "GroupDigest", "IntegrityPolicy", "KVDigest",
           "Labels", "Mismatch", "compare", "describe", "digest_descs", "digest_rows", "digest_units",
           "group_digests", "plan_labels", "read_labels", "unit_views"]
