"""The bench's process group: P_TP prefill and D_TP decode rank processes
(``python -m hybrid_pd.bench.worker``) on loopback, driven over one local socket each.

The coordinator relays the ranks' handshake metadata (msgspec msgpack over the socket,
never pickle) and sends them commands.  :class:`BenchSession` keeps the processes up so
tests can run several requests, fault injections and granularities against one process
group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from hybrid_pd.bench.case import build_case
from hybrid_pd.transfer import wire

STARTUP_TIMEOUT_S = 180.0  # process start + torch/NIXL import + fill, on a loaded 2-core box


class BenchError(RuntimeError):
    pass


@dataclass
class _Proc:
    role: str
    rank: int
    popen: subprocess.Popen[bytes]
    sock: socket.socket | None = None
    handshake: bytes = b""
    baseline: tuple[int, int] = (0, 0)

    @property
    def who(self) -> str:
        return f"{self.role} rank {self.rank} (pid {self.popen.pid})"


@dataclass
class BenchSession:
    """P_TP + D_TP rank processes with exchanged handshakes.  Use as a context manager:
    the processes are stopped, then killed, on exit - also on errors."""

    init: dict[str, Any]
    procs: list[_Proc] = field(default_factory=list)
    refused: str = ""  # handshake refusal message, if a D rank refused a peer

    def __enter__(self) -> BenchSession:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def prefill(self) -> list[_Proc]:
        return [p for p in self.procs if p.role == "prefill"]

    @property
    def decode(self) -> list[_Proc]:
        return [p for p in self.procs if p.role == "decode"]

    # -- start ----------------------------------------------------------------------
    def _start(self) -> None:
        self.init.setdefault("run_id", uuid.uuid4().hex[:8])
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        try:
            self._spawn(*srv.getsockname())
            self._accept(srv)
        finally:
            srv.close()
        for p in self.procs:
            assert p.sock is not None
            wire.send(p.sock, self.init)
        self._exchange()

    def _spawn(self, host: str, port: int) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.init.get("env", {})}
        env.setdefault("NIXL_LOG_LEVEL", "WARN")
        log = None if self.init.get("verbose") else subprocess.DEVNULL
        for role, tp in (("prefill", self.init["prefill_tp"]), ("decode", self.init["decode_tp"])):
            for rank in range(int(tp)):
                cmd = [sys.executable, "-m", "hybrid_pd.bench.worker",
                       host, str(port), role, str(rank)]
                popen = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
                self.procs.append(_Proc(role, rank, popen))

    def _accept(self, srv: socket.socket) -> None:
        """Each rank's connection, matched by its hello; the short accept timeout lets a
        rank that exited before connecting fail the start long before the deadline."""
        by_key = {(p.role, p.rank): p for p in self.procs}
        srv.settimeout(5.0)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        pending = len(self.procs)
        while pending:
            if time.monotonic() > deadline:
                raise BenchError(f"rank processes did not connect within {STARTUP_TIMEOUT_S} s")
            for p in self.procs:
                if p.sock is None and p.popen.poll() is not None:
                    raise BenchError(f"{p.who} exited with {p.popen.returncode} at start")
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            hello = wire.recv(conn, 30, "rank process")
            p = by_key[(hello["hello"], int(hello["rank"]))]
            p.sock = conn
            pending -= 1

    def reconfigure(self, **changes: Any) -> None:
        """New model / N / layout in the same processes (agents kept, regions rebuilt,
        handshakes redone): process start is the expensive part on 2 cores."""
        self.init.update(changes)
        for p in self.procs:
            assert p.sock is not None
            wire.send(p.sock, {**self.init, "op": "setup"})
        self._exchange()

    def _exchange(self) -> None:
        for p in self.procs:
            reply = self._recv(p, STARTUP_TIMEOUT_S)
            p.handshake = reply["handshake"]
            p.baseline = (int(reply["baseline"][0]), int(reply["baseline"][1]))
        msg = {
            "op": "peers",
            "handshakes": [p.handshake for p in self.prefill],
            "baselines": {str(p.rank): p.baseline[0] for p in self.prefill},
        }
        replies = self.broadcast(self.decode, msg, check=False)
        self.refused = "\n".join(r["error"] for r in replies if not r.get("ok"))

    # -- messages -------------------------------------------------------------------
    def _recv(self, p: _Proc, timeout: float, check: bool = True) -> dict[str, Any]:
        assert p.sock is not None
        try:
            reply = wire.recv(p.sock, timeout, p.who)
        except wire.WireError as exc:
            raise BenchError(str(exc)) from exc
        if check and not reply.get("ok"):
            raise BenchError(f"{reply.get('error')}\n{reply.get('trace', '')}")
        return reply

    def broadcast(self, procs: list[_Proc], msg: dict[str, Any], timeout: float = 120.0,
                  check: bool = True) -> list[dict[str, Any]]:
        """Send to all first, then collect: the ranks work concurrently."""
        for p in procs:
            assert p.sock is not None
            wire.send(p.sock, msg)
        return [self._recv(p, timeout, check) for p in procs]

    # -- requests -------------------------------------------------------------------
    def read(self, request_id: str, kind: str, *, per_layer: bool = False,
             timeout_s: float | None = None, telemetry: bool = True, integrity: str = "off",
             integrity_src: dict[str, dict[str, bytes]] | None = None) -> list[dict[str, Any]]:
        """One READ of every D rank.  ``integrity``: the policy each D rank applies to
        ``request_id`` (a selected request is digested after the READ and compared with
        ``integrity_src``, P rank -> D rank -> encoded digest; see :meth:`source_digests`)."""
        msg: dict[str, Any] = {"op": "read", "request_id": request_id, "kind": kind,
                               "per_layer": per_layer, "telemetry": telemetry}
        if timeout_s is not None:
            msg["timeout_s"] = timeout_s
        if integrity != "off":
            msg["integrity"] = integrity
            msg["integrity_src"] = integrity_src or {}
        wait = (timeout_s or float(self.init["timeout_s"])) + 60.0
        return self.broadcast(self.decode, msg, timeout=wait)

    def source_digests(self, request_id: str, integrity: str,
                       flip: str = "") -> list[dict[str, Any]]:
        """Every P rank's digests of the sources it serves for ``request_id`` (empty
        where its ``integrity`` policy does not select the request).  ``flip`` (tests
        only, ``"LAYER:VIEW"``): each P rank then flips one byte of the first source
        descriptor so labelled, after its digest; :meth:`restore_sources` undoes it."""
        return self.broadcast(self.prefill, {"op": "digest", "request_id": request_id,
                                             "integrity": integrity, "flip": flip})

    def restore_sources(self) -> None:
        self.broadcast(self.prefill, {"op": "restore"})

    def lease(self, request_ids: list[str], lease_s: float) -> None:
        case = build_case(self.init)
        for p in self.prefill:
            readers = sum(1 for plan in case.plans.values()
                          if p.rank in plan.prefill_ranks)
            self.broadcast([p], {"op": "lease", "request_ids": request_ids,
                                 "readers": readers, "lease_s": lease_s})

    def leases(self, wait_s: float = 5.0) -> dict[int, dict[str, str]]:
        replies = self.broadcast(self.prefill, {"op": "leases", "wait_s": wait_s},
                                 timeout=wait_s + 30)
        return {p.rank: r["leases"] for p, r in zip(self.prefill, replies, strict=True)}

    # -- stop -----------------------------------------------------------------------
    def kill(self, role: str, rank: int, sig: int = signal.SIGKILL) -> None:
        for p in self.procs:
            if p.role == role and p.rank == rank:
                p.popen.send_signal(sig)

    def close(self) -> None:
        """Ask each process to stop, then kill what is left (only our own children)."""
        for p in self.procs:
            if p.sock is not None and p.popen.poll() is None:
                try:
                    wire.send(p.sock, {"op": "stop"})
                except OSError:
                    pass
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(timeout=10)
            if p.sock is not None:
                p.sock.close()
                p.sock = None


__all__ = ["STARTUP_TIMEOUT_S", "BenchError", "BenchSession"]
