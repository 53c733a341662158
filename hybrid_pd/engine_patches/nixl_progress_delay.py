"""``nixl-progress-delay``: let NIXL's UCX progress thread sleep when there is nothing to do.

The gap (NIXL 1.5.1, Python API): ``nixl_agent.__init__`` hard-codes
``agent_config.pthrDelay = 0``, so every agent's progress thread polls its UCX workers
without ever blocking.  Measured on this 2-core box (``scripts/nixl_idle_cpu.py``): one
idle agent takes a full core (3.0 CPU-s in 3 s); with the delay at 1 ms, 0.08 CPU-s, and
a 64 KiB READ from an idle peer is no slower (median 0.005 vs 0.012 ms).  A P TP2 + D
TP1 pair has three agents, i.e. three spinning threads on two cores beside the engines:
D's handshake and READ posts stalled 30-120 s (until P's engine stepped again, at the
latest at its KV lease expiry) in 5 of 8 runs of the heterogeneous-TP e2e test.  With the
patch, ``tests/e2e/test_hybrid_connector.py`` took 363 s instead of 812 s.

What it does: wraps the ``NixlWrapper`` name vLLM's NIXL worker constructs its agent
through (``base_worker.NixlWrapper``, i.e. ``nixl_agent``) so the agent is built through
:func:`hybrid_pd.transfer.agent.new_agent` (the bench's agents are too): its progress
thread waits on UCX's event fd for up to the delay instead of spinning.  Applies to both
connectors (ours and ``--connector upstream``), so comparisons stay fair.  ``HYBRID_PD_NIXL_PROGRESS_DELAY_US`` sets the
delay (``0``: NIXL's own behaviour).
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import logging
from collections.abc import Callable
from typing import Any

from hybrid_pd.engine_patches.base import EnginePatch
from hybrid_pd.settings import (
    DEFAULT_NIXL_PROGRESS_DELAY_US,
    ENV_NIXL_PROGRESS_DELAY_US,
    VLLM_REQUIREMENT,
)
from hybrid_pd.transfer.agent import new_agent, progress_delay_us

logger = logging.getLogger("hybrid_pd.engine_patches")

# NIXL releases this was measured on; another one may have fixed (or moved) the knob.
NIXL_VERSIONS = ("1.5.",)


def _nixl_version() -> str | None:
    for dist in ("nixl", "nixl-cu12", "nixl-cu13"):
        with contextlib.suppress(md.PackageNotFoundError):
            return md.version(dist)
    return None


def _applies() -> str | None:
    version = _nixl_version()
    if version is None:
        return "NIXL is not installed"
    if not version.startswith(NIXL_VERSIONS):
        return (f"NIXL {version} is not one this patch was measured on "
                f"({', '.join(v + 'x' for v in NIXL_VERSIONS)})")
    return None


def _wrapper_factory() -> Callable[..., Any]:
    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        delay = progress_delay_us()
        agent = new_agent(wrapped, *args, delay_us=delay, **kwargs)
        logger.info("NIXL agent %s: progress thread delay %d us", getattr(agent, "name", "?"),
                    delay)
        return agent

    return wrapper


PATCHES = [
    EnginePatch(
        name="nixl-progress-delay",
        closes="NIXL 1.5.1's Python API fixes the progress thread delay at 0: each agent's "
               "progress thread spins a full core while idle",
        description="vLLM's NIXL agents get a progress-thread delay "
                    f"({ENV_NIXL_PROGRESS_DELAY_US}, default {DEFAULT_NIXL_PROGRESS_DELAY_US} us)",
        requirement=VLLM_REQUIREMENT,
        module="vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker",
        qualname="NixlWrapper",
        expected_params=("agent_name", "nixl_conf", "instantiate_all"),
        wrapper_factory=_wrapper_factory,
        applies_when=_applies,
    ),
]
