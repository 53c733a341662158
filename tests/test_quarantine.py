"""The worker -> scheduler reports with fakes: the quarantine and the notification of a
request that ended unread (the features' own tests are on real engines:
``tests/e2e/test_faults.py::test_late_read_cannot_corrupt_the_next_request`` and
``tests/e2e/test_hybrid_load.py::test_request_d_refuses_after_p_prefilled_frees_p_at_once``).

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
from hybrid_pd.connector.reports import NotifySchedulerMixin, WorkerReport
from hybrid_pd.transfer.reads import held_read_ended


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
    assert w.hy_worker_report() == WorkerReport({(0, "req-1")}, set())
    assert "prefill-engine" in w._engines_with_inflight_transfers()  # upstream keeps the agent
    w.nixl_wrapper.states[h] = state
    for _ in range(3):
        w.get_transfer_results()
    assert (w.nixl_wrapper.released == [h]) is released
    assert (h in w.hy_held) is not released
    report = w.hy_worker_report()
    assert report == (WorkerReport(set(), {(0, "req-1")}) if released else None)
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

    assert (held_read_ended(Raising(), 1) is not None) is ends


def test_scheduler_withholds_finished_recving_until_every_rank_cleared() -> None:
    """D at TP 2: rank 0 gives up at step 1, rank 1 at step 2 (then vLLM's aggregator
    emits the request as finished + failed), rank 1 clears at step 3, rank 0 at step 4."""
    s = QScheduler()
    o = out(None, WorkerReport({(0, "a")}, set()))
    s.update_connector_output(o)
    assert o.finished_recving is None and s.hy_holds("a")
    o = out({"a", "b"}, WorkerReport({(1, "a")}, set()))
    s.update_connector_output(o)
    assert o.finished_recving == {"b"}  # b was never held: freed as usual
    o = out(None, WorkerReport(set(), {(1, "a")}))
    s.update_connector_output(o)
    assert o.finished_recving is None  # rank 0 still holds a READ into a's blocks
    o = out({"c"}, WorkerReport(set(), {(0, "a")}))
    s.update_connector_output(o)
    assert o.finished_recving == {"a", "c"} and not s.hy_holds("a")
    assert s.outputs[-1] is o  # upstream's update_connector_output still runs
    o = out({"a"})  # nothing left of a: a later report of it passes through
    s.update_connector_output(o)
    assert o.finished_recving == {"a"}


def test_cleared_before_the_request_is_emitted_is_not_withheld() -> None:
    s = QScheduler()
    s.update_connector_output(out(None, WorkerReport({(0, "a")}, set())))
    s.update_connector_output(out(None, WorkerReport(set(), {(0, "a")})))
    o = out({"a"})
    s.update_connector_output(o)
    assert o.finished_recving == {"a"}


def test_reports_aggregate_across_ranks() -> None:
    a = WorkerReport({(0, "x")}, set())
    b = WorkerReport(set(), {(1, "y")})
    assert a.aggregate(b) == WorkerReport({(0, "x")}, {(1, "y")})


# -- the notification of a request that ended before its KV was read -----------------


class UpstreamLike(FakeScheduler):
    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict | None]:
        params = request.kv_transfer_params
        if params.get("do_remote_prefill"):  # upstream: queue a notify-only read
            self._reqs_need_recv[request.request_id] = (request, [], (), False)
            params["do_remote_prefill"] = False
        return False, None


class NScheduler(NotifySchedulerMixin, UpstreamLike):
    pass


def finished(rid: str, **params: Any) -> Any:
    return SimpleNamespace(request_id=rid, kv_transfer_params=dict(params))


def test_engine_keeps_stepping_until_every_rank_sent_the_notification() -> None:
    s = NScheduler(tp=2)
    s.request_finished(finished("r", do_remote_prefill=True), ([],))
    s.request_finished(finished("plain"), ([],))  # a request that had no KV to read
    assert s.has_pending_push_work()
    s.update_connector_output(out(None, WorkerReport(notified={(0, "r")})))
    assert s.has_pending_push_work()  # rank 1 has not sent its notification yet
    s.update_connector_output(out(None, WorkerReport(notified={(1, "r")})))
    assert not s.has_pending_push_work()


def test_a_notification_never_sent_stops_keeping_the_engine_up(monkeypatch) -> None:
    from hybrid_pd.connector import reports

    clock = [100.0]
    monkeypatch.setattr(reports.time, "monotonic", lambda: clock[0])
    s = NScheduler()
    s.request_finished(finished("r", do_remote_prefill=True), ([],))
    assert s.has_pending_push_work()
    clock[0] += reports.NOTIFY_PENDING_MAX_S + 1  # e.g. the handshake failed
    assert not s.has_pending_push_work()


def test_worker_reports_notify_only_reads() -> None:
    w = Guarded()
    w._read_blocks(SimpleNamespace(remote_rank=0, local_block_ids=[[], []]), "prefill-engine",
                   "r", "remote-r", 1, None, 2, 1, True)
    w._read_blocks(SimpleNamespace(remote_rank=0, local_block_ids=[[1], []]), "prefill-engine",
                   "s", "remote-s", 1, None, 2, 1, True)
    assert w.hy_worker_report() == WorkerReport(notified={(0, "r")})
    assert w.hy_worker_report() is None  # taken: the next step starts empty


# -- a dead P that NIXL does not report --------------------------------------------


def test_peer_probe_says_gone_only_when_the_side_channel_refuses(monkeypatch) -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # a frozen P: the kernel still accepts
    port = listener.getsockname()[1]
    try:
        assert not q.peer_gone(("127.0.0.1", port))
    finally:
        listener.close()
    assert q.peer_gone(("127.0.0.1", port))  # the process (its listener) is gone
    assert not q.peer_gone(None)
    # unreachable (no answer within the timeout): not known to be gone, keep holding

    def silent(*_: Any, **__: Any) -> None:
        raise TimeoutError("timed out")

    monkeypatch.setattr(q.socket, "create_connection", silent)
    assert not q.peer_gone(("127.0.0.1", port))


def test_held_read_of_a_dead_peer_is_released(monkeypatch) -> None:
    w, h = stalled()
    (held,) = w.hy_held.values()
    held.peer = ("127.0.0.1", 1)
    monkeypatch.setattr(q, "PROBE_INTERVAL_S", 0.0)
    monkeypatch.setattr(q, "peer_gone", lambda peer: peer == ("127.0.0.1", 1))
    w.get_transfer_results()  # NIXL still says PROC; the probe says the peer is gone
    assert w.nixl_wrapper.released == [h] and not w.hy_held
    assert w.hy_worker_report().cleared == {(0, "req-1")}
