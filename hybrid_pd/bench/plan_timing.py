"""``hybrid-pd plan --bench``: what per-request planning costs, beside upstream's own
descriptor-id computation for the same request, measured in one run.

* ``plan_ms_*``: the engine's per-request step, ``PairPlan.plan(..., merge=False)``
  (block ids -> checked dual-view ids of every unit and their bytes: what the connector
  hands NIXL's prepped READ), ``--repeat`` times per D rank, every rank; the pair-level
  work (``PairPlan.build``: templates, checks) is done once, outside the timing, as the
  connector does it once per peer.
* ``descs_ms_*``: the same plus both sides' descriptor arrays, merged unless
  ``--no-merge`` (what a READ from lists of descriptors would post).
* ``views_ms`` / ``views_bytes``: both dual views of every (D rank 0, P rank) pair and
  their NIXL rows (what is prepped once per peer).
* ``upstream_desc_ids_ms_*``: vLLM's ``NixlBaseConnectorWorker._compute_desc_ids`` on an
  object carrying the attributes its worker sets at registration (HMA groups, regions,
  Mamba conv split), called as its pull worker calls it per request: once for P's ids and
  once for D's, per P rank read.  Attention ids are kernel-block ids of every logical
  block (upstream reads whole logical blocks).  ``null`` with ``upstream_error`` when
  vLLM is not importable.

Timings are ``time.perf_counter_ns`` around single calls; medians and p99 over all
repetitions.  The planner itself imports no vLLM: only this module does, lazily.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from hybrid_pd.planner.layout import EngineLayout
from hybrid_pd.planner.model_spec import HybridModelSpec, LayerKind
from hybrid_pd.planner.pair import PairPlan
from hybrid_pd.planner.views import dual_view, to_addr_descs


def _ms(samples: Sequence[int]) -> dict[str, float]:
    arr = np.asarray(samples, dtype=np.float64) / 1e6
    return {"median": round(float(np.median(arr)), 4),
            "p99": round(float(np.percentile(arr, 99)), 4)}


def _time(fn: Callable[[], Any], repeat: int) -> list[int]:
    fn()  # warm caches (imports, numpy dispatch)
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - t0)
    return out


def time_views(spec: HybridModelSpec, d: EngineLayout, p: EngineLayout) -> dict[str, Any]:
    """Both dual views + NIXL rows of D rank 0 with each P rank it reads: time and the
    peak memory numpy allocated for them (tracemalloc)."""
    pair = PairPlan.build(spec=spec, decode=d, prefill=p, decode_rank=0)
    lens_d = (d.region_bytes,) * d.num_regions
    lens_p = (p.region_bytes,) * p.num_regions
    bases_d = [i * d.region_bytes for i in range(d.num_regions)]
    bases_p = [i * p.region_bytes for i in range(p.num_regions)]

    def build() -> int:
        rows = 0
        for t in pair.templates:
            local = to_addr_descs(dual_view(d, t, "local"), bases_d, lens_d)
            remote = to_addr_descs(dual_view(p, t, "remote"), bases_p, lens_p)
            rows += len(local) + len(remote)
        return rows

    t0 = time.perf_counter_ns()
    rows = build()
    took = time.perf_counter_ns() - t0
    tracemalloc.start()
    build()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"views_ms": round(took / 1e6, 3), "views_rows": rows, "views_peak_bytes": peak}


def upstream_worker(layout: EngineLayout) -> Any:
    """vLLM's worker class, uninitialised, with the attributes ``_compute_desc_ids``
    reads set as its ``register_kv_caches`` sets them for this layout."""
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker import (
        NixlBaseConnectorWorker,
    )
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec

    w = object.__new__(NixlBaseConnectorWorker)
    w._has_mamba = any(g.kind is LayerKind.MAMBA for g in layout.hma_groups)
    w._conv_decomp = SimpleNamespace(local_conv_offsets=[(0, 0)] * 3)  # Mamba2: x, B, C
    w._ssm_region_indices = []
    w._scratch_region_indices = []
    w._transfer_layer_group_ids = ()
    w._ple_group_index = None
    w.block_len_per_layer = [layout.page_size_bytes] * layout.num_regions
    w.num_regions = layout.num_regions
    w.region_group_ids = [0] * layout.num_regions
    w._uses_region_group_mapping = False
    w._group_spec_types = tuple(FullAttentionSpec if g.kind is LayerKind.ATTENTION
                                else MambaSpec for g in layout.hma_groups)
    return w


def upstream_ids(layout: EngineLayout, block_ids: Sequence[Sequence[int]]) -> list[list[int]]:
    """Block ids as upstream's pull worker passes them: every kernel block of each
    attention block, logical ids for Mamba."""
    out = []
    for g, ids in zip(layout.hma_groups, block_ids, strict=True):
        if g.kind is LayerKind.ATTENTION:
            r = layout.ratio
            out.append([b * r + k for b in ids for k in range(r)])
        else:
            out.append(list(ids))
    return out


def time_upstream(d: EngineLayout, p: EngineLayout, d_ids: Any, p_ids: Any, reads: int,
                  repeat: int) -> dict[str, Any]:
    try:
        wd, wp = upstream_worker(d), upstream_worker(p)
    except Exception as exc:  # vLLM missing or changed: report, do not fail the bench
        return {"upstream_desc_ids_ms_median": None, "upstream_desc_ids_ms_p99": None,
                "upstream_error": f"{type(exc).__name__}: {exc}"}
    ud, up = upstream_ids(d, d_ids), upstream_ids(p, p_ids)

    def one_request() -> None:
        for _ in range(reads):
            wp._compute_desc_ids(up, p.num_phys_blocks, None, p.ratio)
            wd._compute_desc_ids(ud, d.num_phys_blocks, None, d.ratio)

    stats = _ms(_time(one_request, repeat))
    return {"upstream_desc_ids_ms_median": stats["median"],
            "upstream_desc_ids_ms_p99": stats["p99"]}


def _descs(plan: Any) -> int:
    """Build every read's descriptor arrays (they are made on first use)."""
    return sum(len(r.local_array) + len(r.remote_array) for r in plan.reads)


