"""Length-prefixed msgspec msgpack frames over a local socket (never pickle).

Used between the bench coordinator and its rank processes.  Every receive has a
timeout, so a dead or wedged peer ends in ``WireError`` instead of a hang.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgspec

_HEADER = struct.Struct("!I")
MAX_FRAME = 256 << 20
_ENC = msgspec.msgpack.Encoder()
_DEC = msgspec.msgpack.Decoder()


class WireError(RuntimeError):
    """The peer closed the socket, timed out, or sent a malformed frame."""


def send(sock: socket.socket, obj: Any) -> None:
    data = _ENC.encode(obj)
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int, who: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError as exc:
            raise WireError(f"{who}: no reply within {sock.gettimeout()} s") from exc
        except OSError as exc:
            raise WireError(f"{who}: socket error {exc}") from exc
        if not chunk:
            raise WireError(f"{who}: connection closed (process exited?)")
        buf += chunk
    return bytes(buf)


def recv(sock: socket.socket, timeout_s: float | None, who: str = "peer") -> Any:
    sock.settimeout(timeout_s)
    (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, who))
    if n > MAX_FRAME:
        raise WireError(f"{who}: frame of {n} B exceeds {MAX_FRAME} B")
    try:
        return _DEC.decode(_recv_exact(sock, n, who))
    except msgspec.DecodeError as exc:
        raise WireError(f"{who}: malformed frame ({exc})") from exc
