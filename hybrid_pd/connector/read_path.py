"""The READ path inside vLLM, for both connectors: the same records, polling and stall
guard that ``hybrid-pd bench`` drives (:mod:`hybrid_pd.transfer.reads`), in front of
upstream's pull worker.

:class:`ReadPathWorkerMixin` owns, per worker rank:

* a :class:`~hybrid_pd.transfer.reads.ReadResult` per posted READ handle (registered
  by our worker when it posts, or found after upstream's ``_read_blocks`` posted);
* ``_pop_done_transfers`` (replaces upstream's): one ``check_xfer_state`` per handle
  per engine step and NIXL's telemetry once on DONE (upstream's own calls, which also
  feed ``vllm:nixl_*``), plus the stall guard on the same poll - no extra NIXL call;
* the stall guard (``kv_connector_extra_config["hybrid_read_timeout_s"]``; absent,
  ``off`` or ``0``: no deadline): a READ still ``PROC`` that long after its post is
  reported through upstream's ``_handle_failed_transfer``, so vLLM's
  ``kv_load_failure_policy`` applies at once; its handle and blocks are quarantined
  (:mod:`.quarantine`) until NIXL reports that READ ended.

Behaviour only: nothing here records spans.  It calls ``_hy_read_finished(rec)`` for
every READ outcome and ``_hy_read_aborted(...)`` for every give-up; the tracing mixin
(:mod:`.vllm_tracing`) in front turns those into spans, and does no NIXL call itself.

Why a quarantine and not a release (measured, ``scripts/late_read_probe.py``): NIXL
1.5.1's release of an in-flight READ returns OK but does not cancel it over UCX/TCP -- a
P that was frozen (SIGSTOP) and resumes still delivers the bytes, which would land in D
blocks that meanwhile belong to another request.
"""

from __future__ import annotations

import logging
from typing import Any

from hybrid_pd.connector.quarantine import QuarantineWorkerMixin
from hybrid_pd.connector.reports import NotifyWorkerMixin, take_report
from hybrid_pd.settings import KEY_READ_TIMEOUT
from hybrid_pd.transfer.reads import ReadResult, StallGuard, now_ns, poll_read

logger = logging.getLogger("hybrid_pd.connector")

_OFF = ("off", "none", "0", "")


def stall_guard_from(extra: dict[str, Any] | None) -> StallGuard:
    """The guard configured in ``kv_connector_extra_config`` (a clear error if bad)."""
    value = (extra or {}).get(KEY_READ_TIMEOUT)
    if value is None or str(value).strip().lower() in _OFF or value == 0:
        return StallGuard(None)
    return StallGuard.parse(value, f"kv_connector_extra_config.{KEY_READ_TIMEOUT}")


