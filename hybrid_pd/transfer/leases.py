"""P side of the bench's transfers: block leases freed by D's notifications or by time.

Inside vLLM the same rule is upstream's (``kv_lease_duration``, heartbeats); this table
is what ``hybrid-pd bench``'s prefill ranks run, with the notification format the
executor sends: ``done:<request_id>`` or ``fail:<request_id>:<reason>``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass
class Lease:
    request_id: str
    readers: int  # D ranks expected to report
    deadline_ns: int
    done: int = 0
    freed: str = ""  # "" while held; else "done" | "fail: <reason>" | "lease expired"


class LeaseTable:
    """P holds a request's blocks until every D reader says done (or one says fail), or
    until the lease expires - so a dead or stalled D never pins P's blocks forever."""

    def __init__(self) -> None:
        self.leases: dict[str, Lease] = {}

    def add(self, request_id: str, readers: int, lease_s: float) -> None:
        self.leases[request_id] = Lease(
            request_id, readers, time.monotonic_ns() + int(lease_s * 1e9)
        )

    def on_notif(self, msg: bytes) -> None:
        text = msg.decode(errors="replace")
        kind, _, rest = text.partition(":")
        rid, _, reason = rest.partition(":")
        lease = self.leases.get(rid)
        if lease is None or lease.freed:
            return
        if kind == "done":
            lease.done += 1
            if lease.done >= lease.readers:
                lease.freed = "done"
        elif kind == "fail":
            lease.freed = f"fail: {reason}"

    def poll(self, agent: Any) -> None:
        for msgs in agent.get_new_notifs().values():
            for m in msgs:
                self.on_notif(m)
        now = time.monotonic_ns()
        for lease in self.leases.values():
            if not lease.freed and now > lease.deadline_ns:
                lease.freed = "lease expired"

    def held(self) -> list[str]:
        return [r for r, lease in self.leases.items() if not lease.freed]


__all__ = ["Lease", "LeaseTable"]
