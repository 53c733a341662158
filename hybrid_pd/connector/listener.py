"""An engine whose NIXL side channel cannot listen fails its start, naming the port.

vLLM 0.32 starts the handshake listener on a thread and waits for its ``ready_event``
with no timeout.  When the ZMQ bind fails (the port is taken) the thread dies before
setting the event and the engine hangs in start-up forever: measured in a CI run, P
logged ``ZMQError: Address already in use`` and was still not healthy 600 s later.
:class:`ListenerSchedulerMixin` wakes the waiter when the thread fails and turns the
failure into an error that stops the engine's start-up (the supervisor then reports
the dead child with its log).
"""

from __future__ import annotations

import threading
from typing import Any


class SideChannelError(RuntimeError):
    """The side channel's listener failed before it was ready."""


class ListenerSchedulerMixin:
    """Scheduler side: ``set_xfer_handshake_metadata`` raises when the listener fails."""

    _hy_listener_error: BaseException | None = None

    # Upstream's is a staticmethod run as the thread's target through ``self``; as a
    # plain method here it can leave the failure where the waiting thread reads it.
    def _nixl_handshake_listener(self, encoded_data: dict, ready_event: threading.Event,
                                 stop_event: threading.Event, host: str, port: int) -> None:
        try:
            super()._nixl_handshake_listener(  # type: ignore[misc]
                encoded_data, ready_event, stop_event, host, port)
        except BaseException as exc:
            if not ready_event.is_set():
                self._hy_listener_error = SideChannelError(_message(host, port, exc))
                ready_event.set()  # after the error is stored: the waiter reads it next
            raise

    def set_xfer_handshake_metadata(self, metadata: Any) -> None:
        super().set_xfer_handshake_metadata(metadata)  # type: ignore[misc]
        err = self._hy_listener_error
        if err is not None:
            self._hy_listener_error = None
            self._nixl_handshake_listener_t = None  # dead; a later call may start it again
            raise err


def _message(host: str, port: int, exc: BaseException) -> str:
    return (f"the NIXL side channel could not listen on {host}:{port} ({exc}); "
            "another process holds that port: choose a free one "
            "(hybrid-pd serve --prefill-side-channel-port / --decode-side-channel-port, "
            "or VLLM_NIXL_SIDE_CHANNEL_PORT for a plain vllm serve)")


__all__ = ["ListenerSchedulerMixin", "SideChannelError"]