def run(args: argparse.Namespace, spec: HybridModelSpec, d: EngineLayout, p: EngineLayout,
        d_ids: Any, p_ids: Any) -> dict[str, Any]:
    """The ``--bench`` JSON object for one config, TP pair and token count."""
    samples: list[int] = []
    desc_samples: list[int] = []
    per_rank = []
    descriptors = 0
    merge = not args.no_merge
    n = args.num_tokens
    for rank in range(d.tp):
        pair = PairPlan.build(spec=spec, decode=d, prefill=p, decode_rank=rank)
        plan = pair.plan(d_ids, p_ids, n, merge=merge)
        descriptors += plan.descriptors
        # the engine's step: ids and bytes, bounds-checked (what the connector posts)
        took = _time(lambda pair=pair: pair.plan(d_ids, p_ids, n, merge=False), args.repeat)
        # plus descriptor arrays, merged unless --no-merge (a list-of-descriptors READ)
        desc_took = _time(lambda pair=pair: _descs(pair.plan(d_ids, p_ids, n, merge=merge)),
                          args.repeat)
        samples += took
        desc_samples += desc_took
        per_rank.append({"rank": rank, "plan_ms_median": _ms(took)["median"],
                         "descs_ms_median": _ms(desc_took)["median"],
                         "descriptors": plan.descriptors, "units": sum(
                             len(r.local_id_array) for r in plan.reads)})
    stats, desc_stats = _ms(samples), _ms(desc_samples)
    rank0 = PairPlan.build(spec=spec, decode=d, prefill=p, decode_rank=0)
    out = {
        "model_type": spec.model_type, "prefill_tp": p.tp, "decode_tp": d.tp,
        "num_tokens": n, "kernel_block_size": d.kernel_block_size,
        "block_size": d.block_size, "num_blocks": d.num_blocks, "merged": merge,
        "repeat": args.repeat,
        "plan_ms_median": stats["median"], "plan_ms_p99": stats["p99"],
        "descs_ms_median": desc_stats["median"], "descs_ms_p99": desc_stats["p99"],
        "descriptors_total": descriptors, "per_rank": per_rank,
    }
    out |= time_views(spec, d, p)
    out |= time_upstream(d, p, d_ids, p_ids, len(rank0.templates), args.repeat)
    return out


__all__ = ["run", "time_upstream", "time_views", "upstream_ids", "upstream_worker"]
