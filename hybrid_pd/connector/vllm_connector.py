"""``HybridNixlConnector``: vLLM's NIXL pull connector with our descriptors and reads.

Load it with ``--kv-transfer-config '{"kv_connector": "HybridNixlConnector",
"kv_connector_module_path": "hybrid_pd.connector.vllm_connector", ...}'`` (or
``hybrid-pd serve --connector hybrid``).  Nothing in site-packages is edited.

What stays upstream's (vLLM 0.32 ``kv_connector/v1/nixl``): the scheduler side
(``NixlPullConnectorScheduler``: N-1 prefill, leases, heartbeats, request
bookkeeping), the side-channel handshake and compatibility hash, memory registration,
notifications, failure handling, and ``NixlKVConnectorStats`` (NIXL telemetry ->
``vllm:nixl_*`` metrics).

The worker is four layers, front to back:

* :class:`~.vllm_tracing.TracedWorkerMixin` - spans only, no NIXL calls;
* :class:`~.integrity.IntegrityWorkerMixin` - KV integrity digests (``--kv-integrity``,
  off by default): P digests, D digests and compares before it reports the KV loaded;
* :class:`~.read_path.ReadPathWorkerMixin` - the READ records, polling and stall guard
  shared with ``hybrid-pd bench`` (behaviour; also in front of upstream's worker);
* :class:`~.hybrid_worker.HybridWorkerCore` - our layout, pair plans and reads.

Every upstream method these override and every private attribute they read is listed
in :mod:`.contract` and checked when the connector is built: a vLLM that differs is
refused with what differs, before anything runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import (
    NixlBaseConnector,
    NixlPullConnector,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_scheduler import (
    NixlPullConnectorScheduler,
)

from hybrid_pd.connector import contract
from hybrid_pd.connector.handover import D_SCHED_KEY, HandoverSchedulerMixin
from hybrid_pd.connector.hybrid_worker import HybridWorkerCore
from hybrid_pd.connector.integrity import IntegritySchedulerMixin, IntegrityWorkerMixin
from hybrid_pd.connector.listener import ListenerSchedulerMixin
from hybrid_pd.connector.quarantine import QuarantineSchedulerMixin
from hybrid_pd.connector.read_path import ReadPathWorkerMixin
from hybrid_pd.connector.reports import NotifySchedulerMixin, WorkerReport
from hybrid_pd.connector.stats import P_SCHED_KEY, HybridKVConnectorStats, HybridPromMetrics
from hybrid_pd.connector.vllm_tracing import TracedSchedulerMixin, TracedWorkerMixin

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


class HybridNixlWorker(TracedWorkerMixin, IntegrityWorkerMixin, ReadPathWorkerMixin,
                       HybridWorkerCore):
    """Our worker: spans, integrity digests, then the shared read path, then our core."""

    HY_CONNECTOR = "hybrid"


class HybridNixlScheduler(TracedSchedulerMixin, IntegritySchedulerMixin, HandoverSchedulerMixin,
                          QuarantineSchedulerMixin, NotifySchedulerMixin, ListenerSchedulerMixin,
                          NixlPullConnectorScheduler):
    """Upstream's pull scheduler, forwarding each request's trace hand-off to the workers,
    and the block lists of requests selected for integrity digests (:mod:`.integrity`),
    timing the handover (:mod:`.handover`), withholding the blocks of quarantined READs
    (:mod:`.quarantine`) and stepping until P's notification for a refused request went
    out (:mod:`.reports`), and failing start-up when the side channel cannot listen
    (:mod:`.listener`)."""


class HybridNixlConnector(NixlPullConnector):
    """Thin facade: upstream's pull scheduler, our worker."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig):
        contract.require()  # version + every hook's upstream signature, before building
        # (the worker checks its own attributes right after upstream's __init__)
        # Skip NixlPullConnector.__init__, which would build (and start) upstream's worker.
        NixlBaseConnector.__init__(self, vllm_config, role, kv_cache_config)
        if role == KVConnectorRole.SCHEDULER:
            self.connector_scheduler = HybridNixlScheduler(
                vllm_config, self.engine_id, kv_cache_config
            )
            self.connector_worker = None
            contract.require(scheduler=self.connector_scheduler, classes=False)
        elif role == KVConnectorRole.WORKER:
            self.connector_scheduler = None
            self.connector_worker = HybridNixlWorker(vllm_config, self.engine_id, kv_cache_config)
        else:
            raise ValueError(f"unsupported KVConnectorRole: {role}")

    def build_connector_worker_meta(self) -> WorkerReport | None:
        """The worker's news this step (vLLM hands it to the scheduler)."""
        return self.connector_worker.hy_worker_report() if self.connector_worker else None

    # upstream: NixlBaseConnector.get_kv_connector_stats (extended to the scheduler side)
    def get_kv_connector_stats(self) -> HybridKVConnectorStats | None:
        sched = self.connector_scheduler
        if not isinstance(sched, HandoverSchedulerMixin):
            return super().get_kv_connector_stats()  # type: ignore[return-value]
        d_rows, p_rows = sched.hy_handover_take()
        if not d_rows and not p_rows:
            return None
        stats = HybridKVConnectorStats()
        stats.data[D_SCHED_KEY], stats.data[P_SCHED_KEY] = d_rows, p_rows
        return stats

    # upstream: NixlBaseConnector.build_kv_connector_stats (classmethod, replaced)
    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> HybridKVConnectorStats | None:
        return HybridKVConnectorStats(data=data) if data is not None else HybridKVConnectorStats()

    # upstream: NixlBaseConnector.build_prom_metrics (classmethod, replaced)
    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: Any, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> HybridPromMetrics:
        return HybridPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


__all__ = ["HybridNixlConnector", "HybridNixlScheduler", "HybridNixlWorker"]
