"""``nixl-handshake-timeout``: D's wait for P's NIXL metadata, configurable.

The gap (vLLM 0.32): ``NixlBaseConnectorWorker._nixl_handshake`` waits a hard-coded 5 s
(``sock.setsockopt(zmq.RCVTIMEO, 5000)``) for each P rank's metadata.  On this 2-core box
with P at TP 2 (3 ranks on 2 cores) P's listener sometimes answers later; the waiting
request then failed with ``handshake_setup_failed`` and the client saw ``HTTP 500
Internal server error`` (3 of 4 first requests of ``hybrid-pd demo --prefill-tp 2``).

What it does: while one ``_nixl_handshake`` runs, the sockets it opens keep a receive
timeout of at least ``kv_connector_extra_config["hybrid_handshake_timeout_s"]`` (default
:data:`~hybrid_pd.settings.DEFAULT_HANDSHAKE_TIMEOUT_S`), and a timeout that does expire
is re-raised naming the peer, the wait and the key (vLLM logs it; the request fails as
before).  Applies to both connectors.  How: ``base_worker.zmq_ctx`` is swapped for the
duration of the call (the handshake runs on vLLM's one-thread handshake executor) for a
wrapper whose sockets raise RCVTIMEO to the configured value.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from hybrid_pd.engine_patches.base import EnginePatch
from hybrid_pd.settings import DEFAULT_HANDSHAKE_TIMEOUT_S, KEY_HANDSHAKE_TIMEOUT, VLLM_REQUIREMENT

logger = logging.getLogger("hybrid_pd.engine_patches")
_MODULE = "vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker"
_lock = threading.Lock()


class HandshakeTimeout(RuntimeError):
    """No metadata from a P rank within the configured wait."""


def handshake_timeout_s(extra: dict[str, Any] | None) -> float:
    """The configured wait in seconds (a clear error if the value is bad)."""
    value = (extra or {}).get(KEY_HANDSHAKE_TIMEOUT, DEFAULT_HANDSHAKE_TIMEOUT_S)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"kv_connector_extra_config.{KEY_HANDSHAKE_TIMEOUT}={value!r} is not "
                         "a number of seconds; give e.g. 30") from None
    if not 0 < seconds <= 3600:
        raise ValueError(f"kv_connector_extra_config.{KEY_HANDSHAKE_TIMEOUT}={value!r} must "
                         "be > 0 and <= 3600 seconds")
    return seconds


class _PatientSocket:
    """A zmq socket whose receive timeout never drops below ``min_ms``."""

    def __init__(self, sock: Any, min_ms: int) -> None:
        self._sock, self._min_ms = sock, min_ms

    def setsockopt(self, option: int, value: Any) -> None:
        import zmq

        if option == zmq.RCVTIMEO and isinstance(value, int) and value >= 0:
            value = max(value, self._min_ms)
        self._sock.setsockopt(option, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@contextlib.contextmanager
def patient_zmq(module: Any, min_ms: int) -> Iterator[None]:
    """While inside, ``module.zmq_ctx`` sockets keep RCVTIMEO >= ``min_ms``."""
    original = module.zmq_ctx

    @contextlib.contextmanager
    def zmq_ctx(socket_type: Any, addr: str) -> Iterator[Any]:
        with original(socket_type, addr) as sock:
            yield _PatientSocket(sock, min_ms)

    with _lock:
        module.zmq_ctx = zmq_ctx
        try:
            yield
        finally:
            module.zmq_ctx = original


def _wrapper_factory() -> Callable[..., Any]:
    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        import zmq

        extra = instance.vllm_config.kv_transfer_config.kv_connector_extra_config
        seconds = handshake_timeout_s(extra)
        host = args[0] if args else kwargs.get("host")
        port = args[1] if len(args) > 1 else kwargs.get("port")
        try:
            with patient_zmq(sys.modules[_MODULE], int(seconds * 1000)):
                return wrapped(*args, **kwargs)
        except zmq.error.Again as exc:
            raise HandshakeTimeout(
                f"no NIXL metadata from the prefill engine's side channel {host}:{port} within "
                f"{seconds:g} s: is it up and reachable from here? (wait: "
                f"kv_connector_extra_config.{KEY_HANDSHAKE_TIMEOUT})") from exc

    return wrapper


PATCHES = [
    EnginePatch(
        name="nixl-handshake-timeout",
        closes="vLLM 0.32 waits a fixed 5 s for P's NIXL metadata (RCVTIMEO 5000 in "
               "_nixl_handshake): on a loaded P the first request fails",
        description=f"D's handshake wait is kv_connector_extra_config.{KEY_HANDSHAKE_TIMEOUT} "
                    f"(default {DEFAULT_HANDSHAKE_TIMEOUT_S:g} s), and its expiry names the peer",
        requirement=VLLM_REQUIREMENT,
        module=_MODULE,
        qualname="NixlBaseConnectorWorker._nixl_handshake",
        expected_params=("self", "host", "port", "remote_tp_size", "expected_engine_id",
                         "remote_dcp_size", "remote_pp_size", "notif_agents_only"),
        wrapper_factory=_wrapper_factory,
    ),
]