class ReadPathWorkerMixin(QuarantineWorkerMixin, NotifyWorkerMixin):
    """Front of a ``NixlPullConnectorWorker`` (ours or upstream's); see the module doc.

    State is created lazily (``_hy_path``): the upstream tracing patch swaps this class
    in after upstream's ``__init__`` ran."""

    def _hy_path(self) -> dict[str, Any]:
        st = self.__dict__.get("_hy_read_path")
        if st is None:
            w: Any = self
            extra = getattr(w.vllm_config.kv_transfer_config, "kv_connector_extra_config", None)
            st = self.__dict__["_hy_read_path"] = {
                "guard": stall_guard_from(extra), "reads": {},
            }
        return st

    @property
    def hy_guard(self) -> StallGuard:
        return self._hy_path()["guard"]

    @property
    def hy_reads(self) -> dict[Any, ReadResult]:
        """Posted READ handle -> its record, until its outcome was reported."""
        return self._hy_path()["reads"]

    def hy_worker_report(self) -> Any:
        """This step's :class:`~.reports.WorkerReport` for vLLM (None: no news); vLLM
        asks once per step, after the transfer results (``build_connector_worker_meta``)."""
        return take_report(self)

    # -- hooks for the tracing layer (no-ops here) --------------------------------------
    def _hy_read_finished(self, rec: ReadResult) -> None:
        """A READ's outcome is known (DONE, ERR, exception, abort)."""

    def _hy_read_aborted(self, req_id: str, rec: ReadResult, t_abort: int) -> None:
        """The stall guard gave a READ up (its handle is now held, see .quarantine)."""

    # -- registering READs ------------------------------------------------------------------
    def hy_register_reads(self, request_id: str, started: list[tuple[Any, ReadResult]]) -> None:
        """Our worker's READs, posted through :func:`hybrid_pd.transfer.reads.post_reads`."""
        reads = self.hy_reads
        for handle, rec in started:
            rec.request_id = request_id
            reads[handle] = rec

    def _read_blocks(self, read_spec: Any, dst_engine_id: str, request_id: str,
                     *args: Any, **kwargs: Any) -> bool:
        """Upstream's (or ours); handles it posted that nobody registered get a record
        stamped now (upstream posts inside this call, so the stamp is within it)."""
        w: Any = self
        before = set(w._recving_transfers.get(request_id, ()))
        ok = super()._read_blocks(read_spec, dst_engine_id, request_id,  # type: ignore[misc]
                                  *args, **kwargs)
        reads = self.hy_reads
        t = now_ns()
        for h in w._recving_transfers.get(request_id, ()):
            if h not in before and h not in reads:
                reads[h] = ReadResult(read_spec.remote_rank, None, 0, 0, "PROC",
                                      t_post_ns=t, t_prev_poll_ns=t, request_id=request_id,
                                      peer_engine=dst_engine_id)
        return ok

    # -- polling (replaces upstream's NixlBaseConnectorWorker._pop_done_transfers) ---------
    def _pop_done_transfers(self, transfers: dict[str, list[int]]) -> tuple[set[str], set[str]]:
        """Upstream's contract: poll every handle once, release finished ones, return
        (requests with no handle left, requests that saw a failure); a failed handle NIXL
        would not release stays listed.  Plus the stall guard on the same poll."""
        self.hy_poll_held()
        done_req_ids: set[str] = set()
        failed_req_ids: set[str] = set()
        for req_id, handles in list(transfers.items()):
            in_progress = [h for h in handles
                           if self._hy_poll_one(req_id, h, failed_req_ids)]
            if not in_progress:
                done_req_ids.add(req_id)
                del transfers[req_id]
            else:
                transfers[req_id] = in_progress
        return done_req_ids, failed_req_ids

    def _hy_poll_one(self, req_id: str, handle: int, failed: set[str]) -> bool:
        """One handle, one poll.  True while the handle must stay listed."""
        w: Any = self
        reads = self.hy_reads
        rec = reads.get(handle)
        if rec is None:  # posted by code that bypassed _read_blocks: poll it all the same
            rec = reads[handle] = ReadResult(-1, None, 0, 0, "PROC", t_post_ns=now_ns(),
                                             request_id=req_id)
        try:
            raw = poll_read(w.nixl_wrapper, handle, rec)
        except Exception as e:
            rec.status, rec.t_end_ns = "ERR", now_ns()
            rec.reason = f"transfer_exception: {type(e).__name__}: {e}"[:200]
            w._log_failure(failure_type="transfer_exception", req_id=req_id, error=e)
            return self._hy_failed(req_id, handle, rec, failed)
        if rec.status == "DONE":
            w.xfer_stats.record_transfer(raw)
            w.nixl_wrapper.release_xfer_handle(handle)
            self._hy_finish(handle, rec)
            return False
        if rec.status == "ERR":
            rec.reason = "transfer_failed"  # upstream's failure type for a NIXL ERR state
            w._log_failure(failure_type="transfer_failed", req_id=req_id, xfer_state="ERR")
            return self._hy_failed(req_id, handle, rec, failed)
        now = rec.t_prev_poll_ns
        if self.hy_guard.expired(rec, now):
            return self._hy_stalled(req_id, handle, rec, failed, now)
        return True

    def _hy_failed(self, req_id: str, handle: int, rec: ReadResult, failed: set[str]) -> bool:
        w: Any = self
        released = w._handle_failed_transfer(req_id, handle, failed)
        self._hy_finish(handle, rec)
        return not released

    def _hy_stalled(self, req_id: str, handle: int, rec: ReadResult, failed: set[str],
                    now: int) -> bool:
        w: Any = self
        reason = self.hy_guard.reason(rec, now)
        w._log_failure(failure_type="transfer_stalled", req_id=req_id,
                       msg=f"{reason} ({KEY_READ_TIMEOUT}); the request fails, its blocks "
                           "stay held until NIXL reports the READ ended")
        # upstream's failure bookkeeping (metric, failed engine, failed request); the
        # handle is not released (that would not cancel the READ) but quarantined
        w._handle_failed_transfer(req_id, None, failed)
        rec.status, rec.t_end_ns = "TIMEOUT", now_ns()
        rec.reason = f"{reason}; blocks held until the READ ends"
        self.hy_hold(req_id, handle, rec)
        self._hy_read_aborted(req_id, rec, now)
        self._hy_finish(handle, rec)
        return False  # off the request's list: it fails now; the handle is held apart

    def _hy_finish(self, handle: int, rec: ReadResult) -> None:
        self.hy_reads.pop(handle, None)
        self._hy_read_finished(rec)


__all__ = ["ReadPathWorkerMixin", "stall_guard_from"]
