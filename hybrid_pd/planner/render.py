"""Accounting and rendering: reference byte / descriptor counts for one D rank (what
a plan is measured against) and the text form of a plan for logs and assertion
messages."""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_pd.planner.descs import RequestPlan
from hybrid_pd.planner.layout import EngineLayout, cdiv
from hybrid_pd.planner.model_spec import HybridModelSpec
from hybrid_pd.planner.templates import peer_templates


@dataclass(frozen=True)
class RankCosts:
    """Reference byte / descriptor counts for one D rank (see planner.cli for the JSON)."""

    bytes_optimal: int
    bytes_padded: int
    bytes_upstream: int
    descriptors_upstream: int


def optimal_bytes(spec: HybridModelSpec, decode: EngineLayout, num_tokens: int,
                  mamba_blocks_per_group: int = 1) -> int:
    """The least bytes one D rank needs for ``num_tokens``: FA ``ceil(N/kb)`` kernel blocks x
    the rank's heads, Mamba its conv + ssm share (arithmetic only: the connector calls it
    per request)."""
    n_kb = cdiv(num_tokens, decode.kernel_block_size)
    return (len(spec.attention_layers) * n_kb * decode.kernel_block_bytes
            + len(spec.mamba_layers) * mamba_blocks_per_group * decode.mamba_state_bytes)


def rank_costs(
    spec: HybridModelSpec,
    decode: EngineLayout,
    prefill: EngineLayout,
    decode_rank: int,
    num_tokens: int,
    mamba_blocks_per_group: int = 1,
) -> RankCosts:
    """Optimal: :func:`optimal_bytes`.  Padded: whole D pages of the same blocks.  Upstream (vLLM 0.32): every
    kernel block of every logical block, per-peer runs unmerged (FA one per head slice,
    two in the split layout; Mamba conv + ssm at equal TP, x/B/C + ssm otherwise)."""
    templates = peer_templates(spec, decode, prefill, decode_rank)
    n_fa = len(spec.attention_layers)
    n_mamba = len(spec.mamba_layers)
    n_logical = cdiv(num_tokens, decode.block_size)
    kb_bytes_owned = decode.kernel_block_bytes  # the rank's heads, K and V
    mamba_bytes = decode.mamba_state_bytes
    fa_runs = sum(len(t.fa_runs) for t in templates)
    m_runs = sum(len(t.mamba_runs) for t in templates)
    return RankCosts(
        bytes_optimal=optimal_bytes(spec, decode, num_tokens, mamba_blocks_per_group),
        bytes_padded=(n_fa * n_logical + n_mamba * mamba_blocks_per_group)
        * decode.page_size_bytes,
        bytes_upstream=n_fa * n_logical * decode.ratio * kb_bytes_owned
        + n_mamba * mamba_blocks_per_group * mamba_bytes,
        descriptors_upstream=n_fa * n_logical * decode.ratio * fa_runs
        + n_mamba * mamba_blocks_per_group * m_runs,
    )


def render_plan(plan: RequestPlan, max_descs: int = 8) -> str:
    """Text rendering for logs and assertion messages."""
    lines = [
        f"RequestPlan D rank {plan.decode_rank}/{plan.decode_tp} <- P TP {plan.prefill_tp}: "
        f"{plan.num_tokens} tokens, {plan.num_kernel_blocks} kernel blocks per attention "
        f"layer, {plan.bytes} B in {plan.descriptors} descriptors"
        f"{' (merged)' if plan.merged else ''}"
    ]
    for r in plan.reads:
        lines.append(
            f"  read P rank {r.prefill_rank}: {r.bytes} B, {r.descriptors} descriptors "
            f"({len(r.local_id_array)} unmerged)"
        )
        head_l, head_r = r.local_array[:max_descs].tolist(), r.remote_array[:max_descs].tolist()
        for dl, dr in zip(head_l, head_r, strict=True):
            lines.append(
                f"    D region {dl[2]} +{dl[0]} <- P region {dr[2]} +{dr[0]} len {dl[1]}"
            )
        if r.descriptors > max_descs:
            lines.append(f"    ... {r.descriptors - max_descs} more")
    return "\n".join(lines)


__all__ = ["RankCosts", "rank_costs", "render_plan"]
