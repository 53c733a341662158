"""The quarantine's logic with fakes (the feature's own test is on real engines:
``tests/e2e/test_faults.py::test_late_read_cannot_corrupt_the_next_request``).

Worker: a READ given up at the read timeout is kept unreleased and polled each step;
only DONE, ERR or a remote disconnect release it; its peer counts as busy meanwhile.
Scheduler: a failed request's ``finished_recving`` (what frees its blocks in vLLM) is
withheld until every D rank that held a READ cleared it.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from test_vllm_tracing import FakeScheduler, Guarded, recv_meta

from hybrid_pd.connector import quarantine as q


class QScheduler(q.QuarantineSchedulerMixin, FakeScheduler):
    pass


def stalled(rank: int = 0) -> tuple[Guarded, int]:
    """A worker whose READ for req-1 was just given up by the stall guard."""
    w = Guarded(timeout=0.05)
    w.tp_rank = rank
    w.start_load_kv(recv_meta())
    (h,) = w._recving_transfers["req-1"]
    time.sleep(0.08)
    res = w.get_transfer_results()
    assert res.finished_recving == {"req-1"} and res.failed_recving == {"req-1"}
    return w, h


def out(finished: set[str] | None = None, meta: Any = None) -> Any:
    return SimpleNamespace(finished_recving=finished, kv_connector_worker_meta=meta)


@pytest.mark.parametrize(("state", "released"), [("PROC", False), ("DONE", True), ("ERR", True)])
def test_held_read_is_released_only_once_nixl_says_it_ended(state: str, released: bool) -> None:
    w, h = stalled()
    assert w.nixl_wrapper.released == [] and list(w.hy_held) == [h]
    assert w.hy_quarantine_report() == q.QuarantineReport({(0, "req-1")}, set())
    assert "prefill-engine" in w._engines_with_inflight_transfers()  # upstream keeps the agent
    w.nixl_wrapper.states[h] = state
    for _ in range(3):
        w.get_transfer_results()
    assert (w.nixl_wrapper.released == [h]) is released
    assert (h in w.hy_held) is not released
    report = w.hy_quarantine_report()
    assert report == (q.QuarantineReport(set(), {(0, "req-1")}) if released else None)
    assert ("prefill-engine" in w._engines_with_inflight_transfers()) is not released


@pytest.mark.parametrize(("exc", "ends"), [
    (type("nixlRemoteDisconnectError", (Exception,), {})("NIXL_ERR_REMOTE_DISCONNECT"), True),
    # what check_xfer_state says after remove_remote_agent: the READ still lands later
    (type("nixlNotFoundError", (Exception,), {})("NIXL_ERR_NOT_FOUND"), False),
    (RuntimeError("anything else"), False),
])
def test_only_a_remote_disconnect_error_ends_a_held_read(exc: Exception, ends: bool) -> None:
    class Raising:
        def check_xfer_state(self, h: int) -> str:
            raise exc

    assert (q._ended(Raising(), 1) is not None) is ends


def test_scheduler_withholds_finished_recving_until_every_rank_cleared() -> None:
    """D at TP 2: rank 0 gives up at step 1, rank 1 at step 2 (then vLLM's aggregator
    emits the request as finished + failed), rank 1 clears at step 3, rank 0 at step 4."""
    s = QScheduler()
    o = out(None, q.QuarantineReport({(0, "a")}, set()))
    s.update_connector_output(o)
    assert o.finished_recving is None and s.hy_holds("a")
    o = out({"a", "b"}, q.QuarantineReport({(1, "a")}, set()))
    s.update_connector_output(o)
    assert o.finished_recving == {"b"}  # b was never held: freed as usual
    o = out(None, q.QuarantineReport(set(), {(1, "a")}))
    s.update_connector_output(o)
    assert o.finished_recving is None  # rank 0 still holds a READ into a's blocks
    o = out({"c"}, q.QuarantineReport(set(), {(0, "a")}))
    s.update_connector_output(o)
    assert o.finished_recving == {"a", "c"} and not s.hy_holds("a")
    assert s.outputs[-1] is o  # upstream's update_connector_output still runs
    o = out({"a"})  # nothing left of a: a later report of it passes through
    s.update_connector_output(o)
    assert o.finished_recving == {"a"}


def test_cleared_before_the_request_is_emitted_is_not_withheld() -> None:
    s = QScheduler()
    s.update_connector_output(out(None, q.QuarantineReport({(0, "a")}, set())))
    s.update_connector_output(out(None, q.QuarantineReport(set(), {(0, "a")})))
    o = out({"a"})
    s.update_connector_output(o)
    assert o.finished_recving == {"a"}


def test_reports_aggregate_across_ranks() -> None:
    a = q.QuarantineReport({(0, "x")}, set())
    b = q.QuarantineReport(set(), {(1, "y")})
    assert a.aggregate(b) == q.QuarantineReport({(0, "x")}, {(1, "y")})
