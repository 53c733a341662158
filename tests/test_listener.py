"""The side-channel listener guard, on vLLM's own scheduler code: a taken port fails the
engine's start naming the port (upstream waits forever), a free one serves handshakes."""

from __future__ import annotations

import socket
import threading

import msgspec
import pytest
import zmq
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_scheduler import GET_META_MSG
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import NixlHandshakePayload
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_scheduler import (
    NixlPullConnectorScheduler,
)

from hybrid_pd.connector.listener import ListenerSchedulerMixin, SideChannelError
from hybrid_pd.connector.vllm_connector import HybridNixlScheduler


class Guarded(ListenerSchedulerMixin, NixlPullConnectorScheduler):
    pass


def scheduler(cls: type, port: int) -> NixlPullConnectorScheduler:
    # only what set_xfer_handshake_metadata reads (upstream's __init__ needs a VllmConfig)
    s = object.__new__(cls)
    s._nixl_handshake_listener_t = None
    s._stop_event = threading.Event()
    s.side_channel_host, s.side_channel_port = "127.0.0.1", port
    return s


PAYLOAD = {(0, 0): NixlHandshakePayload(compatibility_hash="h", agent_metadata_bytes=b"m")}


def call(s: NixlPullConnectorScheduler) -> BaseException | None:
    """set_xfer_handshake_metadata on a thread: returns its error, or a hang marker."""
    out: list[BaseException | None] = []

    def run() -> None:
        try:
            s.set_xfer_handshake_metadata(PAYLOAD)
            out.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    return out[0] if out else TimeoutError("set_xfer_handshake_metadata still waiting")


@pytest.fixture
def taken_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_taken_port_fails_start_naming_the_port(taken_port: int) -> None:
    err = call(scheduler(Guarded, taken_port))
    assert isinstance(err, SideChannelError), err
    assert f"127.0.0.1:{taken_port}" in str(err) and "side-channel-port" in str(err)


def test_upstream_alone_waits_forever_on_a_taken_port(taken_port: int) -> None:
    """What the guard exists for: without it the same call never returns."""
    s = scheduler(NixlPullConnectorScheduler, taken_port)
    assert isinstance(call(s), TimeoutError)


def test_free_port_serves_handshakes() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    s = scheduler(Guarded, port)
    assert call(s) is None
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send_multipart((b"", msgspec.msgpack.encode((GET_META_MSG, 0, 0))))
        _, data, _ts = sock.recv_multipart()
        assert msgspec.msgpack.decode(data) == msgspec.msgpack.decode(
            msgspec.msgpack.encode(PAYLOAD[(0, 0)]))
        sock.close(0)
    finally:
        s._stop_event.set()
        s._nixl_handshake_listener_t.join(5)
        ctx.term()


def test_the_engine_scheduler_has_the_guard() -> None:
    assert issubclass(HybridNixlScheduler, ListenerSchedulerMixin)
