"""What D's workers tell the scheduler each engine step, through vLLM's worker ->
scheduler metadata channel (``KVConnectorWorkerMetadata``, aggregated over ranks), and
the notification half of it.

A :class:`WorkerReport` carries (D rank, request id) pairs:

* ``held`` / ``cleared``: a given-up READ's handle was quarantined / has ended
  (:mod:`.quarantine`);
* ``notified``: the notification that frees P's blocks went out for a request that
  ended before its KV was read -- refused by D's server after P prefilled (vLLM's
  rejected-request path), or aborted while queued.

Why the last (measured, ``tests/e2e/test_hybrid_load.py``): vLLM queues that notification
for the worker's next engine step, but an engine with nothing else to do steps once
more and then idles; on a pair whose handshake was not done yet, the handshake ends
after that step, so the notification waited for the next request and P kept the blocks
until its lease (still held after 10 s; lease 120 s).  :class:`NotifySchedulerMixin`
keeps the engine stepping (``has_pending_push_work``, vLLM's keep-alive hook) until
every D rank reported the notification sent, or :data:`NOTIFY_PENDING_MAX_S` passed
(a handshake that fails never sends it; P's lease frees the blocks then).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata

from hybrid_pd.settings import DEFAULT_HANDSHAKE_TIMEOUT_S

logger = logging.getLogger("hybrid_pd.connector")

Key = tuple[int, str]  # (D rank, vLLM request id)
# Longest the engine keeps stepping for one notification: a cold handshake's own bound
# (vLLM's wait as our patch sets it) and as long again for the step after it.
NOTIFY_PENDING_MAX_S = 2 * DEFAULT_HANDSHAKE_TIMEOUT_S


@dataclass
class WorkerReport(KVConnectorWorkerMetadata):
    """One engine step's news from the D ranks (vLLM aggregates the ranks' reports)."""

    held: set[Key] = field(default_factory=set)
    cleared: set[Key] = field(default_factory=set)
    notified: set[Key] = field(default_factory=set)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, WorkerReport):
            return WorkerReport(self.held | other.held, self.cleared | other.cleared,
                                self.notified | other.notified)
        return self

    def __bool__(self) -> bool:
        return bool(self.held or self.cleared or self.notified)


def pending_report(obj: Any) -> WorkerReport:
    """The report being gathered for this step on a worker (created on first use)."""
    report = obj.__dict__.get("_hy_report")
    if report is None:
        report = obj.__dict__["_hy_report"] = WorkerReport()
    return report


def take_report(obj: Any) -> WorkerReport | None:
    """This step's report for vLLM (None when there is no news), and a fresh one."""
    report = obj.__dict__.pop("_hy_report", None)
    return report if report else None


class NotifyWorkerMixin:
    """Worker side: reports each notify-only READ (no local block) once it was posted."""

    def _read_blocks(self, read_spec: Any, dst_engine_id: str, request_id: str,
                     *args: Any, **kwargs: Any) -> bool:
        ok = super()._read_blocks(read_spec, dst_engine_id, request_id,  # type: ignore[misc]
                                  *args, **kwargs)
        if not any(len(g) for g in read_spec.local_block_ids):
            pending_report(self).notified.add((int(getattr(self, "tp_rank", 0)), request_id))
        return ok


class NotifySchedulerMixin:
    """Scheduler side: keeps the engine stepping until a finished request's
    notification to P went out from every D rank (see the module doc)."""

    def _hy_notifying(self) -> dict[str, tuple[set[int], float]]:
        st = self.__dict__.get("_hy_notifying_reqs")
        if st is None:
            st = self.__dict__["_hy_notifying_reqs"] = {}
        return st

    # upstream: NixlPullConnectorScheduler.request_finished (wrapped)
    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict | None]:
        params = request.kv_transfer_params
        queued = bool(params and params.get("do_remote_prefill"))
        out = super().request_finished(request, block_ids)  # type: ignore[misc]
        w: Any = self
        if queued and request.request_id in w._reqs_need_recv:  # upstream's notify-only read
            self._hy_notifying()[request.request_id] = (set(), time.monotonic())
        return out

    # upstream: NixlBaseConnectorScheduler.has_pending_push_work (extended)
    def has_pending_push_work(self) -> bool:
        pending = self._hy_notifying()
        w: Any = self
        ranks = w.vllm_config.parallel_config.tensor_parallel_size
        now = time.monotonic()
        for req, (done, since) in list(pending.items()):
            if len(done) >= ranks:
                del pending[req]
            elif now - since > NOTIFY_PENDING_MAX_S:
                del pending[req]
                logger.warning("hybrid connector: req %s: P's notification not sent by all D "
                               "ranks within %.0f s; P's lease frees its blocks", req,
                               NOTIFY_PENDING_MAX_S)
        return bool(pending) or super().has_pending_push_work()  # type: ignore[misc]

    # upstream: NixlBaseConnectorScheduler.update_connector_output (extended)
    def update_connector_output(self, connector_output: Any) -> None:
        report = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(report, WorkerReport):
            pending = self._hy_notifying()
            for rank, req in report.notified:
                if req in pending:
                    pending[req][0].add(rank)
        super().update_connector_output(connector_output)  # type: ignore[misc]


__all__ = ["NOTIFY_PENDING_MAX_S", "NotifySchedulerMixin", "NotifyWorkerMixin", "WorkerReport",
           "pending_report", "take_report"]
