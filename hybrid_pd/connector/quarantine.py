"""Quarantine: D's blocks of a READ that the stall guard gave up stay out of vLLM's free
pool until NIXL says that READ has ended.

Why (measured with NIXL 1.5.1, UCX over TCP, ``scripts/late_read_probe.py``): releasing
the handle of a READ still in flight returns OK but does not cancel it, and neither does
removing the peer's agent (``check_xfer_state`` then raises NIXL_ERR_NOT_FOUND at once,
yet all 4 MiB still land once the frozen P resumes).  Kept unreleased, the handle says
DONE within 0.01 s of P resuming (the bytes landed) or raises
NIXL_ERR_REMOTE_DISCONNECT within 0.02 s of P's death (nothing landed).  So:

* worker (:class:`QuarantineWorkerMixin`, every D rank): at the read timeout the request
  fails at once through upstream's failure path, but its handle is kept and polled once
  per engine step; only DONE, ERR or a remote disconnect releases it.  While a handle is
  held its peer counts as busy, so upstream never removes that agent (which would not
  cancel the READ either).  Each step's changes reach the scheduler in the step's
  :class:`~.reports.WorkerReport` (``held`` / ``cleared``).
* scheduler (:class:`QuarantineSchedulerMixin`): the failed request is finished (its
  client gets the error now), but its ``finished_recving`` -- which is what makes vLLM
  free the blocks of a request that ended while waiting for its KV -- is withheld until
  every rank cleared it.  vLLM keeps such a request in its table and keeps stepping, so
  the clearance is seen without new traffic.

A dead P does not always say so: in some runs of ``tests/e2e/test_faults.py`` NIXL kept
READs from a SIGKILLed P (whole process group gone) in PROC for good.  So while a READ is
held, D also asks the kernel about P every :data:`PROBE_INTERVAL_S`: a TCP connect to P's
NIXL side channel (the engine's handshake listener).  Refused means P's engine process is
gone (its UCX worker with it), so nothing more can land and the handle is released.  A
frozen P still accepts (the kernel completes the connection), an unreachable one times
out after :data:`PROBE_TIMEOUT_S`: both keep the hold.

Cost, the safe side by choice: the blocks stay out of use until P resumes or dies; a P
that stays frozen (or unreachable) for good holds them (and keeps D stepping) for good.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

from hybrid_pd.connector.reports import WorkerReport, pending_report
from hybrid_pd.transfer.reads import ReadResult, held_read_ended, now_ns, release

logger = logging.getLogger("hybrid_pd.connector")

PROBE_INTERVAL_S = 2.0  # how often a held READ's peer is probed
PROBE_TIMEOUT_S = 0.05  # a connect that takes longer: unreachable, keep holding


@dataclass
class _Held:
    req_id: str
    engine_id: str | None
    rec: ReadResult
    since_ns: int
    peer: tuple[str, int] | None = None  # P's side channel (host, port)
    probed: float = 0.0


def peer_gone(peer: tuple[str, int] | None) -> bool:
    """True only when P's side channel refuses a TCP connection: its process is gone.
    Accepted, timed out or unreachable: not known to be gone."""
    if peer is None:
        return False
    try:
        socket.create_connection(peer, timeout=PROBE_TIMEOUT_S).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


class QuarantineWorkerMixin:
    """Worker side, in front of upstream's pull worker (through the read path)."""

    @property
    def hy_held(self) -> dict[Any, _Held]:
        """Held READ handle -> what it belongs to."""
        held = self.__dict__.get("_hy_held")
        if held is None:
            held = self.__dict__["_hy_held"] = {}
        return held

    def _hy_rank(self) -> int:
        return int(getattr(self, "tp_rank", 0))

    def hy_hold(self, req_id: str, handle: Any, rec: ReadResult) -> None:
        """Keep a given-up READ's handle (and so its request's blocks) until it ends."""
        w: Any = self
        meta = w._recving_metadata.get(req_id)
        remote = getattr(meta, "remote", None)
        engine = getattr(remote, "engine_id", None) or rec.peer_engine or None
        host, port = getattr(remote, "host", None), getattr(remote, "port", None)
        peer = (host, int(port)) if isinstance(host, str) and isinstance(port, int) else None
        self.hy_held[handle] = _Held(req_id, engine, rec, now_ns(), peer, time.monotonic())
        pending_report(self).held.add((self._hy_rank(), req_id))
        logger.warning("hybrid connector: req %s: READ from engine %s given up; its blocks "
                       "stay held until NIXL reports the READ ended", req_id, engine)

    def hy_poll_held(self) -> None:
        """One poll of every held handle (once per engine step)."""
        w: Any = self
        held = self.hy_held
        for handle, h in list(held.items()):
            how = held_read_ended(w.nixl_wrapper, handle)
            if how is None and time.monotonic() - h.probed >= PROBE_INTERVAL_S:
                h.probed = time.monotonic()
                if peer_gone(h.peer):
                    how = "peer's side channel refuses connections: its process is gone"
            if how is None:
                continue
            del held[handle]
            err = release(w.nixl_wrapper, handle)
            waited = (now_ns() - h.since_ns) / 1e9
            logger.warning("hybrid connector: req %s: %s %.1f s after it was given up%s",
                           h.req_id, how, waited, f"; handle release failed: {err}" if err else "")
            if not any(x.req_id == h.req_id for x in held.values()):
                pending_report(self).cleared.add((self._hy_rank(), h.req_id))

    # upstream: NixlBaseConnectorWorker._engines_with_inflight_transfers (extended)
    def _engines_with_inflight_transfers(self) -> set[str]:
        busy = set(super()._engines_with_inflight_transfers())  # type: ignore[misc]
        return busy | {h.engine_id for h in self.hy_held.values() if h.engine_id}


class QuarantineSchedulerMixin:
    """Scheduler side, in front of upstream's pull scheduler."""

    def _hy_q_state(self) -> tuple[dict[str, set[int]], set[str]]:
        st = self.__dict__.get("_hy_q_sched")
        if st is None:
            st = self.__dict__["_hy_q_sched"] = ({}, set())
        return st

    def hy_holds(self, req_id: str) -> bool:
        return bool(self._hy_q_state()[0].get(req_id))

    # upstream: NixlBaseConnectorScheduler.update_connector_output (extended)
    def update_connector_output(self, connector_output: Any) -> None:
        holding, withheld = self._hy_q_state()
        report = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(report, WorkerReport):
            for rank, req in report.held:
                holding.setdefault(req, set()).add(rank)
            for rank, req in report.cleared:
                holding.get(req, set()).discard(rank)
        finished = set(connector_output.finished_recving or ())
        for req in list(finished):
            if holding.get(req):
                finished.discard(req)
                withheld.add(req)
        for req in list(withheld):
            if not holding.get(req):
                withheld.discard(req)
                finished.add(req)
        for req in [r for r, ranks in holding.items() if not ranks and r not in withheld]:
            del holding[req]
        connector_output.finished_recving = finished or None
        super().update_connector_output(connector_output)  # type: ignore[misc]


__all__ = ["QuarantineSchedulerMixin", "QuarantineWorkerMixin"]
