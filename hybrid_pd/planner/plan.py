"""Descriptor planner: which bytes one decode (D) rank reads from which prefill (P)
ranks for one request.  Pure: plain data in, frozen tuples out.

A descriptor is ``(offset, length, region)``: ``offset`` bytes into registered region
``region`` (shared HMA tensor ``region`` of that rank, see :mod:`layout`).
:func:`views.to_addr_descs` turns them into NIXL's ``(addr, len, dev)`` rows.

How a request is planned (generators are the only code that branches on layer kind or
layout):

1. :func:`templates.peer_templates` - the TP mapping.  For every unit the D rank owns
   (KV head, Mamba head for x and SSM, group for B and C) :func:`layout.source_rank`
   names the P rank to read it from; consecutive units from one P rank become one run.
   A template lists, per P rank, the runs inside one kernel block (FA) and inside one
   Mamba page.
2. :class:`pair.PairPlan` - built once per (D rank, prefill engine) at handshake: every
   pair-level check plus the templates.  :meth:`pair.PairPlan.plan` walks one request's
   blocks: FA by *kernel* blocks, only the ``ceil(N / kernel_block)`` that hold
   computed tokens, Mamba by logical blocks (one whole state per block).
3. Adjacent descriptors contiguous on both sides are merged (``merge=True``).
4. Every descriptor is bounds-checked against its region before it is returned.

:func:`plan_request` is steps 1-4 in one call, for callers without a handshake.

Different block sizes: P and D may have different *logical* (HMA) block sizes - that
happens whenever their page sizes differ, e.g. KV heads replicated on one side only -
and they are planned exactly, since kernel block i holds tokens
``[i*kb, (i+1)*kb)`` on both sides.  Different *kernel* block sizes are refused: a
kernel block is head-major (``[heads, kb, K|V]``), so the same token lands at a
different stride per head, and the transfer would need one descriptor per head per
overlapping token run, or a staging permute - neither is a plain READ.

Modules: :mod:`descs` (plain data, bounds check, merge), :mod:`templates` (TP
mapping), :mod:`pair` (per-pair validation and per-request mapping), :mod:`views`
(dual views, NIXL rows), :mod:`render` (reference costs, text).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hybrid_pd.planner.descs import (
    Desc,
    PeerTemplate,
    ReadPlan,
    RequestPlan,
    Run,
    merge_descs,
)
from hybrid_pd.planner.layout import EngineLayout, FaLayout
from hybrid_pd.planner.model_spec import HybridModelSpec
from hybrid_pd.planner.pair import PairPlan
from hybrid_pd.planner.render import RankCosts, rank_costs, render_plan
from hybrid_pd.planner.templates import peer_templates
from hybrid_pd.planner.views import dual_view, to_addr_descs


def plan_request(
    *,
    spec: HybridModelSpec,
    decode: EngineLayout,
    prefill: EngineLayout,
    decode_rank: int,
    decode_block_ids: Sequence[Sequence[int]],
    prefill_block_ids: Sequence[Sequence[int]],
    num_tokens: int,
    decode_region_lens: Sequence[int] | None = None,
    prefill_region_lens: Mapping[int, Sequence[int]] | None = None,
    merge: bool = True,
) -> RequestPlan:
    """Plan one request's reads for one D rank: :meth:`PairPlan.build` then
    :meth:`PairPlan.plan` (see there for the arguments).  Callers planning many requests
    for one pair should keep the :class:`PairPlan`."""
    pair = PairPlan.build(
        spec=spec,
        decode=decode,
        prefill=prefill,
        decode_rank=decode_rank,
        decode_region_lens=decode_region_lens,
        prefill_region_lens=prefill_region_lens,
    )
    return pair.plan(decode_block_ids, prefill_block_ids, num_tokens, merge=merge)


__all__ = [
    "PairPlan",
    "plan_request",
    # Re-exported from descs / templates / views / render until importers switch.
    "Desc",
    "FaLayout",
    "PeerTemplate",
    "RankCosts",
    "ReadPlan",
    "RequestPlan",
    "Run",
    "dual_view",
    "merge_descs",
    "peer_templates",
    "rank_costs",
    "render_plan",
    "to_addr_descs",
]
