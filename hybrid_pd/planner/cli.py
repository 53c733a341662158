"""``hybrid-pd plan``: print the transfer plan of one request for every decode rank.

The only planner module that does I/O (reads the config file, prints).  Block ids are
synthetic but shaped like vLLM's: block 0 is the null block, the attention group takes
``ceil(N / block_size)`` consecutive blocks from 1, then each Mamba group one block.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hybrid_pd.planner.layout import ConvLayout, EngineLayout, build_engine_layout, cdiv
from hybrid_pd.planner.model_spec import HybridModelSpec, LayerKind, spec_from_hf_config
from hybrid_pd.planner.plan import plan_request
from hybrid_pd.planner.render import rank_costs, render_plan


def add_request_args(p: argparse.ArgumentParser) -> None:
    """The model, TP pair, token count and block sizes of one planned request; shared by
    ``hybrid-pd plan`` and ``hybrid-pd bench`` so the two always describe it alike."""
    p.add_argument("--config", required=True, help="Hugging Face config.json of the model")
    p.add_argument("--prefill-tp", type=int, required=True)
    p.add_argument("--decode-tp", type=int, required=True)
    p.add_argument("--num-tokens", type=int, required=True,
                   help="tokens whose state P has computed")
    p.add_argument("--kernel-block-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=None,
                   help="cache block size before HMA alignment (default: kernel block size)")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan",
        help="plan the KV/Mamba state reads of one request (pure; no vLLM, no NIXL)",
        description="Plan which bytes every decode rank reads from which prefill ranks.",
    )
    add_request_args(p)
    p.add_argument("--conv-layout", choices=[c.value for c in ConvLayout], default="DS")
    p.add_argument("--kv-dtype", default="bfloat16")
    p.add_argument("--conv-dtype", default="bfloat16")
    p.add_argument("--ssm-dtype", default="float32")
    p.add_argument("--no-merge", action="store_true", help="do not merge contiguous descriptors")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="blocks each engine registered (default: just enough for the request)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--bench", action="store_true",
                   help="time per-request planning, the dual views and upstream's descriptor "
                   "ids for this request; print one JSON object")
    p.add_argument("--repeat", type=int, default=50, help="timed repetitions per D rank (--bench)")
    p.set_defaults(func=run)


def synthetic_block_ids(layout: EngineLayout, num_tokens: int) -> tuple[tuple[int, ...], ...]:
    """Null block 0, attention blocks 1..n, then one block per Mamba group."""
    next_id = 1
    out = []
    for g in layout.hma_groups:
        n = cdiv(num_tokens, layout.block_size) if g.kind is LayerKind.ATTENTION else 1
        out.append(tuple(range(next_id, next_id + n)))
        next_id += n
    return tuple(out)


def _num_blocks(spec: HybridModelSpec, block_size: int, num_tokens: int) -> int:
    from hybrid_pd.planner.layout import hma_groups

    groups = hma_groups(spec)
    n_attn = sum(1 for g in groups if g.kind is LayerKind.ATTENTION)
    return 1 + n_attn * cdiv(num_tokens, block_size) + (len(groups) - n_attn) + 1


def request_case(args: argparse.Namespace) -> tuple[HybridModelSpec, EngineLayout, EngineLayout,
                                                   tuple, tuple]:
    """(spec, decode layout, prefill layout, D block ids, P block ids) of the request the
    arguments describe."""
    with open(args.config, encoding="utf-8") as f:
        cfg = json.load(f)
    spec = spec_from_hf_config(
        cfg, kv_dtype=args.kv_dtype, conv_dtype=args.conv_dtype, ssm_dtype=args.ssm_dtype
    )
    if args.num_tokens <= 0:
        raise ValueError(f"--num-tokens must be positive, got {args.num_tokens}")
    layouts = {}
    for role, tp in (("prefill", args.prefill_tp), ("decode", args.decode_tp)):
        probe = build_engine_layout(spec, tp, kernel_block_size=args.kernel_block_size,
                                    block_size=args.block_size, num_blocks=1,
                                    conv_layout=args.conv_layout)
        need = _num_blocks(spec, probe.block_size, args.num_tokens)
        num_blocks = getattr(args, "num_blocks", None) or need
        if num_blocks < need:
            raise ValueError(f"--num-blocks {num_blocks} cannot hold {args.num_tokens} tokens "
                             f"({need} blocks of {probe.block_size} needed)")
        layouts[role] = build_engine_layout(
            spec, tp, kernel_block_size=args.kernel_block_size, block_size=args.block_size,
            num_blocks=num_blocks, conv_layout=args.conv_layout,
        )
    d, p = layouts["decode"], layouts["prefill"]
    return spec, d, p, synthetic_block_ids(d, args.num_tokens), synthetic_block_ids(
        p, args.num_tokens)


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    spec, d, p, d_ids, p_ids = request_case(args)
    ranks = []
    totals = dict.fromkeys(
        ("bytes_total", "bytes_optimal", "bytes_padded", "bytes_upstream",
         "descriptors_total", "descriptors_upstream"), 0
    )
    renders = []
    for rank in range(d.tp):
        plan = plan_request(spec=spec, decode=d, prefill=p, decode_rank=rank,
                            decode_block_ids=d_ids, prefill_block_ids=p_ids,
                            num_tokens=args.num_tokens, merge=not args.no_merge)
        costs = rank_costs(spec, d, p, rank, args.num_tokens)
        renders.append(render_plan(plan))
        ranks.append({
            "rank": rank,
            "bytes": plan.bytes,
            "descriptors": plan.descriptors,
            "reads": [
                {"prefill_rank": r.prefill_rank, "bytes": r.bytes, "descriptors": r.descriptors}
                for r in plan.reads
            ],
        })
        totals["bytes_total"] += plan.bytes
        totals["descriptors_total"] += plan.descriptors
        totals["bytes_optimal"] += costs.bytes_optimal
        totals["bytes_padded"] += costs.bytes_padded
        totals["bytes_upstream"] += costs.bytes_upstream
        totals["descriptors_upstream"] += costs.descriptors_upstream
    return {
        "model_type": spec.model_type,
        "prefill_tp": p.tp,
        "decode_tp": d.tp,
        "num_tokens": args.num_tokens,
        "block_size": d.block_size,
        "kernel_block_size": d.kernel_block_size,
        "page_size_bytes": d.page_size_bytes,
        "prefill_block_size": p.block_size,
        "prefill_page_size_bytes": p.page_size_bytes,
        "mamba_state_bytes": d.mamba_state_bytes,
        "padding_bytes": d.padding_bytes,
        "num_regions": d.num_regions,
        "num_groups": len(d.hma_groups),
        "conv_layout": d.conv_layout.value,
        "merged": not args.no_merge,
        "decode_ranks": ranks,
        **totals,
        "_renders": renders,
    }


def run(args: argparse.Namespace) -> int:
    try:
        if getattr(args, "bench", False):
            if args.repeat <= 0:
                raise ValueError(f"--repeat must be positive, got {args.repeat}")
            # The timing lives with the benchmarks (it times upstream's vLLM code too);
            # the planner itself never imports vLLM.
            from hybrid_pd.bench import plan_timing

            print(json.dumps(plan_timing.run(args, *request_case(args))))
            return 0
        report = build_report(args)
    except (OSError, ValueError) as exc:
        msg = " ".join(str(exc).split())
        print(f"hybrid-pd plan: error: {msg}", file=sys.stderr)
        return 2
    renders = report.pop("_renders")
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"{report['model_type']}: P TP={report['prefill_tp']} -> D TP={report['decode_tp']}, "
        f"N={report['num_tokens']}, block {report['block_size']} (kernel "
        f"{report['kernel_block_size']}), page {report['page_size_bytes']} B"
    )
    for text in renders:
        print(text)
    print(
        f"total {report['bytes_total']} B in {report['descriptors_total']} descriptors; "
        f"optimal {report['bytes_optimal']} B; padded pages {report['bytes_padded']} B; "
        f"upstream {report['bytes_upstream']} B in {report['descriptors_upstream']} descriptors"
    )
    return 0
