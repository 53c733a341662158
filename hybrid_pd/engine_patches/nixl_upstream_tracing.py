"""Two instrumentors for upstream's ``NixlConnector`` (``--connector upstream``).

* ``nixl-upstream-read-path`` (behaviour): puts the shared READ path
  (:class:`~hybrid_pd.connector.read_path.ReadPathWorkerMixin`: one record per READ,
  upstream's polling, and the stall guard ``kv_connector_extra_config.
  hybrid_read_timeout_s``) in front of upstream's worker, so a stalled READ fails in
  bounded time with either connector, traced or not.  Closes a gap: vLLM 0.32 polls a
  stuck READ forever.
* ``nixl-upstream-tracing`` (spans only): puts
  :class:`~hybrid_pd.connector.vllm_tracing.TracedSchedulerMixin` /
  :class:`~hybrid_pd.connector.vllm_tracing.TracedWorkerMixin` in front, the same spans
  as our connector.  Closes a gap: vLLM's NIXL connector exports aggregate
  ``vllm:nixl_*`` metrics only, so upstream runs would be invisible in the dashboard.
  ``HYBRID_PD_TRACE_UPSTREAM=0`` turns this one off; the read path stays.

How (opentelemetry-python-contrib style, wrapt, reversible): both wrap
``NixlPullConnector.__init__`` and, after it built upstream's worker / scheduler, switch
its class to a subclass with the mixins in front.  Our own ``HybridNixlConnector`` has
both built in and is left alone.

Guards: the upstream methods the mixins wrap, with their parameters, and the attributes
they read are the ``tracing`` entries of :mod:`hybrid_pd.connector.contract` -- the same
manifest ``HybridNixlConnector`` is checked against.  Any difference skips the patch
(logged with each difference); an upstream object missing an attribute at construction
is left as upstream built it.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from typing import Any

from hybrid_pd.connector import contract
from hybrid_pd.engine_patches.base import EnginePatch
from hybrid_pd.settings import ENV_TRACE_UPSTREAM, VLLM_REQUIREMENT

logger = logging.getLogger("hybrid_pd.engine_patches")
_CONNECTOR = contract.OWNERS["connector"]
_INIT = contract.method("connector", "__init__")
_USERS = {contract.TRACING}


@cache
def _classes() -> dict[str, type]:
    """Upstream's worker/scheduler and the subclasses the two patches swap in: the read
    path alone (tracing off), the read path with spans, the traced scheduler."""
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_scheduler import (
        NixlPullConnectorScheduler,
    )
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_worker import (
        NixlPullConnectorWorker,
    )

    from hybrid_pd.connector.listener import ListenerSchedulerMixin
    from hybrid_pd.connector.quarantine import QuarantineSchedulerMixin
    from hybrid_pd.connector.read_path import ReadPathWorkerMixin
    from hybrid_pd.connector.reports import NotifySchedulerMixin
    from hybrid_pd.connector.vllm_tracing import TracedSchedulerMixin, TracedWorkerMixin

    def make(name: str, *bases: type, **ns: Any) -> type:
        return type(name, bases, {"__module__": __name__, **ns})

    return {
        "worker": NixlPullConnectorWorker,
        "scheduler": NixlPullConnectorScheduler,
        "read_path": make("ReadPathNixlPullConnectorWorker", ReadPathWorkerMixin,
                          NixlPullConnectorWorker),
        "traced": make("TracedNixlPullConnectorWorker", TracedWorkerMixin, ReadPathWorkerMixin,
                       NixlPullConnectorWorker, HY_CONNECTOR="upstream"),
        "q_scheduler": make("QuarantineNixlPullConnectorScheduler", QuarantineSchedulerMixin,
                            NotifySchedulerMixin, ListenerSchedulerMixin,
                            NixlPullConnectorScheduler),
        "traced_scheduler": make("TracedNixlPullConnectorScheduler", TracedSchedulerMixin,
                                 QuarantineSchedulerMixin, NotifySchedulerMixin,
                                 ListenerSchedulerMixin, NixlPullConnectorScheduler),
    }


def _applies_read_path() -> str | None:
    problems = contract.check_classes(users=_USERS)
    if problems:
        return "upstream NIXL connector differs from what the read path wraps: " + "; ".join(
            str(p) for p in problems)
    return None


def _applies() -> str | None:
    if os.environ.get(ENV_TRACE_UPSTREAM, "1") == "0":
        return f"disabled by {ENV_TRACE_UPSTREAM}=0"
    problems = contract.check_classes(users=_USERS)
    if problems:
        return "upstream NIXL connector differs from what the tracing mixins wrap: " + "; ".join(
            str(p) for p in problems)
    return None


def _swap(instance: Any, moves: dict[str, tuple[tuple[type, ...], type]], patch: str) -> bool:
    """Switch the class of the connector's worker / scheduler when it is exactly one of
    the accepted classes and has every attribute the mixins read (otherwise they would
    fail mid-transfer instead of staying as upstream built them); True if any moved."""
    targets = []
    problems = contract.check_instance(instance, "connector", users=_USERS)
    for role, (accept, new) in moves.items():
        obj = getattr(instance, f"connector_{role}", None)
        if obj is not None and type(obj) in accept:
            problems += contract.check_instance(obj, role, users=_USERS)
            targets.append((obj, new))
    if problems:
        logger.warning("hybrid-pd patch %s: upstream connector left as built: %s", patch,
                       "; ".join(str(p) for p in problems))
        return False
    for obj, new in targets:
        obj.__class__ = new
    return bool(targets)


def read_path_connector(instance: Any) -> bool:
    """Put the shared read path (polling records, stall guard, quarantine) in front of
    the worker upstream's ``NixlPullConnector.__init__`` just built, the quarantine's and
    the notification's scheduler halves in front of its scheduler, and hand the worker's
    reports to vLLM (``build_connector_worker_meta``, which upstream leaves at None)."""
    c = _classes()
    moved = _swap(instance, {"worker": ((c["worker"],), c["read_path"]),
                             "scheduler": ((c["scheduler"],), c["q_scheduler"])},
                  "nixl-upstream-read-path")
    worker = getattr(instance, "connector_worker", None)
    if moved and worker is not None:
        instance.build_connector_worker_meta = worker.hy_worker_report
    return moved


def trace_connector(instance: Any) -> bool:
    """Put the tracing mixins in front of the worker (with the read path, whose records
    the read spans come from) and the scheduler upstream just built."""
    c = _classes()
    return _swap(instance, {"worker": ((c["worker"], c["read_path"]), c["traced"]),
                            "scheduler": ((c["scheduler"], c["q_scheduler"]),
                                          c["traced_scheduler"])},
                 "nixl-upstream-tracing")


def _init_wrapper_factory(swap: Any) -> Any:
    def factory() -> Any:
        def wrapper(wrapped: Any, instance: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
            out = wrapped(*args, **kwargs)
            from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import (
                NixlPullConnector,
            )

            if type(instance) is NixlPullConnector:  # ours (a subclass) has both built in
                swap(instance)
            return out

        return wrapper

    return factory


PATCHES = [
    # Applied first, so its wrapper runs inside the tracing one: the read path is in
    # place before tracing puts its mixin in front of it.
    EnginePatch(
        name="nixl-upstream-read-path",
        closes="gap: vLLM's NixlConnector polls a stuck READ forever (no stall timeout); "
        "one read path for both connectors",
        description="the shared READ records, polling, stall guard "
        "(hybrid_read_timeout_s) and quarantine in front of upstream NixlConnector's worker "
        "and scheduler",
        requirement=VLLM_REQUIREMENT,
        module=_CONNECTOR.module,
        qualname=f"{_CONNECTOR.name}.{_INIT.name}",
        expected_params=_INIT.names,
        wrapper_factory=_init_wrapper_factory(read_path_connector),
        applies_when=_applies_read_path,
    ),
    EnginePatch(
        name="nixl-upstream-tracing",
        closes="gap: vLLM's NixlConnector has no per-request/per-READ spans (metrics only)",
        description="spans on upstream NixlConnector's descriptor builds, READs and leases",
        requirement=VLLM_REQUIREMENT,
        module=_CONNECTOR.module,
        qualname=f"{_CONNECTOR.name}.{_INIT.name}",
        expected_params=_INIT.names,
        wrapper_factory=_init_wrapper_factory(trace_connector),
        applies_when=_applies,
    ),
]
