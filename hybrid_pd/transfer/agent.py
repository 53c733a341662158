"""NIXL agent set-up shared by every user of the transfer package."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def make_agent(name: str, *, num_threads: int = 0, capture_telemetry: bool = True) -> Any:
    """A UCX-backed NIXL agent.  ``num_threads`` 0: NIXL's progress runs on the caller's
    thread; on a 2-core box UCX worker threads starved everything (4 stalled handshakes
    15-30 s here)."""
    from nixl._api import nixl_agent, nixl_agent_config

    cfg = nixl_agent_config(
        backends=["UCX"], capture_telemetry=capture_telemetry, num_threads=num_threads
    )
    return nixl_agent(name, cfg)


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


__all__ = ["addr_array", "buffer_span", "make_agent"]
