"""Planning cost does not grow with the prompt: the number of Python-level function
calls of one request's planning (and of building the dual views) is the same at 1x and
16x the tokens (blocks) -- the work that grows is numpy array arithmetic.  Wall-clock
goals live in ``hybrid-pd plan --bench``, not here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from hybrid_pd.planner import cli
from hybrid_pd.planner.pair import PairPlan
from hybrid_pd.planner.views import dual_view, to_addr_descs

CONFIG = Path(__file__).parent / "data" / "nemotron-h-8b.config.json"


def python_calls(fn: Callable[[], object]) -> int:
    """Python function calls (frames entered) while ``fn`` runs."""
    count = 0

    def prof(frame: object, event: str, arg: object) -> None:
        nonlocal count
        if event == "call":
            count += 1

    fn()  # first call: lazy imports and caches are not the planner's cost
    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def case(prefill_tp: int, decode_tp: int, num_tokens: int, num_blocks: int | None = None):
    args = argparse.Namespace(
        config=str(CONFIG), prefill_tp=prefill_tp, decode_tp=decode_tp, num_tokens=num_tokens,
        kernel_block_size=16, block_size=None, conv_layout="DS", kv_dtype="bfloat16",
        conv_dtype="bfloat16", ssm_dtype="float32", num_blocks=num_blocks)
    return cli.request_case(args)


def with_descriptors(plan):
    """The plan with every read's descriptor arrays built (they are made on first use)."""
    for r in plan.reads:
        assert len(r.local_array) == len(r.remote_array)
    return plan


def test_engine_step_builds_no_descriptor_arrays():
    """The connector's per-request step needs ids and bytes only: the (units, 3)
    descriptor arrays are not built until asked for, and then equal the units."""
    spec, d, p, d_ids, p_ids = case(1, 1, 8_192)
    plan = PairPlan.build(spec=spec, decode=d, prefill=p, decode_rank=0).plan(
        d_ids, p_ids, 8_192, merge=False)
    (read,) = plan.reads
    assert "_desc_arrays" not in vars(read)
    assert read.bytes == int(read.local_array[:, 1].sum()) > 0
    assert len(read.local_array) == len(read.local_id_array)


@pytest.mark.parametrize(("p_tp", "d_tp"), [(1, 1), (2, 4), (4, 2)])
@pytest.mark.parametrize("merge", [True, False])
def test_request_planning_calls_do_not_grow_with_tokens(p_tp, d_tp, merge):
    calls, units = {}, {}
    for n in (8_192, 131_072):
        spec, d, p, d_ids, p_ids = case(p_tp, d_tp, n)
        pair = PairPlan.build(spec=spec, decode=d, prefill=p, decode_rank=d_tp - 1)
        calls[n] = python_calls(lambda pair=pair, d_ids=d_ids, p_ids=p_ids, n=n:
                                with_descriptors(pair.plan(d_ids, p_ids, n, merge=merge)))
        units[n] = sum(len(r.local_id_array) for r in pair.plan(d_ids, p_ids, n).reads)
    assert units[131_072] > 10 * units[8_192]  # the request really is 16x the work
    assert calls[131_072] == calls[8_192], calls


def test_dual_views_calls_do_not_grow_with_blocks():
    calls, rows = {}, {}
    for blocks in (100, 1_600):  # logical blocks: x65 kernel blocks each in this layout
        spec, d, p, _, _ = case(1, 1, 1_000, num_blocks=blocks)
        (t,) = PairPlan.build(spec=spec, decode=d, prefill=p, decode_rank=0).templates
        lens = (d.region_bytes,) * d.num_regions
        bases = [i * d.region_bytes for i in range(d.num_regions)]

        def build(d=d, t=t, lens=lens, bases=bases) -> int:
            return len(to_addr_descs(dual_view(d, t, "local"), bases, lens))

        calls[blocks] = python_calls(build)
        rows[blocks] = build()
    assert rows[1_600] == 16 * rows[100]
    assert calls[1_600] == calls[100], calls
