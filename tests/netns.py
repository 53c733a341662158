"""Hosts as network namespaces, for multi-host tests (importable as ``netns``).

:class:`Hosts` makes a P host and a D host: each joined to the root namespace (where
the test and the router run) by its own veth pair, and to each other by a third, so
the P-D link (NIXL's side channel and UCX's TCP traffic) can go down while both stay
reachable from the router.  Addresses come from 10.213.0.0/16, a private range these
tests choose, one /24 per link; nothing routes beyond the links the test made.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass

PREFIX = "10.213"


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run the tests as root"
    if shutil.which("ip") is None:
        return "the ip command (Debian's iproute2) is missing; bash scripts/setup.sh installs it"
    probe = f"hpdprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(("-n", ns) if ns else ()), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


def _free_subnets(n: int) -> list[str]:
    """``n`` unused /24s of the range (none of this machine's addresses in them)."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    out = []
    for third in range(11, 250):
        net = f"{PREFIX}.{third}"
        if f" {net}." not in used:
            out.append(net)
            if len(out) == n:
                return out
    raise RuntimeError(f"no free /24 left in {PREFIX}.0.0/16")


@dataclass(frozen=True)
class Host:
    ns: str
    addr: str  # reached from the root namespace (the router)
    peer_addr: str  # on the P-D link
    peer_dev: str  # the P-D link's device in this namespace

    def command(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]


class Hosts:
    """Two namespaces, ``p`` and ``d``; a context manager that removes everything."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:5]
        self._ns = (f"hpd{tag}p", f"hpd{tag}d")
        a, b, c = _free_subnets(3)
        self.p = Host(self._ns[0], f"{a}.2", f"{c}.1", f"hpd{tag}x")
        self.d = Host(self._ns[1], f"{b}.2", f"{c}.2", f"hpd{tag}y")
        self._root_devs = (f"hpd{tag}a", f"hpd{tag}b")
        self._nets = (a, b)

    def __enter__(self) -> Hosts:
        try:
            for ns in self._ns:
                _ip("netns", "add", ns)
                _ip("link", "set", "lo", "up", ns=ns)  # vLLM's own ranks talk over loopback
            for host, root_dev, net in zip((self.p, self.d), self._root_devs, self._nets,
                                           strict=True):
                inner = root_dev + "i"
                _ip("link", "add", root_dev, "type", "veth", "peer", "name", inner)
                _ip("link", "set", inner, "netns", host.ns)
                _ip("addr", "add", f"{net}.1/24", "dev", root_dev)
                _ip("link", "set", root_dev, "up")
                _ip("addr", "add", f"{host.addr}/24", "dev", inner, ns=host.ns)
                _ip("link", "set", inner, "up", ns=host.ns)
            _ip("link", "add", self.p.peer_dev, "type", "veth", "peer", "name", self.d.peer_dev)
            for host in (self.p, self.d):
                _ip("link", "set", host.peer_dev, "netns", host.ns)
                _ip("addr", "add", f"{host.peer_addr}/24", "dev", host.peer_dev, ns=host.ns)
                _ip("link", "set", host.peer_dev, "up", ns=host.ns)
        except BaseException:
            self.__exit__()
            raise
        return self

    def link(self, up: bool) -> None:
        """The P-D link up or down (P's end; D's end follows: a veth pair has one carrier)."""
        _ip("link", "set", self.p.peer_dev, "up" if up else "down", ns=self.p.ns)

    def __exit__(self, *exc: object) -> None:
        for ns in self._ns:  # deleting a namespace deletes its veths and their peers
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for dev in self._root_devs:
            subprocess.run(["ip", "link", "del", dev], capture_output=True)
