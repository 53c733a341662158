"""Instrumentor for upstream's ``NixlConnector``: the same spans as our connector.

Closes a gap, not a bug: vLLM 0.32's NIXL connector exports aggregate
``vllm:nixl_*`` metrics only -- no per-request or per-READ spans -- so ``--connector
upstream`` runs would be invisible in the dashboard and could not be compared with ours.

How (opentelemetry-python-contrib style, wrapt, reversible): ``NixlPullConnector.__init__``
is wrapped; after it built upstream's scheduler or worker, their class is switched to a
subclass with :class:`~hybrid_pd.connector.vllm_tracing.TracedSchedulerMixin` /
:class:`~hybrid_pd.connector.vllm_tracing.TracedWorkerMixin` in front (no behaviour
change besides spans; the READ stall timeout only acts when
``kv_connector_extra_config.hybrid_read_timeout_s`` is set).  Our own
``HybridNixlConnector`` already has them and is left alone.  ``HYBRID_PD_TRACE_UPSTREAM=0``
turns this one patch off.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

from hybrid_pd.engine_patches.base import EnginePatch

_MOD = "vllm.distributed.kv_transfer.kv_connector.v1.nixl"
# upstream methods the mixins wrap: a rename upstream must stop the patch, not break it
_WORKER_METHODS = (
    "_build_fa_local", "_build_mamba_local", "_build_fa_remote", "_build_mamba_remote",
    "add_remote_agent", "_nixl_handshake", "start_load_kv", "_read_blocks_for_req",
    "_compute_desc_ids", "_read_blocks", "_log_failure", "_pop_done_transfers",
    "get_transfer_results", "_reap_expired_send_leases", "_handle_failed_transfer",
)
_SCHEDULER_METHODS = ("request_finished", "build_connector_meta")


@cache
def _traced_classes() -> tuple[type, type]:
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_scheduler import (
        NixlPullConnectorScheduler,
    )
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_worker import (
        NixlPullConnectorWorker,
    )

    from hybrid_pd.connector.vllm_tracing import TracedSchedulerMixin, TracedWorkerMixin

    worker = type("TracedNixlPullConnectorWorker", (TracedWorkerMixin, NixlPullConnectorWorker),
                  {"HY_CONNECTOR": "upstream", "__module__": __name__})
    sched = type("TracedNixlPullConnectorScheduler",
                 (TracedSchedulerMixin, NixlPullConnectorScheduler), {"__module__": __name__})
    return worker, sched


def _applies() -> str | None:
    if os.environ.get("HYBRID_PD_TRACE_UPSTREAM", "1") == "0":
        return "disabled by HYBRID_PD_TRACE_UPSTREAM=0"
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_scheduler import (
            NixlPullConnectorScheduler,
        )
        from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_worker import (
            NixlPullConnectorWorker,
        )
    except ImportError as exc:
        return f"NIXL connector not importable: {exc}"
    missing = [m for m in _WORKER_METHODS if not hasattr(NixlPullConnectorWorker, m)]
    missing += [m for m in _SCHEDULER_METHODS if not hasattr(NixlPullConnectorScheduler, m)]
    return f"upstream NIXL connector lacks {missing}" if missing else None


def _init_wrapper_factory() -> Any:
    def wrapper(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        out = wrapped(*args, **kwargs)
        from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlPullConnector

        if type(instance) is NixlPullConnector:  # ours (a subclass) traces itself
            worker_cls, sched_cls = _traced_classes()
            w, s = instance.connector_worker, instance.connector_scheduler
            if w is not None and type(w) is worker_cls.__mro__[2]:  # exactly upstream's
                w.__class__ = worker_cls
            if s is not None and type(s) is sched_cls.__mro__[2]:
                s.__class__ = sched_cls
        return out

    return wrapper


PATCHES = [
    EnginePatch(
        name="nixl-upstream-tracing",
        closes="gap: vLLM's NixlConnector has no per-request/per-READ spans (metrics only)",
        description="spans on upstream NixlConnector's descriptor builds, READs and leases",
        requirement="vllm>=0.32,<0.33",
        module=f"{_MOD}.connector",
        qualname="NixlPullConnector.__init__",
        expected_params=("self", "vllm_config", "role", "kv_cache_config"),
        wrapper_factory=_init_wrapper_factory,
        applies_when=_applies,
    ),
]
