"""The bench's init message and the case every process derives identically from it.

The coordinator sends the init message (:func:`make_init`) to every rank process; each one
rebuilds the same :class:`BenchCase` (model spec, both engines' layouts, block ids, plans)
from it, so nothing but plain data crosses the socket.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from hybrid_pd.planner.layout import ConvLayout, EngineLayout, build_engine_layout, cdiv
from hybrid_pd.planner.model_spec import HybridModelSpec, LayerKind, spec_from_hf_config
from hybrid_pd.planner.plan import RequestPlan, plan_request


def make_init(
    config: dict[str, Any], *, prefill_tp: int, decode_tp: int, num_tokens: int,
    requests: int = 5, granularity: str = "request", kernel_block_size: int = 16,
    block_size: int | None = None, timeout_s: float = 30.0, num_threads: int = 0,
    mode: str = "prepped", seed: int = 1234, conv_layout: str = "DS",
    overrides: dict[str, dict[str, str]] | None = None, verbose: bool = False,
    env: dict[str, str] | None = None, telemetry: str = "off",
    telemetry_db: str | None = None,
) -> dict[str, Any]:
    """The init message every rank process receives (plain data: msgpack-able)."""
    return {
        "config": config, "prefill_tp": prefill_tp, "decode_tp": decode_tp,
        "num_tokens": num_tokens, "requests": requests, "granularity": granularity,
        "kernel_block_size": kernel_block_size, "block_size": block_size,
        "timeout_s": timeout_s, "num_threads": num_threads, "mode": mode, "seed": seed,
        "conv_layout": conv_layout, "overrides": overrides or {}, "verbose": verbose,
        "env": env or {}, "telemetry": telemetry, "telemetry_db": telemetry_db,
    }


@dataclass(frozen=True)
class BenchCase:
    spec: HybridModelSpec
    num_tokens: int
    seed: int
    prefill: EngineLayout
    decode: EngineLayout
    prefill_ids: tuple[tuple[int, ...], ...]
    decode_ids: tuple[tuple[int, ...], ...]
    plans: dict[int, RequestPlan]  # D rank -> merged plan (what `hybrid-pd plan` reports)
    unmerged_plans: dict[int, RequestPlan]  # D rank -> ids 1:1 with descriptors


def _block_ids(layout: EngineLayout, num_tokens: int, start: int) -> tuple[tuple[int, ...], ...]:
    """Attention blocks start.., then one block per Mamba group (block 0 stays null)."""
    nxt, out = start, []
    for g in layout.hma_groups:
        n = cdiv(num_tokens, layout.block_size) if g.kind is LayerKind.ATTENTION else 1
        out.append(tuple(range(nxt, nxt + n)))
        nxt += n
    return tuple(out)


def _layout(spec: HybridModelSpec, tp: int, init: dict[str, Any], start: int, n: int):
    conv = ConvLayout(init.get("conv_layout", "DS"))
    probe = build_engine_layout(spec, tp, kernel_block_size=init["kernel_block_size"],
                                block_size=init.get("block_size"), num_blocks=1,
                                conv_layout=conv)
    ids = _block_ids(probe, n, start)
    # +1: a spare block after the request's, so a write past them is caught.
    num_blocks = max(b for g in ids for b in g) + 2
    return replace(probe, num_blocks=num_blocks), ids


def build_case(init: dict[str, Any], role: str | None = None) -> BenchCase:
    """``role``'s view (its dtype / layout overrides applied, for handshake tests)."""
    over = dict(init.get("overrides", {}).get(role or "", {}))
    spec = spec_from_hf_config(init["config"], kv_dtype=over.get("kv_dtype"),
                               conv_dtype=over.get("conv_dtype"),
                               ssm_dtype=over.get("ssm_dtype"))
    n = int(init["num_tokens"])
    init = {**init, **{k: v for k, v in over.items() if k == "conv_layout"}}
    # P blocks from 1, D blocks from 2: ids differ per side, so a side mix-up shows.
    prefill, p_ids = _layout(spec, int(init["prefill_tp"]), init, 1, n)
    decode, d_ids = _layout(spec, int(init["decode_tp"]), init, 2, n)
    plans, unmerged = {}, {}
    for d in range(decode.tp):
        kw = dict(spec=spec, decode=decode, prefill=prefill, decode_rank=d,
                  decode_block_ids=d_ids, prefill_block_ids=p_ids, num_tokens=n)
        plans[d] = plan_request(**kw, merge=True)
        unmerged[d] = plan_request(**kw, merge=False)
    return BenchCase(spec, n, int(init.get("seed", 1234)), prefill, decode, p_ids, d_ids,
                     plans, unmerged)


__all__ = ["BenchCase", "build_case", "make_init"]
