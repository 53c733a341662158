"""NIXL agent set-up shared by every user of the transfer package."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from hybrid_pd.settings import DEFAULT_NIXL_PROGRESS_DELAY_US, ENV_NIXL_PROGRESS_DELAY_US

_config_lock = threading.Lock()


def progress_delay_us() -> int:
    """The progress-thread delay to give NIXL agents, microseconds (0: NIXL's own, which
    spins); a clear error if the variable is bad."""
    raw = os.environ.get(ENV_NIXL_PROGRESS_DELAY_US, str(DEFAULT_NIXL_PROGRESS_DELAY_US))
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_NIXL_PROGRESS_DELAY_US}={raw!r} is not a whole number of "
                         "microseconds; give e.g. 1000 (0: NIXL's default)") from None
    if value < 0:
        raise ValueError(f"{ENV_NIXL_PROGRESS_DELAY_US}={raw!r} must be >= 0")
    return value


@contextlib.contextmanager
def min_progress_delay(agent_cls: Any, delay_us: int) -> Iterator[None]:
    """While inside, agents of ``agent_cls`` (NIXL's ``nixl_agent``) are built with a
    progress-thread delay of at least ``delay_us``.

    Why: NIXL 1.5.1's ``nixl_agent.__init__`` assigns ``pthrDelay = 0``, so its UCX
    progress thread never blocks: an idle agent takes a full core (3.0 CPU-s in 3 s on
    this 2-core box, ``scripts/nixl_idle_cpu.py``).  With a delay the thread waits on
    UCX's event fd for up to that long; an event still wakes it at once.  How: the
    constructor's config class is swapped, for this one call, for a subclass whose
    ``pthrDelay`` never goes below the delay."""
    bindings = getattr(sys.modules[agent_cls.__module__], "nixlBind", None)
    base = getattr(bindings, "nixlAgentConfig", None)
    if base is None or not hasattr(base, "pthrDelay"):
        raise RuntimeError(f"{agent_cls.__module__} has no nixlBind.nixlAgentConfig.pthrDelay "
                           f"(NIXL changed); set {ENV_NIXL_PROGRESS_DELAY_US}=0")
    field = base.pthrDelay

    class _AtLeast(base):  # type: ignore[misc, valid-type]
        pthrDelay = property(field.__get__,
                             lambda self, v: field.__set__(self, max(int(v), delay_us)))

    with _config_lock:
        bindings.nixlAgentConfig = _AtLeast
        try:
            yield
        finally:
            bindings.nixlAgentConfig = base


def new_agent(agent_cls: Any, *args: Any, delay_us: int | None = None, **kwargs: Any) -> Any:
    """``agent_cls(*args, **kwargs)`` with the progress-thread delay (default: the
    configured one, :func:`progress_delay_us`)."""
    delay = progress_delay_us() if delay_us is None else delay_us
    if delay == 0:
        return agent_cls(*args, **kwargs)
    with min_progress_delay(agent_cls, delay):
        return agent_cls(*args, **kwargs)


def make_agent(name: str, *, num_threads: int = 0, capture_telemetry: bool = True,
               delay_us: int | None = None) -> Any:
    """A UCX-backed NIXL agent.  ``num_threads`` 0: no dedicated UCX worker threads (on
    a 2-core box 4 of them stalled handshakes 15-30 s); ``delay_us``: see
    :func:`min_progress_delay`."""
    from nixl._api import nixl_agent, nixl_agent_config

    cfg = nixl_agent_config(
        backends=["UCX"], capture_telemetry=capture_telemetry, num_threads=num_threads
    )
    return new_agent(nixl_agent, name, cfg, delay_us=delay_us)


def addr_array(descs: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """NIXL's Nx3 uint64 ``(addr, len, dev)`` array."""
    return np.asarray(descs, dtype=np.uint64).reshape(-1, 3)


def buffer_span(buf: Any) -> tuple[int, int]:
    """(address, bytes) of a contiguous torch tensor or numpy array."""
    if hasattr(buf, "data_ptr"):  # torch.Tensor (CPU or CUDA)
        if not buf.is_contiguous():
            raise ValueError("regions must be contiguous tensors")
        return int(buf.data_ptr()), int(buf.numel() * buf.element_size())
    arr = np.asarray(buf)
    if not arr.flags.c_contiguous:
        raise ValueError("regions must be C-contiguous arrays")
    return int(arr.ctypes.data), int(arr.nbytes)


__all__ = ["addr_array", "buffer_span", "make_agent", "min_progress_delay", "new_agent",
           "progress_delay_us"]
